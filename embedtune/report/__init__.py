"""The report: evaluation rows + the sweep's trial records → `<run_dir>/report/`.

- `leaderboard` — every row with deltas against its base model, 95% intervals, paired tests, the
  winner (`leaderboard.py`);
- `epochs` — which epoch count to train, and overfitting flags from the trial curves;
- `probe` / `verdict` — "should you fine-tune?" and "already seen" per dataset;
- the do-no-harm check's table, from `harm.json` (written by `embedtune.final.harm`);
- `plots` — epochs per dataset and the best combinations;
- `build` — `build_report` and `rebuild_report`, which put these parts together;
- `render` — the page as blocks, written as `leaderboard.md` and `leaderboard.html` from one
  template pair;
- what a rebuild reads back (`results.csv`, `per_query.parquet`, `harm.json`, `probe.json`,
  `meta.json`) is `embedtune.report_store`, read through `RunDir`, so `embedtune report RUN_DIR`
  rebuilds everything without evaluating.

A report is built in a staging folder and replaces the old one as a whole (`RunDir.write_report`).
"""

from embedtune.report.build import (
    ReportResult,
    build_report,
    dataset_sources,
    rebuild_report,
    report_with_timings,
)

__all__ = ["ReportResult", "build_report", "dataset_sources", "rebuild_report", "report_with_timings"]
