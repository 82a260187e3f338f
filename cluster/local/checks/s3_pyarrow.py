"""Check (a): pyarrow's S3FileSystem against the SeaweedFS S3 gateway of cluster_local.

Run with the client environment of `cluster_local.py env` exported. Tries the ways a client can
name the endpoint (env only, URI query, explicit options) and, for each, lists, writes, reads and
deletes an object. Prints one line per variant; exits non-zero if the env-only variant fails
(that is the one embedtune and Ray Tune rely on).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pyarrow.fs as pafs

BUCKET = "embedtune"


def roundtrip(fs: pafs.FileSystem, base: str) -> str:
    key = f"{base}/checks/pyarrow-{uuid.uuid4().hex[:8]}/a.txt"
    with fs.open_output_stream(key) as out:
        out.write(b"hello from pyarrow")
    listed = [i.path for i in fs.get_file_info(pafs.FileSelector(key.rsplit("/", 1)[0]))]
    data = fs.open_input_stream(key).read()
    fs.delete_dir(key.rsplit("/", 1)[0])
    gone = fs.get_file_info(key).type == pafs.FileType.NotFound
    assert listed == [key] and data == b"hello from pyarrow" and gone, (listed, data, gone)
    return "list/write/read/delete ok"


def variant(name: str, code: str, env: dict[str, str]) -> bool:
    """Each variant in a fresh interpreter: pyarrow reads the AWS environment once per process."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout.strip() or proc.stderr.strip().splitlines()[-1] if (proc.stdout or proc.stderr) else ""
    print(f"{'OK  ' if proc.returncode == 0 else 'FAIL'} {name}: {out}")
    return proc.returncode == 0


def main() -> int:
    endpoint = os.environ["AWS_ENDPOINT_URL"]  # http://127.0.0.1:PORT
    hostport = endpoint.split("://", 1)[1]
    env = dict(os.environ)
    no_endpoint = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
    no_region = {k: v for k, v in env.items() if k not in ("AWS_DEFAULT_REGION", "AWS_REGION")}
    head = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import pyarrow.fs as pafs; from s3_pyarrow import roundtrip\n"
    ok = variant(
        "env only: FileSystem.from_uri('s3://embedtune/...') with AWS_ENDPOINT_URL, keys, region in env",
        head
        + "fs, path = pafs.FileSystem.from_uri('s3://embedtune/x'); print(roundtrip(fs, 'embedtune'), type(fs).__name__, 'region', fs.region)",
        env,
    )
    variant(
        "URI query: s3://embedtune/x?endpoint_override=HOST:PORT&scheme=http (keys from env, no AWS_ENDPOINT_URL)",
        head
        + f"fs, path = pafs.FileSystem.from_uri('s3://embedtune/x?endpoint_override={hostport}&scheme=http'); print(roundtrip(fs, 'embedtune'))",
        no_endpoint,
    )
    variant(
        "explicit: S3FileSystem(endpoint_override=, scheme='http', access_key=, secret_key=, region=)",
        head
        + (
            f"fs = pafs.S3FileSystem(endpoint_override={hostport!r}, scheme='http', access_key={env['AWS_ACCESS_KEY_ID']!r}, "
            f"secret_key={env['AWS_SECRET_ACCESS_KEY']!r}, region='us-east-1'); print(roundtrip(fs, 'embedtune'))"
        ),
        {k: v for k, v in no_endpoint.items() if not k.startswith("AWS_")},
    )
    variant(
        "env without AWS_DEFAULT_REGION/AWS_REGION (from_uri asks the bucket's region)",
        head
        + "fs, path = pafs.FileSystem.from_uri('s3://embedtune/x'); print(roundtrip(fs, 'embedtune'), 'region', fs.region)",
        no_region,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
