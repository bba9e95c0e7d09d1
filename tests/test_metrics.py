"""Node/path metrics: exact path counts against brute force on explicit unit graphs, the DPaI / NPB variants.

The brute force builds the DAG of scalar units with Python loops (one edge per kept weight and spatial
position, per pooling-window member, per residual/concat identity) and counts paths with Python integers
by a memoised depth-first recursion; it shares no code with ``dpai_lib.metrics``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.masks import MaskError, Masks, prunable_parameters
from dpai_lib.metrics import PathCounter, log_path_count, node_path_stats


# ------------------------------------------------------------------------------------------------------
# Tiny networks
# ------------------------------------------------------------------------------------------------------
def mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 3, bias=bias), nn.ReLU(),
                         nn.Linear(3, 2, bias=bias))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """2x4x4 input, conv stem, [max-pool 2 stride 1], identity block, 1x1-shortcut stride-2 block, GAP, fc."""

    def __init__(self, maxpool: bool = True, fc_bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2, stride=1) if maxpool else nn.Identity()
        self.block1 = Block(3, 3, 1)
        self.block2 = Block(3, 4, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=fc_bias)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.gap(self.block2(self.block1(x))), 1))


class PoolCatNet(nn.Module):
    """1x6x6 input; functional avg-pool with ceil_mode, dilated max-pool, concat, scalar scaling, adaptive
    max-pool with overlapping windows, a mean reduction and the sum of two linear heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 2, 3)
        self.pool_b = nn.MaxPool2d(2, stride=1, padding=1, dilation=2)
        self.conv_c = nn.Conv2d(4, 3, 1)
        self.apool = nn.AdaptiveMaxPool2d((3, 2))
        self.fc = nn.Linear(18, 2)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        a = F.avg_pool2d(self.conv_a(x), 3, 2, 1, True)
        b = self.pool_b(self.conv_b(x))
        h = self.apool(self.conv_c(0.5 * torch.cat([a, b], dim=1)))
        return self.fc(h.flatten(1)) + self.fc2(h.mean((2, 3)))


def random_masks(model: nn.Module, seed: int, density: float = 0.5) -> Masks:
    gen = torch.Generator().manual_seed(seed)
    return Masks({n: torch.rand(p.shape, generator=gen) < density for n, p in prunable_parameters(model).items()})


# ------------------------------------------------------------------------------------------------------
# Brute force: explicit unit graph, Python-integer path counts
# ------------------------------------------------------------------------------------------------------
class UnitGraph:
    def __init__(self) -> None:
        self.n = 0
        self.succ: dict[int, list[int]] = defaultdict(list)
        self.pred: dict[int, list[int]] = defaultdict(list)
        self.edges: list[tuple[int, int, tuple | None]] = []  # (src, dst, (param name, index) or None)

    def units(self, *shape: int) -> np.ndarray:
        ids = np.arange(self.n, self.n + int(np.prod(shape))).reshape(shape)
        self.n += ids.size
        return ids

    def edge(self, u, v, weight=None) -> None:
        self.succ[int(u)].append(int(v))
        self.pred[int(v)].append(int(u))
        self.edges.append((int(u), int(v), weight))

    # layers -----------------------------------------------------------------------------------------
    def conv(self, fm: np.ndarray, conv: nn.Conv2d, mask: torch.Tensor, name: str) -> np.ndarray:
        (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
        C, H, W = fm.shape
        out = self.units(conv.out_channels, (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1)
        for o, i, ky, kx in itertools.product(range(out.shape[0]), range(C), range(k), range(k)):
            if mask[o, i, ky, kx]:
                for y, x in itertools.product(range(out.shape[1]), range(out.shape[2])):
                    iy, ix = y * s - p + ky, x * s - p + kx
                    if 0 <= iy < H and 0 <= ix < W:
                        self.edge(fm[i, iy, ix], out[o, y, x], (name, (o, i, ky, kx)))
        return out

    def linear(self, vec: np.ndarray, mask: torch.Tensor, name: str) -> np.ndarray:
        out = self.units(mask.shape[0])
        for o, i in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
            if mask[o, i]:
                self.edge(vec[i], out[o], (name, (o, i)))
        return out

    def pool(self, fm: np.ndarray, windows_y: list[list[int]], windows_x: list[list[int]]) -> np.ndarray:
        out = self.units(fm.shape[0], len(windows_y), len(windows_x))
        for c, oy, ox in itertools.product(range(fm.shape[0]), range(len(windows_y)), range(len(windows_x))):
            for iy, ix in itertools.product(windows_y[oy], windows_x[ox]):
                self.edge(fm[c, iy, ix], out[c, oy, ox])
        return out

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = self.units(*a.shape)
        for idx in np.ndindex(*a.shape):
            self.edge(a[idx], out[idx])
            self.edge(b[idx], out[idx])
        return out

    # counting ---------------------------------------------------------------------------------------
    def count(self, inputs: np.ndarray, outputs: np.ndarray) -> tuple[int, dict[str, torch.Tensor]]:
        """Number of input->output paths, and the effective weights (on an edge with P_in > 0, P_out > 0)."""
        ins, outs = {int(u) for u in inputs.flat}, {int(u) for u in outputs.flat}

        @functools.cache
        def to_output(u: int) -> int:
            return (u in outs) + sum(to_output(v) for v in self.succ[u])

        @functools.cache
        def from_input(u: int) -> int:
            return (u in ins) + sum(from_input(v) for v in self.pred[u])

        total = sum(to_output(u) for u in ins)
        assert total == sum(from_input(u) for u in outs)
        effective = {(w[0], w[1]) for u, v, w in self.edges if w and from_input(u) > 0 and to_output(v) > 0}
        return total, effective


def windows(length: int, n_out: int, k: int, s: int, p: int, d: int = 1) -> list[list[int]]:
    """Members of each pooling window (definition: start o*s - p, step d, inside the input)."""
    return [[o * s - p + j * d for j in range(k) if 0 <= o * s - p + j * d < length] for o in range(n_out)]


def adaptive_windows(length: int, n_out: int) -> list[list[int]]:
    return [list(range(math.floor(o * length / n_out), math.ceil((o + 1) * length / n_out))) for o in range(n_out)]


def brute_mlp(model: nn.Module, masks: Masks) -> tuple[int, set]:
    g = UnitGraph()
    x = inputs = g.units(3)
    for name in ("0.weight", "2.weight", "4.weight"):
        x = g.linear(x, masks[name], name)
    return g.count(inputs, x)


def brute_tiny_resnet(model: TinyResNet, masks: Masks) -> tuple[int, set]:
    g = UnitGraph()
    x = inputs = g.units(2, 4, 4)
    x = g.conv(x, model.stem, masks["stem.weight"], "stem.weight")
    if isinstance(model.pool, nn.MaxPool2d):
        x = g.pool(x, windows(4, 3, 2, 1, 0), windows(4, 3, 2, 1, 0))
    for b in ("block1", "block2"):
        block = getattr(model, b)
        out = g.conv(x, block.conv1, masks[f"{b}.conv1.weight"], f"{b}.conv1.weight")
        out = g.conv(out, block.conv2, masks[f"{b}.conv2.weight"], f"{b}.conv2.weight")
        if len(block.shortcut):
            x = g.conv(x, block.shortcut[0], masks[f"{b}.shortcut.0.weight"], f"{b}.shortcut.0.weight")
        x = g.add(out, x)
    x = g.pool(x, adaptive_windows(x.shape[1], 1), adaptive_windows(x.shape[2], 1))
    return g.count(inputs, g.linear(x.reshape(-1), masks["fc.weight"], "fc.weight"))


def brute_pool_cat(model: PoolCatNet, masks: Masks) -> tuple[int, set]:
    g = UnitGraph()
    x = inputs = g.units(1, 6, 6)
    a = g.conv(x, model.conv_a, masks["conv_a.weight"], "conv_a.weight")
    n = F.avg_pool2d(torch.zeros(1, 1, 6, 6), 3, 2, 1, True).shape[-1]  # torch's output size (ceil_mode)
    a = g.pool(a, windows(6, n, 3, 2, 1), windows(6, n, 3, 2, 1))
    b = g.conv(x, model.conv_b, masks["conv_b.weight"], "conv_b.weight")
    b = g.pool(b, windows(4, 4, 2, 1, 1, d=2), windows(4, 4, 2, 1, 1, d=2))
    h = g.conv(np.concatenate([a, b]), model.conv_c, masks["conv_c.weight"], "conv_c.weight")
    h = g.pool(h, adaptive_windows(4, 3), adaptive_windows(4, 2))
    mean = g.units(3)
    for c, y, x_ in np.ndindex(*h.shape):
        g.edge(h[c, y, x_], mean[c])
    head1 = g.linear(h.reshape(-1), masks["fc.weight"], "fc.weight")
    out = g.add(head1, g.linear(mean, masks["fc2.weight"], "fc2.weight"))
    return g.count(inputs, out)


def expected_counts(masks: Masks, effective: set) -> dict[str, dict[str, int]]:
    """Per-layer params / kernels / nodes (DPaI convention: output channels) from brute-force effective weights."""
    layers = {}
    for name, m in masks.items():
        eff = [idx for (n, idx) in effective if n == name]
        layers[name] = {"params": len(eff), "kernels": len({idx[:2] for idx in eff}),
                        "nodes": len({idx[0] for idx in eff}), "kept": int(m.sum())}
    return layers


def as_tensors(masks: Masks, effective: set) -> dict[str, torch.Tensor]:
    out = {n: torch.zeros(m.shape, dtype=torch.bool) for n, m in masks.items()}
    for name, idx in effective:
        out[name][idx] = True
    return out


CASES = [
    ("mlp", mlp, (3,), brute_mlp),
    ("resnet", TinyResNet, (2, 4, 4), brute_tiny_resnet),
    ("resnet-nopool", functools.partial(TinyResNet, maxpool=False), (2, 4, 4), brute_tiny_resnet),
    ("poolcat", PoolCatNet, (1, 6, 6), brute_pool_cat),
]


def check_against_brute(model, masks, shape, brute) -> dict:
    count, effective = brute(model, masks)
    stats = node_path_stats(model, masks, shape)
    if count == 0:
        assert stats["log_paths"] == -math.inf
        assert not effective
    else:
        assert stats["log_paths"] == pytest.approx(math.log(count), rel=1e-9, abs=1e-12)
    want = expected_counts(masks, effective)
    assert stats["layers"] == want
    for key in ("params", "kernels", "nodes"):
        assert stats[key] == sum(layer[key] for layer in want.values())
    got = PathCounter(model, shape).effective(masks)
    for name, t in as_tensors(masks, effective).items():
        assert torch.equal(got[name], t), name
    return stats


# ------------------------------------------------------------------------------------------------------
# Tests: exact variant
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_brute_force(case, seed):
    _, build, shape, brute = case
    model = build()
    check_against_brute(model, random_masks(model, seed, density=(0.35, 0.5, 0.7, 1.0)[seed]), shape, brute)


def test_mlp_brute_force_counts_by_enumeration():
    """The DP used above, cross-checked by listing every path of the MLP explicitly."""
    model = mlp()
    masks = random_masks(model, 7)
    a, b, c = masks["0.weight"], masks["2.weight"], masks["4.weight"]
    paths = [(i, j, k, o) for i, j, k, o in itertools.product(range(3), range(4), range(3), range(2))
             if a[j, i] and b[k, j] and c[o, k]]
    assert brute_mlp(model, masks)[0] == len(paths)
    used = {("0", j, i) for i, j, _, _ in paths} | {("2", k, j) for _, j, k, _ in paths}
    used |= {("4", o, k) for _, _, k, o in paths}
    assert node_path_stats(model, masks, (3,))["params"] == len(used)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_disconnected_layers(case):
    name, build, shape, brute = case
    model = build()
    masks = dict(random_masks(model, 3, density=0.8))
    last = list(masks)[-1]
    masks[last] = torch.zeros_like(masks[last])  # output layer removed: no path at all
    if name == "poolcat":
        masks["fc.weight"] = torch.zeros_like(masks["fc.weight"])
    stats = check_against_brute(model, Masks(masks), shape, brute)
    assert stats["log_paths"] == -math.inf and stats["params"] == stats["nodes"] == stats["kernels"] == 0
    if name.startswith("resnet"):  # a collapsed residual branch: paths survive through the shortcut only
        masks = dict(random_masks(model, 4, density=0.8))
        masks["block2.conv2.weight"] = torch.zeros_like(masks["block2.conv2.weight"])
        stats = check_against_brute(model, Masks(masks), shape, brute)
        assert math.isfinite(stats["log_paths"]) and stats["layers"]["block2.conv1.weight"]["params"] == 0


# ------------------------------------------------------------------------------------------------------
# Tests: the differentiable counter
# ------------------------------------------------------------------------------------------------------
def direct_tiny_resnet(model: TinyResNet, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over paths of weight products, un-normalised, written independently (pooling = window sums)."""
    x = F.conv2d(torch.ones(1, 2, 4, 4, dtype=torch.float64), w["stem.weight"], padding=1)
    x = F.avg_pool2d(x, 2, stride=1, divisor_override=1)
    for b, stride in (("block1", 1), ("block2", 2)):
        out = F.conv2d(x, w[f"{b}.conv1.weight"], stride=stride, padding=1)
        out = F.conv2d(out, w[f"{b}.conv2.weight"], padding=1)
        x = out + (F.conv2d(x, w[f"{b}.shortcut.0.weight"], stride=stride) if b == "block2" else x)
    return F.linear(x.sum((2, 3)), w["fc.weight"]).sum()


def test_log_path_count_value_and_gradient_match_direct_count():
    model = TinyResNet()
    masks = random_masks(model, 1, density=0.6)
    gen = torch.Generator().manual_seed(0)
    w = {n: (torch.rand(m.shape, generator=gen, dtype=torch.float64) + 0.1) * m for n, m in masks.items()}
    w = {n: t.requires_grad_() for n, t in w.items()}
    counter = PathCounter(model, (2, 4, 4))
    mine = counter(w)
    direct = torch.log(direct_tiny_resnet(model, w))
    assert mine.item() == pytest.approx(direct.item(), rel=1e-12)
    g_mine = torch.autograd.grad(mine, list(w.values()))
    g_direct = torch.autograd.grad(direct, list(w.values()))
    for a, b in zip(g_mine, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # 0/1 masks: the direct count is the brute-force count; the functional form agrees with the class
    ones = {n: m.double() for n, m in masks.items()}
    assert direct_tiny_resnet(model, ones).item() == brute_tiny_resnet(model, masks)[0]
    assert log_path_count(model, ones, (2, 4, 4)).item() == pytest.approx(counter(ones).item(), rel=1e-14)


def test_counter_traces_once(monkeypatch):
    model = TinyResNet()
    counter = PathCounter(model, (2, 4, 4))
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda *a, **k: pytest.fail("retraced"))
    ones = {n: torch.ones_like(p, dtype=torch.float64) for n, p in prunable_parameters(model).items()}
    expected = math.log(brute_tiny_resnet(model, Masks(ones))[0])
    assert counter(ones).item() == counter(ones).item() == pytest.approx(expected)


def test_deep_dense_chain_does_not_overflow():
    """200 dense linear layers of width 64: 64**201 paths, beyond float64 (log > 709)."""
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(200)])
    expected = 201 * math.log(64)
    masks = Masks.ones(model)
    assert node_path_stats(model, masks, (64,))["log_paths"] == pytest.approx(expected, rel=1e-12)
    assert node_path_stats(model, masks, (64,), variant="dpai")["log_paths"] == pytest.approx(expected, rel=1e-12)
    with pytest.warns(RuntimeWarning, match="overflow"):
        assert node_path_stats(model, masks, (64,), variant="npb")["log_paths"] == math.inf


def test_large_dense_models_finite():
    from dpai_lib.models import build_model

    model = build_model("resnet18", 200)
    masks = Masks.ones(model)
    w = {n: m.double().requires_grad_() for n, m in masks.items()}
    value = PathCounter(model, (3, 64, 64))(w)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 100
    assert all(bool(torch.isfinite(t.grad).all()) and bool((t.grad > 0).all()) for t in w.values())

    vgg = build_model("vgg19_bn", 10)
    stats = node_path_stats(vgg, Masks.ones(vgg), (3, 32, 32))
    assert math.isfinite(stats["log_paths"]) and stats["params"] == Masks.ones(vgg).kept()


# ------------------------------------------------------------------------------------------------------
# Tests: DPaI and NPB variants
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_dpai_equals_exact_on_chains_only(seed):
    model = mlp()
    masks = random_masks(model, seed, density=0.7)
    exact, dpai = (node_path_stats(model, masks, (3,), variant=v) for v in ("exact", "dpai"))
    assert dpai["log_paths"] == pytest.approx(exact["log_paths"], rel=1e-12)
    assert dpai["layers"] == exact["layers"]
    # Residual nets: the release divides the branch by the max of each conv input but not the shortcut,
    # so the two summands of an addition are on different scales: its max-normalisation is exact for
    # chains only. (Max/avg pooling are not window sums either.)
    res = TinyResNet(maxpool=False)
    masks = Masks.ones(res)
    exact, dpai = (node_path_stats(res, masks, (2, 4, 4), variant=v) for v in ("exact", "dpai"))
    assert abs(dpai["log_paths"] - exact["log_paths"]) > 1e-3
    assert dpai["params"] == exact["params"] == masks.kept()


def test_npb_variant():
    # No biases, no max-pool, sum pooling: NPB's output sum is the exact count, its effective weights ours.
    model = TinyResNet(maxpool=False, fc_bias=False)
    for seed in range(3):
        masks = random_masks(model, seed, density=0.5)
        count, effective = brute_tiny_resnet(model, masks)
        npb = node_path_stats(model, masks, (2, 4, 4), variant="npb")
        assert npb["log_paths"] == (pytest.approx(math.log(count), rel=1e-12) if count else -math.inf)
        eff = as_tensors(masks, effective)
        assert npb["params"] == sum(int(t.sum()) for t in eff.values())
        # NPB nodes: effective input channels of non-shortcut convs + classifier inputs and outputs
        nodes = sum(int(t.any(0).any(-1).any(-1).sum()) for n, t in eff.items() if t.dim() == 4 and "shortcut" not in n)
        nodes += int(eff["fc.weight"].any(0).sum()) + int(eff["fc.weight"].any(1).sum())
        assert npb["nodes"] == nodes
        assert npb["kernels"] == node_path_stats(model, masks, (2, 4, 4))["kernels"]
    # Biases add "paths" in NPB's count (all parameters are set to 1).
    masks = random_masks(mlp(), 0, density=0.7)
    with_bias = node_path_stats(mlp(True), masks, (3,), variant="npb")["log_paths"]
    assert with_bias > node_path_stats(mlp(False), masks, (3,))["log_paths"]


def test_resnet20_variants_run():
    from dpai_lib.models import build_model
    from dpai_lib.pruners import prune

    model = build_model("resnet20", 10)
    masks = prune(model, "random", 0.99, input_shape=(3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {v: node_path_stats(model, masks, (3, 32, 32), variant=v) for v in ("exact", "dpai", "npb")}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    # ResNet-20 has no biases or max-pool: NPB's count is exact; DPaI's is not (residual additions)
    assert stats["npb"]["log_paths"] == pytest.approx(stats["exact"]["log_paths"], rel=1e-10)
    assert stats["dpai"]["log_paths"] != pytest.approx(stats["exact"]["log_paths"], rel=1e-3)
    for s in stats.values():
        assert 0 < s["params"] <= masks.kept() and set(s["layers"]) == set(masks)


# ------------------------------------------------------------------------------------------------------
# Tests: contract
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["exact", "dpai", "npb"])
def test_model_unchanged(variant):
    model = TinyResNet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    node_path_stats(model, random_masks(model, 0), (2, 4, 4), variant=variant)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == before[k].dtype for k, v in after.items()) and model.training
    assert all(m.forward.__func__ is type(m).forward for m in model.modules() if hasattr(m.forward, "__func__"))


def test_errors():
    model = TinyResNet()
    masks = random_masks(model, 0)
    with pytest.raises(ValueError, match="'exact', 'dpai', 'npb'"):
        node_path_stats(model, masks, (2, 4, 4), variant="synflow")
    with pytest.raises(MaskError, match="missing"):
        node_path_stats(model, {n: m for n, m in masks.items() if n != "fc.weight"}, (2, 4, 4))
    with pytest.raises(MaskError, match="shape"):
        node_path_stats(model, {**masks, "fc.weight": torch.ones(3, 5, dtype=torch.bool)}, (2, 4, 4))
    with pytest.raises(KeyError, match="missing"):
        PathCounter(model, (2, 4, 4))({n: m.double() for n, m in masks.items() if n != "fc.weight"})

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * torch.sigmoid(self.gate(x))

    with pytest.raises(NotImplementedError, match="mul"):
        node_path_stats(Gated(), Masks.ones(Gated()), (4,))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(NotImplementedError, match="MultiheadAttention"):
        PathCounter(Attention(), (3, 4))
