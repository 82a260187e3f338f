"""Check (d): the MLflow tracking server of cluster_local (basic auth, PostgreSQL, artifacts proxied
to S3).

Run with the client environment of `cluster_local.py env` exported. Verifies:
  - REST without credentials and with a wrong password is refused (401) for a write;
  - a client with MLFLOW_TRACKING_USERNAME/PASSWORD and *no AWS_* variables at all* logs params,
    metrics, an artifact and a sentence-transformers model (`mlflow.sentence_transformers.log_model`
    of the packaged paraphrase-MiniLM-L3-v2, or a plain artifact if it is not built), and reads the
    artifact back through the server;
  - the logged objects are in the bucket under s3://embedtune/mlartifacts/<exp id>/<run id>/ (listed
    with boto3 and the S3 keys, which only this check, not the MLflow client, holds).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

CLIENT = r"""
import os, sys, tempfile, time, json
import mlflow
assert not any(k.startswith("AWS_") for k in os.environ), "the client must not need S3 credentials"
t0 = time.monotonic()
mlflow.set_experiment("cluster-local-checks")
with mlflow.start_run(run_name="auth-s3-check") as run:
    mlflow.log_param("lr", 5e-5)
    mlflow.log_metric("ir_recall_at_10", 0.5, step=1)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "report.txt")
        open(p, "w").write("hello from the mlflow client\n")
        mlflow.log_artifact(p, artifact_path="reports")
    model_kind, model_id = "none", None
    try:
        from embedtune.models import resolve_model
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(resolve_model("paraphrase-MiniLM-L3-v2")), device="cpu")
        model_id = mlflow.sentence_transformers.log_model(st, name="model").model_id
        model_kind = "sentence_transformers"
    except Exception as exc:  # the packaged model is not built on this machine
        print("no sentence-transformers model:", type(exc).__name__, exc, file=sys.stderr)
    back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="reports/report.txt")
    assert open(back).read() == "hello from the mlflow client\n"
    exp = mlflow.get_experiment(run.info.experiment_id)
print(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "artifact_uri": run.info.artifact_uri, "experiment_artifact_location": exp.artifact_location,
                  "model": model_kind, "model_id": model_id, "seconds": round(time.monotonic() - t0, 1)}))
"""


def rest_status(url: str, user: str | None, password: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    body = json.dumps({"name": f"cluster-local-rest-{int(time.time() * 1000)}"}).encode()
    req = urllib.request.Request(
        url + "/api/2.0/mlflow/experiments/create", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> int:
    url = os.environ["MLFLOW_TRACKING_URI"]
    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    ok = True
    for name, u, p, want in (
        ("no credentials", None, None, 401),
        ("wrong password", user, "nope", 401),
        (f"the env's login ({user})", user, password, 200),
    ):
        got = rest_status(url, u, p)
        ok &= got == want
        print(f"{'OK  ' if got == want else 'FAIL'} REST create experiment, {name}: HTTP {got} (want {want})")

    client_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT], env=client_env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        print("FAIL mlflow client:", "\n".join(proc.stderr.strip().splitlines()[-5:]))
        return 1
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"OK   mlflow client without AWS_* env: run {info['run_id']} logged params/metric/artifact/model={info['model']} in {info['seconds']}s; "
        f"artifact_uri {info['artifact_uri']}"
    )

    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    exp_prefix = f"mlartifacts/{info['experiment_id']}/"
    keys = [
        o["Key"].removeprefix(exp_prefix)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="embedtune", Prefix=exp_prefix)
        for o in page.get("Contents", [])
    ]
    # MLflow 3: run artifacts under <exp>/<run id>/artifacts/, logged models under <exp>/models/<model id>/artifacts/.
    want = [f"{info['run_id']}/artifacts/reports/report.txt"]
    if info["model_id"]:
        want.append(f"models/{info['model_id']}/artifacts/MLmodel")
    found = all(w in keys for w in want)
    ok &= found
    print(
        f"{'OK  ' if found else 'FAIL'} in the bucket under s3://embedtune/{exp_prefix}: "
        + ", ".join(w for w in want if w in keys)
        + f" ({len(keys)} objects in the experiment)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
