"""From scores to masks: exact-k selection with a deterministic tie-break, global or per layer.

Higher score = keep. ``ties="exact"`` keeps exactly the requested number, breaking ties by position
(earlier layers, then lower flat index, win) - deterministic on every device. ``ties="prune_all"``
reproduces Synaptic-Flow/NPB: the threshold is the k-th smallest score and every weight scoring at or
below it is pruned, so ties can remove more weights than asked.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Literal

import torch

from dpai_lib.masks import Masks
from dpai_lib.sparsity import kept_count, layer_kept_counts

# The values a choice option of a pruner takes, as types: pruner signatures annotate their options with them,
# so a params file's typo (``budget: erkk``) is an error when the file is loaded (dpai_lib.pruners.check_options).
Scope = Literal["global", "layer"]
Ties = Literal["exact", "prune_all"]
Budget = Literal["erk", "uniform"]  # the keys of LAYERWISE_BUDGETS (tests/test_validation.py checks they agree)
Schedule = Literal["exponential", "linear"]
SCOPES, TIES = typing.get_args(Scope), typing.get_args(Ties)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    return value


def topk_mask(scores: torch.Tensor, k: int, ties: str = "exact") -> torch.Tensor:
    """Bool mask of the ``k`` highest entries of ``scores`` (same shape, same device)."""
    check_choice("ties", ties, TIES)
    flat = scores.detach().flatten()
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} weights")
    if ties == "prune_all":
        n_prune = n - k
        if n_prune == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        threshold = flat.kthvalue(n_prune).values
        return (scores > threshold).reshape(scores.shape)
    if k == 0 or k == n:
        return torch.full_like(scores, k == n, dtype=torch.bool)
    # O(n): the largest pruned value is the threshold; among entries equal to it, the earliest are kept
    # (the same result as a stable descending sort, without sorting everything).
    threshold = flat.kthvalue(n - k).values
    keep = flat > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        tied = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[tied] = True
    return keep.reshape(scores.shape)


def masks_from_scores(
    scores: Mapping[str, torch.Tensor], sparsity: float, *, scope: str = "global", budget: str = "erk",
    ties: str = "exact", candidates: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Keep the highest scores: one ranking over all tensors (``global``) or per tensor with the
    layer-wise ``budget`` (``layer``: ``erk`` or ``uniform``). Kept counts use
    :func:`dpai_lib.sparsity.kept_count` (global) or :func:`~dpai_lib.sparsity.layer_kept_counts`.

    ``candidates`` (bool masks, e.g. the previous round's of an iterative pruner): only they can be kept,
    and the caller guarantees that every other entry scores at or below every candidate (with
    ``ties="prune_all"``: all the same score, e.g. SynFlow's 0 for pruned weights). The result is
    then the same as ranking everything, but only the candidates are ranked (iterative pruners rank a
    shrinking set: SynFlow's 100 rounds rank about a fifth of the weights on average at 99 %)."""
    check_choice("scope", scope, SCOPES)
    if scope == "layer":
        counts = layer_kept_counts({n: s.shape for n, s in scores.items()}, sparsity, budget)
        return Masks({n: _topk_within(s.flatten(), None if candidates is None else candidates[n].flatten(),
                                      counts[n], ties).reshape(s.shape) for n, s in scores.items()})
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten() for n in names])  # ranked in the scores' own dtype
    cand = None if candidates is None else torch.cat([candidates[n].flatten().to(flat.device) for n in names])
    mask = _topk_within(flat, cand, kept_count(flat.numel(), 1.0 - sparsity), ties)
    out, start = {}, 0
    for n in names:
        size = math.prod(scores[n].shape)
        out[n] = mask[start:start + size].reshape(scores[n].shape)
        start += size
    return Masks(out)


def _topk_within(flat: torch.Tensor, cand: torch.Tensor | None, k: int, ties: str) -> torch.Tensor:
    """:func:`topk_mask` of a flat tensor, ranking only ``cand`` (see :func:`masks_from_scores`)."""
    if cand is None:
        return topk_mask(flat, k, ties)
    idx = torch.nonzero(cand).flatten()
    n_out = flat.numel() - idx.numel()  # entries outside the candidates: at or below every candidate
    if k > idx.numel() and ties == "exact":  # the non-candidates fill up, earliest first, as a full ranking
        return topk_mask(flat.masked_fill(~cand, float("-inf")), k, ties)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    sub = flat[idx]
    if ties == "prune_all" and n_out and k >= idx.numel():
        # the full ranking's threshold is the largest non-candidate score: candidates tied with it go too
        keep[idx] = sub > flat[~cand].max()
        return keep
    keep[idx] = topk_mask(sub, k, ties)  # same order statistics: the non-candidates all rank below
    return keep
