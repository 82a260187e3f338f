"""Does `mlflow server --artifacts-destination s3://...` need MLFLOW_S3_ENDPOINT_URL, or is
AWS_ENDPOINT_URL enough? Starts a throwaway server (SQLite store in a temp dir, no auth) whose env
has AWS_ENDPOINT_URL + keys but no MLFLOW_S3_ENDPOINT_URL, logs an artifact through it and looks
for the object in the bucket. Only runs in a loopback-only network namespace: if the endpoint were
ignored, boto3 would go to real AWS.

Run with the client environment of `cluster_local.py env` exported.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def main() -> int:
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        print("SKIP: not in a loopback-only network namespace")
        return 0
    work = tempfile.mkdtemp(prefix="etcl-mlflow-endpoint-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work}/mlflow.db", "--artifacts-destination", "s3://embedtune/mlflow-endpoint-check"],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(f"{work}/server.log", "w"), start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        client_env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | {"MLFLOW_TRACKING_URI": url}
        code = ("import mlflow, tempfile, os\n"
                "with mlflow.start_run() as r:\n"
                "    d = tempfile.mkdtemp(); p = os.path.join(d, 'x.txt'); open(p, 'w').write('x')\n"
                "    mlflow.log_artifact(p)\n"
                "print(r.info.experiment_id, r.info.run_id)")  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", code], env=client_env, capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            print(
                "FAIL: artifact upload through a server with AWS_ENDPOINT_URL only:",
                proc.stderr.strip().splitlines()[-1],
            )
            print(open(f"{work}/server.log").read()[-1500:])
            return 1
        exp, run = proc.stdout.strip().splitlines()[-1].split()  # (mlflow prints "View run ..." lines too)
        import boto3

        key = f"mlflow-endpoint-check/{exp}/{run}/artifacts/x.txt"
        boto3.client("s3").head_object(Bucket="embedtune", Key=key)
        print(f"OK: server with AWS_ENDPOINT_URL and no MLFLOW_S3_ENDPOINT_URL stored s3://embedtune/{key}")
        return 0
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
