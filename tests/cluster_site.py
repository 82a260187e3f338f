"""A sample site file (cluster/site.env) and the cluster files rendered with it, for the tests that
read what a user applies: cluster/rendered/, never the templates."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cluster"))
import render  # noqa: E402  (cluster/render.py, what `make cluster-render` runs)

# Values no template ships: a rendered file that still holds a shipped one shows up in the checks.
SAMPLE_SITE = {
    "BUCKET": "acme-ml-sweeps-4711",
    "REGION": "eu-central-1",
    "IMAGE": "registry.acme.test/ml/embedtune:0.1.0-ray2.60.0-py311-gpu",
    "MLFLOW_IMAGE": "registry.acme.test/ml/embedtune-mlflow:3.17.2-7",
    "INSTANCE_PROFILE_ARN": "arn:aws:iam::210987654321:instance-profile/acme-embedtune",
    "ROLE_ARN": "arn:aws:iam::210987654321:role/acme-embedtune",
    "MLFLOW_BACKEND_SECRET": "mlflow-backend",
    "MLFLOW_AUTH_SECRET": "mlflow-auth",
}


def write_site(path: Path, values: dict[str, str] = SAMPLE_SITE) -> Path:
    path.write_text("# sample site\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def render_sample(tmp: Path) -> Path:
    """cluster/rendered/ as `make cluster-render` makes it from the sample site, under `tmp`."""
    out = tmp / "rendered"
    render.render(write_site(tmp / "site.env"), out)
    return out
