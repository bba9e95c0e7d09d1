"""GraSP: Gradient Signal Preservation.

Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving Gradient Flow", ICLR 2020.

Variant implemented (Synaptic-Flow's ``GraSP``, Tanaka et al., NeurIPS 2020), with ``theta`` the
prunable weights only (biases / BatchNorm are held fixed) and ``L_b`` the mean cross-entropy of
``logits / T`` on batch ``b``:

1. pass 1: ``g = sum_b dL_b/dtheta`` (no graph; treated as a constant);
2. pass 2: for every batch, ``z_b = g . dL_b/dtheta`` built with a graph and differentiated again, so
   ``Hg = sum_b H_b g`` (a Hessian-vector product; the full Hessian is never formed);
3. score = ``theta * Hg``, **higher = keep**.

Sign convention: the GraSP paper scores ``S(-theta) = -theta * Hg`` and removes the weights with the
*largest* ``S`` (those whose removal reduces the gradient flow least / increases it most).
Synaptic-Flow computes ``(Hg) * theta`` and prunes the *lowest*. Both keep the largest ``theta * Hg``,
which is our score (higher keeps). Synaptic-Flow's division by ``|sum of scores| + 1e-10`` is omitted: a
positive factor, it does not change the ranking. Scores are signed, not absolute values.

Hyper-parameters and defaults: ``temperature=200.0`` (T; GraSP paper and Synaptic-Flow),
``num_batches=None`` (every batch of ``data``; both passes see the same batches), ``train_mode=True``
(BatchNorm on batch statistics - Synaptic-Flow's authors pass ``--prune-train-mode`` for non-SynFlow
pruners in their own sweep, issue #8, and NTK-SAP's README says to; ``False`` is Synaptic-Flow's default
eval mode), ``scope="global"`` (paper and Synaptic-Flow), ``budget="erk"`` (only with
``scope="layer"``), ``ties="exact"`` (``"prune_all"`` = Synaptic-Flow thresholding). One shot, on the
model's own initial weights. ``seed`` seeds torch's RNG (restored afterwards) for dropout / shuffling
DataLoaders; with dropout, passes 1 and 2 draw different dropout masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.masks import Masks
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._gradients import (
    check_bool,
    check_int,
    check_positive,
    check_selection,
    effective_weight_grads,
    float_masks,
    freeze,
    masked_call,
    model_device,
    model_dtype,
    second_order,
    seeded,
    select,
    take_batches,
)
from dpai_lib.pruners._select import Budget, Scope, Ties


def grasp_hessian_gradient(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    temperature: float = 200.0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(g, Hg)`` of the summed tempered loss with respect to the prunable weights ``params``."""
    ones = float_masks(None, params)
    g = effective_weight_grads(model, params, ones, batches, temperature)
    hg = {n: torch.zeros_like(p) for n, p in params.items()}
    for inputs, targets in batches:
        theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        loss = F.cross_entropy(masked_call(model, theta, inputs) / temperature, targets)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True, allow_unused=True)
        z = sum((gr * g[n]).sum() for n, gr in zip(theta, grads) if gr is not None)
        if not isinstance(z, torch.Tensor) or not z.requires_grad:
            continue  # the loss is linear in the weights on this batch: H g = 0
        for n, h in zip(theta, torch.autograd.grad(z, list(theta.values()), allow_unused=True)):
            if h is not None:
                hg[n] += h
    return g, hg


@register_pruner("grasp", needs_data=True)
def grasp_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    temperature: float = 200.0,
    num_batches: int | None = None,
    train_mode: bool = True,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Masks:
    check_selection(scope, budget, ties)
    check_positive("temperature", temperature)
    check_int("num_batches", num_batches, 1, allow_none=True)
    model.train(check_bool("train_mode", train_mode))
    params = freeze(model)
    device = model_device(model)
    with seeded(seed, device), second_order():
        batches = take_batches(data, num_batches, device, model_dtype(model))
        _, hg = grasp_hessian_gradient(model, params, batches, temperature)
    scores = {n: params[n].detach() * hg[n] for n in params}
    return select(scores, sparsity, scope=scope, budget=budget, ties=ties)
