"""Every number in the README's benchmark table is read from `bench/results.json`, the one file a
full `make bench` writes: a row whose key that file lacks, or whose shown result is not the file's
value at the precision shown, fails here (a README number can't drift from its measurement)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(
    r"^\| `(?P<key>[a-z0-9_]+)` \| (?P<what>.*) \| (?P<result>[^|]+) \| (?P<target>(?:[^|\\]|\\\|)+) \|$"
)
NUMBER = re.compile(r"^(?P<num>-?\d+(?:\.(?P<dec>\d+))?)\s*(?:x|s|µs|ms)?$")


def table_rows() -> list[dict[str, str]]:
    """The rows of the README's `| measure | embedtune vs. baseline | result | target |` table."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| measure | embedtune vs. baseline |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        m = ROW.match(line)
        assert m, f"a benchmark row the test cannot read: {line}"
        rows.append(m.groupdict())
    return rows


def shows(cell: str, value: float) -> bool:
    """Whether `cell` ("72x", "1.23x", "538 s", "0.0005") is `value` at the precision shown."""
    m = NUMBER.match(cell.strip())
    assert m, f"not a number with a unit: {cell!r}"
    decimals = len(m["dec"] or "")
    return round(float(value), decimals) == float(m["num"])


def test_every_benchmark_number_in_the_readme_is_the_results_files():
    results = json.loads((REPO / "bench" / "results.json").read_text())
    assert not results.get("failed_parts"), results.get("failed_parts")
    rows = table_rows()
    assert len(rows) >= 15
    missing = [r["key"] for r in rows if r["key"] not in results]
    assert not missing, f"README rows with no key in bench/results.json: {missing}"
    wrong = [
        (r["key"], r["result"], results[r["key"]]) for r in rows if not shows(r["result"], results[r["key"]])
    ]
    assert not wrong, f"README shows other numbers than bench/results.json: {wrong}"


def test_the_number_check_reads_precision_and_units():
    assert shows("72x", 72.4) and not shows("72x", 72.6)
    assert shows("1.23x", 1.2349) and not shows("1.23x", 1.236)
    assert shows("538 s", 537.8) and shows("0.0005", 0.00049) and shows("65946 µs", 65946.2)
    assert not shows("0.000", 0.0006)
