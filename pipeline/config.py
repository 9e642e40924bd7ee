"""Typed configuration: one dataclass per stage, plus where runs are recorded.

The YAML files under ``conf/`` fill these schemas (registered with Hydra by pipeline.sweep); ``load(cfg)``
turns the composed config into a ``PipelineConfig`` and ``validate()`` rejects values a run cannot use,
before any data is read. Defaults are the tutorial's ("Text classification with movie reviews", TensorFlow docs).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # a stage imports this module: it loads neither OmegaConf nor Hydra (load() imports them)
    from omegaconf import DictConfig

STAGES, TRUNCATIONS = ("ingest", "split", "build", "fit", "evaluate"), ("pre", "post")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam")
FAMILIES = ("tutorial", "fasttext", "cnn", "nbsvm")  # conf/build/<family>.yaml each
BAG_FAMILIES = ("fasttext", "nbsvm")  # trained on each review's distinct n-grams, not its token sequence

# A sweep's jobs find their parent run through these (set by pipeline.sweep, read by pipeline.tracking).
PARENT_RUN, EXPERIMENT = "PIPELINE_SWEEP_PARENT_RUN_ID", "PIPELINE_SWEEP_EXPERIMENT_ID"
CANONICAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
CANONICAL_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"


def _require(ok: bool, setting: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{setting}={value!r} is not allowed: {allowed}")


def _positive(setting: str, value: int) -> None:
    _require(isinstance(value, int) and value > 0, setting, value, "use a whole number above 0")


@dataclass
class IngestConfig:
    source: str = "archive"  # archive: aclImdb layout (.tar.gz or folder); keras: keras.datasets.imdb; table: a file
    path: Optional[str] = None  # archive: local .tar.gz or extracted folder; table: .csv, .tsv, .jsonl or .parquet
    url: str = CANONICAL_URL  # fetched into `path` only when no local copy exists
    sha256: Optional[str] = CANONICAL_SHA256  # checked after a download; null skips the check
    download: bool = True  # false: a missing archive is an error, never a download
    num_words: int = 10000  # keras source: the tutorial's vocabulary cap for load_data
    text_column: str = "text"  # table source
    label_column: str = "label"  # table source: 0 = negative, 1 = positive, unless...
    positive_label: Optional[str] = None  # ...this value means positive and the column's other value negative
    split_column: Optional[str] = "split"  # table source: values train/test; a missing column means...
    test_fraction: float = 0.5  # ...this seeded share of rows becomes the test split (IMDB is 50/50)
    skip_bad_rows: bool = False  # true: leave out empty rows or unreadable files (counted and listed in the run)

    def validate(self) -> None:  # (ingest.source and ingest.path: ingest.check, beside the table of sources)
        _positive("ingest.num_words", self.num_words)
        _require(0.0 < self.test_fraction < 1.0, "ingest.test_fraction", self.test_fraction,
                 "use a fraction strictly between 0 and 1")


@dataclass
class SplitConfig:
    validation_size: Optional[int] = 10000  # the tutorial holds out the first 10,000 training reviews
    validation_fraction: Optional[float] = None  # alternative to validation_size; set exactly one
    shuffle: bool = True  # seeded shuffle before the hold-out (the archive is sorted by class)
    seed: Optional[int] = None  # the shuffle's seed; null: the run's seed (set it to keep one split across seeds)

    def validate(self) -> None:
        size, share = self.validation_size, self.validation_fraction  # (ingest=table holds out a share by default)
        if size is not None and share is not None:
            raise ValueError(f"split.validation_size={size} and split.validation_fraction={share}: set exactly one; "
                             f"add split.validation_fraction=null to hold out {size}, "
                             f"or split.validation_size=null for {share}")
        _require(size is not None or share is not None, "split.validation_size", size, "split.validation_fraction is "
                 "null too; set one, e.g. split.validation_fraction=0.4 (a share) or split.validation_size=10000")
        if size is not None:
            _positive("split.validation_size", size)
        if share is not None:
            _require(0.0 < share < 1.0, "split.validation_fraction", share,
                     "use a share strictly between 0 and 1, e.g. split.validation_fraction=0.4")

@dataclass
class BuildConfig:
    family: str = "tutorial"  # tutorial, fasttext, cnn or nbsvm (pipeline/build.py; conf/build/<family>.yaml)
    vocabulary_size: int = 10000  # the tutorial's num_words (fasttext, nbsvm: how many n-grams at most)
    sequence_length: int = 256  # the tutorial's maxlen (fasttext, nbsvm: distinct n-grams kept per review)
    ngrams: int = 1  # fasttext, nbsvm: word n-grams of 1..ngrams words
    min_count: int = 2  # fasttext, nbsvm: n-grams in fewer training reviews are left out
    truncate: str = "pre"  # pre keeps each review's last tokens, as pad_sequences does (test acc 0.873 vs 0.856)
    embedding_dim: int = 16  # the tutorial's value
    hidden_units: int = 16  # the tutorial's Dense(16, relu)
    hidden_layers: int = 1  # how many Dense(hidden_units, relu) layers
    dropout_rate: float = 0.0  # the tutorial uses none; applied after pooling and after each hidden layer
    optimizer: str = "adam"  # the tutorial's optimizer
    learning_rate: float = 0.001  # Keras's Adam default, which the tutorial uses
    l2: float = 0.0  # L2 penalty on the first layer's weights (the embedding; nbsvm: the n-gram weights)
    filters: int = 64  # cnn: channels of each Conv1D
    kernel_size: int = 7  # cnn: words each filter sees
    smoothing: float = 1.0  # nbsvm: the count added to every n-gram before the log-count ratios

    def validate(self) -> None:
        _require(self.family in FAMILIES, "build.family", self.family, f"one of {', '.join(FAMILIES)} (build=<family>)")
        for name in ("vocabulary_size", "sequence_length", "embedding_dim", "hidden_units", "hidden_layers",
                     "ngrams", "min_count", "filters", "kernel_size"):
            _positive(f"build.{name}", getattr(self, name))
        _require(self.ngrams <= 3, "build.ngrams", self.ngrams, "use 1, 2 or 3")
        _require(self.l2 >= 0 and self.smoothing > 0, "build.l2/build.smoothing", (self.l2, self.smoothing),
                 "use l2 >= 0 and smoothing > 0")
        if self.family == "cnn":  # two Conv1D of stride 3: the second needs kernel_size positions left
            _require((self.sequence_length - self.kernel_size) // 3 + 1 >= self.kernel_size, "build.sequence_length",
                     self.sequence_length, f"at least {4 * self.kernel_size - 3} for two convolutions of {self.kernel_size}")
        _require(self.vocabulary_size >= 3, "build.vocabulary_size", self.vocabulary_size,
                 "use at least 3 (padding, out-of-vocabulary and one word)")
        _require(self.truncate in TRUNCATIONS, "build.truncate", self.truncate,
                 "pre (keep the last tokens) or post (keep the first tokens)")
        _require(0.0 <= self.dropout_rate < 1.0, "build.dropout_rate", self.dropout_rate,
                 "use a rate in [0, 1)")
        _require(self.optimizer in OPTIMIZERS, "build.optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        _require(self.learning_rate > 0, "build.learning_rate", self.learning_rate, "use a rate above 0")


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False  # the tutorial trains all 40 epochs; turn on for the automatic answer to overfitting
    monitor: str = "val_loss"  # also what picks the "best" checkpoint, whether early stopping is on or not
    patience: int = 3  # epochs without improvement before stopping
    restore_best_weights: bool = True  # keep the best epoch's weights, not the last

    def validate(self) -> None:
        _require(self.monitor in ("val_loss", "val_accuracy", "loss", "accuracy"), "fit.early_stopping.monitor",
                 self.monitor, "one of val_loss, val_accuracy, loss, accuracy")
        _positive("fit.early_stopping.patience", self.patience)


@dataclass
class FitConfig:
    epochs: int = 40  # the tutorial's value
    batch_size: int = 512  # the tutorial's value
    loop: str = "epoch"  # epoch: one compiled call trains an epoch and validates; keras: model.fit as written
    jit_compile: bool = True  # compile with XLA: the same steps, several times faster on CPU
    compile_cache: bool = True  # keep XLA's compiled programs in cache_dir: a later run loads them (0.5 s sooner)
    dense_gradients: bool = True  # fit.loop=epoch: an embedding's gradient summed per row (pipeline/epochloop.py)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint_every: int = 0  # also keep every N-th epoch's weights, logged as checkpoints (0 or less: off)

    def validate(self) -> None:
        _positive("fit.epochs", self.epochs)
        _positive("fit.batch_size", self.batch_size)
        _require(self.loop in ("epoch", "keras"), "fit.loop", self.loop, "one of epoch, keras")


@dataclass
class EvaluateConfig:
    threshold: float = 0.5  # probability above which a review counts as positive
    batch_size: int = 8192  # rows scored a call: a quarter of the time of 512 a call for 500k reviews, the same
    # bits (any multiple of 8 here); a call's embedding output is 8192 x 256 x 16 float32, 134 MB (cnn: 4096)
    log_model: bool = True  # log the raw-text model (pyfunc) to MLflow
    registered_model_name: Optional[str] = None  # also register the model under this name
    serve: str = "best"  # the checkpoint logged as `model`, registered, scored as test_*: best (by validation) or last

    def validate(self) -> None:
        _require(self.serve in ("best", "last"), "evaluate.serve", self.serve, "best (by fit.early_stopping.monitor) or last")
        _require(0.0 < self.threshold < 1.0, "evaluate.threshold", self.threshold, "use a value strictly between 0 and 1")
        _positive("evaluate.batch_size", self.batch_size)
        _require((name := self.registered_model_name) is None or (name.strip() != "" and not any(c in name for c in "/:")),
                 "evaluate.registered_model_name", name, "use a name without '/' or ':' (the model registry's rule)")


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory
    experiment_name: str = "imdb-sentiment"
    run_name: Optional[str] = None  # null: MLflow picks a name
    wait_for_server: float = 45.0  # seconds a run's end waits for a lost tracking server before keeping its record

    def validate(self) -> None:
        _require(self.wait_for_server >= 0, "tracking.wait_for_server", self.wait_for_server, "use 0 seconds or more")


@dataclass
class SweepConfig:
    early_stopping_reference: bool = False  # after a sweep's jobs, also run this config with early stopping
    threads: Optional[int] = None  # TensorFlow threads per job; null: TensorFlow's choice (all cores)
    resume: Optional[str] = None  # a sweep's parent run id: continue it, skipping jobs that already finished
    champion_alias: Optional[str] = "champion"  # with evaluate.registered_model_name: alias of the best job's version
    share_budgets: bool = True  # jobs differing only in fit.epochs: one training, each budget its own run (budgets.py)
    # a shared training's longest budget recorded while the sweep's next job starts (in-process launcher; a speed
    # switch, measured by benchmarks/budgets.py: pipeline/tracking/budgets.py)
    overlap_records: bool = True
    trial: Optional[int] = None  # set by the Optuna sweeper (pipeline/search.py): the job is this trial of `study`,
    study: Optional[str] = None  # kept in `storage`, to which it reports each epoch, so that a pruner can stop it
    storage: Optional[str] = None

    def validate(self) -> None:
        _require(self.threads is None or (isinstance(self.threads, int) and self.threads > 0), "sweep.threads",
                 self.threads, "use a whole number above 0")


@dataclass
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # a prefix of the pipeline
    seed: int = 42  # seeds the split, weight initialisation and batch order
    cache_dir: str = ".cache/pipeline"  # stage products and compiled programs, keyed by what made them
    verbose: bool = False  # true: the libraries' own lines on the terminal (false: in the run's logs/run.log only)
    # Speed switches, each measured by `python benchmarks/bench.py --ablate` (docs/performance.md)
    stage_cache: bool = True  # reuse ingest/split/vectorize products from cache_dir (pipeline.cache)
    prepare_ahead: bool = True  # prepare the data in a worker process while TensorFlow loads
    freeze_gc: bool = True  # once TensorFlow is loaded, leave its objects out of garbage collection

    def validate(self) -> None:
        for part in (self.ingest, self.split, self.build, self.fit, self.fit.early_stopping, self.evaluate, self.tracking,
                     self.sweep):
            part.validate()
        stages = list(self.stages)
        _require(len(stages) > 0 and stages == list(STAGES[: len(stages)]), "stages", stages,
                 f"a prefix of {list(STAGES)}, e.g. [ingest,split]")


def register() -> None:
    """Give Hydra the schema, so that conf/config.yaml (and every group option) is type-checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


# The configuration Hydra composes: in an installed wheel, inside the package (pipeline/conf, pyproject.toml's
# package-dir); in a checkout and its editable install, conf/ at the top of the repository.
PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF = PACKAGED_CONF if PACKAGED_CONF.is_dir() else PACKAGED_CONF.parents[1] / "conf"


def configure(*overrides: str) -> PipelineConfig:
    """The settings `python -m pipeline OVERRIDES` would run with, for train() in a notebook or another
    program: conf/ composed with the overrides (Hydra's syntax, e.g. "fit.epochs=10"), checked alike."""
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return load(compose(config_name="config", overrides=list(overrides)))


def family_epochs(family: str | None) -> int | None:
    """A family's own epoch budget: the `fit.epochs` its conf/build file sets, else FitConfig's (None: no such family)."""
    from omegaconf import OmegaConf

    path = CONF / "build" / f"{family}.yaml"
    return int(OmegaConf.select(OmegaConf.load(path), "fit.epochs", default=FitConfig.epochs)) if path.is_file() else None


def load(cfg: DictConfig) -> PipelineConfig:
    """The composed Hydra config as a validated PipelineConfig (drops the `hydra` node if present)."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # Hydra's own node; its interpolations only resolve inside a running app
    container = OmegaConf.to_container(cfg, resolve=True)
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineConfig), container))
    config.validate()
    return config


SECRET_KEY = re.compile(r"password|passwd|secret|token|credential|api_?key|access_?key", re.IGNORECASE)
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
REDACTED = "***"


def redact(key: str, value: Any) -> Any:
    """A setting as it may be recorded: secrets-looking keys hidden, credentials in URLs removed."""
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
    return value


def _redacted(node: Any, prefix: str = "") -> Any:
    if isinstance(node, dict):
        return {key: _redacted(value, f"{prefix}.{key}" if prefix else str(key)) for key, value in node.items()}
    return redact(prefix, node)


def flatten(cfg: PipelineConfig) -> dict[str, Any]:
    """Every setting as a flat dotted key (``build.hidden_units``), the way MLflow shows params;
    credentials redacted (see `redact`)."""
    import pandas as pd

    return pd.json_normalize(_redacted(asdict(cfg))).iloc[0].to_dict()


def recorded_yaml(cfg: PipelineConfig) -> str:
    """The settings as YAML for the run's artifacts, with the same redaction as the params."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(_redacted(asdict(cfg)))


# -- where runs are recorded (pipeline.tracking.server checks that it answers) ----------------------
def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the embedded store that `mlflow ui` opens here."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
