"""Shared fixtures: tiny run configurations and offline data."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def sigint_as_at_a_terminal() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: the default action back, as under a terminal. A
    shell that starts pytest in the background (``pytest &``, nohup) leaves SIGINT ignored in its children, and a
    Python started so never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture()
def reap():
    """``reap(proc)`` registers a child process that the test must not leave behind: at teardown, one still
    running (a failed assertion, a timeout) is killed, with its process group when it leads one (its kernels)."""
    procs: list[subprocess.Popen] = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.communicate()


def train_cfg(**overrides):
    from dpai_lib.config import TrainConfig

    base = dict(epochs=2, batch_size=64, test_batch_size=256, lr=0.05, momentum=0.9, nesterov=False,
                weight_decay=5e-4, lr_drops=[1], lr_drop_factor=0.1)
    return TrainConfig(**(base | overrides))


def run_dict(**overrides) -> dict:
    """A complete, small run configuration as plain data (synthetic data, ResNet-20, random ERK)."""
    base = {
        "seed": 0,
        "deterministic": True,
        "data": {"name": "synthetic", "options": {"train_size": 512, "test_size": 256}},
        "model": {"name": "resnet20"},
        "prune": {"method": "random", "sparsity": 0.9, "options": {"budget": "erk"}},
        "train": dict(epochs=1, batch_size=64, test_batch_size=256, lr=0.05, momentum=0.9, nesterov=False,
                      weight_decay=1e-4, lr_drops=[], lr_drop_factor=0.1),
    }
    for key, value in overrides.items():
        base[key] = value
    return base


@pytest.fixture(scope="session")
def synthetic():
    from dpai_lib.data import load_tensors

    opts = {"train_size": 2000, "test_size": 500}
    return load_tensors("synthetic", "train", **opts), load_tensors("synthetic", "test", **opts)
