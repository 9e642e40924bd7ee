"""The whole pipeline in-process on a tiny archive (pipeline.train): what it records, and what the stage cache reuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline.speed import cache
from pipeline.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import check_complete_run, runs

NO_MODEL = "evaluate.log_model=false"  # what the stage cache reuses does not depend on the logged model (tested below)


def test_a_run_records_everything_a_user_looks_for(tiny_run):
    tiny_config, metrics, objects = tiny_run
    frame = runs(tiny_config.tracking.uri)
    assert len(frame) == 1
    check_complete_run(tiny_config.tracking.uri, frame.run_id[0], epochs=3)
    assert metrics["test_accuracy"] == pytest.approx(frame["metrics.test_accuracy"][0])
    assert frame["params.data.validation_rows"][0] == "8"
    assert frame["tags.cache.vectorize"][0] == "miss"
    assert objects["fitted"].history.shape[0] == 3


def test_with_the_stage_cache_off_nothing_is_cached_and_the_numbers_are_the_same(tiny_archive, tmp_path):
    base = tiny_overrides(tiny_archive, tmp_path) + [NO_MODEL]
    cached, _ = train(compose_config(base))
    again, _ = train(compose_config(base))  # from the cache
    off, _ = train(compose_config(base + ["stage_cache=false", f"cache_dir={tmp_path / 'unused'}"]))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.vectorize"].tolist() == ["miss", "hit", "off"]
    assert not (tmp_path / "unused").exists()
    assert cached == pytest.approx(again, abs=1e-9) and off == pytest.approx(cached, abs=1e-9)


def test_the_logged_model_predicts_like_the_trained_one(tiny_run):
    tiny_config, _, objects = tiny_run
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
    metrics, objects = train(cfg)
    frame = runs(cfg.tracking.uri)
    assert metrics == {} and "model" not in objects
    assert frame["status"][0] == "FINISHED" and "metrics.val_loss" not in frame
    assert frame["params.data.train_rows"][0] == "16"


def test_second_run_that_changes_only_the_model_reuses_prepared_data(tiny_archive, tmp_path, caplog):
    base = tiny_overrides(tiny_archive, tmp_path) + [NO_MODEL]
    train(compose_config(base))
    caplog.set_level("INFO")
    train(compose_config(base + ["build.hidden_units=8", "fit.epochs=2"]))
    assert re.search(r"ingest +\d+\.\d s  .*, from the stage cache", caplog.text)
    assert re.search(r"vectorize +\d+\.\d s  .*, from the stage cache", caplog.text)
    train(compose_config(base + ["split.validation_size=6"]))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.vectorize"].tolist() == ["miss", "hit", "miss"]
    assert frame["tags.cache.ingest"].tolist() == ["miss", "hit", "hit"]
    assert frame["params.data.validation_rows"].tolist() == ["8", "8", "6"]


def test_a_changed_archive_is_never_served_from_the_cache(tmp_path):
    from tests.conftest import write_archive

    archive = write_archive(tmp_path / "data.tar.gz", seed=1)
    overrides = tiny_overrides(archive, tmp_path) + ["fit.epochs=1", NO_MODEL]
    train(compose_config(overrides))
    write_archive(archive, seed=2)  # same path, new content
    train(compose_config(overrides))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.ingest"].tolist() == ["miss", "miss"]
    assert frame["tags.data.digest"][0] != frame["tags.data.digest"][1]


def test_a_damaged_cache_entry_is_rebuilt(tiny_archive, tmp_path):
    overrides = tiny_overrides(tiny_archive, tmp_path) + ["fit.epochs=1", NO_MODEL]
    train(compose_config(overrides))
    entry = next((tmp_path / "cache" / "vectorize").iterdir())
    (entry / "x_train.npy").write_bytes(b"\x93NUMPY garbage")
    train(compose_config(overrides))
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["tags.cache.vectorize"].tolist() == ["miss", "miss"]
    store = cache.StageCache(compose_config(overrides))
    assert store.key("vectorize") == entry.name and store.load("vectorize") is not None  # rebuilt and verified


def test_a_failing_run_ends_failed_with_the_error(tiny_archive, tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tiny_archive.read_bytes()[:200])
    cfg = compose_config(tiny_overrides(broken, tmp_path))
    with pytest.raises(ValueError, match="not a readable"):
        train(cfg)
    frame = runs(cfg.tracking.uri)
    assert frame["status"].tolist() == ["FAILED"]
    assert "not a readable" in frame["tags.error"][0]


def test_your_own_csv_with_word_labels_and_empty_rows_is_recorded_as_read(tmp_path):
    import random

    from tests.conftest import review

    rng = random.Random(2)
    frame = pd.DataFrame({"review": [review(rng, i % 2 == 0) for i in range(60)],
                          "sentiment": ["positive" if i % 2 == 0 else "negative" for i in range(60)]})
    frame.loc[[4, 17], "review"] = ""
    frame.to_csv(tmp_path / "imdb.csv", index=False)
    overrides = tiny_overrides(tmp_path / "imdb.csv", tmp_path)
    cfg = compose_config(overrides + ["ingest=table", "ingest.text_column=review", "ingest.label_column=sentiment",
                                      "ingest.positive_label=positive", "ingest.skip_bad_rows=true",
                                      "split.validation_fraction=null"])  # (a table holds out a share by default)
    train(cfg)
    run = runs(cfg.tracking.uri).iloc[0]
    assert run["status"] == "FINISHED"
    assert (run["params.data.label_positive"], run["params.data.label_negative"]) == ("positive", "negative")
    assert run["metrics.data.skipped_rows"] == 2
    listed = mlflow.artifacts.load_text(f"runs:/{run.run_id}/data/skipped_rows.csv")
    assert listed.splitlines() == ["row,reason", "5,empty text", "18,empty text"]
    # the same rows as Parquet (the same content digest), in the same store: each run's dataset names its own file
    frame.to_parquet(tmp_path / "imdb.parquet")
    train(compose_config(overrides + ["ingest=table", f"ingest.path={tmp_path / 'imdb.parquet'}", "stages=[ingest]",
                                      "ingest.text_column=review", "ingest.label_column=sentiment",
                                      "ingest.positive_label=positive", "ingest.skip_bad_rows=true",
                                      "split.validation_fraction=null"]))
    both = runs(cfg.tracking.uri)
    assert both["tags.data.digest"].nunique() == 1
    for run_id, path in zip(both.run_id, both["params.ingest.path"]):
        source = json.loads(mlflow.get_run(run_id).inputs.dataset_inputs[0].dataset.source)["uri"]
        assert Path(source) == Path(path).resolve()


@pytest.mark.parametrize("family", ["tutorial", "fasttext", "cnn", "nbsvm"])
def test_every_family_serves_the_probabilities_it_was_tested_with(tiny_archive, tmp_path, family):
    """The logged model takes raw review text and computes the same tokens or n-grams as training did:
    served on the raw test reviews, it gives the pipeline's own test-set probabilities."""
    from pipeline import ingest, split

    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + [f"build={family}"])
    metrics, objects = train(cfg)
    frame = runs(cfg.tracking.uri)
    assert frame["params.build.family"][0] == family and frame["status"][0] == "FINISHED"
    assert frame["metrics.model.parameters"][0] == objects["model"].count_params()
    assert (objects["encoded"].ngrams > 0) == (family in ("fasttext", "nbsvm"))
    test = split.split(ingest.ingest(cfg.ingest, cfg.seed).frame, cfg.split, cfg.seed).test
    served = mlflow.pyfunc.load_model(frame["tags.model_uri"][0]).predict(test[["text"]])
    assert served == pytest.approx(objects["evaluation"].probabilities.tolist(), abs=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(((served > 0.5) == test["label"].to_numpy()).mean())
