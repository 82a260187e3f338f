"""Read a sweep spec from YAML (or a dict); every error is one line naming the key path, e.g.
`sweeps/x.yaml: search.epochs.0: Input should be greater than or equal to 1`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from embedtune.errors import EmbedtuneError
from embedtune.specs.sweep import SweepSpec


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (check its spelling)")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err['input']!r})")
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def parse_spec(raw: dict[str, Any], source: str = "sweep spec") -> SweepSpec:
    if not isinstance(raw, dict):
        raise EmbedtuneError(f"{source}: expected a mapping of keys at the top level")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise EmbedtuneError(_format_error(source, exc)) from exc


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
