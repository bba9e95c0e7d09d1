"""Sparsity arithmetic in one place: compression <-> density <-> sparsity, and layer-wise budgets.

Vocabulary used everywhere in ``dpai_lib``:

* **density** ``d`` - fraction of prunable weights that are *kept*;
* **sparsity** ``s = 1 - d`` - fraction of prunable weights that are *removed*;
* **compression** ``c`` - the exponent used by SynFlow, NPB and the DPaI release: ``d = 10**-c``, so
  ``s = 1 - 10**-c`` (c = 0.5, 1, 1.5, 2, 2.5, 3 -> 68.38, 90, 96.84, 99, 99.68, 99.90 %).

Layer-wise budgets follow the DPaI release (and rigl's ``get_sparsities_erdos_renyi`` with kernel
terms, power 1): a layer's raw ERK score is ``sum(shape) / prod(shape)`` of its weight; one factor
``eps`` scales all raw scores so that the kept total matches the global density; a layer whose density
would exceed 1 is made dense - one largest-score group at a time, as rigl does - and ``eps`` is solved
again. Kept counts per layer use the release's rounding: ``k = numel - int((1 - d_l) * numel)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn


def compression_to_sparsity(compression: float) -> float:
    """``1 - 10**-c``: the fraction of weights removed at compression ``c``."""
    return 1.0 - 10.0 ** (-compression)


def sparsity_to_compression(sparsity: float) -> float:
    """Inverse of :func:`compression_to_sparsity`."""
    check_sparsity(sparsity)
    return -math.log10(1.0 - sparsity)


def density_to_sparsity(density: float) -> float:
    return 1.0 - density


def sparsity_to_density(sparsity: float) -> float:
    return 1.0 - sparsity


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` if it is a fraction in [0, 1), else raise naming the value."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"{name} must be the fraction of prunable weights removed, in [0, 1); got {sparsity!r} "
            "(99% sparsity is 0.99; compression c gives 1 - 10**-c)"
        )
    return float(sparsity)


def kept_count(numel: int, density: float) -> int:
    """Weights kept in a tensor of ``numel`` entries at ``density`` (the DPaI release's rounding)."""
    return numel - int((1.0 - density) * numel)


def _shapes(model_or_shapes: nn.Module | Mapping[str, torch.Size | tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    if isinstance(model_or_shapes, nn.Module):
        from dpai_lib.masks import prunable_parameters

        return {name: tuple(p.shape) for name, p in prunable_parameters(model_or_shapes).items()}
    return {name: tuple(shape) for name, shape in model_or_shapes.items()}


def erk_densities(
    model: nn.Module | Mapping[str, tuple[int, ...]], density: float
) -> dict[str, float]:
    """Erdős–Rényi-Kernel density of every prunable weight for a global ``density`` (kept fraction).

    ``model`` is a module (its :func:`~dpai_lib.masks.prunable_parameters` are used) or a mapping
    name -> weight shape. Returns name -> density in (0, 1], in the order of the parameters.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be the kept fraction in (0, 1]; got {density!r}")
    shapes = _shapes(model)
    if not shapes:
        raise ValueError("erk_densities: the model has no prunable parameters")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        rhs = sum(density * numel[n] for n in shapes if n not in dense) - sum(
            (1.0 - density) * numel[n] for n in dense
        )
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:  # every layer is dense
            break
        eps = rhs / divisor
        free = [n for n in shapes if n not in dense]
        max_raw = max(raw[n] for n in free)
        if max_raw * eps <= 1.0:
            break
        dense.update(n for n in free if raw[n] == max_raw)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def uniform_densities(model: nn.Module | Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """The same ``density`` for every prunable weight."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be the kept fraction in (0, 1]; got {density!r}")
    return {name: density for name in _shapes(model)}


LAYERWISE_BUDGETS = {"erk": erk_densities, "uniform": uniform_densities}


def layer_densities(model: nn.Module | Mapping[str, tuple[int, ...]], sparsity: float, budget: str) -> dict[str, float]:
    """Per-layer densities for a global ``sparsity`` under a named budget (``erk`` or ``uniform``)."""
    check_sparsity(sparsity)
    if budget not in LAYERWISE_BUDGETS:
        raise ValueError(f"unknown layer-wise budget {budget!r}; allowed: {', '.join(LAYERWISE_BUDGETS)}")
    return LAYERWISE_BUDGETS[budget](model, 1.0 - sparsity)


def layer_kept_counts(model: nn.Module | Mapping[str, tuple[int, ...]], sparsity: float, budget: str) -> dict[str, int]:
    """Exact number of weights kept per layer: :func:`kept_count` of :func:`layer_densities`."""
    shapes = _shapes(model)
    densities = layer_densities(shapes, sparsity, budget)
    return {n: kept_count(math.prod(shapes[n]), d) for n, d in densities.items()}
