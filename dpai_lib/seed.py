"""The one place where seeds and determinism flags are set."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool) -> dict[str, Any]:
    """Seed Python, NumPy and torch (all devices) and set the determinism flags.

    ``deterministic=True`` asks for deterministic algorithms (cuDNN deterministic, no autotuning;
    operations without a deterministic implementation warn), ``False`` lets cuDNN autotune.
    Returns the flags, for the run record. Nothing else in ``dpai_lib`` changes these flags.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return {
        "seed": seed,
        "deterministic": deterministic,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
