"""`make cluster-render`: the cluster files a user applies are the templates filled from one site
file (cluster/site.env), strictly; and what it renders passes the schemas the API server applies
(KubeRay's CRDs at the documented minimum release, Kubernetes' own for core objects)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_site import REPO, SAMPLE_SITE, render, render_sample, write_site
from k8s_schemas import KUBERAY, errors

CLUSTER = REPO / "cluster"
MANIFESTS = ("mlflow-server.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml")
# What the shipped files used to hard-code: none of it may reach a user's cluster.
NOT_CHOSEN = ("<account>", "embedtune-runs", "ghcr.io/example", "us-west-2", "123456789012")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    return render_sample(tmp_path_factory.mktemp("site"))


def test_every_template_renders_with_the_sample_site_and_nothing_is_left_unfilled(rendered: Path) -> None:
    files = sorted(p.relative_to(rendered).as_posix() for p in rendered.rglob("*.yaml"))
    assert files == sorted(render.TEMPLATES)
    for rel in files:
        text = (rendered / rel).read_text()
        assert not [n for n in SAMPLE_SITE if f"${{{n}}}" in text], rel  # no placeholder left
        for shipped in NOT_CHOSEN:
            assert shipped not in text, (rel, shipped)
        assert SAMPLE_SITE["BUCKET"] in text, rel  # every file that stores anything uses the site's bucket
    launcher = yaml.safe_load((rendered / "ray-cluster.yaml").read_text())
    assert launcher["provider"]["region"] == SAMPLE_SITE["REGION"]
    arns = {t["node_config"]["IamInstanceProfile"]["Arn"] for t in launcher["available_node_types"].values()}
    assert arns == {SAMPLE_SITE["INSTANCE_PROFILE_ARN"]}
    head = next(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    assert f"EMBEDTUNE_STORAGE=s3://{SAMPLE_SITE['BUCKET']}/sweeps" in head
    docs = {d["kind"]: d for d in yaml.safe_load_all((rendered / "mlflow-server.yaml").read_text()) if d}
    assert (
        docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        == SAMPLE_SITE["ROLE_ARN"]
    )
    # the tracking server runs the site's built image (cluster/mlflow.Dockerfile) and installs nothing
    (server,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert server["image"] == SAMPLE_SITE["MLFLOW_IMAGE"]
    assert server["command"][:2] == ["mlflow", "server"] and "args" not in server
    assert not [w for w in server["command"] if "pip" in w or "/bin/sh" in w], server["command"]
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        text = (rendered / rel).read_text()
        assert text.count(f"image: {SAMPLE_SITE['IMAGE']}") >= 2, rel
        assert text.count(f"value: s3://{SAMPLE_SITE['BUCKET']}/sweeps") == 2, rel  # head and workers


def test_shell_variables_in_the_commands_pass_through(rendered: Path) -> None:
    """Only `${NAME}` is a placeholder: the launcher's shell ($HOME, $(cat ...), $RAY_HEAD_IP) stays."""
    text = (rendered / "ray-cluster.yaml").read_text()
    template = (CLUSTER / "ray-cluster.yaml").read_text()
    for shell in ("$HOME/embedtune-secrets/ray_auth_token", "$RAY_HEAD_IP:6379", "$(cat $HOME/"):
        assert shell in template and shell in text, shell


def test_an_escaped_placeholder_is_the_shells_own(tmp_path: Path) -> None:
    site = render.read_site(write_site(tmp_path / "site.env"))
    text, used = render.render_text("a: $${HOME}/x ${BUCKET} ${HOME:-/root} $HOME", site, "t.yaml", tmp_path)
    assert text == f"a: ${{HOME}}/x {SAMPLE_SITE['BUCKET']} ${{HOME:-/root}} $HOME" and used == {"BUCKET"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"BUCKET": ""}, "BUCKET is empty"),
        (
            {"ROLE_ARN": "arn:aws:iam::<account>:role/x"},
            "ROLE_ARN=arn:aws:iam::<account>:role/x still holds a <...>",
        ),
        ({"REGION": None}, "${REGION} is not set in"),
        ({"BUKET": "typo"}, "BUKET is used by no template"),
    ],
    ids=["empty", "placeholder", "missing", "typo"],
)
def test_rendering_refuses_a_bad_site_file_in_one_line_and_writes_nothing(
    change: dict, message: str, tmp_path: Path
) -> None:
    values = {k: v for k, v in {**SAMPLE_SITE, **change}.items() if v is not None}
    site = write_site(tmp_path / "site.env", values)
    out = tmp_path / "rendered"
    proc = subprocess.run([sys.executable, str(CLUSTER / "render.py"), "--site", str(site), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob(".rendered.*"))  # nothing half-written


def test_the_example_site_file_does_not_render_until_filled_in(tmp_path: Path) -> None:
    """cluster/site.env.example names every value the templates use, and ships no bucket, account
    or registry: copied as it is, it is refused."""
    example = render.read_site(CLUSTER / "site.env.example")
    used = set()
    for rel in render.TEMPLATES:
        used |= {
            m.group(2) for m in render.PLACEHOLDER.finditer((CLUSTER / rel).read_text()) if not m.group(1)
        }
    assert set(example) == used
    for key in ("BUCKET", "REGION", "IMAGE", "INSTANCE_PROFILE_ARN", "ROLE_ARN"):
        assert example[key] == "", key
    with pytest.raises(render.SiteError, match="is empty"):
        render.render(CLUSTER / "site.env.example", tmp_path / "out")


def test_the_makefile_target_renders_into_cluster_rendered() -> None:
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^cluster-render:.*\n\t.*cluster/render\.py", make, re.M)
    ignored = (REPO / ".gitignore").read_text().split()
    assert "cluster/site.env" in ignored and "cluster/rendered/" in ignored


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("rel", MANIFESTS)
def test_rendered_manifests_pass_the_api_servers_schemas(rendered: Path, rel: str) -> None:
    docs = [d for d in yaml.safe_load_all((rendered / rel).read_text()) if d]
    assert docs
    problems = [p for d in docs for p in errors(d)]
    assert not problems, "\n".join(problems)


def test_the_schema_check_catches_what_the_api_server_refuses(rendered: Path) -> None:
    """The checker is not a rubber stamp: an unknown field, a wrong type, a bad enum value, an
    unknown kind and a field newer than the vendored KubeRay are each refused."""
    cluster = yaml.safe_load((rendered / "kuberay/raycluster.yaml").read_text())
    assert not errors(cluster)
    head = cluster["spec"]["headGroupSpec"]
    bad = [
        ("spec", "enableInTreeAutoscalng", True),  # a typo: kubectl --validate=strict refuses it
        ("spec", "authOptions", {"mode": "password"}),  # enum
        ("spec", "authOptions", {"mode": "token", "secretName": "x", "tokenTTL": 5}),  # unknown field
    ]
    for where, key, value in bad:
        broken = yaml.safe_load(yaml.safe_dump(cluster))
        broken[where][key] = value
        assert errors(broken), (key, value)
    broken = yaml.safe_load(yaml.safe_dump(cluster))
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert errors(broken)
    broken = yaml.safe_load(yaml.safe_dump(cluster))
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert errors(broken)
    assert head  # the untouched original still passes (checked above)
    docs = {d["kind"]: d for d in yaml.safe_load_all((rendered / "mlflow-server.yaml").read_text()) if d}
    dep = yaml.safe_load(yaml.safe_dump(docs["Deployment"]))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/health"
    assert errors(dep)
    svc = yaml.safe_load(yaml.safe_dump(docs["Service"]))
    svc["spec"]["ports"][0]["port"] = "5000"  # an int field
    assert errors(svc)
    assert errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})


def test_the_vendored_kuberay_is_the_readmes_minimum_and_has_every_field_used() -> None:
    readme = (REPO / "README.md").read_text()
    version = KUBERAY.name.removeprefix("kuberay-v")
    assert f"KubeRay ≥ {version}" in readme or f"KubeRay >= {version}" in readme
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert (
            f"KubeRay operator >= {version}" in (CLUSTER / rel).read_text()
            or f"KubeRay >= {version}" in (CLUSTER / rel).read_text()
        )
    crd = yaml.safe_load((KUBERAY / "ray.io_rayclusters.yaml").read_text())
    auth = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "authOptions"
    ]
    assert {"mode", "secretName"} <= set(auth["properties"])  # what the manifests use


# ------------------------------------------------------------------ network policy


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes' LabelSelector semantics: every matchLabels pair and every matchExpression
    (In, NotIn, Exists, DoesNotExist) must hold; an empty selector selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_the_label_selector_matcher() -> None:
    sel = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["x"]}]}
    assert selects(sel, {"a": "1", "b": "x", "c": "z"})
    assert not selects(sel, {"a": "1", "b": "y"}) and not selects(sel, {"a": "1"})
    assert not selects(sel, {"a": "2", "b": "x"})
    assert selects({"matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"b": ""})
    assert not selects({"matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"})
    assert selects({}, {"a": "1"})


def ray_pod_labels(rendered: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(file, group, labels) of every Ray pod template, with the labels KubeRay adds to each pod
    (`ray.io/node-type`, `ray.io/cluster`; a RayJob's cluster has a generated name)."""
    pods = []
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        doc = yaml.safe_load((rendered / rel).read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        cluster = doc["metadata"]["name"] + ("" if doc["kind"] == "RayCluster" else "-x7k2q")
        groups = [("head", "head", spec["headGroupSpec"])]
        groups += [(g["groupName"], "worker", g) for g in spec["workerGroupSpecs"]]
        for name, node_type, group in groups:
            labels = dict(group["template"]["metadata"]["labels"])
            labels |= {"ray.io/node-type": node_type, "ray.io/cluster": cluster, "ray.io/group": name}
            pods.append((rel, node_type, labels))
    return pods


def test_only_the_ray_heads_may_reach_the_tracking_server(rendered: Path) -> None:
    docs = [d for d in yaml.safe_load_all((rendered / "mlflow-server.yaml").read_text()) if d]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1
    policy = policies[0]
    assert not errors(policy)
    assert policy["metadata"]["namespace"] == "embedtune"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    # it selects the tracking server's pods and nothing else that ships
    assert selects(spec["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert spec["podSelector"]["matchLabels"] == service["spec"]["selector"]
    pods = ray_pod_labels(rendered)
    assert {(rel, t) for rel, t, _ in pods} == {
        (r, t) for r in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml") for t in ("head", "worker")
    }
    assert not [p for p in pods if selects(spec["podSelector"], p[2])]
    # one rule: TCP 5000 from pods of this namespace that are Ray heads of either cluster
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock: this namespace only
    for rel, node_type, labels in pods:
        assert selects(peer["podSelector"], labels) == (node_type == "head"), (rel, node_type, labels)
        if node_type == "worker":  # not even by KubeRay's head label alone: our label is heads-only
            assert "embedtune.io/mlflow-client" not in labels, rel
    # the server's container port is the one admitted
    (port,) = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["containerPort"] == 5000
