"""Check (c): LanceDB on s3://embedtune/lancedb/... against the SeaweedFS S3 gateway.

Run with the client environment of `cluster_local.py env` exported. Two ways to configure the
connection, each in a fresh interpreter:
  options   `lancedb.connect(uri, storage_options={aws_endpoint, aws_access_key_id, ...})` with no
            AWS_* variables in the environment at all;
  env       `lancedb.connect(uri)` with nothing but the environment (AWS_ENDPOINT_URL, keys,
            region, AWS_ALLOW_HTTP), which is what embedtune's index.connect does.
Each creates a table, adds rows, builds a full-text (FTS) index, runs a vector and an FTS search,
and drops the table. Only run it where S3 cannot reach real AWS by mistake: a missing endpoint would
send the requests there (run it inside a loopback-only network namespace when unsure).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

CHILD = r"""
import os, sys, time, uuid, json
import lancedb, pyarrow as pa
uri = sys.argv[1]
opts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
t0 = time.monotonic()
db = lancedb.connect(uri, storage_options=opts) if opts else lancedb.connect(uri)
name = "docs_" + uuid.uuid4().hex[:6]
schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("vector", pa.list_(pa.float32(), 4))])
tbl = db.create_table(name, schema=schema)
tbl.add([{"id": 1, "text": "the quick brown fox", "vector": [1, 0, 0, 0]},
         {"id": 2, "text": "lazy dogs sleep all day", "vector": [0, 1, 0, 0]}])
tbl.add([{"id": 3, "text": "a fox jumps over the dog", "vector": [0.9, 0.1, 0, 0]}])
tbl.create_fts_index("text")
vec = tbl.search([1, 0, 0, 0]).limit(2).to_list()
fts = tbl.search("fox", query_type="fts").limit(5).to_list()
assert tbl.count_rows() == 3, tbl.count_rows()
assert [r["id"] for r in vec] == [1, 3], vec
assert sorted(r["id"] for r in fts) == [1, 3], fts
listed = name in db.table_names()
db.drop_table(name)
print(f"create/add/fts-index/search/drop ok in {time.monotonic() - t0:.1f}s (vector top2 ids {[r['id'] for r in vec]}, fts 'fox' ids {sorted(r['id'] for r in fts)}, listed {listed})")
"""


def run(name: str, env: dict[str, str], *argv: str, expect_ok: bool = True) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    text = proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]
    ok = (proc.returncode == 0) == expect_ok
    print(f"{'OK  ' if ok else 'FAIL'} {name}{'' if expect_ok else ' (must fail)'}: {text}")
    return ok


def main() -> int:
    import lancedb

    print("lancedb", lancedb.__version__)
    base = f"s3://embedtune/lancedb/checks-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    # The one AWS_* that stays: without it the AWS SDK may ask 169.254.169.254 for a region/credentials.
    bare["AWS_EC2_METADATA_DISABLED"] = "true"
    import json

    options = {
        "aws_endpoint": env["AWS_ENDPOINT_URL"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "aws_region": env.get("AWS_DEFAULT_REGION", "us-east-1"),
        "allow_http": "true",
    }
    ok = run(
        "options: storage_options={aws_endpoint, keys, aws_region, allow_http}, no AWS_* env",
        bare,
        base + "-opt",
        json.dumps(options),
    )
    ok &= run(
        "env: lancedb.connect(uri) with AWS_ENDPOINT_URL, keys, region, AWS_ALLOW_HTTP in env",
        env,
        base + "-env",
    )
    no_http = {k: v for k, v in env.items() if k != "AWS_ALLOW_HTTP"}
    ok &= run("env without AWS_ALLOW_HTTP (endpoint is http://)", no_http, base + "-nohttp", expect_ok=False)
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri("s3://embedtune")
    for suffix in ("-opt", "-env", "-nohttp"):  # the namespace manifests the tables leave behind
        fs.delete_dir_contents((base + suffix).removeprefix("s3://"), missing_dir_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
