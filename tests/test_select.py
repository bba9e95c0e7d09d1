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


@pytest.mark.parametrize("ties", ["exact", "prune_all"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_ranking_only_the_candidates_equals_ranking_everything(ties, scope):
    """Iterative pruners rank only the weights kept so far; with the pruned ones scoring 0 (SynFlow) the
    masks must be those of a full ranking, ties included (many exact zeros among the kept weights too)."""
    gen = torch.Generator().manual_seed(5)
    shapes = {"a": (40, 30), "b": (20, 10, 3, 3), "c": (10, 50)}
    current = {n: torch.rand(s, generator=gen) < 0.5 for n, s in shapes.items()}
    scores = {}
    for n, s in shapes.items():
        v = torch.randint(0, 6, s, generator=gen).double()  # many ties, zeros included
        scores[n] = torch.where(current[n], v, torch.zeros_like(v))
    kept = sum(int(m.sum()) for m in current.values())
    total = sum(m.numel() for m in current.values())
    for sparsity in (0.2, 1 - kept / total, 0.6, 0.8, 0.97):  # 0.2: more than the candidates
        full = {n: s.masked_fill(~current[n], float("-inf")) for n, s in scores.items()} if ties == "exact" else scores
        want = masks_from_scores(full, sparsity, scope=scope, budget="uniform", ties=ties)
        got = masks_from_scores(scores, sparsity, scope=scope, budget="uniform", ties=ties, candidates=current)
        assert all(torch.equal(want[n], got[n]) for n in shapes), (sparsity, ties, scope)


def test_synflow_equals_a_synaptic_flow_style_loop_in_float64():
    from dpai_lib import build_model, prune
    from dpai_lib.bench import synaptic_flow_loop

    torch.manual_seed(1)
    model = build_model("resnet20", 10)
    ours = prune(model, "synflow", 0.99, input_shape=(3, 32, 32), iterations=10, ties="prune_all")
    loop = synaptic_flow_loop(model, 0.99, (3, 32, 32), 10)
    assert all(torch.equal(ours[n], loop[n]) for n in loop)
