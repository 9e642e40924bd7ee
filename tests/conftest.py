"""Shared fixtures: tiny archives in the aclImdb layout, and the real config shrunk to fit them."""

from __future__ import annotations

import contextlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline import config
from tests.helpers import store_in

PROJECT = Path(__file__).resolve().parents[1]
CONF = config.CONF  # the conf/ the pipeline composes (the checkout's, or an installed wheel's)
# The full data set, where the machine has it (CI does): beside the project, or named by IMDB_ARCHIVE.
REAL_ARCHIVE = Path(os.environ.get("IMDB_ARCHIVE", PROJECT.parent / "shared" / "data" / "aclImdb_v1_labeled.tar.gz"))

POSITIVE = "wonderful superb brilliant moving delightful masterpiece loved great excellent".split()
NEGATIVE = "awful boring terrible dull waste worst hated poor stupid".split()
NEUTRAL = "the film movie plot actor scene story this it was and of a with director".split()


def review(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(12, 30))]
    for _ in range(rng.randint(3, 6)):
        words.insert(rng.randrange(len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    text = " ".join(words).capitalize() + "."
    return text.replace(" scene ", " scene.<br /><br />", 1)


def write_archive(path: Path, per_class: int = 12, seed: int = 0, skip: tuple[str, ...] = (),
                  overrides: dict[str, bytes] | None = None) -> Path:
    """A .tar.gz in the aclImdb layout: per_class reviews for each of train/test x pos/neg.

    skip drops folders ("train/pos"); overrides replaces a member's bytes ("train/pos/0_9.txt": b"").
    """
    rng = random.Random(seed)
    overrides = overrides or {}
    with tarfile.open(path, "w:gz") as archive:
        for split in ("train", "test"):
            for polarity in ("pos", "neg"):
                if f"{split}/{polarity}" in skip:
                    continue
                for index in range(per_class):
                    rating = rng.randint(7, 10) if polarity == "pos" else rng.randint(1, 4)
                    name = f"{split}/{polarity}/{index}_{rating}.txt"
                    data = review(rng, polarity == "pos").encode()
                    data = overrides.get(f"{split}/{polarity}/{index}", data)
                    info = tarfile.TarInfo(f"aclImdb/{name}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        extra = b"unlabelled review"
        info = tarfile.TarInfo("aclImdb/train/unsup/0_0.txt")  # present in the original; must be skipped
        info.size = len(extra)
        archive.addfile(info, io.BytesIO(extra))
    return path


@pytest.fixture(scope="session", autouse=True)
def elsewhere(tmp_path_factory):
    """The tests run in a folder of their own: what a run keeps where it runs (a new store's experiments' artifacts in
    ./mlruns, the default store ./mlflow.db) stays out of the checkout."""
    with contextlib.chdir(tmp_path_factory.mktemp("working-folder")):
        yield


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("data") / "aclImdb_tiny.tar.gz")


def tiny_overrides(archive: Path, workdir: Path, made_store: bool = True) -> list[str]:
    """Hydra overrides that shrink the real config to seconds on a tiny archive, tracked under workdir: in a copy
    of a store MLflow has made (store_in), or, made_store=False, in one the run makes itself (none is there yet)."""
    return [
        f"ingest.path={archive}",
        "ingest.download=false",
        "split.validation_size=8",
        "build.vocabulary_size=200",
        "build.sequence_length=32",
        "fit.epochs=3",
        "fit.batch_size=8",
        "fit.jit_compile=false",
        "tracking.uri=" + (store_in(workdir) if made_store else f"sqlite:///{workdir / 'mlflow.db'}"),
        f"cache_dir={workdir / 'cache'}",
    ]


def compose_config(overrides: list[str]) -> config.PipelineConfig:
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return config.load(compose(config_name="config", overrides=overrides))


@pytest.fixture
def tiny_config(tiny_archive, tmp_path) -> config.PipelineConfig:
    return compose_config(tiny_overrides(tiny_archive, tmp_path))


@pytest.fixture(scope="session")
def tiny_run(tiny_archive, tmp_path_factory):
    """One tiny run of the real config, trained in-process once for the tests that only read what it left
    (its store, its logged model, what train() returned): (config, metrics, objects). Alone in its store."""
    from pipeline.train import train

    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path_factory.mktemp("tiny_run")))
    metrics, objects = train(cfg)
    return cfg, metrics, objects
