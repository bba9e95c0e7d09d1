"""dpai_lib: pruning at initialisation with DPaI and its baselines, node-path metrics, training, records.

The public names are imported lazily, so ``import dpai_lib`` is cheap::

    import dpai_lib
    model = dpai_lib.build_model("resnet20", num_classes=10)
    masks = dpai_lib.prune(model, "random", 0.9, input_shape=(3, 32, 32))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "dpai_lib.models",
    "list_models": "dpai_lib.models",
    "Masks": "dpai_lib.masks",
    "prunable_parameters": "dpai_lib.masks",
    "erk_densities": "dpai_lib.sparsity",
    "compression_to_sparsity": "dpai_lib.sparsity",
    "sparsity_to_compression": "dpai_lib.sparsity",
    "get_dataset": "dpai_lib.data",
    "load_tensors": "dpai_lib.data",
    "list_datasets": "dpai_lib.data",
    "train": "dpai_lib.trainer",
    "evaluate": "dpai_lib.trainer",
    "prune": "dpai_lib.pruners",
    "list_pruners": "dpai_lib.pruners",
    "node_path_stats": "dpai_lib.metrics",
    "seed_everything": "dpai_lib.seed",
    "RunConfig": "dpai_lib.config",
    "load_config": "dpai_lib.config",
    "run_id": "dpai_lib.runs",
    "execute": "dpai_lib.runs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpai_lib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
