"""The user's view: the MLflow UI on the SQLite store of a finished small sweep, in headless Chromium.

The session's small real sweep (conftest.grid_sweep: 2 models x 1 and 2 epochs, SQLite store);
`mlflow ui` serves its `mlflow.db` on a loopback port; Playwright drives Debian's `chromium` (the system binary,
installed by `make setup`; Playwright never downloads a browser) and checks what a user would see:

* the experiment page shows the experiment's name, and its runs table the sweep's parent run with
  every trial's run name under it (the parent expanded);
* the experiment's chart view draws an `ir_recall_at_10` plot with a line per trial, each trial
  named in its legend;
* a trial run's "Model metrics" tab draws its `ir_recall_at_10` chart with one point per epoch
  (epoch 0 = the base model).

Screenshots go to `$EMBEDTUNE_ARTIFACTS` (else `artifacts/` in the repo; CI keeps them as an
artifact), one more on failure. `docs/mlflow-ui.png` in the README is a copy of
`mlflow-ui-charts.png` from a passing run.

The browser reaches nothing but the loopback server: name resolution maps every host but 127.0.0.1
to "not found", no proxy, background networking off, and every request to another host is aborted
by the page context's route and recorded; the test fails if one was attempted without being aborted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)
from servers import MlflowServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
METRIC = "ir_recall_at_10"
TIMEOUT_MS = 30_000
LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}
EGRESS_PROBE = "http://egress-probe.invalid/"

# No sandbox: CI and this project's machines run the tests as root, where Chromium refuses to
# start sandboxed. The rest keeps Chromium's own traffic (updates, sync, safe browsing, DNS
# prefetch ...) from leaving the machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--proxy-server=direct://",
]

# UI preferences a returning user would have (MLflow keeps them in localStorage): the "Model
# training" view of an experiment (its runs table; the default is the GenAI overview) and the
# assistant panel and first-visit tips closed, so they cover nothing.
UI_PREFERENCES = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.detectIssues.guidanceShown_v1": True,
}


@dataclass(frozen=True)
class Trial:
    run_id: str
    name: str
    epochs: int


@dataclass(frozen=True)
class FinishedSweep:
    db: Path
    experiment: str
    experiment_id: str
    parent_name: str
    trials: list[Trial]


@dataclass
class OffLoopbackLog:
    """Every request the browser made to a host other than the loopback server, and those the
    route aborted."""

    attempted: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)


def _artifacts_dir() -> Path:
    out = Path(os.environ.get("EMBEDTUNE_ARTIFACTS") or REPO / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in {"data", "blob", "about"} or parts.hostname in LOOPBACK_HOSTS


@pytest.fixture(scope="module")
def finished_sweep(grid_sweep) -> FinishedSweep:
    """The session's small real sweep (conftest.grid_sweep: 2 models x 1 and 2 epochs)."""
    spec, result = grid_sweep.spec, grid_sweep.result
    db = grid_sweep.run_dir / "mlflow.db"
    assert result.tracking_uri == f"sqlite:///{db}" and db.exists()
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("embedtune.kind") == "sweep"]
    trials = [
        Trial(r.info.run_id, r.info.run_name, int(float(r.data.params["epochs"])))
        for r in runs
        if r.data.tags.get("embedtune.kind") == "trial"
    ]
    assert len(parents) == 1 and len(trials) == 4, [r.info.run_name for r in runs]
    # Every trial run records its data as MLflow dataset inputs: digest = the data fingerprint.
    fingerprint = json.loads((grid_sweep.run_dir / "data" / "medquad.json").read_text())["fingerprint"]
    for r in runs:
        if r.data.tags.get("embedtune.kind") == "trial":
            inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
            got = {(i.dataset.name, i.dataset.digest) for i in inputs}
            assert got == {("medquad/train", fingerprint), ("medquad/eval", fingerprint)}, got
    assert all(r.info.status == "FINISHED" for r in runs)
    return FinishedSweep(
        db,
        spec.experiment,
        experiment.experiment_id,
        parents[0].info.run_name,
        sorted(trials, key=lambda t: t.epochs),
    )


@pytest.fixture(scope="module")
def mlflow_ui(finished_sweep: FinishedSweep) -> Iterator[str]:
    """`mlflow ui` (as `make mlflow-ui` starts it) on a free loopback port; its base URL."""
    server = MlflowServer(
        f"sqlite:///{finished_sweep.db}", command="ui", log=_artifacts_dir() / "mlflow-ui-server.log"
    )
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium under Playwright; first in the test's arguments, so a missing browser fails
    the test before the sweep runs."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: this test drives Debian's `chromium` package, which `make setup` "
            "installs (apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as pw:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir), removed on close.
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _context(browser: Browser, log: OffLoopbackLog) -> BrowserContext:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, service_workers="block")
    context.set_default_timeout(TIMEOUT_MS)
    init = f"for (const [k, v] of Object.entries({json.dumps(UI_PREFERENCES)})) localStorage.setItem(k, JSON.stringify(v));"
    context.add_init_script(init)

    def on_request(request: Request) -> None:
        if not _is_loopback_url(request.url):
            log.attempted.append(request.url)

    def gate(route: Route) -> None:
        if _is_loopback_url(route.request.url):
            route.continue_()
        else:
            log.aborted.append(route.request.url)
            route.abort()

    context.on("request", on_request)
    context.route("**/*", gate)
    return context


def _chart_card(page: Page, metric: str) -> Locator:
    """The chart card titled `metric` (one; an MLflow run-charts card, drawn by Plotly)."""
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator(f"h4[title='{metric}']")
    )
    expect(card).to_have_count(1)
    return card


def test_mlflow_ui_shows_sweep_runs_and_epoch_chart(
    browser: Browser, finished_sweep: FinishedSweep, mlflow_ui: str
) -> None:
    expect.set_options(timeout=TIMEOUT_MS)
    sweep = finished_sweep
    out = _artifacts_dir()
    log = OffLoopbackLog()
    page_errors: list[str] = []
    context = _context(browser, log)
    page = context.new_page()
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        # The experiment page: its name, the sweep's parent run, and (expanded) every trial run.
        page.goto(f"{mlflow_ui}/#/experiments/{sweep.experiment_id}")
        expect(page.get_by_role("link", name=sweep.experiment, exact=True).first).to_be_visible()
        parent_row = page.get_by_role("row").filter(
            has=page.get_by_role("link", name=sweep.parent_name, exact=True)
        )
        expect(parent_row).to_have_count(1)
        parent_row.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").click()  # expand
        for trial in sweep.trials:
            expect(page.get_by_role("link", name=trial.name, exact=True)).to_be_visible()
        page.screenshot(path=out / "mlflow-ui-experiment.png")

        # Its chart view: an ir_recall_at_10 plot with a line per trial, named in the legend.
        page.locator("label").filter(has=page.locator("input[name='runs-view-mode'][value='CHART']")).click()
        page.get_by_placeholder("Search metric charts").fill(METRIC)
        card = _chart_card(page, METRIC)
        expect(card.locator(".js-plotly-plot")).to_be_visible()
        for trial in sweep.trials:
            expect(card.get_by_text(f"{trial.name} ({METRIC})", exact=True)).to_be_visible()
        lines = card.locator(".js-plotly-plot g.trace.scatter path.js-line")
        expect(lines.first).to_be_attached()
        drawn = [d for d in lines.evaluate_all("els => els.map(e => e.getAttribute('d') || '')") if d]
        assert len(drawn) >= len(sweep.trials), f"{len(drawn)} plotted lines for {len(sweep.trials)} trials"
        # For the picture, the charts of every metric at 10 (the README shows this one).
        page.get_by_placeholder("Search metric charts").fill("_at_10")
        expect(
            _chart_card(page, "ir_mrr_at_10").locator(".js-plotly-plot g.trace.scatter").first
        ).to_be_visible()
        page.screenshot(path=out / "mlflow-ui-charts.png")

        # A trial's own page, "Model metrics" tab: its ir_recall_at_10 chart, a point per epoch 0..N.
        longest = sweep.trials[-1]
        page.goto(f"{mlflow_ui}/#/experiments/{sweep.experiment_id}/runs/{longest.run_id}/model-metrics")
        expect(page.get_by_role("heading", name=longest.name)).to_be_visible()
        page.get_by_placeholder("Search metric charts").fill(METRIC)  # charts off screen are not drawn
        card = _chart_card(page, METRIC)
        expect(card.locator(".js-plotly-plot")).to_be_visible()
        expect(card.locator(".js-plotly-plot g.trace.scatter path.point")).to_have_count(longest.epochs + 1)
        page.screenshot(path=out / "mlflow-ui-metric.png")

        # Its overview: the data it trained on, digest = the data fingerprint, and one more (the eval
        # data, behind "+1"; finished_sweep checks both records).
        fingerprint = json.loads((sweep.db.parent / "data" / "medquad.json").read_text())["fingerprint"]
        page.goto(f"{mlflow_ui}/#/experiments/{sweep.experiment_id}/runs/{longest.run_id}")
        expect(page.get_by_role("heading", name="Datasets")).to_be_visible()
        expect(page.get_by_text(f"medquad/train ({fingerprint})", exact=True)).to_be_visible()
        expect(page.get_by_text("+1", exact=True).first).to_be_visible()
        page.screenshot(path=out / "mlflow-ui-datasets.png")

        # The egress gate is live: a request to another host is recorded and aborted (it could not
        # leave anyway: the name resolves nowhere).
        outcome = page.evaluate(f"fetch('{EGRESS_PROBE}').then(() => 'reached', () => 'blocked')")
        assert outcome == "blocked" and EGRESS_PROBE in log.aborted, (outcome, log)
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=out / "mlflow-ui-failure.png")
            (out / "mlflow-ui-failure.html").write_text(page.content())
        raise
    finally:
        context.close()

    # Nothing left the machine: every request to another host was one the route aborted.
    others = sorted(set(log.attempted) - {EGRESS_PROBE})
    print(f"off-loopback requests (all aborted): {others or 'none'}")
    assert set(log.attempted) <= set(log.aborted), sorted(set(log.attempted) - set(log.aborted))
    assert not page_errors, f"uncaught errors in the UI: {page_errors}"
