"""The MLflow UI in a real browser (headless Debian Chromium driven by Playwright), over a store the
pipeline filled with one run and a small sweep. Screenshots land in screenshots/ (not committed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT, tiny_overrides
from tests.helpers import environment
from tests.servers import tracking_server

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("ui")]  # (one worker: one filled store)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = PROJECT / "screenshots"
EPOCHS = 6
# What this machine's Chromium needs headless and offline (no background calls to Google's hosts).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def filled_store(tiny_archive, tmp_path_factory):
    """One run and a sweep of 3 into a new store, started at once (they share nothing but the store)."""
    folder = tmp_path_factory.mktemp("ui")
    common = tiny_overrides(tiny_archive, folder) + [f"fit.epochs={EPOCHS}"]
    commands = {"single": [sys.executable, "-m", "pipeline", *common, "tracking.run_name=tutorial-tiny",
                           f"hydra.run.dir={folder / 'out'}"],
                "sweep": [sys.executable, "-m", "pipeline", "-m", *common, "build.hidden_units=4,8,16",
                          f"hydra.sweep.dir={folder / 'multirun'}"]}
    started = {}
    for name, command in commands.items():  # single.out: what the single run's terminal showed
        with open(folder / f"{name}.out", "w") as shown, open(folder / f"{name}.err", "w") as complained:
            started[name] = subprocess.Popen(command, cwd=folder, env=environment(), stdout=shown, stderr=complained)
    try:
        for name, process in started.items():
            process.wait(timeout=600)
            assert process.returncode == 0, (
                f"{name}\n{(folder / f'{name}.out').read_text()[-3000:]}\n{(folder / f'{name}.err').read_text()[-3000:]}")
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
    return folder


@pytest.fixture(scope="module")
def browser_page(filled_store):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium package is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(exist_ok=True)
    with tracking_server(filled_store, backend=f"sqlite:///{filled_store / 'mlflow.db'}") as url:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            yield url, page
            browser.close()


def ids(url: str):
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("imdb-sentiment")
    every = client.search_runs([experiment.experiment_id])
    single = next(r for r in every if r.info.run_name == "tutorial-tiny")
    parent = next(r for r in every if r.data.tags.get("sweep.parent") == "true")
    return experiment.experiment_id, single, parent


def unfold(page, parent_name: str) -> None:
    """Show a parent run's children in the runs table (the UI remembers, so only when they are hidden)."""
    if not page.get_by_text("hidden_units=16", exact=True).count():
        page.locator("div[role='row']").filter(has_text=parent_name).locator(
            "button[data-component-id*='runnamecellrenderer']").click()
    page.get_by_text("hidden_units=16", exact=True).wait_for()


def val_loss_points(page) -> int:
    """The points plotted in the val_loss chart of a metric-chart view (Plotly draws one per step and run)."""
    page.get_by_placeholder("Search metric charts").fill("val_loss")
    card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
        has=page.get_by_text("val_loss", exact=True))
    card.locator("g.points path").first.wait_for()
    return card.locator("g.points path").count()


def open_page(page, url: str, wait_for: str):
    page.goto(url)
    page.get_by_text(wait_for, exact=False).first.wait_for()


def fresh_page(page, width: int = 1600):
    """A page in a new browser profile: what a newcomer's browser holds (nothing remembered)."""
    fresh = page.context.browser.new_page(viewport={"width": width, "height": 1000})
    fresh.set_default_timeout(60_000)
    return fresh


def shows_the_runs_table(page, experiment_id: str, parent_name: str) -> None:
    """The experiment's runs table, as Model training shows it: the single run and the sweep's parent,
    its children folded. MLflow 3.18 opens an experiment on its GenAI Overview unless asked otherwise."""
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/(runs|overview)"))
    assert re.search(rf"#/experiments/{experiment_id}/runs\?workflowType=machine_learning", page.url), page.url
    page.get_by_text(parent_name, exact=True).wait_for()
    body = page.inner_text("body")
    assert "tutorial-tiny" in body and parent_name in body
    assert not any(f"hidden_units={h}" in body for h in (4, 8, 16))  # the children are folded under their parent


def test_a_newcomer_clicks_the_experiment_on_the_home_page_and_sees_the_runs_table(browser_page):
    """What the README tells a newcomer to do: choose Model training once (the browser remembers it),
    then click the experiment on the home page."""
    url, shared = browser_page
    experiment_id, _, parent = ids(url)
    page = fresh_page(shared)
    try:
        page.goto(f"{url}/")
        page.get_by_text("Model training", exact=True).click()
        page.get_by_role("link", name="imdb-sentiment", exact=True).click()
        shows_the_runs_table(page, experiment_id, parent.info.run_name)
        page.screenshot(path=str(SHOTS / "0-home-click-experiment.png"))
        page.goto(f"{url}/")  # next time, the choice is remembered
        page.get_by_role("link", name="imdb-sentiment", exact=True).click()
        shows_the_runs_table(page, experiment_id, parent.info.run_name)
    finally:
        page.close()


def test_the_runs_closing_lines_give_the_ui_command_its_run_page_and_the_runs_table(browser_page, filled_store):
    url, shared = browser_page
    experiment_id, single, parent = ids(url)
    *_, verdict, command, first, second = (filled_store / "single.out").read_text().strip().splitlines()
    assert verdict.startswith(f"MLflow run {single.info.run_id} ended FINISHED, test_accuracy ")
    assert command == f"See it: mlflow ui --backend-store-uri sqlite:///{filled_store / 'mlflow.db'}, then open"
    view = "?workflowType=machine_learning"
    run_page, runs_table = re.findall(r"http://127\.0\.0\.1:5000(/\S+)", first + second)  # mlflow ui's address
    assert run_page == f"/#/experiments/{experiment_id}/runs/{single.info.run_id}{view}"
    assert runs_table == f"/#/experiments/{experiment_id}/runs{view}"
    page = fresh_page(shared)  # served here by the test's server, on another port
    try:
        page.goto(url + runs_table)
        shows_the_runs_table(page, experiment_id, parent.info.run_name)
        page.goto(url + run_page)
        page.get_by_text("build.hidden_units").first.wait_for()
        assert "tutorial-tiny" in page.inner_text("body")
        page.screenshot(path=str(SHOTS / "0-run-page-from-log.png"))
    finally:
        page.close()


def test_the_experiment_lists_runs_and_groups_the_sweep(browser_page):
    url, page = browser_page
    experiment_id, single, parent = ids(url)
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs", "tutorial-tiny")
    body = page.inner_text("body")
    assert "tutorial-tiny" in body and parent.info.run_name in body
    assert "hidden_units=4" not in body  # children are folded under their parent ...
    unfold(page, parent.info.run_name)  # ... and unfold from it
    body = page.inner_text("body")
    assert all(f"hidden_units={h}" in body for h in (4, 8, 16))
    page.screenshot(path=str(SHOTS / "1-experiment-runs.png"))


def test_a_run_page_shows_params_test_accuracy_and_one_val_loss_point_per_epoch(browser_page):
    url, page = browser_page
    experiment_id, single, _ = ids(url)
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs/{single.info.run_id}", "build.hidden_units")
    body = page.inner_text("body")
    assert "build.hidden_units" in body and "test_accuracy" in body
    assert repr(single.data.metrics['test_accuracy'])[:4] in body
    page.screenshot(path=str(SHOTS / "2-run-overview.png"), full_page=True)
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs/{single.info.run_id}/model-metrics", "Model metrics")
    assert val_loss_points(page) == EPOCHS
    page.screenshot(path=str(SHOTS / "3-run-val-loss.png"))


def test_the_artifacts_view_lists_figures_report_and_model(browser_page):
    url, page = browser_page
    experiment_id, single, parent = ids(url)
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs/{single.info.run_id}/artifacts", "history.csv")
    body = page.inner_text("body")
    assert all(name in body for name in ("figures", "history.csv", "config", "model_summary.txt"))
    page.get_by_text("figures", exact=True).click()
    page.get_by_text("loss.png", exact=True).click()
    page.locator("img[alt='figures/loss.png']").first.wait_for()  # the figure itself is shown
    page.screenshot(path=str(SHOTS / "4-run-artifacts-figure.png"))
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs/{parent.info.run_id}/artifacts", "analysis")
    page.get_by_text("analysis", exact=True).click()
    page.get_by_text("report.md", exact=True).click()
    page.get_by_text("Validation loss is lowest at epoch").first.wait_for()
    page.screenshot(path=str(SHOTS / "5-sweep-report.png"))
    # the run's two checkpoints, its best and last epoch, are listed with it (MLflow 3 keeps logged models
    # beside the artifacts); the served one is the run's model_uri
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs/{single.info.run_id}", "Logged models (2)")
    for other in MlflowClient(url).search_logged_models([experiment_id], f"source_run_id = '{single.info.run_id}'"):
        page.locator(f"a[href*='/models/{other.model_id}']").first.wait_for()
    model_id = single.data.tags["model_uri"].removeprefix("models:/")
    link = page.locator(f"a[href*='/models/{model_id}']").first
    link.click()  # the model's own page
    page.get_by_text(model_id).first.wait_for()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "6-logged-model.png"))


def row_of(page, name: str) -> str:
    """The text of the grid's row that holds `name`: its pinned and scrolled parts (a div[role=row] each) joined."""
    index = page.locator("div[role='row'][row-index]").filter(has_text=name).first.get_attribute("row-index")
    parts = page.locator(f"div[role='row'][row-index='{index}']")
    return "\n".join(parts.nth(i).inner_text() for i in range(parts.count()))


def test_the_models_tab_names_each_checkpoint_and_shows_its_own_epochs_values(browser_page):
    """A row per LoggedModel (the single run's and the sweep's, best and last each), named by role, epoch and
    run, its metric columns that model's (MLflow 3.18 shows a model's first point of a key: a whole linked
    curve showed epoch 1's loss beside the last epoch's model); the run page's logged models and the model's
    own page likewise."""
    url, shared = browser_page
    experiment_id, single, _ = ids(url)
    client = MlflowClient(url)
    every = client.search_logged_models([experiment_id])
    names = [model.name for model in every]
    assert len(every) == 8 and len(set(names)) == 8, names  # 4 runs x best and last, no two rows named alike
    mine = [model for model in every if model.source_run_id == single.info.run_id]
    steps = {output.model_id: output.step for output in client.get_run(single.info.run_id).outputs.model_outputs}
    assert sorted((m.tags["checkpoint"], steps[m.model_id]) for m in mine)[1] == ("last", EPOCHS)
    curves = {key: {p.step: p.value for p in client.get_metric_history(single.info.run_id, key)} for key in ("loss", "val_loss")}
    page = fresh_page(shared, width=3200)  # the grid draws only the columns in view: wide enough for the metrics
    try:
        page.goto(f"{url}/#/experiments/{experiment_id}/models?workflowType=machine_learning")
        page.get_by_text(mine[0].name).first.wait_for()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / "6b-models-tab.png"))
        for where in ("models tab", "run page"):
            if where == "run page":
                page.goto(f"{url}/#/experiments/{experiment_id}/runs/{single.info.run_id}")
                page.get_by_text(mine[0].name).first.wait_for()
            for model in mine:
                epoch, row = steps[model.model_id], row_of(page, model.name)
                assert model.name.startswith(f"{model.tags['checkpoint']}-epoch-{epoch}") and "tutorial-tiny" in row
                for key, values in curves.items():  # its epoch's value, no other epoch's
                    assert repr(values[epoch]) in row, (where, model.name, key, row)
                    assert not [s for s, value in values.items() if value != values[epoch] and repr(value) in row], row
        last = next(model for model in mine if model.tags["checkpoint"] == "last")
        page.goto(f"{url}/#/experiments/{experiment_id}/models/{last.model_id}")
        page.get_by_text(last.model_id).first.wait_for()
        page.get_by_text(repr(curves["loss"][EPOCHS])).first.wait_for()  # its metrics: the last epoch's loss, once
        body = page.inner_text("body")
        assert last.name in body and body.count(repr(curves["loss"][EPOCHS])) == 1 and repr(curves["loss"][1]) not in body
        page.screenshot(path=str(SHOTS / "6c-last-model.png"), full_page=True)
    finally:
        page.close()


def test_comparing_the_sweep_children_shows_val_loss_curves_side_by_side(browser_page):
    url, page = browser_page
    experiment_id, _, parent = ids(url)
    open_page(page, f"{url}/#/experiments/{experiment_id}/runs", "tutorial-tiny")
    search = page.get_by_placeholder('metrics.rmse < 1 and params.model = "tree"')
    search.fill(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    search.press("Enter")
    page.get_by_text("4 matching runs").wait_for()  # the parent and its three children
    unfold(page, parent.info.run_name)
    page.locator("label:has(input[value='CHART'])").click()
    assert val_loss_points(page) == 3 * EPOCHS  # three children, one point per epoch each
    page.screenshot(path=str(SHOTS / "7-compare-val-loss.png"))
