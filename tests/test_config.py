"""Every option of every config group composes into a valid PipelineConfig; bad settings are refused early."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException

from pipeline import config
from tests.conftest import CONF, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(group, option.stem) for group in GROUPS for option in sorted((CONF / group).glob("*.yaml"))]


def test_every_stage_has_a_config_group():
    assert set(config.STAGES) <= set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}", "ingest.path=reviews.csv" if (group, option) == ("ingest", "table") else "seed=1"]
    cfg = compose_config(overrides)
    assert isinstance(cfg, config.PipelineConfig)
    flat = config.flatten(cfg)
    assert "build.hidden_units" in flat and "fit.early_stopping.patience" in flat


def test_defaults_are_the_tutorials():
    cfg = compose_config([])
    assert (cfg.build.vocabulary_size, cfg.build.sequence_length, cfg.build.embedding_dim) == (10000, 256, 16)
    assert (cfg.build.hidden_units, cfg.build.hidden_layers, cfg.build.optimizer) == (16, 1, "adam")
    assert (cfg.fit.epochs, cfg.fit.batch_size, cfg.split.validation_size) == (40, 512, 10000)
    assert cfg.build.truncate == "pre" and cfg.build.dropout_rate == 0.0
    assert cfg.stages == list(config.STAGES)


def test_imdb_archive_variable_supplies_the_path(monkeypatch):
    monkeypatch.setenv("IMDB_ARCHIVE", "/data/somewhere/aclImdb_v1.tar.gz")
    assert compose_config([]).ingest.path == "/data/somewhere/aclImdb_v1.tar.gz"
    monkeypatch.delenv("IMDB_ARCHIVE")
    assert compose_config([]).ingest.path == "data/aclImdb_v1.tar.gz"


def test_a_family_brings_the_fit_it_needs_and_the_command_line_still_wins():
    cnn = compose_config(["build=cnn"])
    assert (cnn.build.family, cnn.fit.epochs, cnn.fit.batch_size, cnn.fit.jit_compile) == ("cnn", 2, 32, False)
    assert compose_config(["build=cnn", "fit.epochs=5"]).fit.epochs == 5
    stopped = compose_config(["build=nbsvm", "fit=early_stopping"])
    assert stopped.fit.early_stopping.enabled and stopped.fit.epochs == 3 and stopped.build.ngrams == 3
    assert compose_config(["build=fasttext"]).build.ngrams == 2
    tutorial = compose_config(["build=tutorial"])
    assert (tutorial.build.family, tutorial.fit.epochs, tutorial.fit.batch_size) == ("tutorial", 40, 512)


def test_overrides_reach_the_typed_config():
    cfg = compose_config(["fit.epochs=20", "build.hidden_units=32", "stages=[ingest,split]"])
    assert (cfg.fit.epochs, cfg.build.hidden_units, cfg.stages) == (20, 32, ["ingest", "split"])


@pytest.mark.parametrize("override, message", [
    ("build.family=svm", "build.family='svm'"),
    ("build.ngrams=4", "build.ngrams=4"),
    ("build=cnn build.sequence_length=20", "build.sequence_length=20"),
    ("build.hidden_units=0", "build.hidden_units=0"),
    ("fit.epochs=-1", "fit.epochs=-1"),
    ("fit.batch_size=0", "fit.batch_size=0"),
    ("build.vocabulary_size=0", "build.vocabulary_size=0"),
    ("build.truncate=middle", "build.truncate='middle'"),
    ("build.optimizer=lbfgs", "build.optimizer='lbfgs'"),
    ("split.validation_fraction=0.3", "set exactly one"),
    ("stages=[fit,evaluate]", "a prefix of"),
    ("evaluate.registered_model_name=team/imdb", "evaluate.registered_model_name='team/imdb'"),
])
def test_invalid_settings_name_the_setting_and_value(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        compose_config(override.split())


@pytest.mark.parametrize("overrides, message", [
    (["ingest.source=web"], "ingest.source='web' is not allowed: one of archive, keras, table"),
    (["ingest=table", "ingest.path=null"], "ingest.path=None is not allowed: set the archive or table location"),
    (["ingest.path=''"], "ingest.path='' is not allowed"),
])
def test_a_source_is_one_of_the_ingest_stages_and_its_path_is_set_where_it_reads_one(overrides, message):
    """Asked by a run before any work (train.check) and by a sweep before it starts and for each job."""
    from pipeline import sweep, train

    settings = compose_config(overrides)  # (the sources' table is the ingest stage's: config.py does not ask it)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check(settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        sweep.child_settings(settings, overrides, 0)


@pytest.mark.parametrize("override", ["fit.epoch=3", "build.hidden_units=many", "fit.epochs=2.5"])
def test_unknown_keys_and_wrong_types_are_refused(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def _leaves(node, prefix="", top=True):
    """(dotted key, value) of every value a config file sets, its `defaults` list aside."""
    for key, value in node.items():
        if key == "defaults" and top:
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        yield from (_leaves(value, path, False) if isinstance(value, dict) else [(path, value)])


@pytest.mark.parametrize("group, option", [o for o in OPTIONS if o[0] != "experiment"], ids=lambda o: str(o))
def test_a_config_file_names_only_what_differs_from_the_schema(group, option):
    """Each default lives once, in pipeline/config.py: an option file that repeated one would have to be kept
    equal to it by hand."""
    from omegaconf import OmegaConf

    path = CONF / group / f"{option}.yaml"
    text = path.read_text()
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    prefix = "" if "# @package _global_" in text else group
    defaults = OmegaConf.to_container(OmegaConf.structured(config.PipelineConfig))
    for key, value in _leaves(raw, prefix):
        default = defaults
        for part in key.split("."):
            default = default[part]
        assert value != default, f"{path.relative_to(CONF)} sets {key}: {value!r}, the schema's default already"


def test_a_familys_epoch_budget_holds_whatever_fit_group_is_chosen():
    for fit in ("tutorial", "early_stopping"):
        assert compose_config(["build=cnn", f"fit={fit}"]).fit.epochs == 2
        assert compose_config([f"fit={fit}", "build=nbsvm"]).fit.epochs == 3


@pytest.mark.slow
def test_a_stage_loads_neither_hydra_nor_omegaconf_nor_mlflow():
    """Stages are plain functions: importing them (and their typed configs) brings in no framework; the story
    (train) loads no Hydra or OmegaConf either, nor MLflow until it runs."""
    import subprocess
    import sys

    from tests.conftest import PROJECT

    code = ("import sys, pipeline.ingest, pipeline.split, pipeline.build, pipeline.fit, pipeline.evaluate; "
            "print(sorted(m for m in ('hydra', 'omegaconf', 'mlflow') if m in sys.modules)); "
            "import pipeline.train; print('mlflow' in sys.modules); "  # (the data worker imports the story, not MLflow)
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'hydra_plugins'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["[]", "False", "[]"], done.stdout + done.stderr


@pytest.mark.slow
def test_a_speed_mechanism_is_imported_only_when_its_switch_is_on(tiny_archive, tmp_path):
    """With every speed switch off, a run loads none of pipeline/speed's mechanisms (the gc pause aside: the
    command line's, imported by the story to resume it)."""
    import subprocess
    import sys

    from tests.conftest import tiny_overrides
    from tests.helpers import environment

    off = ["stage_cache=false", "prepare_ahead=false", "fit.compile_cache=false", "fit.loop=keras", "freeze_gc=false",
           "evaluate.log_model=false", "fit.epochs=1"]
    code = ("import sys; from pipeline.config import configure; from pipeline.train import train; "
            f"train(configure(*{tiny_overrides(tiny_archive, tmp_path) + off!r})); "
            "print(sorted(m for m in sys.modules if m.startswith(('pipeline.speed.', 'pipeline.epochloop'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment(), capture_output=True, text=True,
                          timeout=300)  # (in a folder of its own: its run's artifacts go to ./mlruns)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['pipeline.speed.collection']", done.stdout
