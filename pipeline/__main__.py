"""`python -m pipeline [overrides]`: the Hydra entry point, kept thin.

It composes conf/, validates it into a PipelineConfig and calls pipeline.runner.run; the return value
(validation accuracy) is what a Hydra sweeper optimizes. `--overrides "a=1 b=2"` takes the overrides as
one string, which is how `mlflow run` passes them (see MLproject).
"""

from __future__ import annotations

import shlex
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import config

config.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline import runner

    settings = config.load(cfg)
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics, _ = runner.run(settings, composed_yaml=yaml)
    return metrics.get("val_accuracy")


def _expand_overrides(argv: list[str]) -> list[str]:
    if "--overrides" not in argv:
        return argv
    at = argv.index("--overrides")
    if at + 1 >= len(argv):
        raise SystemExit("--overrides needs a value, e.g. --overrides 'fit.epochs=20 build.hidden_units=32'")
    return argv[:at] + shlex.split(argv[at + 1]) + argv[at + 2:]


if __name__ == "__main__":
    sys.argv = _expand_overrides(sys.argv)
    main()
