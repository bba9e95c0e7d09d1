"""PHEW pruner: exact budget, determinism, paths, walk bias, residual handling, unsupported structures."""

import pytest
import torch
from torch import nn

from dpai_lib import build_model, list_pruners, prune
from dpai_lib.pruners import pruner_hparams
from dpai_lib.pruners.phew import _Graph, _phew_select, phew_visit_counts
from dpai_lib.sparsity import kept_count

DEFAULTS = dict(identity_skip=0.0, max_walks=50_000_000, batch_walks=32_768)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 10)


def mlp(widths=(12, 10, 8, 6), seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_registered_with_documented_hparams():
    assert "phew" in list_pruners()
    assert pruner_hparams("phew") == DEFAULTS
    from dpai_lib.pruners import PRUNERS

    assert PRUNERS.get("phew").needs_data is False


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.999])
def test_exact_global_count_and_no_collapse_on_resnet20(resnet20, sparsity):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    masks = prune(resnet20, "phew", sparsity, input_shape=(3, 32, 32), seed=0)
    assert masks.kept() == kept_count(masks.total(), 1.0 - sparsity)
    assert masks.collapsed_layers() == []
    after = resnet20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in resnet20.modules())


def test_deterministic_for_a_seed_and_different_for_another(resnet20):
    a = prune(resnet20, "phew", 0.99, input_shape=(3, 32, 32), seed=0)
    b = prune(resnet20, "phew", 0.99, input_shape=(3, 32, 32), seed=0)
    c = prune(resnet20, "phew", 0.99, input_shape=(3, 32, 32), seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def _off_path(weights, masks):
    """Global indices of kept weights that are not on an input-to-output path of kept weights (MLP)."""
    kept = [masks[n].to(torch.int64) for n in weights]  # (out, in) each
    reach = [torch.ones(kept[0].shape[1], dtype=torch.bool)]
    for m in kept:
        reach.append((m @ reach[-1].to(torch.int64)) > 0)
    coreach = [torch.ones(kept[-1].shape[0], dtype=torch.bool)]
    for m in reversed(kept):
        coreach.insert(0, (m.t() @ coreach[0].to(torch.int64)) > 0)
    off, offset = [], 0
    for l, m in enumerate(kept):
        on = m.bool() & reach[l][None, :] & coreach[l + 1][:, None]
        bad = torch.nonzero((m.bool() & ~on).flatten()).flatten()
        off.append(bad + offset)
        offset += m.numel()
    return torch.cat(off)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_kept_weight_lies_on_an_input_output_path(sparsity, seed):
    model = mlp(seed=seed)
    masks, info = _phew_select(model, sparsity, input_shape=(12,), seed=seed, **DEFAULTS)
    assert masks.kept() == kept_count(masks.total(), 1.0 - sparsity)
    off = _off_path([f"{i}.weight" for i in (0, 2, 4)], masks)
    # Only the walk cut at the budget can leave a partial path (at most route length - 1 weights).
    cut = info["cut_walk_kept"]
    assert cut.numel() <= 2
    assert set(off.tolist()) <= set(cut.tolist())


def test_walks_prefer_large_weights():
    model = mlp((6, 8, 4), seed=0)
    with torch.no_grad():
        model[2].weight[0] *= 100.0  # output unit 0's incoming weights are 100x larger
    visits = phew_visit_counts(model, 4000, input_shape=(6,), seed=0)["2.weight"].sum(1).double()
    # Forward walks choose unit 0 ~97% of the time, backward walks start at each unit in turn (25%).
    assert visits.sum() == 4000
    assert visits[0] > 3 * visits[1:].max()
    control = phew_visit_counts(mlp((6, 8, 4), seed=0), 4000, input_shape=(6,), seed=0)["2.weight"].sum(1)
    assert control.max() < 2 * control.min()


def test_weight_inside_a_kernel_is_chosen_by_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[0].weight[0, 0, 1, 1] = 1.0
    visits = phew_visit_counts(model, 1000, input_shape=(1, 5, 5), seed=0)["0.weight"].flatten()
    assert visits.sum() == 1000
    assert visits[4] > 0.85 * 1000  # expected 1 / 1.08 = 93%


def test_resnet20_keeps_shortcut_and_main_branch(resnet20):
    masks = prune(resnet20, "phew", 0.99, input_shape=(3, 32, 32), seed=0)
    kept = masks.layer_kept()
    for block in (3, 6):
        assert kept[f"layers.{block}.shortcut.0.weight"] > 0
        assert kept[f"layers.{block}.conv1.weight"] > 0 and kept[f"layers.{block}.conv2.weight"] > 0


def test_identity_skip_rule(resnet20):
    graph = _Graph(resnet20, (3, 32, 32), 0.0)
    fan_out = [n.fwd_cum.tolist() for n in graph.nodes if n.fwd_cum is not None]
    merges = [n.bwd_cum.tolist() for n in graph.nodes if n.bwd_cum is not None]
    assert fan_out.count([0.5, 1.0]) == 2 and merges.count([0.5, 1.0]) == 2  # coin flip at 1x1 shortcuts
    assert fan_out.count([1.0, 1.0]) == 7 and merges.count([1.0, 1.0]) == 7  # identity blocks: main branch
    half = prune(resnet20, "phew", 0.99, input_shape=(3, 32, 32), identity_skip=0.5)
    assert half.collapsed_layers() == []
    with pytest.raises(ValueError, match="identity_skip"):
        prune(resnet20, "phew", 0.9, input_shape=(3, 32, 32), identity_skip=1.5)


@pytest.mark.parametrize("name,classes,shape,layers", [
    ("vgg19_bn", 100, (3, 32, 32), 17), ("resnet18", 200, (3, 64, 64), 21),
])
def test_paper_networks_at_99_percent(name, classes, shape, layers):
    torch.manual_seed(0)
    model = build_model(name, classes)
    masks = prune(model, "phew", 0.99, input_shape=shape, seed=0)
    assert len(masks) == layers
    assert masks.kept() == kept_count(masks.total(), 0.01)
    assert masks.collapsed_layers() == []


def test_flatten_mlp_starts_at_pixels_and_cnn_flatten_maps_blocks():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    graph = _Graph(model, (1, 8, 8), 0.0)
    assert graph.n_in_units == 64 and graph.n_out_units == 10
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(54, 10))
    graph = _Graph(cnn, (1, 12, 12), 0.0)
    assert [n.factor for n in graph.nodes if n.kind == "flatten"] == [9]
    masks = prune(cnn, "phew", 0.8, input_shape=(1, 12, 12))
    assert masks.kept() == kept_count(masks.total(), 0.2) and masks.collapsed_layers() == []


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.cat([self.a(x), self.b(x)], 1), 1), 1))


def test_unsupported_structures_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="cat"):
        prune(_Concat(), "phew", 0.9, input_shape=(3, 8, 8))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(NotImplementedError, match="groups=2"):
        prune(grouped, "phew", 0.9, input_shape=(4, 8, 8))
    with pytest.raises(NotImplementedError, match="permute"):
        prune(build_model("vit_tiny", 10), "phew", 0.9, input_shape=(3, 32, 32))


def test_unreachable_budgets_are_reported():
    model = mlp((6, 8, 4))
    with torch.no_grad():
        keep = torch.arange(8)[:, None] % 6 == torch.arange(6)[None, :]
        model[0].weight[~keep] = 0.0  # zero kernels between non-zero rows/columns are never crossed
    with pytest.raises(ValueError, match="exceeds the 40 weights"):  # 8 + 32 weights can be picked
        prune(model, "phew", 0.4, input_shape=(6,))
    assert prune(model, "phew", 0.5, input_shape=(6,)).kept() == 40
    with pytest.raises(RuntimeError, match="max_walks"):
        prune(mlp((6, 8, 4)), "phew", 0.05, input_shape=(6,), max_walks=64)
    assert prune(mlp((6, 8, 4)), "phew", 0.0, input_shape=(6,)).kept() == 80  # sparsity 0: dense


def test_transition_frequencies_match_kernel_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5))
    w = model[0].weight.detach().abs().double()
    n = 60_000  # 30k forward walks (10k per input unit), 30k backward walks (6k per output unit)
    visits = phew_visit_counts(model, n, input_shape=(3,), seed=0)["0.weight"].double()
    expected = (n / 2 / 3) * w / w.sum(0, keepdim=True) + (n / 2 / 5) * w / w.sum(1, keepdim=True)
    assert visits.sum() == n
    assert torch.allclose(visits, expected, rtol=0.05, atol=60)
