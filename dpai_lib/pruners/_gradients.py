"""Shared machinery of the gradient-based baseline pruners (SNIP, iterative SNIP, GraSP, SynFlow, ProsPr).

* Masked forward passes go through :func:`torch.func.functional_call` with the *effective* prunable
  weights ``m * theta`` passed in as tensors: no layer classes, no hooks, no in-place ``weight.data``
  rewrites, and gradients are taken with :func:`torch.autograd.grad` (never read from ``.grad``, so no
  stale gradient can leak into a score - Synaptic-Flow quirk #4).
* Scores are turned into masks only by :func:`dpai_lib.pruners._select.masks_from_scores`, through
  :func:`select`, which validates the common choices, checks the scores are finite, and rescales
  float64 scores before ``masks_from_scores`` ranks them in float32.
* Iterative pruners share :func:`iteration_sparsities` (Synaptic-Flow's ``prune_loop`` schedules).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import typing
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.pruners._select import SCOPES, TIES, Budget, Schedule, Scope, Ties, check_choice, masks_from_scores  # noqa: F401

BUDGETS = typing.get_args(Budget)
SCHEDULES = typing.get_args(Schedule)


# -- validation ------------------------------------------------------------------------------------


def check_selection(scope: str, budget: str, ties: str) -> None:
    """Validate the score -> mask choices up front (before any expensive scoring)."""
    check_choice("scope", scope, SCOPES)
    check_choice("budget", budget, BUDGETS)
    check_choice("ties", ties, TIES)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed; choose one of True, False")
    return value


def check_int(name: str, value: object, minimum: int, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None (all batches)" if allow_none else ""
        raise ValueError(f"{name}={value!r} is not allowed; use an integer >= {minimum}{extra}")
    return value


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name}={value!r} is not allowed; use a finite number {'>=' if allow_zero else '>'} 0")
    return float(value)


# -- model and data plumbing -----------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def freeze(model: nn.Module) -> dict[str, nn.Parameter]:
    """Switch off ``requires_grad`` on every parameter of the (private copy of the) model - gradients
    are only ever taken with respect to tensors passed to :func:`functional_call` - and return the
    prunable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = prunable_parameters(model)
    if not params:
        raise ValueError("the model has no prunable parameters (conv / linear weights)")
    return params


def to_device(batch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise ValueError("data must yield (inputs, targets) pairs") from None
    inputs = torch.as_tensor(inputs).to(device)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    return inputs, torch.as_tensor(targets).to(device=device, dtype=torch.int64)


def take_batches(data: Iterable, num_batches: int | None, device: torch.device, dtype: torch.dtype) -> list:
    """The first ``num_batches`` batches of ``data`` (all if ``None``), on ``device``."""
    if data is None:
        raise ValueError("this pruner scores weights with data: pass data=<iterable of (inputs, targets)>")
    chosen = data if num_batches is None else itertools.islice(data, num_batches)
    out = [to_device(b, device, dtype) for b in chosen]
    if not out:
        raise ValueError("data yielded no batch")
    return out


def cycle_batches(data: Iterable, device: torch.device, dtype: torch.dtype) -> Iterator:
    """Batches of ``data`` in order, starting again at the first after the last (``data`` is re-iterated,
    so a shuffling DataLoader gives a new order every pass)."""
    if data is None:
        raise ValueError("this pruner scores weights with data: pass data=<iterable of (inputs, targets)>")
    while True:
        empty = True
        for batch in data:
            empty = False
            yield to_device(batch, device, dtype)
        if empty:
            raise ValueError("data yielded no batch")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run with torch's global RNG (CPU and, on CUDA, the model's device) seeded with ``seed`` and
    restored afterwards: makes dropout in train-mode scoring and shuffling DataLoaders that use the
    default generator deterministic for a seed, without disturbing the caller's RNG stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def second_order():
    """Allow double backward through attention: the fused scaled-dot-product kernels (flash,
    memory-efficient) have no second derivative, so GraSP and ProsPr run attention with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def masked_call(
    model: nn.Module, weights: Mapping[str, torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """``model(inputs)`` with the named parameters replaced by ``weights`` (e.g. effective ``m * theta``)."""
    return functional_call(model, dict(weights), (inputs,))


def float_masks(masks: Masks | None, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 masks on each weight's device and dtype (all ones when ``masks`` is None)."""
    if masks is None:
        return {n: torch.ones_like(p) for n, p in params.items()}
    return {n: masks[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}


def effective_weight_grads(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``dL/dw`` at the effective weights ``w = m * theta``, with ``L`` the sum over ``batches`` of the
    mean cross-entropy of ``logits / temperature`` (one backward per batch, gradients summed)."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for inputs, targets in batches:
        eff = {n: (params[n].detach() * masks[n]).requires_grad_(True) for n in params}
        loss = F.cross_entropy(masked_call(model, eff, inputs) / temperature, targets)
        grads = torch.autograd.grad(loss, list(eff.values()), allow_unused=True)
        for n, g in zip(eff, grads):
            if g is not None:
                total[n] += g
    return total


# -- schedules and selection -----------------------------------------------------------------------


def iteration_sparsities(sparsity: float, iterations: int, schedule: str) -> list[float]:
    """Target sparsity after each of ``iterations`` rounds (Synaptic-Flow ``prune_loop``): kept fraction
    ``d**((k+1)/K)`` (``exponential``) or ``1 - (1 - d)(k+1)/K`` (``linear``), ``d = 1 - sparsity``.
    The last entry is ``sparsity`` itself, so the final kept count is exactly the requested one."""
    check_choice("schedule", schedule, SCHEDULES)
    density = 1.0 - sparsity
    out = []
    for k in range(iterations):
        frac = (k + 1) / iterations
        kept = density**frac if schedule == "exponential" else 1.0 - (1.0 - density) * frac
        out.append(min(max(1.0 - kept, 0.0), sparsity))
    out[-1] = sparsity
    return out


def select(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    scope: str,
    budget: str,
    ties: str,
    current: Masks | None = None,
) -> Masks:
    """Masks keeping the highest ``scores`` via :func:`masks_from_scores`.

    Non-finite scores are an error (e.g. SynFlow overflow in float32). Scores are ranked in their own
    dtype (float64 SynFlow scores in float64, as Synaptic-Flow's loop would in double precision). With
    ``current`` masks and ``ties="exact"`` the currently pruned
    weights are ranked below every kept one (score ``-inf``), so they stay pruned even where kept weights
    score exactly 0; with ``ties="prune_all"`` scores are passed unchanged, as in Synaptic-Flow.
    """
    out = {}
    for n, s in scores.items():
        s = s.detach()
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError(
                f"non-finite pruning scores in {n!r} (overflow or NaN); for SynFlow use double=True"
            )
        out[n] = s
    candidates = None if current is None else {n: current[n].to(out[n].device) for n in out}
    return masks_from_scores(out, sparsity, scope=scope, budget=budget, ties=ties, candidates=candidates)
