"""A run's model as MLflow logs and serves it: the raw-text pyfunc, pipeline/textmodel.py as model code beside the
Keras classifier and the vocabulary (and n-grams) it encodes text with. Logged while the tracking server answers;
while it is lost, saved on disk and kept with the run's other writes (journal.py) until they are written.
"""

from __future__ import annotations

import functools
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow

from pipeline import textmodel
from pipeline.tracking import journal as journals

PACKAGES = ("tensorflow", "keras", "mlflow", "hydra-core", "numpy", "pandas")
# Made-up reviews, so that no part of the data set is copied into the model's metadata.
INPUT_EXAMPLE = ["A moving story with wonderful acting; I would watch it again.",
                 "Dull, far too long, and the plot makes no sense at all.<br /><br />Skip it."]


def versions() -> dict[str, str]:
    """Installed versions of what the run depends on (TensorFlow under whichever name it was installed), as the process
    first found them: the code it runs (a package upgraded meanwhile runs its old code until the process restarts)."""
    return dict(_installed())


@functools.cache
def _installed() -> dict[str, str]:
    installed = {name: version for name in PACKAGES + ("tensorflow-cpu",) if (version := _version(name))}
    if "tensorflow-cpu" in installed:
        installed.pop("tensorflow", None)
    return installed


def _version(distribution: str) -> str | None:
    return next((d.version for d in metadata.distributions(name=distribution)), None)


def log(journal, model, encoded, cfg, step=0, tags=None, name="model") -> str | None:
    """The raw-text pyfunc at `step` (its epoch), logged in the run of `journal`. MLflow checks that the input
    example serves before keeping it. Input type Any, not string: MLflow's server casts a string column's null or
    123 to text (docs/serving.md). Its URI; None while the server is lost (then it is saved here and kept)."""
    with tempfile.TemporaryDirectory() as folder:
        arguments = files(model, encoded, cfg, folder, journal, step)
        if journal.live:
            try:
                info = mlflow.pyfunc.log_model(name=name, registered_model_name=cfg.evaluate.registered_model_name,
                                               step=step, tags=tags, **arguments)
                journal.models[name] = info.model_id
                return info.model_uri
            except Exception as error:
                if not journals.lost(error):
                    raise
                journal.lose(error)
        mlflow.pyfunc.save_model(f"{folder}/model", **arguments)
        journal.model(f"{folder}/model", name, step, tags or {}, cfg.evaluate.registered_model_name, link_step=True)
    return None


def save(model, encoded, cfg, path: str) -> None:
    """The same model, saved at `path` (not logged)."""
    with tempfile.TemporaryDirectory() as folder:
        mlflow.pyfunc.save_model(path, **files(model, encoded, cfg, folder))


def files(model, encoded, cfg, folder: str, journal=None, step: int | None = None) -> dict:
    """The classifier and vocabulary saved in `folder`; the arguments that make them the raw-text pyfunc. With a
    `journal` and a `step`, the model's size is recorded at that step (`model.size_mb`)."""
    from mlflow.types.schema import AnyType, ColSpec, Schema

    classifier, vocabulary_file = Path(folder) / textmodel.CLASSIFIER_FILE, Path(folder) / textmodel.VOCABULARY_FILE
    model.save(classifier)
    textmodel.save_vocabulary(vocabulary_file, encoded.vocabulary, cfg.build.sequence_length,
                              cfg.build.truncate, encoded.ngrams, encoded.codes)
    if journal is not None and step is not None:
        journal.metrics({"model.size_mb": sum(f.stat().st_size for f in (classifier, vocabulary_file)) / 1e6},
                        step=step)
    requirements = {name: version for name, version in versions().items() if name != "hydra-core"}
    return dict(python_model=str(Path(textmodel.__file__)),  # models from code: nothing pickled
                artifacts={"classifier": str(classifier), "vocabulary": str(vocabulary_file)},
                signature=mlflow.models.ModelSignature(Schema([ColSpec(AnyType())]), Schema([ColSpec("double")])),
                input_example=INPUT_EXAMPLE,
                pip_requirements=[f"{name}=={version}" for name, version in requirements.items()])
