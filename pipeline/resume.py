"""What a sweep's resume must match, and the command that asks for one (pure: no MLflow).

A sweep's parent records the settings it was asked; each job's child run records its own (config.flatten,
as MLflow params, i.e. as strings). A resume continues a sweep only if it asks what the parent was asked,
whatever the order of its keys and of the values on each axis (canonical_axis); a job is known by its
settings on the axes (job_identity), not by the name its run was given, and counts as finished only if its
recorded settings equal the ones asked now. PER_ATTEMPT keys may differ.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

# Keys that differ between attempts of one sweep without changing what a job computes: the resume
# itself, whether budgets share a training (their numbers are the same), the run's name, how the store is spelled
# (the parent was found in it), how long a run's end waits for a lost server, and the console's detail.
PER_ATTEMPT = ("sweep.resume", "sweep.share_budgets", "sweep.overlap_records", "tracking.run_name", "tracking.uri",
               "tracking.wait_for_server", "verbose")
RESUME = "sweep.resume"


def as_recorded(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flattened settings as MLflow keeps params: every value a string (None as "None", lists as Python writes them)."""
    return {key: str(value) for key, value in flat.items()}


def differences(before: Mapping[str, str], now: Mapping[str, Any],
                skip: tuple[str, ...] = ()) -> dict[str, tuple[str | None, str]]:
    """{key: (recorded value or None, value asked now)} for every key asked now whose recorded value
    differs, leaving out PER_ATTEMPT keys and `skip` (keys and the groups under them, e.g. the sweep's
    axes). A key the record lacks differs (nothing says it was the same); a recorded key no longer asked
    (the code has dropped it, or it is not a setting, like a child's data.* params) does not."""
    left_out = PER_ATTEMPT + tuple(skip)
    found = {}
    for key in sorted(now):
        if any(key == out or key.startswith(out + ".") for out in left_out):
            continue
        asked = str(now[key])
        if before.get(key) != asked:
            found[key] = (before.get(key), asked)
    return found


def canonical_axis(key: str, written: str) -> str:
    """What an axis asks, however it was typed: the values of a list or range sweep sorted (`16,8`,
    `choice(8, 16)` and `range(8,17,8)` are one axis), an interval as its numbers and tags; anything else
    (a glob) as written, without spaces."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(f"{key}={written}")
        if override.is_interval_sweep():
            interval = override.value()
            return f"interval:{float(interval.start)},{float(interval.end)},{sorted(interval.tags)}"
        return "values:" + json.dumps(sorted(override.sweep_string_iterator()))
    except Exception:  # (not a sweep Hydra enumerates without a config: glob)
        return "".join(written.split())


def job_identity(settings: Mapping[str, str], axes: Iterable[str], run_name: str) -> tuple:
    """A sweep job's identity: its recorded settings (as strings) on each axis (a config group's axis, such
    as `build`: every setting under it), its Optuna trial, and whether it is the early-stopping reference
    job; an axis that is no setting (or a run that recorded none): the value its run name gives."""
    named = dict(part.split("=", 1) for part in run_name.split(",") if "=" in part)
    found: list = []
    for axis in sorted(axes):
        under = sorted((key, value) for key, value in settings.items() if key == axis or key.startswith(axis + "."))
        found.append((axis, tuple(under) or named.get(axis.rsplit(".", 1)[-1])))
    found.append(("sweep.trial", settings.get("sweep.trial", "None")))
    found.append(("reference", run_name.split(",", 1)[0] == "early_stopping"))
    return tuple(found)


def describe(found: Mapping[str, tuple[str | None, Any]], what: str = "before") -> str:
    """`fit.epochs: 5 before, 6 now; seed: not recorded before, 1 now` (at most 8 keys, then how many more)."""
    parts = [f"{key}: {'not recorded' if old is None else old} {what}, {new} now"
             for key, (old, new) in list(found.items())[:8]]
    more = len(found) - 8
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_same_sweep(parent_run_id: str, axes_before: Mapping[str, str], axes: Mapping[str, str],
                     settings_before: Mapping[str, str] | None, settings: Mapping[str, Any]) -> None:
    """Refuse (ValueError, naming each key and what to do) a resume of `parent_run_id` whose axes or
    settings (flattened) differ from what the parent recorded. `settings_before` None: the parent kept
    none (made before they were kept), and only its axes are compared."""
    found = {f"the axis {key}": (axes_before.get(key, "not swept"), axes.get(key, "not swept"))
             for key in sorted(set(axes_before) | set(axes)) if key not in axes_before or key not in axes
             or canonical_axis(key, axes_before[key]) != canonical_axis(key, axes[key])}
    if settings_before is not None:
        found.update(differences(settings_before, settings, skip=tuple(axes_before) + tuple(axes)))
    if found:
        raise ValueError(
            f"sweep.resume={parent_run_id} asks for other settings than that sweep was given: "
            f"{describe(found, 'in the sweep')}. A resume continues the same sweep: run this as a new sweep "
            "(the same command without sweep.resume), or resume with the sweep's own settings")


def resume_command(argv: list[str], parent_run_id: str) -> str:
    """The command line `argv` (as the user typed it, sys.orig_argv) asking to resume `parent_run_id`:
    any sweep.resume it had replaced, shell-quoted to paste as it is."""
    kept, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--overrides" and rest:  # `mlflow run`'s one-string form: filtered inside
            kept += [arg, shlex.join(o for o in shlex.split(rest.pop(0)) if not _is_resume(o))]
        elif not _is_resume(arg):
            kept.append(arg)
    return shlex.join([*kept, f"{RESUME}={parent_run_id}"])


def _is_resume(arg: str) -> bool:
    return arg.lstrip("+~").split("=", 1)[0] == RESUME
