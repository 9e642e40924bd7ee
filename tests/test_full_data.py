"""Acceptance: the default configuration on the real archive reproduces the tutorial (about 40 s here).

Runs whenever the archive is available: IMDB_ARCHIVE, or the shared data folder beside the project.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REAL_ARCHIVE
from tests.helpers import check_complete_run, environment, output, runs

pytestmark = [pytest.mark.slow, pytest.mark.full_data,
              pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason=f"no archive at {REAL_ARCHIVE}")]


def test_default_run_reproduces_the_tutorial(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", f"ingest.path={REAL_ARCHIVE}", f"tracking.uri={uri}",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, output(done)
    frame = runs(uri)
    run = frame.iloc[0]
    check_complete_run(uri, run.run_id, epochs=40)
    assert run["metrics.test_accuracy"] >= 0.86
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    val_loss = [p.value for p in sorted(client.get_metric_history(run.run_id, "val_loss"), key=lambda p: p.step)]
    accuracy = client.get_metric_history(run.run_id, "accuracy")
    val_accuracy = client.get_metric_history(run.run_id, "val_accuracy")
    # the tutorial's overfitting signature: validation loss turns up before the end ...
    best_epoch = val_loss.index(min(val_loss)) + 1
    assert best_epoch < 40 and val_loss[-1] > min(val_loss)
    assert 15 <= best_epoch <= 35  # where the tutorial (and the default sweep for 16 units) finds it
    # ... while training accuracy pulls ahead of validation accuracy
    final = {p.key: p.value for p in accuracy + val_accuracy if p.step == 40}
    assert final["accuracy"] > final["val_accuracy"]
    assert run["params.data.train_rows"] == "15000" and run["params.data.validation_rows"] == "10000"


def test_the_best_family_beats_the_tutorial_by_four_points(tmp_path):
    """nbsvm (uni+bi+trigrams, naive-Bayes ratios), the model_comparison sweep's choice, at its defaults:
    0.913 test accuracy measured here (0.919 published), served from raw text."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "build=nbsvm", f"ingest.path={REAL_ARCHIVE}", f"tracking.uri={uri}",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, output(done)
    run = runs(uri).iloc[0]
    check_complete_run(uri, run.run_id, epochs=3)
    assert run["metrics.test_accuracy"] >= 0.912
    import mlflow

    model = mlflow.pyfunc.load_model(run["tags.model_uri"])
    scores = model.predict(["A moving, brilliantly acted film: one of the best of the year.",
                            "Dull, predictable and far too long. A waste of two hours."])
    assert scores[0] > 0.5 > scores[1]
