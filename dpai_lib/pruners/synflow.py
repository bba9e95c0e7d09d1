"""SynFlow: Iterative Synaptic Flow Pruning (data-free).

Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by iteratively conserving
synaptic flow", NeurIPS 2020 (code: ganguli-lab/Synaptic-Flow).

Variant implemented:

1. **linearise**: replace every floating-point *parameter* by its absolute value (prunable weights,
   biases, BatchNorm affine parameters). Buffers are **not** touched (Synaptic-Flow's ``SynFlow.score``
   takes ``abs`` of every ``state_dict`` entry, BN running statistics included; at initialisation, mean 0 /
   var 1, this is the same; after pre-training ours keeps the true running mean, which can then make
   pre-activations negative). The model is a private copy: nothing needs restoring.
2. BatchNorm in **eval** mode (``train_mode=False``, Synaptic-Flow's default for every pruner and the
   NTK-SAP README's advice for SynFlow), so it uses its running statistics (0 / 1 at init).
3. for ``k = 0 .. K-1`` (``K = iterations``): input = all-ones tensor of shape ``(1, *input_shape)``;
   ``R = sum(f(1))`` with the prunable weights replaced by ``m * |theta|``; score =
   ``|dR/dtheta * theta|`` (= ``|m * theta * dR/dw|``), so pruned weights score 0; keep the highest
   scores at the kept fraction ``d**((k+1)/K)`` (``schedule="exponential"``, the paper's and code's
   default) or ``1 - (1 - d)(k+1)/K`` (``"linear"``), ``d = 1 - sparsity``; the last round keeps exactly
   the requested count. With ``ties="exact"`` pruned weights are ranked below every kept weight, so a
   pruned weight **stays pruned** even where kept weights also score exactly 0 (disconnected); with
   ``ties="prune_all"`` (Synaptic-Flow) their zero score keeps them pruned.

Hyper-parameters and defaults: ``iterations=100`` (paper runs, ``--prune-epochs 100``),
``schedule="exponential"``, ``double=True`` - **our deviation**: scoring in float64 (the whole copy is
converted) so that ``R`` and the scores of deep or wide networks cannot overflow float32 (Synaptic-Flow
briefly used double precision, commit 7de8b51, then reverted to float32; ``double=False`` reproduces
float32 and raises ``FloatingPointError`` on non-finite scores instead of silently over-pruning);
``train_mode=False``; ``scope="global"`` (paper), ``budget="erk"`` (only with ``scope="layer"``),
``ties="exact"`` (``"prune_all"`` = Synaptic-Flow thresholding). Scores are not normalised (as
Synaptic-Flow); float64 scores are ranked in float64, and each round ranks only the weights the previous
round kept (pruned weights score 0, so the result is that of ranking all of them). With
``ties="prune_all"`` the masks equal those of a Synaptic-Flow-style loop in float64
(``python -m dpai_lib.bench synflow`` checks it and times both). ``seed`` is unused: SynFlow is
deterministic. Version 2: version 1 ranked float64 scores in float32 after rescaling by their maximum,
which could order near-equal scores differently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from dpai_lib.masks import Masks
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._gradients import (
    SCHEDULES,
    check_bool,
    check_choice,
    check_int,
    check_selection,
    float_masks,
    freeze,
    iteration_sparsities,
    masked_call,
    model_device,
    model_dtype,
    select,
)
from dpai_lib.pruners._select import Budget, Schedule, Scope, Ties


@torch.no_grad()
def linearise(model: nn.Module) -> None:
    """Absolute value of every floating-point parameter of ``model``, in place (buffers untouched)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.abs_()


def synflow_scores(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """``|dR/dtheta * theta|`` with ``R = sum(f(ones))`` through the network masked by the float ``masks``
    (call :func:`linearise` first; the mode is the caller's business)."""
    x = torch.ones((1, *input_shape), device=model_device(model), dtype=model_dtype(model))
    eff = {n: (p.detach() * masks[n]).requires_grad_(True) for n, p in params.items()}
    r = masked_call(model, eff, x).sum()
    grads = torch.autograd.grad(r, list(eff.values()), allow_unused=True)
    # |g * m * theta| = |g * eff| exactly (m is 0/1): one product, one in-place abs
    with torch.no_grad():
        return {n: torch.zeros_like(params[n]) if g is None else g.mul_(e).abs_()
                for (n, e), g in zip(eff.items(), grads)}


def synflow_masks(
    model: nn.Module,
    sparsity: float,
    input_shape: tuple[int, ...],
    *,
    iterations: int = 100,
    schedule: Schedule = "exponential",
    double: bool = True,
    train_mode: bool = False,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Iterator[Masks]:
    """Yield the masks after every round (the pruner returns the last); ``model`` is modified in place."""
    check_selection(scope, budget, ties)
    check_choice("schedule", schedule, SCHEDULES)
    check_int("iterations", iterations, 1)
    if check_bool("double", double):
        model.double()
    model.train(check_bool("train_mode", train_mode))
    params = freeze(model)
    linearise(model)
    current = None
    for target in iteration_sparsities(sparsity, iterations, schedule):
        scores = synflow_scores(model, params, float_masks(current, params), input_shape)
        current = select(scores, target, scope=scope, budget=budget, ties=ties, current=current)
        yield current


@register_pruner("synflow", needs_data=False, version=2)
def synflow_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    iterations: int = 100,
    schedule: Schedule = "exponential",
    double: bool = True,
    train_mode: bool = False,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Masks:
    masks = None
    for masks in synflow_masks(  # noqa: B007  (the last round's masks are the result)
        model, sparsity, input_shape, iterations=iterations, schedule=schedule, double=double,
        train_mode=train_mode, scope=scope, budget=budget, ties=ties,
    ):
        pass
    assert masks is not None  # iterations >= 1 is checked, so at least one round ran
    return masks
