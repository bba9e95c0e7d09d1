"""The pruning network (dpai_lib.paths): activations are identities whatever their spelling, and DPaI on
it is the release's computation (checked against a hand-written release-form forward)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib import build_model, prune
from dpai_lib.masks import prunable_parameters
from dpai_lib.paths import ReleasePathCount, identity_modules, pruning_network
from dpai_lib.sparsity import layer_kept_counts


class Block(nn.Module):
    """A residual block whose activations are spelled in one of four ways."""

    def __init__(self, c_in: int, c_out: int, stride: int, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU(inplace=True)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Sequential())

    def act(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if self.style == "module":
            return (self.act1 if which == 1 else self.act2)(x)
        if self.style == "functional":
            return F.relu(x, inplace=which == 2)
        if self.style == "torch":
            return torch.relu(x) if which == 1 else torch.relu_(x)
        return x.relu() if which == 1 else x.relu_()  # "method"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)), 1)
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x), 2)


class Net(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(Block(4, 4, 1, style), Block(4, 8, 2, style), Block(8, 8, 1, style))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)))


STYLES = ("module", "functional", "torch", "method")


def nets() -> dict[str, nn.Module]:
    built = {}
    for style in STYLES:
        torch.manual_seed(0)
        built[style] = Net(style)
    return built


def test_pruning_network_removes_every_spelling_of_an_identity():
    for style, net in nets().items():
        gm = pruning_network(net)
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            assert node.target not in (F.relu, torch.relu, torch.relu_, "relu", "relu_"), (style, node)
            if node.op == "call_module":
                assert not isinstance(modules[node.target], identity_modules()), (style, node)
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Dropout)) for m in gm.modules()), style
        assert set(prunable_parameters(gm)) == set(prunable_parameters(net))
        # with no activation left, the network is linear in its input: f(2x) = 2 f(x) with zero biases
        gm.fc.bias.data.zero_()
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(gm(2 * x), 2 * gm(x), atol=1e-5)
    assert net.training and isinstance(net.bn1, nn.BatchNorm2d)  # the model itself is untouched


def test_dpai_masks_and_traces_do_not_depend_on_how_relu_is_spelled():
    results = {style: prune(net, "dpai", 0.97, input_shape=(3, 8, 8), steps=15, seed=1) for style, net in nets().items()}
    first = results["module"]
    for style, masks in results.items():
        assert all(torch.equal(first[n], masks[n]) for n in first), style
        assert [r["log_paths"] for r in first.meta["trace"]] == [r["log_paths"] for r in masks.meta["trace"]]


def test_a_kept_relu_would_block_the_gradients_that_revive_dead_units():
    """What the module-swap copy got wrong on functional ReLU: with ReLU in the forward, weights feeding a
    unit that has no path get gradient 0; the release's network (ReLU an identity) gives them paths."""
    net = nets()["functional"]
    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.rand(p.shape, generator=gen) < 0.5).float() for n, p in prunable_parameters(net).items()}
    weights["blocks.0.conv1.weight"][0] = 0  # unit 0 of the first block's conv1 has no path: it is dead
    weights = {n: w.requires_grad_() for n, w in weights.items()}
    release = torch.autograd.grad(ReleasePathCount(net, (3, 8, 8))(weights), list(weights.values()))
    # the same count with the model's own forward (ReLU kept; BN made an identity, biases 0)
    kept = nets()["functional"].eval()
    for m in kept.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.forward = lambda x: x
    kept.fc.bias.data.zero_()
    from torch.func import functional_call

    out = functional_call(kept, dict(weights), (torch.ones(1, 3, 8, 8),))
    with_relu = torch.autograd.grad(out.sum().log(), list(weights.values()))
    grad = dict(zip(weights, release))["blocks.0.conv1.weight"][0]
    assert bool((grad != 0).all())  # the release: every weight into the dead unit would add paths
    assert bool((dict(zip(weights, with_relu))["blocks.0.conv1.weight"][0] == 0).all())  # a kept ReLU: none


def _release_forward(model: nn.Module, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """ResNet-20's pruning forward written out by hand as the release computes it: no BN, no ReLU, no
    bias, every conv/linear input divided by its maximum, log R = log(sum(out)) + sum(log max)."""
    logs = []

    def conv(name: str, x: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
        c = x.max()
        logs.append(torch.log(c))
        return F.conv2d(x / c, w[name], stride=stride, padding=pad)

    x = conv("conv1.weight", torch.ones(1, 3, 32, 32, dtype=torch.float64), 1, 1)
    for i, block in enumerate(model.layers):
        stride = block.conv1.stride[0]
        out = conv(f"layers.{i}.conv2.weight", conv(f"layers.{i}.conv1.weight", x, stride, 1), 1, 1)
        short = conv(f"layers.{i}.shortcut.0.weight", x, stride, 0) if len(block.shortcut) else x
        x = out + short
    x = x.mean((2, 3))
    c = x.max()
    logs.append(torch.log(c))
    out = F.linear(x / c, w["fc.weight"])
    return torch.log(out.sum()) + torch.stack(logs).sum()


def test_one_dpai_step_on_resnet20_matches_a_release_form_computation():
    model = build_model("resnet20", 10)
    sparsity, alpha, beta, lr = 0.99, 0.99, 0.5, 0.005
    counts = layer_kept_counts(model, sparsity, "erk")
    gen = torch.Generator().manual_seed(4)
    scores = {n: torch.randn(p.shape, generator=gen) for n, p in prunable_parameters(model).items()}
    # the release's step, by hand: masks = top-k |s|, g = dlogR/dm * sign(s), indicators, Adam
    masks = {}
    for n, s in scores.items():
        flat = torch.zeros(s.numel(), dtype=torch.bool)
        flat[s.abs().flatten().argsort(descending=True, stable=True)[:counts[n]]] = True
        masks[n] = flat.view(s.shape)
    w = {n: m.double().requires_grad_() for n, m in masks.items()}
    grads = dict(zip(w, torch.autograd.grad(_release_forward(model, w), list(w.values()))))
    ours = ReleasePathCount(model, (3, 32, 32), dtype=torch.float64)
    w2 = {n: m.double().requires_grad_() for n, m in masks.items()}
    ours_grads = torch.autograd.grad(ours(w2), list(w2.values()))
    for (n, g), h in zip(grads.items(), ours_grads):
        assert torch.allclose(g, h, rtol=1e-9, atol=1e-12), n
    params = {n: s.clone().requires_grad_() for n, s in scores.items()}
    adam = torch.optim.Adam(list(params.values()), lr=lr)
    for n, p in params.items():
        g, m = grads[n].float(), masks[n]
        eff = (g != 0) & m
        if eff.dim() > 2:
            kernel_ok = eff.flatten(2).any(2)[..., None, None]
            node_ok = eff.flatten(1).any(1)[:, None, None, None]
        else:
            kernel_ok, node_ok = eff, eff.any(1, keepdim=True)
        gs = g * torch.sign(p.detach())
        p.grad = -((1 - alpha) * gs + alpha * ((1 - beta) * gs * (~node_ok) + beta * gs * (~kernel_ok)))
    adam.step()
    expected = {}
    for n, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[p.detach().abs().flatten().argsort(descending=True, stable=True)[:counts[n]]] = True
        expected[n] = flat.view(p.shape)
    got = prune(model, "dpai", sparsity, input_shape=(3, 32, 32), steps=1, init_scores=scores, alpha=alpha,
                beta=beta, lr=lr)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not all(torch.equal(got[n], masks[n]) for n in masks)  # the step did move some weights


@pytest.mark.parametrize("name,shape", [("tv:resnet18", (3, 32, 32)), ("efficientnet_b0", (3, 32, 32)),
                                        ("vit_tiny", (3, 32, 32)), ("vgg19_bn", (3, 32, 32))])
def test_release_count_on_other_architectures(name, shape):
    model = build_model(name, 10)
    gm = pruning_network(model)
    assert not any(isinstance(m, identity_modules()) for m in gm.modules())
    weights = {n: torch.ones_like(p) for n, p in prunable_parameters(model).items()}
    value = ReleasePathCount(model, shape)(weights).item()
    assert math.isfinite(value) and value > 0


def test_untraceable_models_are_refused_by_name():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(NotImplementedError, match="Branchy"):
        pruning_network(Branchy())
