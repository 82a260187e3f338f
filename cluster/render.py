#!/usr/bin/env python3
"""Render the cluster files with one site's values: `make cluster-render`.

    cp cluster/site.env.example cluster/site.env     # once; fill in (git-ignored)
    make cluster-render                               # -> cluster/rendered/ (git-ignored)

The shipped files (cluster/ray-cluster.yaml, cluster/mlflow-server.yaml, cluster/kuberay/*.yaml)
are templates: every value that differs between sites (bucket, region, image, IAM ARNs, Secret
names) is a `${NAME}` placeholder filled from the site file (`NAME=value` lines, `#` comments).
What you apply is the rendered copy under cluster/rendered/, same relative paths.

Strict, so nothing half-filled is ever applied: a placeholder the site file does not define, an
empty value, a name the templates do not use (a typo) or a value with `<...>` left in stops with
one line and writes nothing. Only the braced form `${NAME}` is a placeholder: shell variables in the
commands (`$HOME`, `$(cat ...)`, `${VAR:-default}`) pass through untouched, and `$${NAME}` renders as
a literal `${NAME}` for a shell that needs the braces. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent
TEMPLATES = ("ray-cluster.yaml", "mlflow-server.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml")
PLACEHOLDER = re.compile(r"(\$?)\$\{([A-Z][A-Z0-9_]*)\}")  # `$${NAME}`: a literal `${NAME}`
LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


class SiteError(ValueError):
    """A site file or template problem, said in one line."""


def read_site(path: Path) -> dict[str, str]:
    """`NAME=value` lines (values may be quoted; `#` starts a comment line); one line on a bad one."""
    if not path.is_file():
        raise SiteError(f"{path}: no site file; copy cluster/site.env.example to it and fill it in")
    values: dict[str, str] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = LINE.match(line)
        if not match:
            raise SiteError(f"{path}:{n}: expected NAME=value, got {line[:60]!r}")
        name, value = match.group(1), match.group(2).split(" #", 1)[0].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if name in values:
            raise SiteError(f"{path}:{n}: {name} is set twice")
        values[name] = value
    return values


def render_text(text: str, site: dict[str, str], where: str, site_path: Path) -> tuple[str, set[str]]:
    """The template with its placeholders filled; the names it used."""
    used: set[str] = set()

    def fill(match: re.Match) -> str:
        name = match.group(2)
        if match.group(1):  # escaped: the shell's own ${NAME}
            return match.group(0)[1:]
        line = text.count("\n", 0, match.start()) + 1
        if name not in site:
            raise SiteError(
                f"{where}:{line}: ${{{name}}} is not set in {site_path} (see cluster/site.env.example)"
            )
        if not site[name]:
            raise SiteError(f"{site_path}: {name} is empty; {where} needs it (see cluster/site.env.example)")
        if re.search(r"<[^>]*>", site[name]):
            raise SiteError(
                f"{site_path}: {name}={site[name]} still holds a <...> placeholder; put the real value"
            )
        used.add(name)
        return site[name]

    return PLACEHOLDER.sub(fill, text), used


def render(
    site_path: Path, out: Path, templates: tuple[str, ...] = TEMPLATES, root: Path = CLUSTER
) -> list[Path]:
    """Render `templates` (paths relative to `root`) into `out`; all or nothing."""
    site = read_site(site_path)
    rendered: dict[str, str] = {}
    used: set[str] = set()
    for rel in templates:
        text, names = render_text((root / rel).read_text(encoding="utf-8"), site, f"cluster/{rel}", site_path)
        used |= names
        rendered[rel] = text
    if templates == TEMPLATES and (unused := sorted(set(site) - used)):
        raise SiteError(f"{site_path}: {', '.join(unused)} is used by no template (a typo?)")
    # Written into a staging folder and swapped in whole: never a mix of old and new files.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, text in rendered.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / rel for rel in rendered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--site", type=Path, default=CLUSTER / "site.env", help="the site file (default cluster/site.env)"
    )
    parser.add_argument(
        "--out", type=Path, default=CLUSTER / "rendered", help="where to write (default cluster/rendered)"
    )
    args = parser.parse_args(argv)
    try:
        files = render(args.site, args.out)
    except SiteError as exc:
        print(f"cluster-render: {exc}", file=sys.stderr)
        return 2
    print("rendered: " + " ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
