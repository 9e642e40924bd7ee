"""One command at a time works on a sweep: it holds the parent run by its tag `sweep.holder`.

MLflow has no compare-and-set, so a command takes a parent by writing the tag (its host, pid, the process's
start time, its command line, since when, a heartbeat), waiting SETTLE seconds and reading it back: of
commands that wrote at once the last writer holds it, and the others are refused (SweepHeld), naming it.
A holder whose process is gone does not keep the sweep: on its own host, that pid with that start time no
longer runs; from another host, its heartbeat (written every BEAT seconds by a thread of the holding
command) is older than STALE. The holder lets go (release) when its command ends, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime

import mlflow
import psutil

log = logging.getLogger(__name__)
TAG = "sweep.holder"
SETTLE = 2.0  # seconds: longer than another command takes between reading the tag and writing its own
BEAT = 60.0  # seconds between heartbeats
STALE = 300.0  # seconds: a holder on another host whose heartbeat is older than this is gone (SIGKILL, a lost machine)
_held: dict[str, "_Heartbeat"] = {}  # run id -> this process's heartbeat for it


class SweepHeld(RuntimeError):
    """Another live command works on this sweep."""


def _this_process() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "command": shlex.join(sys.orig_argv)[:3000], "since": now, "heartbeat": now}


def _read(client, run_id: str) -> dict | None:
    try:
        return json.loads(client.get_run(run_id).data.tags.get(TAG) or "null")
    except ValueError:  # (not ours to judge: written by hand)
        return None


def _same(one: dict | None, other: dict | None) -> bool:
    return bool(one and other) and all(one.get(key) == other.get(key) for key in ("host", "pid", "started"))


def alive(holder: dict) -> bool:
    """Whether the command `holder` describes may still be running."""
    if holder.get("host") == socket.gethostname():
        try:
            return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["started"])) < 0.5
        except (psutil.Error, KeyError, TypeError, ValueError):  # that process is gone (or the tag is not whole)
            return False
    return time.time() - float(holder.get("heartbeat", 0)) < STALE


def describe(holder: dict) -> str:
    since = datetime.fromtimestamp(float(holder.get("since", 0))).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"`{holder.get('command', '?')}` (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


def take(run_id: str, new: bool = False) -> None:
    """Hold the sweep's parent `run_id` for this process until release(), or raise SweepHeld naming the
    command that holds it. `new`: the parent was created just now, and no other command knows it yet."""
    client = mlflow.MlflowClient(uri := mlflow.get_tracking_uri())
    me = _this_process()
    found = None if new else _read(client, run_id)
    if _same(found, me) and run_id in _held:  # (taken already by this process)
        return
    if found and alive(found):
        raise SweepHeld(f"sweep {run_id} is being worked on by another command: {describe(found)}; "
                        "wait for it to end, or stop it, then run this again")
    if found:
        log.warning("sweep %s was held by %s, which has ended without letting go: taken over", run_id, describe(found))
    client.set_tag(run_id, TAG, json.dumps(me))
    _held[run_id] = _Heartbeat(uri, run_id, me)  # (from here on release() lets go, whatever happens next)
    try:
        if not new:
            time.sleep(SETTLE)
            last = _read(client, run_id)
            if not _same(last, me):  # another command wrote after this one: it holds the sweep
                raise SweepHeld(f"sweep {run_id} is being worked on by another command: {describe(last or {})}; "
                                "wait for it to end, or stop it, then run this again")
    except BaseException:  # (refused, or interrupted while it settled)
        release(run_id)
        raise
    _held[run_id].start()


def release(run_id: str) -> None:
    """Let go of a parent this process holds (nothing if it holds none, or another command has taken it)."""
    beat = _held.pop(run_id, None)
    if beat is None:
        return
    beat.stop()
    client = mlflow.MlflowClient(beat.uri)
    if _same(_read(client, run_id), beat.me):
        client.delete_tag(run_id, TAG)


class _Heartbeat(threading.Thread):
    """Refreshes the holder's heartbeat every BEAT seconds, so that other hosts know the command lives."""

    def __init__(self, uri: str, run_id: str, me: dict) -> None:
        super().__init__(name=f"sweep-holder-{run_id[:8]}", daemon=True)
        self.uri, self.run_id, self.me, self.stopped = uri, run_id, me, threading.Event()

    def run(self) -> None:
        client = mlflow.MlflowClient(self.uri)
        while not self.stopped.wait(BEAT):
            try:
                if not _same(_read(client, self.run_id), self.me):
                    log.warning("sweep %s: another command has taken it over from this one", self.run_id)
                    return
                client.set_tag(self.run_id, TAG, json.dumps({**self.me, "heartbeat": time.time()}))
            except Exception as error:  # a store that does not answer now may answer at the next beat
                log.warning("sweep %s: could not refresh its holder's heartbeat (%s)", self.run_id, error)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=10)
