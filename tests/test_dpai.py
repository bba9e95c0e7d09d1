"""DPaI pruner: exact counts, selection identical to a full sort, the release's gradient, traces."""

import math

import pytest
import torch
from torch import nn

from dpai_lib import build_model, prune
from dpai_lib.pruners._select import topk_mask
from dpai_lib.pruners.dpai import ReleasePathCount, _TrackedTopK, _true_indices
from dpai_lib.sparsity import layer_kept_counts


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


@pytest.mark.parametrize("sparsity", [0.6838, 0.9, 0.99])
def test_exact_erk_counts_determinism_and_untouched_model(sparsity):
    model = build_model("resnet20", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = prune(model, "dpai", sparsity, input_shape=(3, 32, 32), steps=5, seed=3)
    b = prune(model, "dpai", sparsity, input_shape=(3, 32, 32), steps=5, seed=3)
    assert a.layer_kept() == layer_kept_counts(model, sparsity, "erk")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(a.meta["trace"]) == 5 + 2 and a.meta["trace"][0]["step"] == 0


def test_tracked_topk_equals_a_full_sort_along_a_score_trajectory():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(64, 32, 3, 3, generator=gen)
    for k in (1, 184, 5000, 18431):
        sel, cur = _TrackedTopK(k), s.clone()
        for step in range(30):
            scale = 1e-3 if step % 7 else 0.2  # mostly small Adam-like moves, sometimes a jump
            cur = cur + scale * torch.randn(cur.shape, generator=gen)
            got = sel(cur.abs())
            assert torch.equal(got, topk_mask(cur.abs(), k)), (k, step)
            assert int(got.sum()) == k


def test_tracked_topk_with_many_ties_keeps_the_earliest_like_a_stable_sort():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(40, 30, 3, 3, generator=gen)
    for k in (7, 1000, 9000):
        sel, cur = _TrackedTopK(k), s.clone()
        for step in range(20):
            cur = torch.round((cur + 2e-3 * torch.randn(cur.shape, generator=gen)) * 100) / 100  # ties everywhere
            got = sel(cur.abs())
            assert torch.equal(got, topk_mask(cur.abs(), k)), (k, step)


@pytest.mark.parametrize("n,true", [(0, 0), (255, 3), (256, 0), (1000, 1), (70000, 40), (70001, 70001)])
def test_true_indices_equal_nonzero(n, true):
    gen = torch.Generator().manual_seed(n)
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.randperm(n, generator=gen)[:true]] = True
    if n > 1:
        flags[-1] = True  # the tail beyond the last whole block
    assert torch.equal(_true_indices(flags), torch.nonzero(flags).flatten())
    assert torch.equal(_true_indices(flags.view(-1, 1) if n else flags), torch.nonzero(flags).flatten())


def test_init_scores_with_zero_steps_give_the_topk_of_their_magnitudes():
    model = mlp()
    names = [n for n, _ in model.named_parameters() if n.endswith("weight") and n != "3.weight"]
    scores = {n: torch.randn(dict(model.named_parameters())[n].shape) for n in names}
    masks = prune(model, "dpai", 0.5, input_shape=(6,), steps=0, init_scores=scores, budget="uniform")
    counts = layer_kept_counts({n: s.shape for n, s in scores.items()}, 0.5, "uniform")
    for n in names:
        assert torch.equal(masks[n], topk_mask(scores[n].abs(), counts[n]))
    with pytest.raises(ValueError, match="init_scores"):
        prune(model, "dpai", 0.5, input_shape=(6,), steps=0, init_scores={names[0]: scores[names[0]]})


def test_release_path_count_is_the_path_count_on_a_chain():
    model = mlp()
    gen = torch.Generator().manual_seed(1)
    weights = {n: (torch.rand(p.shape, generator=gen) < 0.6).float()
               for n, p in model.named_parameters() if n.endswith("weight") and n != "3.weight"}
    direct = torch.ones(1, 6, dtype=torch.float64)
    for n in ("0.weight", "2.weight", "4.weight"):
        direct = direct @ weights[n].double().T
    assert float(ReleasePathCount(model, (6,))(weights)) == pytest.approx(math.log(float(direct.sum())), rel=1e-6)


class _STE(torch.autograd.Function):
    """Independent straight-through top-k: hard mask forward, identity backward (as the release)."""

    @staticmethod
    def forward(ctx, a, k):
        return topk_mask(a, k).float()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.99, 0.5), (1.0, 1.0)])
def test_one_step_matches_an_independent_implementation_of_the_release_update(alpha, beta):
    model = mlp()
    names = ["0.weight", "2.weight", "4.weight"]
    shapes = {n: dict(model.named_parameters())[n].shape for n in names}
    counts = layer_kept_counts(shapes, 0.6, "erk")
    gen = torch.Generator().manual_seed(4)
    init = {n: torch.randn(shapes[n], generator=gen) for n in names}

    # reference: autograd through STE(|s|), chain forward with per-layer max normalisation
    s = {n: init[n].clone().requires_grad_(True) for n in names}
    m = {n: _STE.apply(s[n].abs(), counts[n]) for n in names}
    x, log_c = torch.ones(1, 6), 0.0
    for n in names:
        c = x.max()
        log_c = log_c + torch.log(c)
        x = (x / c) @ m[n].T
    log_r = torch.log(x.sum()) + log_c
    gm = torch.autograd.grad(log_r, [m[n] for n in names], retain_graph=True)
    gs = torch.autograd.grad(log_r, [s[n] for n in names])
    opt = torch.optim.Adam([s[n] for n in names], lr=0.05)
    for n, g_m, g_s in zip(names, gm, gs):
        eff = (g_m.abs() * m[n]) > 0
        node = eff.any(1, keepdim=True)
        s[n].grad = -((1 - alpha) * g_s + alpha * ((1 - beta) * g_s * (~node) + beta * g_s * (~eff)))
    opt.step()
    expected = {n: topk_mask(s[n].detach().abs(), counts[n]) for n in names}

    masks = prune(model, "dpai", 0.6, input_shape=(6,), steps=1, lr=0.05, alpha=alpha, beta=beta, init_scores=init)
    for n in names:
        assert torch.equal(masks[n], expected[n]), n
    assert masks.meta["trace"][0]["log_paths"] == pytest.approx(float(log_r.detach()), rel=1e-6)


def test_optimisation_raises_the_path_count_and_bad_options_are_errors():
    model = build_model("resnet20", 10)
    masks = prune(model, "dpai", 0.99, input_shape=(3, 32, 32), steps=150, alpha=0.0)
    trace = masks.meta["trace"]
    assert trace[-1]["log_paths"] > trace[0]["log_paths"] + 1.0
    assert masks.collapsed_layers() == []
    with pytest.raises(ValueError, match="path_count='fast'.*'release', 'exact'"):
        prune(model, "dpai", 0.9, input_shape=(3, 32, 32), path_count="fast")
    with pytest.raises(ValueError, match="alpha"):
        prune(model, "dpai", 0.9, input_shape=(3, 32, 32), alpha=2)


def test_vit_attention_projections_are_scored_and_optimised():
    model = build_model("vit_tiny", 10)
    names = ["encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
             "encoder.layers.encoder_layer_0.self_attention.out_proj.weight"]
    start = prune(model, "dpai", 0.99, input_shape=(3, 32, 32), steps=0, seed=1)
    moved = prune(model, "dpai", 0.99, input_shape=(3, 32, 32), steps=40, lr=0.05, alpha=0.0, seed=1)
    for n in names:
        assert n in moved and not torch.equal(start[n], moved[n]), n  # got path gradients
    trace = moved.meta["trace"]
    assert all(math.isfinite(r["log_paths"]) for r in trace)
    assert trace[-1]["log_paths"] > trace[0]["log_paths"]


def test_release_count_equals_the_exact_count_on_a_chain_and_exact_mode_agrees_with_the_metric():
    from dpai_lib import node_path_stats
    from dpai_lib.metrics import PathCounter

    model = mlp()
    gen = torch.Generator().manual_seed(2)
    weights = {n: (torch.rand(p.shape, generator=gen) < 0.5).float()
               for n, p in model.named_parameters() if n in ("0.weight", "2.weight", "4.weight")}
    assert float(ReleasePathCount(model, (6,))(weights)) == pytest.approx(float(PathCounter(model, (6,))(weights)), rel=1e-6)
    resnet = build_model("resnet20", 10)
    masks = prune(resnet, "dpai", 0.95, input_shape=(3, 32, 32), steps=3, path_count="exact")
    final_trace = masks.meta["trace"][-1]
    stats = node_path_stats(resnet, masks, (3, 32, 32))
    assert final_trace["log_paths"] == pytest.approx(stats["log_paths"], rel=1e-9)
    assert (final_trace["nodes"], final_trace["kernels"]) == (stats["nodes"], stats["kernels"])


def test_dpai_raises_the_effective_path_count_over_random_erk_at_99_percent_on_resnet20():
    from dpai_lib import node_path_stats

    model = build_model("resnet20", 10)
    shape = (3, 32, 32)
    random_paths = [node_path_stats(model, prune(model, "random", 0.99, input_shape=shape, seed=s), shape)["log_paths"]
                    for s in range(3)]
    dpai = node_path_stats(model, prune(model, "dpai", 0.99, input_shape=shape, steps=300), shape)
    assert dpai["log_paths"] > max(random_paths) + 1.0


def test_efficientnet_se_convs_keep_their_initial_random_erk_mask_as_in_the_release():
    """SE blocks are identities in the pruning network: their convs get no path gradient, so their masks
    are the top-k of the initial scores, whatever the number of steps; every layer keeps its ERK count."""
    model = build_model("efficientnet_b0", 10)
    a = prune(model, "dpai", 0.95, input_shape=(3, 32, 32), seed=3, steps=0)
    b = prune(model, "dpai", 0.95, input_shape=(3, 32, 32), seed=3, steps=3)
    assert b.layer_kept() == layer_kept_counts(model, 0.95, "erk")
    se = [n for n in b if ".fc1." in n or ".fc2." in n]
    assert len(se) == 2 * 16 and all(torch.equal(a[n], b[n]) for n in se)
    assert any(not torch.equal(a[n], b[n]) for n in b if n not in se)
