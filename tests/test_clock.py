"""The stage clock (embedtune.clock): measured wall time per stage, skipped stages, the time line."""

from __future__ import annotations

import time

import pytest

from embedtune.clock import StageClock, duration, time_line


def test_stages_measure_wall_time_add_up_and_keep_time_of_a_failed_block() -> None:
    clock = StageClock()
    with clock.stage("data"):
        time.sleep(0.05)
    for _ in range(2):  # one per dataset: the times add up
        with clock.stage("final/scoring/a"):
            time.sleep(0.03)
    with pytest.raises(RuntimeError), clock.stage("final/harm"):
        time.sleep(0.02)
        raise RuntimeError("boom")
    clock.skip("trials", "all done before")
    total = clock.total()
    got = clock.to_dict()
    assert list(got["stages"]) == ["data", "final/scoring/a", "final/harm", "trials"]  # order started
    assert 0.05 <= got["stages"]["data"] < 0.5
    assert 0.06 <= got["stages"]["final/scoring/a"] < 0.6
    assert 0.02 <= got["stages"]["final/harm"] < 0.5
    assert got["stages"]["trials"] == 0.0 and got["skipped"] == {"trials": "all done before"}
    assert sum(got["stages"].values()) <= got["total_s"] and got["total_s"] >= total
    assert clock.ran("data") and not clock.ran("trials") and not clock.ran("final")
    flat = clock.flat()
    assert set(flat) == {"data_s", "final/scoring/a_s", "final/harm_s", "trials_s", "total_s"}
    assert set(clock.metrics()) == {f"time/{k}" for k in flat}


def test_a_stage_run_again_after_a_skip_is_no_longer_skipped() -> None:
    clock = StageClock()
    clock.skip("final/epochs", "none")
    with clock.stage("final/epochs"):
        pass
    assert clock.ran("final/epochs") and clock.skipped == {}


def test_duration_words() -> None:
    assert [duration(s) for s in (0.04, 4.21, 12.3, 59.4, 59.6, 571.2, 3725)] == [
        "0.0 s",
        "4.2 s",
        "12 s",
        "59 s",
        "1 min 0 s",
        "9 min 31 s",
        "1 h 2 min",
    ]


def test_time_line_nests_parts_shows_the_rest_and_what_was_skipped() -> None:
    timings = {
        "total_s": 571.0,
        "stages": {
            "preflight": 2.0,
            "data": 12.0,
            "mining": 20.0,
            "base_scores": 31.0,
            "tracking": 1.0,
            "trials": 400.0,
            "final/cross_encoder": 41.0,
            "final/scoring/medquad": 30.0,
            "final/scoring/squad": 25.0,
            "final/harm": 0.0,
            "final/report": 8.0,
            "final/registry": 4.0,
            "final": 101.0,
        },
        "skipped": {"final/harm": "no final.ood"},
    }
    assert time_line(timings) == (
        "9 min 31 s — preflight 2.0 s, data 12 s, mining 20 s, base scores 31 s, tracking 1.0 s, "
        "trials 6 min 40 s, final stage 1 min 41 s (cross-encoder 41 s, ingest+scoring 55 s "
        "(medquad 30 s, squad 25 s), report 8.0 s, registry 4.0 s); other 4.0 s; "
        "skipped: do-no-harm (no final.ood)"
    )
    assert time_line({"total_s": 1.0, "stages": {}}) == "1.0 s — no stage timed; other 1.0 s"
