"""Where a run trains: the device tags, the warning for a GPU TensorFlow does not see, and (only where a
GPU is visible) one short run on it with the compiled epoch loop."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from pipeline import fit
from pipeline.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import check_complete_run, runs


def _gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def test_a_run_is_tagged_with_the_device_it_trained_on(tiny_run):
    tiny_config, _, _ = tiny_run
    frame = runs(tiny_config.tracking.uri)
    assert frame["tags.device"][0] == ("GPU:0" if _gpus() else "CPU")
    assert frame["tags.device.name"][0]


def test_a_gpu_that_tensorflow_does_not_see_is_warned_about(tmp_path, monkeypatch, caplog):
    if _gpus():
        pytest.skip("TensorFlow sees this machine's GPU")
    smi = tmp_path / "bin" / "nvidia-smi"  # the machine says it has a GPU, as NVIDIA's driver tool does
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0000)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        tags = fit.device()
    assert tags["device"] == "CPU"
    assert any("NVIDIA H200" in r.getMessage() and "gpu extra" in r.getMessage() for r in caplog.records)


def test_no_warning_without_a_gpu(tmp_path, monkeypatch, caplog):
    if _gpus():
        pytest.skip("TensorFlow sees this machine's GPU")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        fit.device()
    assert not caplog.records


def test_a_short_run_on_the_gpu(tiny_archive, tmp_path):
    if not _gpus():
        pytest.skip("no GPU visible to TensorFlow here (install the gpu extra on a machine with one)")
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["fit.jit_compile=true"])  # XLA on the GPU
    metrics, _ = train(cfg)
    frame = runs(cfg.tracking.uri)
    assert frame["tags.device"][0] == "GPU:0"
    check_complete_run(cfg.tracking.uri, frame.run_id[0], epochs=3)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
