"""Score -> mask selection: exact k with earliest-index tie-break, Synaptic-Flow tie mode, global scope."""

import pytest
import torch

from dpai_lib.pruners._select import masks_from_scores, topk_mask


def test_exact_topk_equals_a_stable_descending_sort_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 50, (1,), generator=gen))
        x = torch.randint(0, 4, (n,), generator=gen).float()
        for k in range(n + 1):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.sort(x, descending=True, stable=True).indices[:k]] = True
            assert torch.equal(topk_mask(x, k), ref)


def test_prune_all_ties_mode_over_prunes_like_synaptic_flow():
    x = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert topk_mask(x, 2, "prune_all").sum() == 0  # threshold 3: every 3 is pruned
    assert topk_mask(x, 4, "prune_all").tolist() == [False, True, True, True, True, False]
    with pytest.raises(ValueError, match="'exact', 'prune_all'"):
        topk_mask(x, 2, "random")


def test_global_scope_ranks_across_tensors_and_layer_scope_uses_budgets():
    scores = {"a": torch.tensor([[5.0, 1.0], [2.0, 0.0]]), "b": torch.tensor([4.0, 3.0, -1.0, 6.0])}
    m = masks_from_scores(scores, 0.5)  # keep 8 - int(0.5 * 8) = 4: 6, 5, 4, 3
    assert m["a"].tolist() == [[True, False], [False, False]] and m["b"].tolist() == [True, True, False, True]
    m = masks_from_scores(scores, 0.5, scope="layer", budget="uniform")
    assert m.layer_kept() == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="scope='net'"):
        masks_from_scores(scores, 0.5, scope="net")
