"""MLflow, without Ray: the client, secrets kept out of logs, the sweep's experiment and runs.

Layout: one experiment per sweep, a parent run per sweep, one child run per trial (tags
`embedtune.trial_id`, `embedtune.config_hash`, `mlflow.parentRunId`). Everything here takes the
tracking URI explicitly, so a sweep never leaves `MLFLOW_TRACKING_URI` set behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedtune import env
from embedtune.credentials import URI_PASSWORD, redact
from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)

TRIAL_TAG = "embedtune.trial_id"
CONFIG_TAG = "embedtune.config_hash"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "embedtune.kind"
CREATE_TOKEN_TAG = "embedtune.create_token"  # finds a parent run whose create_run reply was lost

# Credentials that can ride in a URI are never logged as MLflow params, never printed.
_URI_PASSWORD = URI_PASSWORD


PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
_HIDDEN = "***"


def keep_secret_in_env(tracking_uri: str) -> str:
    """The form of `tracking_uri` that may be stored (spec.json, sweep_state.json, Tune's pickled
    callback): a password in it (`http://user:pw@host`) moves to $MLFLOW_TRACKING_PASSWORD of this
    process and the URI keeps `user:***@`; `client()` puts it back at run time (`with_secret`)."""
    match = _URI_PASSWORD.search(tracking_uri)
    if not match:
        return tracking_uri
    from urllib.parse import unquote

    password = tracking_uri[match.end("head") + 1 : match.end() - 1]
    if password != _HIDDEN:
        os.environ[PASSWORD_ENV] = unquote(password)
    return _URI_PASSWORD.sub(lambda m: f"{m['head']}:{_HIDDEN}@", tracking_uri, count=1)


def with_secret(tracking_uri: str) -> str:
    """A stored URI (`user:***@`) with its password from $MLFLOW_TRACKING_PASSWORD, for the call
    that needs it; anything else unchanged."""
    if f":{_HIDDEN}@" not in tracking_uri or not _URI_PASSWORD.search(tracking_uri):
        return tracking_uri
    from urllib.parse import quote

    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise EmbedtuneError(
            f"the tracking URI {tracking_uri} keeps its password out of the run dir: set "
            f"{PASSWORD_ENV} to it (or give the URI with the password again)"
        )
    return tracking_uri.replace(f":{_HIDDEN}@", f":{quote(password, safe='')}@", 1)


def _no_links_with_secrets(tracking_uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>" when a run ends on a tracking server, the
    URI's password included; with a password in the URI those links are off (the CLI prints the
    redacted location instead)."""
    if redact(tracking_uri) != tracking_uri or f":{_HIDDEN}@" in tracking_uri:  # given, or put back
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def client(tracking_uri: str):
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's REST client retries a failing request for minutes (7 retries, backoff factor 2),
    # stalling Tune's event loop; the trial callback keeps what fails and retries on its own, so
    # a short budget (unless the user set one).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    _no_links_with_secrets(tracking_uri)
    return MlflowClient(tracking_uri=with_secret(tracking_uri))


def check_access(tracking_uri: str | None, timeout_s: float = 10.0) -> None:
    """Fail in seconds, before any data work or training, when an http(s) tracking server does not
    answer or refuses our credentials: one authenticated API call (a one-row experiment search), with
    MLflow's own credential variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), no retries
    and a short timeout. (`/health` answers without credentials, so it proves nothing about them.)
    Other stores are checked by use."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException

    with_secret(tracking_uri)  # a stored URI without its password in the environment: say so
    shown = redact(tracking_uri)
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    try:
        with env.patched_environ(quick):
            client(tracking_uri).search_experiments(max_results=1)
    except MlflowException as exc:
        text = str(exc)
        if any(code in text for code in ("401", "403", "Unauthorized", "Forbidden", "PERMISSION_DENIED",
                                         "UNAUTHENTICATED")):  # fmt: skip
            raise EmbedtuneError(
                f"MLflow tracking server {shown} refused the credentials; set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account it accepts"
            ) from None
        raise EmbedtuneError(
            f"MLflow tracking server {shown} is unreachable ({redact(text.splitlines()[0])[:160]}); start it "
            "(e.g. `mlflow server --host 127.0.0.1`) or fix mlflow.tracking_uri / $MLFLOW_TRACKING_URI"
        ) from None
    except Exception as exc:  # requests' connection errors, timeouts
        raise EmbedtuneError(
            f"MLflow tracking server {shown} is unreachable ({type(exc).__name__}); start it (e.g. `mlflow "
            "server --host 127.0.0.1`) or fix mlflow.tracking_uri / $MLFLOW_TRACKING_URI"
        ) from None


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None) -> str:
    """The id of experiment `name` (restored if deleted, created if missing). A SQLite store keeps its
    artifacts under `artifact_root`; a tracking server decides itself."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = (
        artifact_root.resolve().as_uri() if artifact_root and tracking_uri.startswith("sqlite") else None
    )
    return c.create_experiment(name, artifact_location=location)


def start_parent_run(tracking_uri: str, experiment_id: str, run_id: str | None, name: str) -> str:
    """Create the sweep's parent run, or reopen `run_id` when resuming. A create_run whose reply
    was lost (committed, then the connection dropped) is either sent again by MLflow's HTTP retries
    (two runs) or raises: the run carries a one-off token, so both cases end with exactly one."""
    import uuid

    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    if run_id:
        _check_parent_exists(c, tracking_uri, run_id)
        c.update_run(run_id, status="RUNNING")
        return run_id
    token = uuid.uuid4().hex
    try:
        c.create_run(experiment_id, run_name=name, tags={KIND_TAG: "sweep", CREATE_TOKEN_TAG: token})
    except (MlflowException, OSError):
        if not _runs_with_token(c, experiment_id, token):
            raise
    return keep_oldest(c, _runs_with_token(c, experiment_id, token), "parent run")


def _runs_with_token(c, experiment_id: str, token: str) -> list:
    return c.search_runs([experiment_id], filter_string=f"tags.`{CREATE_TOKEN_TAG}` = '{token}'")


def keep_oldest(c, runs: list, what: str) -> str:
    """The id of the oldest of `runs` (one logical run that a create_run sent twice made into
    several: a lost reply, then MLflow's retry or a replay); the others are deleted."""
    keep, *extra = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    for run in extra:
        log.info("deleting duplicate run %s of %s (a create_run sent twice)", run.info.run_id, what)
        c.delete_run(run.info.run_id)
    return keep.info.run_id


def _check_parent_exists(c, tracking_uri: str, run_id: str) -> None:
    """A resume needs the parent run it recorded: one line when the tracking database lost it."""
    from mlflow.exceptions import MlflowException

    try:
        gone = c.get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        gone = True
    if gone:
        raise EmbedtuneError(
            f"resume: the sweep's MLflow parent run {run_id} is not in {redact(tracking_uri)} (its tracking "
            "database was lost or replaced, or the run was deleted): restore that database, or start the "
            "sweep over with --fresh"
        )


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log the params the run does not have yet (redacted, MLflow's length limit)."""
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    items = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if is_number(v)]
    if items:
        client(tracking_uri).log_batch(run_id, metrics=items)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(tracking_uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)


@contextlib.contextmanager
def fluent_uri(tracking_uri: str, registry: bool = False) -> Iterator[None]:
    """Point MLflow's fluent API (`log_model`, `register_model`) at `tracking_uri` for one block.
    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI (and the registry call
    MLFLOW_REGISTRY_URI) into this process's environment, where every later sweep and every child
    process would pick it up; so the previous values are restored afterwards."""
    import mlflow

    keys = ["MLFLOW_TRACKING_URI", *(["MLFLOW_REGISTRY_URI"] if registry else [])]
    saved = {k: os.environ.get(k) for k in keys}
    _no_links_with_secrets(tracking_uri)
    with env.patched_environ(saved):
        mlflow.set_tracking_uri(with_secret(tracking_uri))
        if registry:
            mlflow.set_registry_uri(with_secret(tracking_uri))
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
            if registry:
                mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])


def log_sentence_transformer(
    tracking_uri: str, run_id: str, model_dir: Path, name: str = "model", registered_name: str | None = None
):
    """Log a model directory as an MLflow sentence_transformers model (optionally registering it);
    returns MLflow's ModelInfo."""
    import mlflow
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    # Explicit requirements: inferring them starts a subprocess that reloads the model.
    reqs = [
        f"sentence-transformers=={sentence_transformers.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
    ]
    client(tracking_uri).update_run(run_id, status="RUNNING")  # start_run would refuse a terminated run
    with fluent_uri(tracking_uri, registry=registered_name is not None), mlflow.start_run(run_id=run_id):
        return mlflow.sentence_transformers.log_model(
            model, name=name, pip_requirements=reqs, registered_model_name=registered_name
        )


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, where: str = "") -> list:
    """The runs under `parent_run_id`, optionally filtered further (an MLflow filter clause)."""
    clause = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and {where}" if where else "")
    return all_runs(tracking_uri, experiment_id, clause)


def all_runs(tracking_uri: str, experiment_id: str, clause: str, page_size: int = 1000) -> list:
    """Every run matching `clause`, page after page (one search returns at most 1,000, and a
    study-scale sweep has thousands of trials)."""
    c, out, token = client(tracking_uri), [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=clause, max_results=page_size, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def close_open_children(
    tracking_uri: str, experiment_id: str, parent_run_id: str, status: str = "KILLED"
) -> int:
    """Mark child runs still RUNNING (the driver died or was interrupted) as `status`."""
    runs = child_runs(tracking_uri, experiment_id, parent_run_id, "attributes.status = 'RUNNING'")
    c = client(tracking_uri)
    for run in runs:
        c.set_terminated(run.info.run_id, status=status)
    return len(runs)


def exception_line(traceback_text: str) -> str | None:
    """The line of a traceback (or Ray's wrapped error text) that says what was raised."""
    lines = [ln.strip() for ln in traceback_text.splitlines() if ln.strip()]
    found = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return (found or lines or [None])[-1]
