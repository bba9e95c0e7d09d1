"""Magnitude pruning at initialisation: keep the largest ``|theta|``.

The data-free baseline of Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks" (ICLR 2019) and of the pruning-at-initialisation comparisons (e.g. Tanaka et al.,
NeurIPS 2020 / Synaptic-Flow's ``Mag``; Frankle et al., "Pruning Neural Networks at Initialization:
Why Are We Missing the Mark?", ICLR 2021), applied once to the given (initial) weights.

Variant implemented: score = ``|theta|`` of every prunable weight
(:func:`dpai_lib.masks.prunable_parameters`: conv and linear weights incl. the first conv, 1x1 shortcut
convs and the classifier), one shot.

Hyper-parameters and defaults:

* ``scope="global"`` - one ranking over all prunable weights, as Synaptic-Flow (``--mask-scope global``);
  ``"layer"`` keeps the highest scores per tensor with the layer-wise ``budget``.
* ``budget="erk"`` - ``"erk"`` or ``"uniform"``; only used with ``scope="layer"`` (Synaptic-Flow's
  ``local`` scope is ``scope="layer", budget="uniform"``).
* ``ties="exact"`` - exactly the requested count, ties broken by position (earlier tensor, then lower
  flat index, kept); ``"prune_all"`` prunes every weight scoring at or below the threshold
  (Synaptic-Flow/NPB behaviour, may over-prune).

There is no ``train_mode``: nothing is run through the network. ``seed`` is unused (deterministic).
"""

from __future__ import annotations

from torch import nn

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._gradients import check_selection, select
from dpai_lib.pruners._select import Budget, Scope, Ties


@register_pruner("magnitude", needs_data=False)
def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Masks:
    check_selection(scope, budget, ties)
    scores = {n: p.detach().abs() for n, p in prunable_parameters(model).items()}
    return select(scores, sparsity, scope=scope, budget=budget, ties=ties)
