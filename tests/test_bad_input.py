"""Bad input to `embedtune sweep`, one kind per test: each stops before any work with exit code 2
and one line that names the field, file or value and what would fix it, and writes nothing (no
run dir, no Ray temp dir, nothing beside the inputs). `embedtune train`'s own table of bad inputs
is in test_cli_train.py; spec validation details in test_config.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

GOOD = {
    "name": "bad-input",
    "datasets": [{"name": "medquad", "source": "medquad-sample", "max_pairs": 200, "eval_size": 30}],
    "models": ["paraphrase-MiniLM-L3-v2"],
    "search": {"mode": "grid", "epochs": [1], "batch_size": [16]},
    "ray": {"num_gpus": 0},
}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _with_data(**dataset) -> dict:
    return {**GOOD, "datasets": [{"name": "d", **dataset}]}


def _case(name: str, d: Path) -> tuple[str | dict, str]:
    """(spec text or mapping, text the one error line must contain) for bad-input kind `name`."""
    pairs = [
        {"question": f"What is condition {i}?", "answer": f"Condition {i} is a disease of organ {i}."}
        for i in range(40)
    ]
    if name == "malformed YAML":
        return "name: [unclosed\nmodels: {\n", "not valid YAML"
    if name == "unknown key":
        return {**GOOD, "epochz": [1]}, "epochz: unknown key"
    if name == "wrong type":
        return {**GOOD, "resources": {"cpu": "two"}}, "resources.cpu: Input should be a valid number"
    if name == "empty search space":
        return {**GOOD, "search": {"epochs": []}}, "search.epochs"
    if name == "epochs < 1":
        return {**GOOD, "search": {"epochs": [0, 1]}}, "search.epochs"
    if name == "batch size < 2":
        return {**GOOD, "search": {"epochs": [1], "batch_size": [1]}}, "search.batch_size"
    if name == "unknown model":
        return {**GOOD, "models": ["all-MiniLM-L6-v3"]}, "unknown model 'all-MiniLM-L6-v3'"
    if name == "not a sentence-transformers model":
        folder = d / "some-folder"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(os.urandom(64))
        return {**GOOD, "models": [str(folder)]}, "not a sentence-transformers model"
    if name == "missing column":
        rows = [{"q": p["question"], "a": p["answer"]} for p in pairs]
        return _with_data(
            source=_jsonl(d / "qa.jsonl", rows), eval_size=5
        ), "column 'question', 'answer' not found"
    if name == "empty dataset":
        (d / "empty.jsonl").write_text("")
        return _with_data(source=str(d / "empty.jsonl")), "has no rows"
    if name == "all-duplicate dataset":
        return _with_data(
            source=_jsonl(d / "dups.jsonl", [pairs[0]] * 50), eval_size=5
        ), "all 50 rows are one (question, answer) pair"
    if name == "non-UTF-8 file":
        (d / "latin1.csv").write_bytes("question,answer\ncaf\xe9 au lait?,a drink\n".encode("latin-1"))
        return _with_data(source=str(d / "latin1.csv")), "not UTF-8"
    if name == "resources beyond the cluster":
        return {**GOOD, "resources": {"gpu": 1}}, "resources.gpu: 1 per trial"
    if name == "k larger than the corpus":
        spec = {
            **_with_data(source=_jsonl(d / "few.jsonl", pairs), eval_size=5),
            "final": {"eval": {"ks": [1, 100]}},
        }
        return spec, "final.eval.ks: k=100 is larger than the corpus of d (40 documents)"
    if name == "max_seq_length above the model's limit":
        return {**GOOD, "train": {"max_seq_length": 600}}, (
            "train.max_seq_length: 600 is above the position limit of model 'paraphrase-MiniLM-L3-v2' "
            "(512 tokens, from its max_position_embeddings): set train.max_seq_length to 512 or less"
        )
    if name == "one model in two spellings":
        return {**GOOD, "models": ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"]}, (
            "models.0 'all-MiniLM-L6-v2' and models.1 'sentence-transformers/all-MiniLM-L6-v2' both get the label"
        )
    if name == "dataset name leaving the run dir":
        return _with_data(source="medquad-sample", name="../../x"), "datasets.0: Value error, name '../../x'"
    raise KeyError(name)


KINDS = [
    "malformed YAML",
    "unknown key",
    "wrong type",
    "empty search space",
    "epochs < 1",
    "batch size < 2",
    "unknown model",
    "not a sentence-transformers model",
    "missing column",
    "empty dataset",
    "all-duplicate dataset",
    "non-UTF-8 file",
    "resources beyond the cluster",
    "k larger than the corpus",
    "dataset name leaving the run dir",
    "max_seq_length above the model's limit",
    "one model in two spellings",
]


def _ray_dirs() -> set[Path]:
    return {*Path("/tmp").glob("etray-*"), *Path("/tmp").glob("embedtune-rayhome-*")}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_sweep_input_is_refused_in_one_line(kind: str, tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    spec, expected = _case(kind, inputs)
    spec_file = inputs / "spec.yaml"
    spec_file.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    before_inputs = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    before_ray = _ray_dirs()
    run_dir = tmp_path / "run"

    assert main(["sweep", str(spec_file), "--run-dir", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("embedtune: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not run_dir.exists()  # nothing written
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before_inputs
    assert _ray_dirs() <= before_ray  # no Ray was started


def test_checkpoints_that_cannot_fit_on_the_disk_are_refused(tmp_path: Path) -> None:
    """The run dir sits on a real 40 MiB filesystem (a tmpfs in a private mount namespace): the
    sweep's checkpoints (checkpoints.keep x model size x trials) cannot fit, so it stops before any
    data work or Ray, in one line naming the need, the free space and the fixes."""
    import sys

    from small_disk import on_small_disk

    small = tmp_path / "small-disk"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**GOOD, "checkpoints": {"keep": 2}}))
    run = [sys.executable, "-m", "embedtune.cli", "sweep", str(spec_file), "--run-dir", str(small / "run")]
    done = on_small_disk(small, "40m", 'exec "$@"', run, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"embedtune: error: not enough disk for the checkpoints at {small}/run"), lines
    assert "checkpoints.keep 2 x 1 trial(s) + 1 running" in lines[0] and "GiB free" in lines[0], lines
    assert "data " not in done.stdout  # refused before any data work
    assert not (small / "run").exists()  # (on the real disk: the tmpfs is gone with its namespace)


REMOTE_STAGING = """
import sys
from pathlib import Path
from embedtune.errors import EmbedtuneError
from embedtune.rundir import RunDir
from embedtune.specs import parse_spec
from embedtune.sweep import preflight as pf

spec = parse_spec({**GOOD, "storage_path": "s3://embedtune-test/sweeps", "ray": {"num_cpus": 2}})
rundir = RunDir("s3://embedtune-test/sweeps/bad-input", work=Path("/tmp/work"))
try:
    pf.check_local_staging(spec, rundir, joins_cluster=False, ray_tmp=Path("/tmp"))
    print("PASSED")
except EmbedtuneError as exc:
    print("ERROR", exc)
pf.check_local_staging(spec, rundir, joins_cluster=True, ray_tmp=Path("/tmp"))  # a cluster: copies only
print("CLUSTER PASSED")
"""


def test_remote_storage_still_checks_the_local_disk_checkpoints_pass_through() -> None:
    """With `storage_path` on S3 the Tune storage's disk is not ours to check, but checkpoints still
    pass through this machine: a private Ray stages each running trial's in /tmp, and the final stage
    copies the ones it evaluates into the run's local work folder. On a real 256 MiB /tmp (a tmpfs)
    that holds both, one running MiniLM-L3 trial (2 staged) and 1 + final.top_k 2 copies (5 x 67 MiB)
    do not fit: one line naming both places, the need and the fix. Joined to a cluster (trials stage
    on the workers' disks) the 3 copies alone fit."""
    import sys

    from small_disk import on_small_disk

    from embedtune.models import resolve_model
    from embedtune.storage import folder_bytes

    model = folder_bytes(resolve_model("paraphrase-MiniLM-L3-v2"))
    assert 3 * model < 256 * 2**20 < 5 * model  # what makes the two cases differ
    code = f"GOOD = {GOOD!r}\n{REMOTE_STAGING}"
    done = on_small_disk(Path("/tmp"), "256m", 'exec "$@"', [sys.executable, "-c", code], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(
        "ERROR not enough local disk at /tmp/work and /tmp (the Tune storage is remote, but checkpoints "
        "pass through here): about "
    ), lines
    assert (
        "(3 checkpoint copies for the final stage + 1 running trial(s) x 2 staged checkpoints, x " in lines[0]
    )
    assert lines[0].endswith("or set EMBEDTUNE_HOME (the run's local work folder) to a bigger disk"), lines
    assert lines[1:] == ["CLUSTER PASSED"], lines


def test_the_checkpoint_estimate_counts_kept_and_running_checkpoints() -> None:
    from embedtune.models import resolve_model
    from embedtune.specs import parse_spec
    from embedtune.sweep import preflight as pf

    grid = {"mode": "grid", "epochs": [1, 2], "lr": [1e-5, 2e-5, 3e-5]}
    spec = parse_spec({**GOOD, "search": grid, "checkpoints": {"keep": 2}})
    model = sum(f.stat().st_size for f in resolve_model("paraphrase-MiniLM-L3-v2").rglob("*") if f.is_file())
    need, how = pf.checkpoint_bytes(spec, cpus=4)
    assert pf.planned_trials(spec) == 6 and need == model * (2 * 6 + 4), how
    pf.check_disk(spec, Path("/tmp"))  # ~0.5 GiB: fits on this machine's disk


def test_a_time_budgeted_search_counts_its_trial_cap_and_the_refusal_names_it(tmp_path: Path) -> None:
    """An auto search on a time budget starts at most search.budget.max_trials trials: the disk check
    counts that many (not an unbounded guess), and refuses naming the key that lowers it."""
    from embedtune.errors import EmbedtuneError
    from embedtune.models import resolve_model
    from embedtune.specs import parse_spec
    from embedtune.sweep import preflight as pf

    model = sum(f.stat().st_size for f in resolve_model("paraphrase-MiniLM-L3-v2").rglob("*") if f.is_file())
    auto = {"mode": "auto", "budget": {"minutes": 30, "max_trials": 7}}
    spec = parse_spec({**GOOD, "search": auto, "checkpoints": {"keep": 2}, "max_concurrent_trials": 1})
    assert pf.planned_trials(spec) == 7
    assert pf.checkpoint_bytes(spec, cpus=4)[0] == model * (2 * 7 + 1)
    huge = parse_spec(
        {**GOOD, "search": {"budget": {"minutes": 30, "max_trials": 10**6}}}
    )  # auto: the default
    with pytest.raises(EmbedtuneError, match=r"fewer trials \(search.budget.max_trials\)"):
        pf.check_disk(huge, tmp_path)


@pytest.mark.slow
def test_a_disk_that_fills_mid_sweep_fails_the_trial_in_one_line_and_leaves_no_partial_checkpoint(
    tmp_path: Path,
) -> None:
    """The Tune storage sits on a real 320 MiB filesystem (a tmpfs in a private mount namespace):
    enough for the up-front check (4 checkpoints of MiniLM-L3: 1 kept x 2 epoch counts + 2 running), then, once the trial
    has started its epoch-1 checkpoint, something else fills the disk to 5 MiB free. The trial's
    next checkpoint cannot fit: it fails for good (no retries of the same failure) with one line
    naming the place, the need and the fixes; every checkpoint left in storage is whole."""
    import sys

    from small_disk import on_small_disk

    from embedtune.sweep.trainable import check_checkpoint

    disk = tmp_path / "small-disk"
    spec_file = tmp_path / "spec.yaml"
    data = [{**GOOD["datasets"][0], "max_train_pairs": 48}]
    spec = {**GOOD, "datasets": data, "search": {"mode": "grid", "epochs": [1, 2], "batch_size": [16]},
            "train": {"max_seq_length": 48}, "storage_path": str(disk / "tune")}  # fmt: skip
    spec_file.write_text(yaml.safe_dump({**spec, "checkpoints": {"keep": 1}, "max_failures": 2}))
    run = [sys.executable, "-m", "embedtune.cli", "sweep", str(spec_file), "--run-dir", str(tmp_path / "run"),
           "--no-final"]  # fmt: skip
    # In the namespace: wait (at most 10 min) for the first checkpoint folder, then fill the disk.
    script = (
        f"( i=0; until find {disk} -path '*checkpoint_0*' -name '*.json' | grep -q .; do "
        f"i=$((i+1)); [ $i -gt 1200 ] && exit 0; sleep 0.5; done; leave_free 5242880; touch {tmp_path}/filled ) & "
        '"$@"; rc=$?; wait; '
        # what storage holds, copied out before the tmpfs goes away with the namespace
        f"cp -r {disk}/tune {tmp_path}/left 2>/dev/null; exit $rc"
    )
    done = on_small_disk(disk, "320m", script, run, timeout=900)
    out = done.stdout + done.stderr
    assert (tmp_path / "filled").exists(), out[-3000:]  # the disk did fill mid-run
    assert done.returncode == 0, out[-3000:]
    failed = [
        ln for ln in done.stdout.splitlines() if " failed: " in ln and ln.startswith("[embedtune] trial ")
    ]
    assert len(failed) == 1, done.stdout[-3000:]
    assert f"no room for the epoch 2 checkpoint at {disk / 'tune'}" in failed[0] or (
        f"no room for the epoch 1 checkpoint at {disk / 'tune'}" in failed[0]
    ), failed
    assert "MB are free; free space there" in failed[0] and "set storage_path to a bigger disk" in failed[0]
    trials = json.loads((tmp_path / "run" / "trials.json").read_text())  # one record per epoch count
    failed_records = [t for t in trials if t["status"] == "FAILED"]
    assert [t["epochs"] for t in failed_records][-1:] == [2], trials  # the count never reached
    assert all("no room for the epoch" in (t["error"] or "") for t in failed_records), failed_records
    assert "Traceback" not in done.stdout
    kept = sorted((tmp_path / "left").rglob("checkpoint_0*"))
    for ckpt in kept:  # whole, or not there at all
        check_checkpoint(ckpt, str(ckpt))
    assert len(kept) <= 1  # epoch 1's at most (checkpoints.keep 1), never a partial epoch 2
