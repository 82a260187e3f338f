"""Kubernetes manifests checked against the schemas the API server applies: KubeRay's CRDs (vendored
at the documented minimum release) for RayCluster / RayJob, Kubernetes' own OpenAPI definitions for
core objects (tests/schemas/*/SOURCE.md says where each comes from).

The schemas are made strict the way `kubectl apply` (strict field validation, kubectl's default)
treats a manifest: a field the schema does not list is an error, not silently dropped. Kubernetes'
schema extensions are read as the API server reads them (`x-kubernetes-int-or-string`,
`x-kubernetes-preserve-unknown-fields`, IntOrString / Quantity). CEL rules
(`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERAY = SCHEMAS / "kuberay-v1.6.0"
KUBERNETES = SCHEMAS / "kubernetes-v1.36"

# apiVersion/kind -> Kubernetes definition name
CORE = {
    ("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment",
    ("v1", "Service"): "io.k8s.api.core.v1.Service",
    ("v1", "ServiceAccount"): "io.k8s.api.core.v1.ServiceAccount",
    ("v1", "Secret"): "io.k8s.api.core.v1.Secret",
    ("v1", "ConfigMap"): "io.k8s.api.core.v1.ConfigMap",
    ("v1", "PersistentVolumeClaim"): "io.k8s.api.core.v1.PersistentVolumeClaim",
    ("networking.k8s.io/v1", "NetworkPolicy"): "io.k8s.api.networking.v1.NetworkPolicy",
}
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def strict(node: Any) -> Any:
    """A copy of an OpenAPI schema node that refuses unknown fields (see the module docstring)."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string":
        return {k: v for k, v in INT_OR_STRING.items()}
    out = {
        k: strict(v) if k not in ("enum", "required", "example", "default") else v for k, v in node.items()
    }
    if "properties" in node:
        out["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _core_definitions() -> dict[str, Any]:
    defs = json.loads((KUBERNETES / "definitions.json").read_text())["definitions"]
    defs = {name: strict(d) for name, d in defs.items()}
    defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = dict(INT_OR_STRING)
    defs["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {
        "anyOf": [{"type": "string"}, {"type": "number"}]
    }
    return defs


def _core_schema(definition: str) -> dict[str, Any]:
    return {"definitions": _core_definitions(), "$ref": f"#/definitions/{definition}"}


@functools.cache
def _crd_schema(kind: str) -> tuple[str, dict[str, Any]]:
    """(apiVersion, schema) of the served version of a vendored KubeRay CRD."""
    crd = yaml.safe_load((KUBERAY / CRDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict(version["schema"]["openAPIV3Schema"])
    # metadata is Kubernetes' ObjectMeta (the CRD schema leaves it open): checked as such
    schema["definitions"] = _core_definitions()  # $refs resolve against the root schema
    schema["properties"]["metadata"] = {
        "$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    return f"{crd['spec']['group']}/{version['name']}", schema


@functools.cache
def _validator(api: str, kind: str) -> jsonschema.Draft4Validator | str:
    if kind in CRDS:
        want, schema = _crd_schema(kind)
        if api != want:
            return f"{kind}: apiVersion {api!r}, the vendored CRD serves {want!r}"
    elif (api, kind) in CORE:
        schema = _core_schema(CORE[(api, kind)])
    else:
        return f"no vendored schema for apiVersion {api!r} kind {kind!r} (add it to tests/k8s_schemas.py)"
    return jsonschema.Draft4Validator(schema)


def errors(doc: dict[str, Any]) -> list[str]:
    """What the API server's schema refuses in one manifest (empty when it is valid); an unknown
    kind is an error too, so no document goes unchecked."""
    validator = _validator(str(doc.get("apiVersion")), str(doc.get("kind")))
    if isinstance(validator, str):
        return [validator]
    return [
        f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in validator.iter_errors(doc)
    ]
