"""Read a sweep spec from YAML (or a dict); every error is one line naming the key path, e.g.
`sweeps/x.yaml: search.epochs.0: Input should be greater than or equal to 1`.

String values may name environment variables, so one spec serves several clusters:
`${VAR}` (required: unset is an error naming the key) and `${VAR:-default}` (the default when VAR
is unset or empty). The environment of the process that loads the spec decides: on a cluster, the
driver's (a RayJob's env, a `ray job submit --runtime-env`, or the head node's).

Where a sweep's shared services are, highest first: `embedtune sweep --tracking-uri / --storage-path /
--lancedb-uri` (`with_overrides`), the spec's value (its variables expanded), then for the tracking
URI `$MLFLOW_TRACKING_URI`, then the defaults (SQLite, Tune storage and LanceDB in the run dir).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from embedtune.errors import EmbedtuneError
from embedtune.specs.sweep import SweepSpec


def validation_error_line(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (check its spelling)")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err['input']!r})")
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(raw: Any, source: str, where: str = "") -> Any:
    """`raw` with `${VAR}` / `${VAR:-default}` in its strings replaced from the environment."""
    if isinstance(raw, dict):
        return {k: expand_env(v, source, f"{where}.{k}" if where else str(k)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand_env(v, source, f"{where}.{i}") for i, v in enumerate(raw)]
    if not isinstance(raw, str) or "${" not in raw:
        return raw

    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name)
        if got:
            return got
        if default is not None:
            return default
        raise EmbedtuneError(
            f"{source}: {where}: environment variable {name} is not set (export it, or write ${{{name}:-default}})"
        )

    expanded = _VAR.sub(value, raw)
    return None if expanded == "" and raw.strip().startswith("${") else expanded


def parse_spec(raw: dict[str, Any], source: str = "sweep spec") -> SweepSpec:
    if not isinstance(raw, dict):
        raise EmbedtuneError(f"{source}: expected a mapping of keys at the top level")
    raw = expand_env(raw, source)
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise EmbedtuneError(validation_error_line(source, exc)) from exc


# Spec keys a command-line flag may set: flag name -> key path.
OVERRIDABLE = {
    "tracking_uri": ("mlflow", "tracking_uri"),
    "storage_path": ("storage_path",),
    "lancedb_uri": ("final", "lancedb_uri"),
}


def with_overrides(spec: SweepSpec, source: str = "command line", **values: str | None) -> SweepSpec:
    """`spec` with the given OVERRIDABLE keys replaced (None: keep the spec's value), validated again."""
    unknown = set(values) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"not overridable: {sorted(unknown)}")
    if all(v is None for v in values.values()):
        return spec
    raw = spec.model_dump(mode="json")
    for name, value in values.items():
        if value is None:
            continue
        *parents, key = OVERRIDABLE[name]
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise EmbedtuneError(validation_error_line(source, exc)) from exc


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.exists():
        raise EmbedtuneError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EmbedtuneError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    except UnicodeDecodeError as exc:
        raise EmbedtuneError(f"{path}: not UTF-8 text") from exc
    spec = parse_spec(raw, str(path))
    # Relative local data paths are relative to the spec file, not the cwd.
    for ds in spec.datasets:
        src = ds.source
        if not src.startswith("hf:") and not Path(src).is_absolute() and (path.parent / src).exists():
            ds.source = str((path.parent / src).resolve())
    return spec
