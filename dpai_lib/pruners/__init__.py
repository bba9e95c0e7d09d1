"""Pruner registry and the one entry point :func:`prune`.

A pruner is a function ``fn(model, sparsity, *, input_shape, data, seed, **hparams) -> Masks``
registered with ``@register_pruner(name, needs_data=...)`` in its own file under this package. Its
keyword-only hyper-parameters (with their defaults) are its documented interface: :func:`prune` rejects
any other name and lists the valid ones.
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pydantic
import torch
from torch import nn

from dpai_lib.errors import one_line, short, suggest
from dpai_lib.masks import Masks, prunable_parameters
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


_LOADED: list[bool] = []


def _load_builtin() -> None:
    # Every public module of this package defines (and so registers) one pruner; imported once.
    import importlib
    import pkgutil

    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED.append(True)


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


def check_options(method: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with ``options`` as hyper-parameters of pruner ``method``, before anything runs: one
    ``(option, message)`` per unknown name (with the closest valid one) or value whose type is not the one
    the pruner function annotates (strictly: ``"3"`` is not an int, ``1`` is not a bool; an int is a valid
    float). Values within a valid type (e.g. ``budget: erkk``) are left to the pruner's own checks."""
    allowed = pruner_hparams(method)
    problems = []
    for name, value in options.items():
        if name not in allowed:
            hint = suggest(name, allowed)
            problems.append((str(name), f"unknown option of pruner {method!r};{hint} its options: "
                                        f"{', '.join(allowed) or 'none'}"))
            continue
        adapter, wanted = _option_type(method, name)
        if adapter is None:
            continue
        try:
            adapter.validate_python(value)
        except pydantic.ValidationError:
            choices = _choices(method, name)
            hint = suggest(value, choices) if choices and isinstance(value, str) else ""
            problems.append((str(name), f"option {name!r} of pruner {method!r} must be {wanted}; got {short(value)}"
                                        + (f";{hint}" if hint else "")))
    return problems


@functools.cache
def _option_type(method: str, name: str) -> tuple[pydantic.TypeAdapter | None, str]:
    """A strict validator of the annotated type of option ``name`` of ``method``, and the type in words."""
    try:
        annotation = typing.get_type_hints(PRUNERS.get(method))[name]
    except (KeyError, NameError, TypeError):  # not annotated, or an annotation that cannot be resolved
        return None, ""
    config = pydantic.ConfigDict(strict=True, arbitrary_types_allowed=True)
    try:
        return pydantic.TypeAdapter(annotation, config=config), _in_words(annotation)
    except pydantic.PydanticUserError:  # e.g. an annotation pydantic cannot validate
        return None, ""


def _choices(method: str, name: str) -> list[str]:
    """The string values a choice option (annotated ``Literal[...]``, maybe ``| None``) allows."""
    annotation = typing.get_type_hints(PRUNERS.get(method)).get(name)
    args = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else [
        v for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    return [str(v) for v in args]


def _in_words(annotation: Any) -> str:
    words = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "null"}
    if annotation in words:
        return words[annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_in_words(a) for a in args)
    if typing.get_origin(annotation) in (list, tuple, collections.abc.Sequence) and args:
        return f"a list of {_in_words(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return f"of type {getattr(annotation, '__name__', annotation)}"


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
    pruner works on a deep copy. Every argument is checked before any pruning work: the model must have
    prunable weights and accept a batch of ``input_shape`` (one forward pass of zeros, in eval mode and
    without gradients, on the copy), the seed must be an integer >= 0, the hyper-parameters must be the
    pruner's own.
    """
    _load_builtin()
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune(model, method, sparsity, *, input_shape, ...) takes the network first; got "
                        f"{short(model)} as the model")
    if not isinstance(method, str):
        raise TypeError(f"the pruning method must be a pruner name ({', '.join(list_pruners())}); got "
                        f"{short(method)}: the arguments are prune(model, method, sparsity, *, input_shape, ...)")
    fn = PRUNERS.get(method)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a number in [0, 1); got {short(sparsity)}")
    check_sparsity(sparsity)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer >= 0; got {short(seed)}")
    if seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed}")
    shape = _input_shape(input_shape)
    allowed = pruner_hparams(method)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        hint = suggest(unknown[0], allowed)
        raise TypeError(
            f"pruner {method!r} has no hyper-parameter {', '.join(map(repr, unknown))};{hint} "
            f"valid: {', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}"
        )
    if fn.needs_data and data is None:  # type: ignore[attr-defined]
        raise ValueError(f"pruner {method!r} scores weights with data: pass data=<iterable of (inputs, targets)>")
    if not prunable_parameters(model):
        raise ValueError(f"{type(model).__name__} has no prunable weights (no convolution, linear or attention "
                         f"projection); pruner {method!r} has nothing to prune")
    work = copy.deepcopy(model)
    _dry_forward(work, shape)
    masks = fn(work, sparsity, input_shape=shape, data=data, seed=int(seed), **hparams)
    return masks.validate(model)


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (one input's shape, without the batch dimension)."""
    what = "one input's shape as positive integers, without the batch dimension, e.g. (3, 32, 32)"
    if not isinstance(input_shape, (tuple, list, torch.Size)):
        raise TypeError(f"input_shape must be {what}; got {short(input_shape)}")
    if not input_shape or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) > 0
                                  for d in input_shape):
        raise ValueError(f"input_shape must be {what}; got {short(input_shape)}")
    return tuple(int(d) for d in input_shape)


def _dry_forward(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Raise a ValueError naming ``shape`` unless ``model`` accepts a batch of one input of that shape. The
    pass runs in eval mode (no batch-norm statistics change) and without gradients; every module's
    train/eval flag is restored, so the pruner gets the model as it was."""
    param = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=param.device, dtype=param.dtype))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
        reason = one_line(str(err)).removesuffix(".") or type(err).__name__
        raise ValueError(f"input_shape {shape} does not fit this {type(model).__name__}: a batch of that shape "
                         f"fails with {type(err).__name__}: {reason[:300]}") from err
    finally:
        for module, training in modes.items():
            module.training = training
