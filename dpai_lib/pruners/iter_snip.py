"""Iterative SNIP: SNIP scores recomputed on the progressively pruned network.

de Jorge, Sanyal, Behl, Torr, Rogez & Dokania, "Progressive Skeletonization: Trimming More Fat from a
Network at Initialization", ICLR 2021 (the FORCE paper, which introduces Iterative SNIP beside FORCE).

Variant implemented, for ``K = iterations`` rounds ``k = 0 .. K-1``:

1. take the next ``batches_per_iteration`` batches of ``data`` (cycling back to the first batch after
   the last; ``None`` = every batch in every round, Synaptic-Flow's SNIP with ``--prune-epochs K``);
2. score the **currently masked** network (``w = m * theta``), ``L`` = cross-entropy summed over those
   batches (mean per batch);
3. keep the highest scores at the kept fraction ``d**((k+1)/K)`` (``schedule="exponential"``, as FORCE
   and Synaptic-Flow) or ``1 - (1 - d)(k+1)/K`` (``"linear"``), ``d = 1 - sparsity``; the last round
   keeps exactly the requested count.

Two meanings of "iterative SNIP" exist in the public code (Synaptic-Flow / NPB against naver/force and
NTK-SAP; see ``book/sources.md``); ``revival`` picks one:

* ``revival=False`` (default; de Jorge et al.'s Iterative SNIP, also NTK-SAP's ``IterSNIP``): score
  ``|theta * dL/dtheta|`` = ``|m * theta * dL/dw|``, zero for pruned weights, and pruned weights are
  ranked below every kept weight, so **a pruned weight stays pruned** and masks shrink monotonically
  (FORCE forces pruned saliencies to the global minimum and masks their gradients). With
  ``ties="prune_all"`` the zero scores alone keep them pruned, as in Synaptic-Flow.
* ``revival=True`` (Synaptic-Flow SNIP run for K prune epochs, the NPB/DPaI "Iter-SNIP" baseline):
  score ``|dL/dm| = |theta * dL/dw|``, non-zero for pruned weights, which can therefore come back.

Hyper-parameters and defaults: ``iterations=100`` (Synaptic-Flow/NPB ``--prune-epochs 100``; FORCE's
code defaults to 10, its README uses 60), ``schedule="exponential"``, ``revival=False``,
``batches_per_iteration=1`` (FORCE draws one fresh batch per round), ``train_mode=True`` (BatchNorm on
batch statistics, as for :mod:`~dpai_lib.pruners.snip`; Synaptic-Flow's default is eval),
``scope="global"``, ``budget="erk"`` (only with ``scope="layer"``), ``ties="exact"`` (FORCE keeps all ties
at the threshold, Synaptic-Flow prunes them all - ``"prune_all"``). Loss: cross-entropy on logits (FORCE
uses ``nll_loss`` on log-probabilities - the same thing). Weights are the model's own initial weights.
``seed`` seeds torch's RNG (restored afterwards) for dropout / shuffling DataLoaders.

To reproduce the NPB repository's Iter-SNIP (the DPaI paper's baseline): ``revival=True,
batches_per_iteration=None, train_mode=False, ties="prune_all"``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from torch import nn

from dpai_lib.masks import Masks
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._gradients import (
    SCHEDULES,
    check_bool,
    check_choice,
    check_int,
    check_selection,
    cycle_batches,
    float_masks,
    freeze,
    iteration_sparsities,
    model_device,
    model_dtype,
    seeded,
    select,
    take_batches,
)
from dpai_lib.pruners._select import Budget, Schedule, Scope, Ties
from dpai_lib.pruners.snip import snip_scores


def iter_snip_masks(
    model: nn.Module,
    sparsity: float,
    data: Iterable,
    *,
    seed: int = 0,
    iterations: int = 100,
    schedule: Schedule = "exponential",
    revival: bool = False,
    batches_per_iteration: int | None = 1,
    train_mode: bool = True,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Iterator[Masks]:
    """Yield the masks after every round (the pruner returns the last); ``model`` is modified (mode)."""
    check_selection(scope, budget, ties)
    check_choice("schedule", schedule, SCHEDULES)
    check_int("iterations", iterations, 1)
    check_int("batches_per_iteration", batches_per_iteration, 1, allow_none=True)
    check_bool("revival", revival)
    model.train(check_bool("train_mode", train_mode))
    params = freeze(model)
    device, dtype = model_device(model), model_dtype(model)
    with seeded(seed, device):
        if batches_per_iteration is None:
            fixed = take_batches(data, None, device, dtype)
        else:
            stream = cycle_batches(data, device, dtype)
        current = None
        for target in iteration_sparsities(sparsity, iterations, schedule):
            batches = fixed if batches_per_iteration is None else list(itertools.islice(stream, batches_per_iteration))
            scores = snip_scores(model, params, float_masks(current, params), batches, mask_gradient=revival)
            current = select(
                scores, target, scope=scope, budget=budget, ties=ties, current=None if revival else current
            )
            yield current


@register_pruner("iter_snip", needs_data=True)
def iter_snip_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    iterations: int = 100,
    schedule: Schedule = "exponential",
    revival: bool = False,
    batches_per_iteration: int | None = 1,
    train_mode: bool = True,
    scope: Scope = "global",
    budget: Budget = "erk",
    ties: Ties = "exact",
) -> Masks:
    masks = None
    for masks in iter_snip_masks(  # noqa: B007  (the last round's masks are the result)
        model, sparsity, data, seed=seed, iterations=iterations, schedule=schedule, revival=revival,
        batches_per_iteration=batches_per_iteration, train_mode=train_mode, scope=scope, budget=budget, ties=ties,
    ):
        pass
    assert masks is not None  # iterations >= 1 is checked, so at least one round ran
    return masks
