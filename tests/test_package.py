"""The package is what ships: its wheel, installed alone into a fresh environment, runs from an empty folder."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from pipeline import config
from tests.conftest import PROJECT
from tests.helpers import environment, output, runs

pytestmark = pytest.mark.slow

# What is not the project's source, at its top (pip builds in the tree it is given: the test gives it a copy)
NOT_SOURCE = {".git", ".venv", "build", "data", ".cache", "mlflow.db", "mlruns", "mlartifacts", "outputs", "multirun",
              ".pytest_cache", "screenshots", "optuna.db"}


def not_source(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == PROJECT
    return {name for name in names
            if name == "__pycache__" or name.endswith(".egg-info") or (top and name in NOT_SOURCE)}


# a run of seconds: tiny_overrides's settings, but 2 epochs; data and store are the folder's own
TINY = ["split.validation_size=8", "build.vocabulary_size=200", "build.sequence_length=32", "fit.epochs=2",
        "fit.batch_size=8", "fit.jit_compile=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel installed into a new virtualenv (no dependencies: a .pth file lends it the libraries of
    the environment running the tests, but not that environment's install of this checkout); its python."""
    folder = tmp_path_factory.mktemp("package")
    shutil.copytree(PROJECT, folder / "source", ignore=not_source)
    # (the build backend, setuptools, from this environment: the lock has it, so no index is needed)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(folder / "source"), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(folder / "wheel")], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True, timeout=120)
    python = folder / "venv" / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "libraries.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    *map(str, (folder / "wheel").glob("*.whl"))], check=True, timeout=300)
    return python


def alone(python: Path) -> dict[str, str]:
    """The environment of a user of the installed package: its virtualenv's programs, nothing of the checkout."""
    env = environment(PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH")
    return env


def run(python: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    return subprocess.run([str(python), *args], cwd=folder, env=alone(python), capture_output=True, text=True,
                          timeout=600)


def config_sources(hydra_folder: Path) -> list[str]:
    """Where Hydra read the configuration from, as the job's .hydra/hydra.yaml records it."""
    hydra = yaml.safe_load((hydra_folder / ".hydra" / "hydra.yaml").read_text())["hydra"]
    return [source["path"] for source in hydra["runtime"]["config_sources"]]


def test_the_wheel_runs_a_run_a_search_and_scoring_from_an_empty_folder(installed, tiny_archive, tmp_path):
    """Every module and conf/ are in the wheel: from an empty folder, with no checkout importable, a single run
    (its settings from the user's own config folder, --config-dir), an Optuna search of two trials (the sweeper
    under hydra_plugins, a parent run with a child each) and `python -m pipeline.score` on the logged model."""
    found = run(installed, tmp_path / "where", "-c", "import pipeline, pipeline.speed.cache, "
                "hydra_plugins.pipeline_search; from pipeline import config; print(pipeline.__file__, config.CONF)")
    packaged = installed.parents[1] / "lib"
    assert found.returncode == 0, output(found)
    module, conf = map(Path, found.stdout.split())
    assert packaged in module.parents and conf == module.parent / "conf"
    # every module and every config file of the checkout is in the package
    shipped = {path.relative_to(module.parent) for path in module.parent.rglob("*.py")}
    assert {path.relative_to(PROJECT / "pipeline") for path in (PROJECT / "pipeline").rglob("*.py")
            if "hydra_plugin" not in path.parts} <= shipped  # (the plugin: installed as hydra_plugins.pipeline_search)
    assert sorted(path.relative_to(conf) for path in conf.rglob("*.yaml")) == sorted(
        path.relative_to(config.CONF) for path in config.CONF.rglob("*.yaml"))
    assert config.CONF == PROJECT / "conf"  # (this checkout, and its editable install, read its own conf/)
    # a single run, its settings in an experiment file of the user's own, and a search, side by side
    single, search = tmp_path / "single", tmp_path / "search"
    (single / "mine" / "experiment").mkdir(parents=True)
    (single / "mine" / "experiment" / "tiny.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(
        OmegaConf.from_dotlist(TINY)))
    data = [f"ingest.path={tiny_archive}", "ingest.download=false"]
    search.mkdir()
    terminal = (search / "terminal.txt").open("w")  # (a file, not a pipe a long search could fill)
    searching = subprocess.Popen(
        [str(installed), "-m", "pipeline", "-m", "experiment=optuna_search", "hydra.sweeper.n_trials=2",
         "evaluate.log_model=false", *data, *TINY], cwd=search, env=alone(installed), stdout=terminal, stderr=terminal)
    try:
        done = run(installed, single, "-m", "pipeline", "--config-dir", "mine", "experiment=tiny", *data)
        assert done.returncode == 0, output(done)
        (job,) = single.glob("outputs/*/*")
        assert config_sources(job)[1:3] == [str(conf), str(single / "mine")]  # ours, then the user's folder
        frame = runs(f"sqlite:///{single / 'mlflow.db'}")
        assert frame["status"].tolist() == ["FINISHED"] and frame["params.build.vocabulary_size"][0] == "200"
        assert frame["metrics.epochs_trained"][0] == 2
        # the logged model (models from code: pipeline/textmodel.py travels in it), loaded and scored
        (single / "reviews.txt").write_text("Superb, brilliant and moving.\nAwful, boring, the worst.\n")
        scored = run(installed, single, "-m", "pipeline.score", frame["tags.model_uri"][0], "reviews.txt",
                     "-o", "scored.csv")
        searching.wait(timeout=600)
    finally:
        searching.kill()
        terminal.close()
    assert searching.returncode == 0, (search / "terminal.txt").read_text()[-3000:]
    swept = runs(f"sqlite:///{search / 'mlflow.db'}")
    assert sorted(swept["status"]) == ["FINISHED"] * 3  # the parent and its two trials
    children = swept[swept["tags.mlflow.parentRunId"].notna()]
    assert len(children) == 2 and set(children["params.build.vocabulary_size"]) == {"200"}
    assert config_sources(next(search.glob("multirun/*/*/0")))[1] == str(conf)
    assert scored.returncode == 0, output(scored)
    table = pd.read_csv(single / "scored.csv")
    assert len(table) == 2 and table["probability"].between(0, 1).all()
    assert set(table["label"]) <= {"positive", "negative"}
