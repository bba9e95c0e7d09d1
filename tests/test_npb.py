"""NPB pruner: exact budgets, reproducibility, the layer MILP against brute force, node/path extremes,
P_in through max-pools, chunk remainders, fine_tune, time limits and argument errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib import build_model, prune
from dpai_lib.pruners.npb import (
    NPBTimeLimitWarning,
    _fill_groups,
    _path_counting_copy,
    layer_objective,
    max_path,
    npb_masks_and_report,
    release_max_path,
    solve_layer,
)
from dpai_lib.sparsity import layer_kept_counts

SHAPE = (3, 32, 32)


# -- helpers ------------------------------------------------------------------------------------------
class TinyConv(nn.Module):
    """Two 3x3 convolutions (3 -> 6 -> 8) with BN/ReLU between, summed over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.bn(self.c1(x)))).mean((2, 3))


class TinyVGG(nn.Module):
    """conv-BN-ReLU-maxpool-conv-BN-ReLU-conv-maxpool-avgpool-linear: pooling between prunable layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def kernel_counts(mask: torch.Tensor) -> np.ndarray:
    """(C_in, C_out) number of kept weights per kernel."""
    return mask.reshape(mask.shape[0], mask.shape[1], -1).sum(-1).T.numpy().astype(np.int64)


def masked_path_net(model: nn.Module, masks) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The path-counting copy of ``model`` with ``masks`` as its prunable weights, and its parameters."""
    net = _path_counting_copy(model)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].copy_(m.to(torch.float64))
    return net, params


def effective_params(model: nn.Module, masks, input_shape) -> int:
    """Kept weights on at least one input-to-output path (non-zero gradient of the all-ones output)."""
    net, params = masked_path_net(model, masks)
    ws = [params[n] for n in masks]
    for w in ws:
        w.requires_grad_(True)
    grads = torch.autograd.grad(net(torch.ones((1, *input_shape), dtype=torch.float64)).sum(), ws)
    return sum(int(((g != 0) & masks[n]).sum()) for n, g in zip(masks, grads))


# -- ResNet-20: exact ERK budgets, untouched input, reproducibility --------------------------------------
@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 10)


@pytest.fixture(scope="module")
def resnet20_99(resnet20):
    return npb_masks_and_report(resnet20, 0.99, input_shape=SHAPE, seed=0)


@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_resnet20_kept_counts_equal_erk_budgets_and_model_is_untouched(resnet20, resnet20_99, sparsity):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    masks = prune(resnet20, "npb", sparsity, input_shape=SHAPE) if sparsity == 0.9 else resnet20_99[0]
    assert masks.layer_kept() == layer_kept_counts(resnet20, sparsity, "erk")
    assert not masks.collapsed_layers()
    after = resnet20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(resnet20.parameters()).dtype == torch.float32


def test_resnet20_is_deterministic_per_seed_and_changes_with_the_seed(resnet20, resnet20_99):
    masks, report = resnet20_99
    again = prune(resnet20, "npb", 0.99, input_shape=SHAPE, seed=0)
    other = prune(resnet20, "npb", 0.99, input_shape=SHAPE, seed=1)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    assert any(not torch.equal(masks[n], other[n]) for n in masks)
    assert other.layer_kept() == masks.layer_kept()
    assert not any(r.hit_time_limit for r in report.layers)


def test_resnet20_layer_kinds_shortcuts_max_p_and_chunks(resnet20_99):
    report = {r.name: r for r in resnet20_99[1].layers}
    assert report["conv1.weight"].kind == "first" and report["fc.weight"].kind == "linear"
    shortcuts = [n for n, r in report.items() if r.kind == "shortcut"]
    assert shortcuts == ["layers.3.shortcut.0.weight", "layers.6.shortcut.0.weight"]
    assert report["layers.3.shortcut.0.weight"].beta == 0.001 and report["fc.weight"].beta == 0.0
    # max_p 9 -> 7 after the first shortcut -> 5 after the second (NPB's schedule)
    assert report["layers.3.conv2.weight"].kmax == [9]
    assert report["layers.4.conv1.weight"].kmax == [7]
    assert report["layers.7.conv1.weight"].kmax == [5, 5]
    # 64x64 convs exceed 64*32: two chunks of 32 outputs, each with its share of the budget
    r = report["layers.8.conv2.weight"]
    assert r.chunks == [(0, 32), (32, 64)]
    assert [int(r.M[:, a:b].sum()) for a, b in r.chunks] == [r.kept // 2, r.kept - r.kept // 2]
    # processed in forward order: the shortcut after the block's second conv
    names = list(report)
    assert names.index("layers.3.conv2.weight") < names.index("layers.3.shortcut.0.weight") < names.index(
        "layers.4.conv1.weight")


def test_fine_tune_keeps_counts_and_only_adds_effective_weights(resnet20, resnet20_99):
    tuned, report = resnet20_99
    raw, raw_report = npb_masks_and_report(resnet20, 0.99, input_shape=SHAPE, seed=0, fine_tune=False)
    assert raw.layer_kept() == tuned.layer_kept()
    # fine_tune starts from the MILP solution
    assert all(np.array_equal(a.M, b.M) for a, b in zip(report.layers, raw_report.layers))
    eff_raw, eff_tuned = effective_params(resnet20, raw, SHAPE), effective_params(resnet20, tuned, SHAPE)
    assert eff_tuned > eff_raw
    assert eff_tuned == tuned.kept() - sum(r.ineffective_after for r in report.layers)
    assert sum(r.moved for r in report.layers) > 0 and all(r.moved == 0 for r in raw_report.layers)


# -- the layer MILP ------------------------------------------------------------------------------------
def brute_force(p, c_out, n, kmax, alpha, beta, min_n, variant="release"):
    """Best objective over every integer M with 0 <= M <= kmax and sum(M) <= n (NPB's constraint)."""
    c_in = len(p)
    best = -math.inf
    for flat in itertools.product(range(kmax + 1), repeat=c_in * c_out):
        if sum(flat) <= n:
            M = np.array(flat).reshape(c_in, c_out)
            best = max(best, layer_objective(M, p, n, kmax=kmax, alpha=alpha, beta=beta, min_n=min_n,
                                             variant=variant))
    return best


@pytest.mark.parametrize("p,c_out,n,kmax", [([3.0, 1.0], 2, 3, 2), ([2.0, 5.0, 1.0], 2, 4, 2)])
@pytest.mark.parametrize("alpha,beta,min_n", [
    (0.01, 1.0, 1), (0.0, 0.0, 1), (1.0, 0.0, 1), (0.5, 0.3, 1), (0.9, 0.05, 2), (0.3, 2.0, 2),
])
@pytest.mark.parametrize("variant", ["release", "library"])
def test_layer_milp_matches_brute_force(p, c_out, n, kmax, alpha, beta, min_n, variant):
    sol = solve_layer(p, c_out, n, kmax=kmax, alpha=alpha, beta=beta, min_n=min_n, mip_rel_gap=0.0, variant=variant)
    assert sol.status == "optimal"
    assert sol.M.shape == (len(p), c_out) and int(sol.M.sum()) == n
    assert sol.M.min() >= 0 and sol.M.max() <= kmax
    assert sol.objective == pytest.approx(brute_force(p, c_out, n, kmax, alpha, beta, min_n, variant), abs=1e-9)


def test_layer_milp_alpha_zero_concentrates_on_highest_path_mass():
    p = np.array([1.0, 7.0, 3.0, 5.0, 2.0])
    # beta = 0: whole rows (kmax * C_out = 12) for the largest P_in, B = 1
    M = solve_layer(p, 4, 16, kmax=3, alpha=0.0, beta=0.0).M
    assert M.sum(1).tolist() == [0, 12, 0, 4, 0]
    # beta = 1: one weight per kernel, still in the rows of largest P_in
    M = solve_layer(p, 4, 10, kmax=3, alpha=0.0, beta=1.0).M
    used = M.sum(1) > 0
    assert used.tolist() == [False, True, True, True, False] and M.max() == 1


def test_layer_milp_trivial_and_infeasible_budgets():
    assert solve_layer([1.0, 2.0], 3, 0, kmax=2, alpha=0.5, beta=1.0).M.sum() == 0
    full = solve_layer([1.0, 2.0], 3, 12, kmax=2, alpha=0.5, beta=1.0)
    assert full.status == "trivial" and (full.M == 2).all()
    with pytest.raises(ValueError, match="cannot keep 13"):
        solve_layer([1.0, 2.0], 3, 13, kmax=2, alpha=0.5, beta=1.0)


# -- tiny networks ---------------------------------------------------------------------------------------
def test_milp_beats_random_masks_with_the_same_counts():
    torch.manual_seed(0)
    model = TinyConv()
    masks, report = npb_masks_and_report(model, 0.9, input_shape=(3, 8, 8), budget="uniform", fine_tune=False)
    gen = torch.Generator().manual_seed(1)
    for r in report.layers:
        assert int(masks[r.name].sum()) == r.kept and np.array_equal(kernel_counts(masks[r.name]), r.M)
        assert r.status == ["optimal"]
        ours = layer_objective(r.M, r.p_in, r.kept, kmax=r.kmax[0], alpha=r.alpha, beta=r.beta)
        numel = math.prod(r.shape)
        rand = []
        for _ in range(20):
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[torch.randperm(numel, generator=gen)[: r.kept]] = True
            rand.append(layer_objective(kernel_counts(flat.view(r.shape)), r.p_in, r.kept, kmax=r.kmax[0],
                                        alpha=r.alpha, beta=r.beta))
        assert ours >= max(rand) - 1e-12 and ours > float(np.mean(rand))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_alpha_one_connects_every_channel_when_the_budget_allows(beta):
    torch.manual_seed(0)
    model = TinyConv()
    masks, report = npb_masks_and_report(model, 0.9, input_shape=(3, 8, 8), budget="uniform", alpha=1.0, beta=beta,
                                         fine_tune=False)
    for r in report.layers:
        c_out, c_in = r.shape[:2]
        assert r.kept >= c_in + c_out
        m = masks[r.name]
        assert bool((m.sum((0, 2, 3)) > 0).all()) and bool((m.sum((1, 2, 3)) > 0).all())
    # path-only (alpha = 0, beta = 0) does not: it fills the input channels with the most paths
    path_only = npb_masks_and_report(model, 0.9, input_shape=(3, 8, 8), budget="uniform", alpha=0.0, beta=0.0,
                                     fine_tune=False)[0]
    assert not bool((path_only["c2.weight"].sum((0, 2, 3)) > 0).all())


def test_alpha_zero_keeps_the_input_channels_with_the_most_paths():
    torch.manual_seed(0)
    model = TinyConv()
    masks, report = npb_masks_and_report(model, 0.9, input_shape=(3, 8, 8), budget="uniform", alpha=0.0, beta=0.0,
                                         max_p=None, fine_tune=False)
    r = {x.name: x for x in report.layers}["c2.weight"]
    p = r.p_in
    assert len(set(p.tolist())) > 1  # random kernel positions of c1 give unequal path masses
    used = masks["c2.weight"].sum((0, 2, 3)) > 0
    assert p[used.numpy()].min() >= p[~used.numpy()].max()
    # the library's normaliser is the attainable maximum: B = 1 (NPB's is larger when no whole row fits)
    assert layer_objective(r.M, p, r.kept, kmax=9, alpha=0.0, beta=0.0, variant="library") == pytest.approx(1.0)
    assert layer_objective(r.M, p, r.kept, kmax=9, alpha=0.0, beta=0.0) < 1.0


def test_p_in_is_the_tensor_entering_each_layer_through_max_pools():
    torch.manual_seed(0)
    model = TinyVGG()
    masks, report = npb_masks_and_report(model, 0.8, input_shape=(3, 16, 16), fine_tune=False)
    r = {x.name: x for x in report.layers}
    m = {n: v.to(torch.float64) for n, v in masks.items()}
    x = torch.ones(1, 3, 16, 16, dtype=torch.float64)
    np.testing.assert_allclose(r["features.0.weight"].p_in, x.sum((0, 2, 3)).numpy())
    x = F.max_pool2d(F.conv2d(x, m["features.0.weight"], padding=1), 2)
    np.testing.assert_allclose(r["features.4.weight"].p_in, x.sum((0, 2, 3)).numpy())
    x = F.conv2d(x, m["features.4.weight"], padding=1)
    np.testing.assert_allclose(r["features.7.weight"].p_in, x.sum((0, 2, 3)).numpy())
    x = F.max_pool2d(F.conv2d(x, m["features.7.weight"], padding=1), 2).mean((2, 3))
    np.testing.assert_allclose(r["fc.weight"].p_in, x.sum(0).numpy())
    assert masks.layer_kept() == layer_kept_counts(model, 0.8, "erk")


def test_chunks_cover_every_output_channel_and_split_the_budget_exactly():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 37, 3, padding=1), nn.Flatten(),
                        nn.Linear(37 * 4 * 4, 23))
    masks, report = npb_masks_and_report(net, 0.9, input_shape=(3, 4, 4), chunk_size=8, chunk_threshold=0,
                                         linear_chunk_size=10, linear_chunk_threshold=0, budget="uniform",
                                         fine_tune=False)
    conv, fc = report.layers[1], report.layers[2]
    assert conv.chunks == [(0, 7), (7, 14), (14, 22), (22, 29), (29, 37)]
    assert fc.chunks == [(0, 7), (7, 15), (15, 23)]
    for r in (conv, fc):
        c_out = r.shape[0]
        assert [int(r.M[:, a:b].sum()) for a, b in r.chunks] == [
            r.kept * b // c_out - r.kept * a // c_out for a, b in r.chunks]
        assert int(masks[r.name].sum()) == r.kept
        assert bool(masks[r.name][-1].sum() > 0)  # the trailing output channel is pruned too, not skipped
    assert masks.layer_kept() == layer_kept_counts(net, 0.9, "uniform")


def test_time_limit_is_reported_and_counts_stay_exact():
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    with pytest.warns(NPBTimeLimitWarning, match=r"time_limit_s=1e-06"):
        masks, report = npb_masks_and_report(net, 0.95, input_shape=(3, 8, 8), time_limit_s=1e-6,
                                             chunk_threshold=10**9)
    assert report.layers[1].hit_time_limit
    assert "1.weight" in report.as_dict()["time_limit_layers"]
    assert masks.meta["report"]["time_limit_hit"] is True and masks.meta["report"]["time_limit_s"] == 1e-6
    assert masks.layer_kept() == layer_kept_counts(net, 0.95, "erk")


# -- NPB as released: path normaliser, min_n capping, VGG max_p schedule, fine-tune rule ----------------
def test_release_path_normaliser_by_hand():
    p = [1.0, 2.0, 3.0]  # row = kmax * c_out = 2
    # n = 1 fills no whole row: NPB's sort(P_in)[-0:] is the whole array -> 2 * (1+2+3) + 1 * 3
    assert release_max_path(p, 2, 1, 1) == 15.0 and max_path(p, 2, 1, 1) == 3.0
    # n = 5: two whole rows (3, 2) and one weight on the next (1): both give the attainable maximum
    assert release_max_path(p, 2, 5, 1) == max_path(p, 2, 5, 1) == 2 * (3 + 2) + 1
    # n = 6: every row whole, no (m+1)-th value (NPB's IndexError branch)
    assert release_max_path(p, 2, 6, 1) == max_path(p, 2, 6, 1) == 12.0


def test_fill_groups_by_hand():
    eff = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    grad = torch.tensor([[0.0, 0.0, 9.0], [5.0, 0.5, 2.0], [7.0, 7.0, 7.0], [1.0, 1.0, 1.0]])
    # visit order by effective count: group 3 (full), 0 (1 free), 1 (2 free), 2 (3 free)
    assert _fill_groups(eff, grad, 3).int().tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]]
    # 2 to add: group 0 whole, then the free position of group 1 with the largest gradient (2.0)
    assert _fill_groups(eff, grad, 2).int().tolist() == [[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]]


def release_fine_tune_reference(model, raw, order, shortcuts, shape):
    """NPB's fine-tune rule written out with loops (counts kept exact, fresh gradients per layer)."""
    net, params = masked_path_net(model, raw)
    ws = [params[n] for n in order]
    for idx, name in enumerate(order):
        w = ws[idx]
        if w.dim() != 4:
            continue
        for v in ws:
            v.requires_grad_(True)
        g = torch.autograd.grad(net(torch.ones((1, *shape), dtype=torch.float64)).sum(), ws)[idx]
        for v in ws:
            v.requires_grad_(False)
        kept = w.detach() > 0
        eff = kept & (g != 0)
        todo = int(kept.sum() - eff.sum())
        if todo <= 1:
            continue
        c_out, c_in = w.shape[:2]
        if name in shortcuts:  # groups: input columns, positions by output channel
            groups = [[(o, i, a, b) for o in range(c_out) for a in range(w.shape[2]) for b in range(w.shape[3])]
                      for i in range(c_in)]
        else:  # groups: kernels
            groups = [[(o, i, a, b) for a in range(w.shape[2]) for b in range(w.shape[3])]
                      for o in range(c_out) for i in range(c_in)]
        counts = [sum(bool(eff[q]) for q in grp) for grp in groups]
        new = eff.clone()
        for k in sorted(range(len(groups)), key=lambda k: (-counts[k], k)):
            free = [q for q in groups[k] if not eff[q]]
            if len(free) > todo:  # the positions still needed, largest gradient first (ties: first position)
                free = sorted(free, key=lambda q: -float(g[q]))[:todo]
            for q in free:
                new[q] = True
            todo -= len(free)
            if todo == 0:
                break
        with torch.no_grad():
            w.copy_(new.to(torch.float64))
    return {n: params[n].detach() > 0 for n in raw}


def test_release_fine_tune_equals_a_loop_reference_and_keeps_counts(resnet20, resnet20_99):
    tuned, report = resnet20_99
    raw, _ = npb_masks_and_report(resnet20, 0.99, input_shape=SHAPE, seed=0, fine_tune=False)
    order = [r.name for r in report.layers]
    shortcuts = {r.name for r in report.layers if r.kind == "shortcut"}
    ref = release_fine_tune_reference(resnet20, raw, order, shortcuts, SHAPE)
    assert all(torch.equal(tuned[n], ref[n]) for n in tuned)
    assert tuned.layer_kept() == raw.layer_kept()
    assert sum(r.moved for r in report.layers) > 0
    assert all(r.moved == 0 for r in report.layers if r.kind == "linear")  # NPB leaves linear layers alone
    assert report.variant == "release" and tuned.meta["report"]["variant"] == "release"


def test_release_min_n_is_capped_and_first_layers_get_one():
    torch.manual_seed(0)
    model = TinyConv()
    for variant, expected in (("release", {"c1.weight": [1], "c2.weight": [1]}),
                              ("library", {"c1.weight": [3], "c2.weight": [3]})):
        _, report = npb_masks_and_report(model, 0.9, input_shape=(3, 8, 8), budget="uniform", min_n=3,
                                         variant=variant, fine_tune=False)
        assert {r.name: r.min_n for r in report.layers} == expected
    # a dense enough budget lifts the cap: ceil(n / kernels) = ceil(216 / 48) = 5 >= min_n
    _, report = npb_masks_and_report(model, 0.5, input_shape=(3, 8, 8), budget="uniform", min_n=3, fine_tune=False)
    assert {r.name: r.min_n for r in report.layers} == {"c1.weight": [1], "c2.weight": [3]}


def test_max_p_drop_layers_lowers_max_p_from_the_given_layers_on():
    torch.manual_seed(0)
    model = TinyVGG()
    _, report = npb_masks_and_report(model, 0.95, input_shape=(3, 16, 16), max_p=9, max_p_drop_layers=[1, 2],
                                     fine_tune=False)
    assert [r.kmax for r in report.layers] == [[9], [7], [5], [1]]
    _, report = npb_masks_and_report(model, 0.95, input_shape=(3, 16, 16), max_p=9, fine_tune=False)
    assert [r.kmax for r in report.layers] == [[9], [9], [9], [1]]
    with pytest.raises(ValueError, match="max_p_drop_layers.*below the number of prunable layers"):
        npb_masks_and_report(model, 0.95, input_shape=(3, 16, 16), max_p_drop_layers=[4])
    with pytest.raises(ValueError, match="max_p_drop_layers.*max_p is None"):
        npb_masks_and_report(model, 0.95, input_shape=(3, 16, 16), max_p=None, max_p_drop_layers=[1])


# -- errors ----------------------------------------------------------------------------------------------
def test_unknown_and_bad_hyper_parameters_are_clear_errors(resnet20):
    with pytest.raises(TypeError, match="no hyper-parameter 'alhpa'.*alpha=0.01"):
        prune(resnet20, "npb", 0.9, input_shape=SHAPE, alhpa=0.5)
    bad = {
        "alpha": 1.5, "beta": -1.0, "max_p": 0, "min_n": 0, "chunk_size": 0, "linear_chunk_size": 2.5,
        "chunk_threshold": -1, "max_p_step": -2, "time_limit_s": 0, "mip_rel_gap": -0.1, "fine_tune": "yes",
        "shortcut_beta": float("nan"),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"npb: {name} must be"):
            prune(resnet20, "npb", 0.9, input_shape=SHAPE, **{name: value})
    with pytest.raises(ValueError, match="variant='relase' is not allowed"):
        prune(resnet20, "npb", 0.9, input_shape=SHAPE, variant="relase")
    with pytest.raises(ValueError, match="budget='erkk' is not allowed"):
        prune(resnet20, "npb", 0.9, input_shape=SHAPE, budget="erkk")
    with pytest.raises(ValueError, match="input_shape"):
        prune(resnet20, "npb", 0.9, input_shape=())
    with pytest.raises(ValueError, match="fraction"):
        prune(resnet20, "npb", 1.0, input_shape=SHAPE)


def test_unsupported_networks_are_rejected():
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        prune(grouped, "npb", 0.5, input_shape=(4, 6, 6))
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="more than once"):
        prune(shared, "npb", 0.5, input_shape=(4,))
