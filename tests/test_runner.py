"""The whole pipeline in-process on a tiny archive: what it records, and what the stage cache reuses."""

from __future__ import annotations

import dataclasses
import json
import sys

import mlflow
import pandas as pd
import pytest

from pipeline import cache, runner
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import check_complete_run, runs


def test_a_run_records_everything_a_user_looks_for(tiny_config):
    metrics, objects = runner.run(tiny_config)
    frame = runs(tiny_config.tracking.uri)
    assert len(frame) == 1
    check_complete_run(tiny_config.tracking.uri, frame.run_id[0], epochs=3)
    assert metrics["test_accuracy"] == pytest.approx(frame["metrics.test_accuracy"][0])
    assert frame["params.data.validation_rows"][0] == "8"
    assert frame["tags.cache.vectorize"][0] == "miss"
    assert objects["fitted"].history.shape[0] == 3


def test_the_logged_model_predicts_like_the_trained_one(tiny_config):
    _, objects = runner.run(tiny_config)
    uri = runs(tiny_config.tracking.uri)["tags.model_uri"][0]
    model = mlflow.pyfunc.load_model(uri)
    texts = ["Brilliant, superb and moving.", "Dull, awful, a waste.<br /><br />The worst."]
    from_model = model.predict(pd.DataFrame({"text": texts}))
    encoded = objects["encoded"]
    from pipeline import textmodel

    index = textmodel.token_index(encoded.vocabulary)
    direct = objects["model"].predict(textmodel.encode(index, texts, 32, "pre"), verbose=0).reshape(-1)
    assert from_model == pytest.approx(direct.tolist(), abs=1e-6)
    assert model.predict(texts) == pytest.approx(from_model)


def test_a_prefix_of_stages_runs_only_that_prefix(tiny_archive, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["stages=[ingest,split]"])
    metrics, objects = runner.run(cfg)
    frame = runs(cfg.tracking.uri)
    assert metrics == {} and "model" not in objects
    assert frame["status"][0] == "FINISHED" and "metrics.val_loss" not in frame
    assert frame["params.data.train_rows"][0] == "16"


def test_second_run_that_changes_only_the_model_reuses_prepared_data(tiny_archive, tmp_path, caplog):
    base = tiny_overrides(tiny_archive, tmp_path)
    runner.run(compose_config(base))
    caplog.set_level("INFO")
    runner.run(compose_config(base + ["build.hidden_units=8", "fit.epochs=2"]))
    assert "reusing cached products" in caplog.text
    runner.run(compose_config(base + ["split.validation_size=6"]))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.vectorize"].tolist() == ["miss", "hit", "miss"]
    assert frame["tags.cache.ingest"].tolist() == ["miss", "hit", "hit"]
    assert frame["params.data.validation_rows"].tolist() == ["8", "8", "6"]


def test_a_changed_archive_is_never_served_from_the_cache(tmp_path):
    from tests.conftest import write_archive

    archive = write_archive(tmp_path / "data.tar.gz", seed=1)
    overrides = tiny_overrides(archive, tmp_path) + ["fit.epochs=1"]
    runner.run(compose_config(overrides))
    write_archive(archive, seed=2)  # same path, new content
    runner.run(compose_config(overrides))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.ingest"].tolist() == ["miss", "miss"]
    assert frame["tags.data.digest"][0] != frame["tags.data.digest"][1]


def test_a_damaged_cache_entry_is_rebuilt(tiny_archive, tmp_path):
    overrides = tiny_overrides(tiny_archive, tmp_path) + ["fit.epochs=1"]
    runner.run(compose_config(overrides))
    entry = next((tmp_path / "cache" / "vectorize").iterdir())
    (entry / "x_train.npy").write_bytes(b"\x93NUMPY garbage")
    runner.run(compose_config(overrides))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.vectorize"].tolist() == ["miss", "miss"]
    store = cache.StageCache(tmp_path / "cache")
    assert store.load("vectorize", entry.name) is not None  # rebuilt and verified


def test_a_failing_run_ends_failed_with_the_error(tiny_archive, tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tiny_archive.read_bytes()[:200])
    cfg = compose_config(tiny_overrides(broken, tmp_path))
    with pytest.raises(ValueError, match="not a readable"):
        runner.run(cfg)
    frame = runs(cfg.tracking.uri)
    assert frame["status"].tolist() == ["FAILED"]
    assert "not a readable" in frame["tags.error"][0]


@pytest.fixture
def fits(monkeypatch) -> list:
    """Every runner.Training (the fit thread) a run starts, as it starts."""
    started, trainings = runner.Training.__init__, []

    def training(self, *args, **kwargs):
        started(self, *args, **kwargs)
        trainings.append(self)

    monkeypatch.setattr(runner.Training, "__init__", training)
    return trainings


def test_epochs_that_end_before_the_run_is_open_are_recorded_in_order(tiny_config, monkeypatch, fits):
    # The fit starts while MLflow is still being imported and the run opened; here the opening is held
    # back until the fit has ended, so every epoch waits for the run and must still reach it, in order.
    from pipeline import tracking

    opened = tracking.TrackedRun.__enter__

    def open_after_the_fit(self):
        fits[0].thread.join()
        return opened(self)

    monkeypatch.setattr(tracking.TrackedRun, "__enter__", open_after_the_fit)
    cfg = dataclasses.replace(tiny_config, fit=dataclasses.replace(tiny_config.fit, epochs=5))
    runner.run(cfg)
    assert fits[0].error is None and not fits[0].waiting  # all handed over when the run opened
    check_complete_run(cfg.tracking.uri, runs(cfg.tracking.uri).run_id[0], epochs=5)


def test_an_interrupt_before_the_run_is_open_stops_the_fit(tiny_config, monkeypatch, fits):
    from pipeline import tracking

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking.TrackedRun, "__enter__", interrupted)
    cfg = dataclasses.replace(tiny_config, fit=dataclasses.replace(tiny_config.fit, epochs=100000))
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg)
    assert not fits[0].thread.is_alive()  # stopped after the epoch under way, not left training
    assert fits[0].fitted is not None and len(fits[0].fitted.history) < 100000


def test_a_deferred_package_runs_its_code_on_first_use_only(tmp_path, monkeypatch):
    package = tmp_path / "lazy_pkg" / "inner"
    package.mkdir(parents=True)
    (tmp_path / "lazy_pkg" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("import sys\nsys.modules['lazy_pkg'].ran = True\nvalue = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("lazy_pkg", "lazy_pkg.inner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    runner.defer_imports(("lazy_pkg.inner",))
    import lazy_pkg
    from lazy_pkg import inner  # as Keras imports its wrappers: the code does not run yet

    assert not hasattr(lazy_pkg, "ran")
    assert inner.value == 42 and lazy_pkg.ran  # the first use runs it
    assert "__getattr__" not in vars(inner)  # and it is an ordinary module from then on


def test_stream_mode_records_what_memory_mode_records(tiny_archive, tmp_path):
    def overrides(mode: str, cache_name: str) -> list[str]:
        base = [o for o in tiny_overrides(tiny_archive, tmp_path) if not o.startswith("cache_dir=")]
        return base + [f"ingest.mode={mode}", f"cache_dir={tmp_path / cache_name}", "fit.epochs=2"]

    memory_metrics, _ = runner.run(compose_config(overrides("memory", "memory_cache")))
    stream_metrics, objects = runner.run(compose_config(overrides("stream", "stream_cache")))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["params.ingest.mode"].tolist() == ["memory", "stream"]
    for column in ("tags.data.digest", "params.data.train_rows", "params.data.validation_rows",
                   "params.data.test_rows", "tags.cache.ingest", "tags.cache.vectorize"):
        assert frame[column].nunique() == 1, column
    assert stream_metrics == pytest.approx(memory_metrics, abs=1e-6)
    assert objects["encoded"].x_train.shape == (16, 32)

    # the stage cache: the streamed ingest product is a blob of texts plus arrays, kept under its own
    # stage name; the vectorize products are byte for byte the same, under the same key
    entries = {name: {p.name: p for p in (tmp_path / name / "vectorize").iterdir()}
               for name in ("memory_cache", "stream_cache")}
    assert entries["memory_cache"].keys() == entries["stream_cache"].keys()
    manifests = [json.loads((next(iter(e.values())) / "manifest.json").read_text()) for e in entries.values()]
    assert manifests[0] == manifests[1]
    assert [p.name for p in (tmp_path / "memory_cache").iterdir() if p.name.startswith("ingest")] == ["ingest"]
    streamed = next((tmp_path / "stream_cache" / "ingest_stream").iterdir())
    assert (streamed / "texts.bin").stat().st_size > 0

    # a streamed run on the memory run's cache reuses its vectorize product
    runner.run(compose_config(overrides("stream", "memory_cache")))
    assert runs(f"sqlite:///{tmp_path / 'mlflow.db'}")["tags.cache.vectorize"].tolist()[-1] == "hit"


def test_fill_logs_the_chosen_mode_and_reuses_the_streamed_product(tiny_archive, tmp_path, caplog):
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["ingest.mode=stream"])
    store = cache.StageCache(tmp_path / "cache")
    ingest_key, vector_key = runner._keys(cfg)
    caplog.set_level("INFO")
    first = runner._fill(cfg, store, ingest_key, vector_key, runner.StageClock())
    assert "ingest: stream mode (ingest.mode=stream)" in caplog.text
    second = runner._fill(cfg, store, ingest_key, vector_key, runner.StageClock())
    assert (first["ingest_hit"], second["ingest_hit"]) == (False, True)
    assert first["ingest_meta"] == second["ingest_meta"]
    assert first["ingest_meta"]["counts"] == {"train": 24, "test": 24}
    assert second["encoded"].vocabulary == first["encoded"].vocabulary
