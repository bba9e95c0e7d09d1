"""ProsPr: Prospect Pruning, meta-gradients through the first steps of training.

Alizadeh, Tailor, Zintgraf, van Amersfoort, Farquhar, Lane & Gal, "Prospect Pruning: Finding Trainable
Weights at Initialization using Meta-Gradients", ICLR 2022 (code: mil-ad/prospr).

Variant implemented ("full" second-order meta-gradients, unstructured):

1. masks ``c = 1`` (one per prunable weight) are differentiable variables; the initial parameters are
   ``w_0 = c * theta_0`` for prunable weights and ``theta_0`` for every other trainable parameter
   (biases, BatchNorm affine parameters);
2. ``inner_steps`` differentiable SGD steps on *all* trainable parameters, the graph kept through every
   step: ``v_t = inner_momentum * v_{t-1} + grad L(w_t; batch_t)`` (``v_0`` = the first gradient, as
   ``torch.optim.SGD``), ``w_{t+1} = w_t - inner_lr * v_t``, no weight decay; ``L`` = mean cross-entropy
   on logits; the forward passes use :func:`torch.func.functional_call` with these tensors;
3. score = ``|dL(w_K; batch_K)/dc|`` - one meta-gradient, no outer update;
4. keep the highest scores (exact top-k, global by default; ProsPr keeps ``ceil(N(1 - p))`` by
   ``torch.topk``, we keep ``N - int(pN)``, the library-wide rounding - the same number up to
   floating-point rounding of ``pN``).

The mask multiplies the weights once, at initialisation (the paper's formulation, as we read it: the
meta-gradient is ``grad L(w_K) . prod_t (I - lr H_t) . theta_0``); it is not re-applied after each inner
step (re-applying it would add ``c``-dependence to every update; at ``c = 1`` the forward passes agree,
the meta-gradients do not).

Batches: ``new_batches=True`` (default) draws batch ``t`` for inner step ``t`` and the next one for the
meta-loss, cycling through ``data`` (with a single batch every step uses it). ``new_batches=False``
uses the first batch for every step and for the meta-loss (our reading of ProsPr's CLI default, "new
data in inner loop" off).

Hyper-parameters and defaults follow ProsPr's CLI: ``inner_steps=3``, ``inner_lr=0.1``,
``inner_momentum=0.0`` (its README example uses lr 0.5, momentum 0.9); ``train_mode=True`` (ProsPr
scores in train mode: BatchNorm on batch statistics); ``scope="global"``, ``budget="erk"`` (only with
``scope="layer"``), ``ties="exact"``. The meta-gradient is computed on the model's device (ProsPr moves
to the CPU for memory; memory grows with ``inner_steps``). ``inner_steps=0`` reduces to SNIP on one
batch. ``seed`` seeds torch's RNG (restored afterwards) for dropout / shuffling DataLoaders. ProsPr
asserts no layer is empty; we do not (inspect ``masks.collapsed_layers()``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._gradients import (
    check_bool,
    check_int,
    check_positive,
    check_selection,
    cycle_batches,
    masked_call,
    model_device,
    model_dtype,
    second_order,
    seeded,
    select,
)
from dpai_lib.pruners._select import Budget, Scope, Ties


def prospr_scores(
    model: nn.Module,
    trainable: Mapping[str, torch.Tensor],
    prunable: Sequence[str],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    inner_lr: float = 0.1,
    inner_momentum: float = 0.0,
) -> dict[str, torch.Tensor]:
    """``|dL_after/dc|`` after ``len(batches) - 1`` differentiable SGD steps (the last batch is the
    meta-loss). ``trainable``: every parameter updated by the inner steps (name -> tensor);
    ``prunable``: the names that get a mask."""
    names = list(trainable)
    c = {n: torch.ones_like(trainable[n]).requires_grad_(True) for n in prunable}
    w = {n: c[n] * trainable[n].detach() if n in c else trainable[n].detach().requires_grad_(True) for n in names}
    velocity: dict[str, torch.Tensor] = {}
    *inner, (x_meta, y_meta) = batches
    for inputs, targets in inner:
        loss = F.cross_entropy(masked_call(model, w, inputs), targets)
        grads = torch.autograd.grad(loss, [w[n] for n in names], create_graph=True, allow_unused=True)
        new = {}
        for n, g in zip(names, grads):
            if g is None:
                new[n] = w[n]
                continue
            if inner_momentum and n in velocity:
                g = inner_momentum * velocity[n] + g
            velocity[n] = g
            new[n] = w[n] - inner_lr * g
        w = new
    meta = F.cross_entropy(masked_call(model, w, x_meta), y_meta)
    grads = torch.autograd.grad(meta, [c[n] for n in prunable], allow_unused=True)
    return {n: torch.zeros_like(c[n]) if g is None else g.detach().abs() for n, g in zip(prunable, grads)}


@register_pruner("prospr", needs_data=True)
def prospr_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    inner_steps: int = 3,
    inner_lr: float = 0.1,
    inner_momentum: float = 0.0,
    new_batches: bool = True,
    train_mode: bool = True,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Masks:
    check_selection(scope, budget, ties)
    check_int("inner_steps", inner_steps, 0)
    check_positive("inner_lr", inner_lr, allow_zero=True)
    check_positive("inner_momentum", inner_momentum, allow_zero=True)
    check_bool("new_batches", new_batches)
    model.train(check_bool("train_mode", train_mode))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    pp = prunable_parameters(model)
    trainable.update((n, p) for n, p in pp.items() if n not in trainable)  # masked even if frozen
    prunable = list(pp)
    for p in model.parameters():
        p.requires_grad_(False)
    device = model_device(model)
    with seeded(seed, device), second_order():
        stream = cycle_batches(data, device, model_dtype(model))
        if new_batches:
            batches = list(itertools.islice(stream, inner_steps + 1))
        else:
            batches = [next(stream)] * (inner_steps + 1)
        scores = prospr_scores(
            model, trainable, prunable, batches, inner_lr=inner_lr, inner_momentum=inner_momentum
        )
    return select(scores, sparsity, scope=scope, budget=budget, ties=ties)
