"""Under `mlflow run`: which run records the work. `mlflow run` creates a run before our process starts
(MLFLOW_RUN_ID) in the experiment the user chose (`--experiment-name`/`--experiment-id`, or their
variables), else in experiment 0, "Default". A chosen experiment is kept: that run records the work. A run
in Default was put there by nobody: the work is recorded in tracking.experiment_name with every other run,
in a new run carrying the project's tags, and the run `mlflow run` made stays in Default as a pointer to it
(a note and the tag `pipeline.recorded_as`); `mlflow run` ends it with the process's status, as ever.
"""

from __future__ import annotations

import mlflow
from mlflow.entities import Run

UNCHOSEN = "0"  # MLflow's Default experiment: where `mlflow run` puts a run when nobody says where
NOT_COPIED = ("mlflow.runName", "mlflow.note.content")


def project_run(client: mlflow.MlflowClient, run_id: str, experiment_name: str, run_name: str | None,
                start: float) -> Run:
    """The run that records the work started by `mlflow run` as its run `run_id` (see above); `run_name`
    (None: the project run's) and `start` (seconds) only for a new run."""
    made = client.get_run(run_id)
    if made.info.experiment_id != UNCHOSEN:
        return made
    experiment = mlflow.set_experiment(experiment_name)
    if experiment.experiment_id == UNCHOSEN:  # tracking.experiment_name=Default asks for it
        return made
    tags = {key: value for key, value in made.data.tags.items() if key.startswith("mlflow.") and key not in NOT_COPIED}
    run = client.create_run(experiment.experiment_id, start_time=int(start * 1000),
                            run_name=run_name or made.info.run_name, tags={**tags, "pipeline.project_run": run_id})
    client.set_tag(run_id, "pipeline.recorded_as", run.info.run_id)
    client.set_tag(run_id, "mlflow.note.content",
                   f"`mlflow run` made this run in the Default experiment; the work is recorded in experiment "
                   f"{experiment_name!r} (id {experiment.experiment_id}) as run {run.info.run_id} ({run.info.run_name}).")
    return run
