"""A run whose process is killed outright (SIGKILL, out of memory) must not stay RUNNING.

TrackedRun starts this file as a process of its own (`python watchdog.py URI RUN_ID`, not through the
package, so that it starts in milliseconds and imports nothing until it is needed) and holds its
standard input. When the run ends as it should, the run's process writes "ended" and this process
leaves. If the input closes without that word, the run's process is gone: the run ends KILLED, with an
`error` tag that says so, unless it has ended already.
"""

import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the run's process, which ends the run
    uri, run_id = sys.argv[1:3]
    if sys.stdin.buffer.read() != b"ended":
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", "the training process ended before it ended the run")
            client.set_terminated(run_id, "KILLED")
