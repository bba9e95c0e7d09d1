"""SNIP: connection sensitivity at initialisation.

Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019.

Variant implemented (Synaptic-Flow's ``SNIP``, Tanaka et al., NeurIPS 2020): masks ``c`` multiply the
prunable weights, ``L`` = cross-entropy on the logits, and

    score = |dL/dc| at c = 1  =  |theta * dL/dtheta|,

with ``L`` **summed over the batches** (mean cross-entropy per batch, one backward per batch, gradients
accumulated - as Synaptic-Flow does over its prune loader; the SNIP paper uses one mini-batch: pass
``num_batches=1`` for that). The paper's normalisation ``s / sum(s)`` is not applied: it does not change
the ranking. One shot, on the model's **own** initial weights (Synaptic-Flow; mil-ad/snip instead
re-initialises a copy with Xavier-normal, as in the SNIP paper - re-initialise the model yourself for
that).

Hyper-parameters and defaults:

* ``num_batches=None`` - use every batch of ``data``; an integer uses the first that many batches.
* ``train_mode=True`` - BatchNorm uses batch statistics while scoring (train mode). Synaptic-Flow's
  default is eval mode, but its authors' own sweep (issue #8) passes ``--prune-train-mode`` for
  non-SynFlow pruners, NTK-SAP's README says to, and PHEW scores SNIP in train mode; ``False`` gives
  Synaptic-Flow's default.
* ``scope="global"`` (SNIP paper and Synaptic-Flow), ``budget="erk"`` (only with ``scope="layer"``),
  ``ties="exact"`` (``"prune_all"`` = Synaptic-Flow thresholding): see :mod:`dpai_lib.pruners._select`.

``seed`` seeds torch's RNG (restored afterwards) for any randomness in the forward pass (dropout in
train mode) or in a shuffling DataLoader; batches are otherwise used in the order given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dpai_lib.masks import Masks
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._gradients import (
    check_bool,
    check_int,
    check_selection,
    effective_weight_grads,
    float_masks,
    freeze,
    model_device,
    model_dtype,
    seeded,
    select,
    take_batches,
)
from dpai_lib.pruners._select import Budget, Scope, Ties


def snip_scores(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    mask_gradient: bool = True,
) -> dict[str, torch.Tensor]:
    """SNIP scores of the network masked by the float 0/1 ``masks`` (the mode is the caller's business).

    ``mask_gradient=True``: ``|dL/dc| = |theta * dL/dw|`` at ``w = c * theta`` - non-zero for pruned
    weights too (Synaptic-Flow). ``False``: ``|theta * dL/dtheta| = |c * theta * dL/dw|`` - zero for
    pruned weights (NTK-SAP's ``IterSNIP``, FORCE's iterative SNIP).
    """
    grads = effective_weight_grads(model, params, masks, batches)
    scores = {n: (params[n].detach() * grads[n]).abs() for n in params}
    if not mask_gradient:
        scores = {n: s * masks[n] for n, s in scores.items()}
    return scores


@register_pruner("snip", needs_data=True)
def snip_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    num_batches: int | None = None,
    train_mode: bool = True,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Masks:
    check_selection(scope, budget, ties)
    check_int("num_batches", num_batches, 1, allow_none=True)
    model.train(check_bool("train_mode", train_mode))
    params = freeze(model)
    device = model_device(model)
    with seeded(seed, device):
        batches = take_batches(data, num_batches, device, model_dtype(model))
        scores = snip_scores(model, params, float_masks(None, params), batches)
    return select(scores, sparsity, scope=scope, budget=budget, ties=ties)
