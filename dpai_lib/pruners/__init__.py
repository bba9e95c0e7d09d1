"""Pruner registry and the one entry point :func:`prune`.

A pruner is a function ``fn(model, sparsity, *, input_shape, data, seed, **hparams) -> Masks``
registered with ``@register_pruner(name, needs_data=...)`` in its own file under this package. Its
keyword-only hyper-parameters (with their defaults) are its documented interface: :func:`prune` rejects
any other name and lists the valid ones.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from dpai_lib.masks import Masks
from dpai_lib.registry import Registry
from dpai_lib.sparsity import check_sparsity

PRUNERS: Registry[Callable[..., Masks]] = Registry("pruner")
_COMMON = ("input_shape", "data", "seed")


def register_pruner(name: str, *, needs_data: bool, version: int = 1) -> Callable[[Callable[..., Masks]], Callable[..., Masks]]:
    """Register a pruner; raise ``version`` whenever a change alters its masks (it is part of run ids)."""

    def decorator(fn: Callable[..., Masks]) -> Callable[..., Masks]:
        fn.needs_data = needs_data  # type: ignore[attr-defined]
        return PRUNERS.register(name, version=version)(fn)

    return decorator


def _load_builtin() -> None:
    # Every public module of this package defines (and so registers) one pruner.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_pruners() -> list[str]:
    """The names of every registered pruner, sorted (the values ``prune(method=...)`` accepts)."""
    _load_builtin()
    return PRUNERS.names()


def pruner_version(method: str) -> int:
    """The code version of ``method`` (raised by every change that alters its masks)."""
    _load_builtin()
    return PRUNERS.version(method)


def needs_data(method: str) -> bool:
    """Whether ``method`` scores with data batches (SNIP, GraSP, ...) or is data-free (random, SynFlow, DPaI, ...)."""
    _load_builtin()
    return bool(PRUNERS.get(method).needs_data)  # type: ignore[attr-defined]


def pruner_hparams(method: str) -> dict[str, Any]:
    """The hyper-parameters ``method`` accepts, with their defaults."""
    _load_builtin()
    sig = inspect.signature(PRUNERS.get(method))
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _COMMON
    }


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data: Iterable | None = None,
    seed: int = 0,
    **hparams: Any,
) -> Masks:
    """Masks removing the fraction ``sparsity`` of ``model``'s prunable weights with ``method``.

    ``input_shape`` is one input's shape, e.g. ``(3, 32, 32)``; ``data`` an iterable of
    ``(inputs, targets)`` batches for the methods that need data. ``model`` is never modified: the
    pruner works on a deep copy.
    """
    _load_builtin()
    fn = PRUNERS.get(method)
    check_sparsity(sparsity)
    allowed = pruner_hparams(method)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise TypeError(
            f"pruner {method!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}"
        )
    if fn.needs_data and data is None:  # type: ignore[attr-defined]
        raise ValueError(f"pruner {method!r} scores weights with data: pass data=<iterable of (inputs, targets)>")
    masks = fn(copy.deepcopy(model), sparsity, input_shape=tuple(input_shape), data=data, seed=seed, **hparams)
    return masks.validate(model)
