"""A run whose process is killed outright (SIGKILL, out of memory) keeps every epoch and is not left RUNNING.

TrackedRun starts this file as a process of its own (`python watchdog.py URI RUN_ID FOLDER`, not through the
package, so that it starts in milliseconds and imports nothing until it is needed) and writes to its
standard input one JSON line per epoch ({"time", "step", "values"}) before Keras prints it, and a line
{"time"} when a stage ends. When the run ends as it should, the last line is "ended" and this process
leaves. If the input closes without it, the run's process is gone: the epochs the store lacks are written
with their own times, and the run ends KILLED, at the last moment its process was known alive, with an
`error` tag that says so, unless it has ended already. If the run's writes were being kept on disk (FOLDER,
journal.py: its tracking server was lost), the same is added to the kept record instead, which
`python -m pipeline.replay FOLDER` writes once the server is back.
"""

import json
import signal
import sys
from pathlib import Path


ERROR = "the training process ended before it ended the run"


def keep(folder: Path, told: list[dict]) -> bool:
    """The end, added to a kept record (journal.py's operations) if the run's writes were being kept."""
    operations = folder / "operations.jsonl"
    if not operations.exists():
        return False
    lines = operations.read_text().splitlines()
    if any('"op": "end"' in line for line in lines):
        return True
    points = [[key, value, message["time"], message["step"], None]
              for message in told if "step" in message for key, value in message["values"].items()]
    with open(operations, "a") as kept:
        if lines and not lines[-1].endswith("}"):
            kept.write("\n")  # after a line cut short by the death
        for operation in ({"op": "metrics", "points": points}, {"op": "tags", "tags": {"error": ERROR}},
                          {"op": "end", "status": "KILLED", "end_time": max((m["time"] for m in told), default=None)}):
            kept.write(json.dumps(operation) + "\n")
    print(f"the run's process was killed while its tracking server did not answer; its record is kept in {folder}; "
          f"once the server is back, write it with:\npython -m pipeline.replay {folder}", file=sys.stderr)
    return True


def rescue(uri: str, run_id: str, lines: list[bytes], folder: Path | None = None) -> None:
    told = []
    for line in lines:
        try:
            told.append(json.loads(line))
        except ValueError:  # a line cut short by the death
            pass
    if folder is not None and keep(folder, told):
        return
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus, Metric

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return
    epochs = [message for message in told if "step" in message]
    missing = []
    for key in {key for message in epochs for key in message["values"]}:
        stored = {point.step for point in client.get_metric_history(run_id, key)}
        missing += [Metric(key, message["values"][key], message["time"], message["step"])
                    for message in epochs if key in message["values"] and message["step"] not in stored]
    for start in range(0, len(missing), 1000):  # (a batch takes at most 1000 metrics)
        client.log_batch(run_id, metrics=missing[start:start + 1000])
    why = ERROR
    unfinished = [model for model in client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
                  if model.status == LoggedModelStatus.PENDING]
    for model in unfinished:  # (the Models tab would show it pending for ever)
        client.set_logged_model_tags(model.model_id, {"error": "the training process ended while this model was logged"})
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    if unfinished:
        why += f", while it logged the model {', '.join(model.name for model in unfinished)} (marked FAILED)"
    client.set_tag(run_id, "error", why)
    client.set_terminated(run_id, "KILLED", end_time=max((message["time"] for message in told), default=None))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the run's process, which ends the run
    uri, run_id = sys.argv[1:3]
    folder = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    lines = []
    for line in sys.stdin.buffer:  # as each arrives; the end of input is the end of the run's process
        if line == b"ended\n":
            break
        lines.append(line)
    else:
        rescue(uri, run_id, lines, folder)
