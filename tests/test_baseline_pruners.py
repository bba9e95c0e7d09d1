"""Baseline pruners: magnitude, SNIP, iterative SNIP, GraSP, SynFlow, ProsPr.

Every score is checked against an independent computation (hand-written gradients, brute-force path
enumeration, an explicit Hessian, finite differences); every pruner against the library contract (exact
kept counts, input untouched, deterministic, validated hyper-parameters).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib import build_model, list_pruners, prunable_parameters, prune
from dpai_lib.data import load_tensors, normalize
from dpai_lib.masks import Masks
from dpai_lib.pruners import pruner_hparams
from dpai_lib.pruners._gradients import float_masks, freeze, iteration_sparsities
from dpai_lib.pruners.grasp import grasp_hessian_gradient
from dpai_lib.pruners.iter_snip import iter_snip_masks
from dpai_lib.pruners.prospr import prospr_scores
from dpai_lib.pruners.snip import snip_scores
from dpai_lib.pruners.synflow import linearise, synflow_masks, synflow_scores
from dpai_lib.sparsity import kept_count, layer_kept_counts

METHODS = ["magnitude", "snip", "iter_snip", "grasp", "synflow", "prospr"]
DATA_METHODS = {"snip", "iter_snip", "grasp", "prospr"}
SHAPE = (3, 16, 16)


class TinyNet(nn.Module):
    """conv-BN-ReLU, strided conv-BN plus a 1x1 strided shortcut, ReLU, pool, dropout, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.short = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + self.short(x))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


@pytest.fixture(scope="module")
def batches():
    """Two batches of 64 normalised synthetic 16x16 images."""
    t = load_tensors("synthetic", "train", train_size=128, image_size=16)
    x = normalize(t.images, t.info)
    return [(x[:64], t.labels[:64]), (x[64:], t.labels[64:])]


def run(method, model, sparsity, batches, **kw):
    data = batches if method in DATA_METHODS else None
    return prune(model, method, sparsity, input_shape=SHAPE, data=data, **kw)


def same(a: Masks, b: Masks) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def subset(inner: Masks, outer: Masks) -> bool:
    return all(not bool((inner[n] & ~outer[n]).any()) for n in inner)


# -- registry and contract --------------------------------------------------------------------------


def test_registered_with_documented_defaults():
    assert set(METHODS) <= set(list_pruners())
    sel = {"scope": "global", "budget": "erk", "ties": "exact"}
    assert pruner_hparams("magnitude") == sel
    assert pruner_hparams("snip") == {"num_batches": None, "train_mode": True, **sel}
    assert pruner_hparams("iter_snip") == {
        "iterations": 100, "schedule": "exponential", "revival": False, "batches_per_iteration": 1,
        "train_mode": True, **sel}
    assert pruner_hparams("grasp") == {"temperature": 200.0, "num_batches": None, "train_mode": True, **sel}
    assert pruner_hparams("synflow") == {
        "iterations": 100, "schedule": "exponential", "double": True, "train_mode": False, **sel}
    assert pruner_hparams("prospr") == {
        "inner_steps": 3, "inner_lr": 0.1, "inner_momentum": 0.0, "new_batches": True, "train_mode": True, **sel}


@pytest.mark.parametrize("method", METHODS)
def test_exact_counts_untouched_input_and_determinism(method, batches):
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    total = sum(p.numel() for p in prunable_parameters(model).values())
    for sparsity in (0.5, 0.9, 0.99):
        a = run(method, model, sparsity, batches, seed=3)
        assert a.kept() == kept_count(total, 1.0 - sparsity)
        assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in a.values())
        assert same(a, run(method, model, sparsity, batches, seed=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG stream is not consumed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", ["erk", "uniform"])
def test_layer_scope_follows_the_budget(method, budget, batches):
    model = tiny_net()
    kw = {"iterations": 10} if method in ("iter_snip", "synflow") else {}
    masks = run(method, model, 0.9, batches, scope="layer", budget=budget, **kw)
    assert masks.layer_kept() == layer_kept_counts(model, 0.9, budget)


@pytest.mark.parametrize("method", METHODS)
def test_prune_all_ties_never_keep_more_than_asked(method, batches):
    model = tiny_net()
    total = sum(p.numel() for p in prunable_parameters(model).values())
    kw = {"iterations": 10} if method in ("iter_snip", "synflow") else {}
    masks = run(method, model, 0.9, batches, ties="prune_all", **kw)
    assert 0 < masks.kept() <= kept_count(total, 0.1)


@pytest.mark.parametrize("method,kw,match", [
    ("magnitude", {"scope": "local"}, "scope='local'.*'global', 'layer'"),
    ("magnitude", {"budget": "er"}, "budget='er'.*'erk', 'uniform'"),
    ("snip", {"ties": "random"}, "ties='random'.*'exact', 'prune_all'"),
    ("snip", {"num_batches": 0}, "num_batches=0"),
    ("snip", {"train_mode": "yes"}, "train_mode='yes'.*True, False"),
    ("iter_snip", {"schedule": "cosine"}, "schedule='cosine'.*'exponential', 'linear'"),
    ("iter_snip", {"revival": 1}, "revival=1.*True, False"),
    ("iter_snip", {"iterations": 0}, "iterations=0"),
    ("grasp", {"temperature": 0}, "temperature=0"),
    ("synflow", {"double": None}, "double=None.*True, False"),
    ("synflow", {"schedule": "exp"}, "schedule='exp'.*'exponential', 'linear'"),
    ("prospr", {"inner_steps": -1}, "inner_steps=-1"),
    ("prospr", {"scope": "all"}, "scope='all'.*'global', 'layer'"),
])
def test_bad_hyperparameters_name_the_allowed_values(method, kw, match, batches):
    with pytest.raises(ValueError, match=match):
        run(method, tiny_net(), 0.9, batches, **kw)


@pytest.mark.parametrize("method", sorted(DATA_METHODS))
def test_data_methods_require_data(method):
    with pytest.raises(ValueError, match="data"):
        prune(tiny_net(), method, 0.9, input_shape=SHAPE)


def test_schedules():
    exp = iteration_sparsities(0.99, 4, "exponential")
    assert exp[-1] == 0.99 and exp[0] == pytest.approx(1 - 0.01**0.25)
    assert iteration_sparsities(0.9, 3, "linear") == pytest.approx([0.3, 0.6, 0.9])
    assert iteration_sparsities(0.9, 3, "linear")[-1] == 0.9


# -- magnitude ---------------------------------------------------------------------------------------


def test_magnitude_keeps_exactly_the_largest_weights():
    model = tiny_net()
    params = prunable_parameters(model)
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    for sparsity in (0.5, 0.9, 0.99):
        k = kept_count(flat.numel(), 1 - sparsity)
        expected = torch.zeros(flat.numel(), dtype=torch.bool)
        expected[torch.argsort(flat, descending=True)[:k]] = True
        masks = prune(model, "magnitude", sparsity, input_shape=SHAPE)
        assert torch.equal(torch.cat([masks[n].flatten() for n in params]), expected)
    layer = prune(model, "magnitude", 0.8, input_shape=SHAPE, scope="layer", budget="uniform")
    for n, p in params.items():
        kept, pruned = p.detach().abs()[layer[n]], p.detach().abs()[~layer[n]]
        assert kept.min() > pruned.max()


# -- SNIP --------------------------------------------------------------------------------------------


def linear_problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).to(dtype)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(5, 12, generator=g))
        model[1].bias.copy_(torch.randn(5, generator=g))
    data = [(torch.randn(7, 3, 2, 2, generator=g, dtype=dtype), torch.randint(0, 5, (7,), generator=g))
            for _ in range(2)]
    return model, data


def hand_snip(model, data):
    w, b = model[1].weight.detach(), model[1].bias.detach()
    grad = torch.zeros_like(w)
    for x, y in data:
        x = x.flatten(1)
        p = torch.softmax(x @ w.T + b, dim=1)
        grad += (p - F.one_hot(y, 5).to(p.dtype)).T @ x / len(y)  # d(mean CE)/dW
    return (w * grad).abs()


def test_snip_scores_equal_the_hand_computed_gradient():
    model, data = linear_problem()
    params = freeze(model)
    scores = snip_scores(model, params, float_masks(None, params), data)
    torch.testing.assert_close(scores["1.weight"], hand_snip(model, data), rtol=1e-12, atol=1e-14)
    for sparsity, num_batches in ((0.5, None), (0.75, 1)):
        model, data = linear_problem()
        hand = hand_snip(model, data[: num_batches or 2]).flatten()
        masks = prune(model, "snip", sparsity, input_shape=(3, 2, 2), data=data, num_batches=num_batches)
        k = kept_count(hand.numel(), 1 - sparsity)
        assert torch.equal(masks["1.weight"].flatten(), torch.zeros(60, dtype=torch.bool).index_fill(
            0, torch.argsort(hand, descending=True)[:k], True))


# -- SynFlow -----------------------------------------------------------------------------------------


def brute_force_path_scores(weights, masks):
    """Score of every weight = sum over all input->output paths through it of the product of |w| along
    the path (kept weights only), by enumerating every path of a bias-free MLP."""
    w = [(wi * mi).abs() for wi, mi in zip(weights, masks)]
    widths = [w[0].shape[1]] + [wi.shape[0] for wi in w]
    scores = [torch.zeros_like(wi) for wi in w]
    for path in itertools.product(*(range(n) for n in widths)):
        edges = [(path[l + 1], path[l]) for l in range(len(w))]  # weight[out, in] of layer l
        flow = math.prod(float(w[l][e]) for l, e in enumerate(edges))
        for l, e in enumerate(edges):
            scores[l][e] += flow
    return scores


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.ReLU(),
                         nn.Linear(4, 2, bias=False)).double()


def test_synflow_scores_equal_the_path_count():
    model = mlp()
    weights = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(1)
    random_masks = [torch.rand(w.shape, generator=g) > 0.3 for w in weights]
    for masks in ([torch.ones_like(w, dtype=torch.bool) for w in weights], random_masks):
        net = mlp()
        params = freeze(net)
        linearise(net)
        net.eval()
        scores = synflow_scores(net, params, dict(zip(params, [m.double() for m in masks])), (3,))
        for s, b in zip(scores.values(), brute_force_path_scores(weights, masks)):
            torch.testing.assert_close(s, b, rtol=1e-12, atol=1e-15)
    # one iteration keeps the top-k of the path scores; the input weights keep their signs
    dense = torch.cat([b.flatten() for b in brute_force_path_scores(weights, [torch.ones_like(w) for w in weights])])
    model = mlp()
    masks = prune(model, "synflow", 0.6, input_shape=(3,), iterations=1)
    expected = torch.zeros(dense.numel(), dtype=torch.bool)
    expected[torch.argsort(dense, descending=True)[: kept_count(dense.numel(), 0.4)]] = True
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), expected)
    assert bool((model[0].weight < 0).any())


def test_synflow_pruned_weights_stay_pruned():
    history = list(synflow_masks(tiny_net().eval(), 0.99, SHAPE, iterations=20))
    assert len(history) == 20
    assert all(subset(b, a) for a, b in zip(history, history[1:]))


def test_synflow_double_avoids_float32_overflow():
    model = mlp().float()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(1e14)  # R ~ 1e42 > float32 max
    with pytest.raises(FloatingPointError, match="double=True"):
        prune(model, "synflow", 0.5, input_shape=(3,), double=False, iterations=2)
    assert prune(model, "synflow", 0.5, input_shape=(3,), iterations=2).kept() == kept_count(36, 0.5)


def test_synflow_resnet20_at_99_percent_keeps_the_network_connected():
    """SynFlow's claim: no layer collapse that disconnects the network. Every layer on the main path
    keeps weights and the pruned network still conducts flow from input to output. A 1x1 projection
    shortcut, which is parallel to a two-conv path carrying ~100x more flow, can be emptied at some
    initialisations (7 of 12 seeds for one of resnet20's two shortcuts; Synaptic-Flow issue #7 on ResNet-18)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    masks = prune(model, "synflow", 0.99, input_shape=(3, 32, 32))
    assert masks.kept() == kept_count(masks.total(), 0.01)
    assert all("shortcut" in n for n in masks.collapsed_layers())
    assert masks.collapsed_layers() == []  # at this seed nothing is empty
    net = build_model("resnet20", 10).double().eval()
    net.load_state_dict(model.state_dict())
    params = freeze(net)
    linearise(net)
    assert float(synflow_scores(net, params, float_masks(masks, params), (3, 32, 32))["fc.weight"].sum()) > 0


# -- iterative SNIP ----------------------------------------------------------------------------------


def test_iter_snip_without_revival_is_monotone_and_with_revival_is_not(batches):
    kw = dict(iterations=10, seed=0)
    plain = list(iter_snip_masks(tiny_net(), 0.9, batches, revival=False, **kw))
    assert all(subset(b, a) for a, b in zip(plain, plain[1:]))
    revived = list(iter_snip_masks(tiny_net(), 0.9, batches, revival=True, **kw))
    assert not all(subset(b, a) for a, b in zip(revived, revived[1:]))
    targets = iteration_sparsities(0.9, 10, "exponential")
    assert [m.kept() for m in revived] == [kept_count(revived[0].total(), 1 - s) for s in targets]


def test_iter_snip_with_one_round_is_snip(batches):
    model = tiny_net()
    snip = run("snip", model, 0.9, batches)
    for revival in (False, True):
        one = run("iter_snip", model, 0.9, batches, iterations=1, batches_per_iteration=None, revival=revival)
        assert same(snip, one)


# -- GraSP -------------------------------------------------------------------------------------------


def test_grasp_hessian_gradient_product_matches_the_explicit_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(2)]
    for temperature in (200.0, 1.0):
        params = freeze(model)
        names, shapes = list(params), [p.shape for p in params.values()]
        sizes = [p.numel() for p in params.values()]

        def loss(flat):
            ws = dict(zip(names, (t.view(s) for t, s in zip(flat.split(sizes), shapes))))  # noqa: B023  (used within the iteration)
            return sum(F.cross_entropy(torch.func.functional_call(model, ws, (x,)) / temperature, y) for x, y in data)  # noqa: B023

        flat = torch.cat([p.detach().flatten() for p in params.values()])
        hessian = torch.autograd.functional.hessian(loss, flat)
        grad = torch.autograd.functional.jacobian(loss, flat)
        g_ours, hg_ours = grasp_hessian_gradient(model, params, data, temperature)
        torch.testing.assert_close(torch.cat([g_ours[n].flatten() for n in names]), grad, rtol=1e-10, atol=1e-15)
        hg = torch.cat([hg_ours[n].flatten() for n in names])
        torch.testing.assert_close(hg, hessian @ grad, rtol=1e-8, atol=1e-18)
        assert hg.abs().max() > 0
    # higher theta * Hg keeps (= the GraSP paper removes the largest -theta * Hg)
    score = flat * hg
    masks = prune(model, "grasp", 0.5, input_shape=(6,), data=data, temperature=1.0)
    kept = torch.cat([masks[n].flatten() for n in names])
    assert kept.sum() == kept_count(score.numel(), 0.5)
    assert score[kept].min() > score[~kept].max()


# -- ProsPr ------------------------------------------------------------------------------------------


def test_prospr_matches_finite_differences_of_the_unrolled_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(3)]
    lr, mom = 0.5, 0.9
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    prunable = list(prunable_parameters(model))

    def loss_after(masks):
        w = {n: theta[n] * masks[n] if n in masks else theta[n] for n in theta}
        v = {}
        for x, y in data[:-1]:
            grads = torch.func.grad(lambda ws: F.cross_entropy(torch.func.functional_call(model, ws, (x,)), y))(w)  # noqa: B023
            v = {n: mom * v[n] + grads[n] if n in v else grads[n] for n in w}
            w = {n: w[n] - lr * v[n] for n in w}
        x, y = data[-1]
        return float(F.cross_entropy(torch.func.functional_call(model, w, (x,)), y))

    trainable = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    ours = prospr_scores(model, trainable, prunable, data, inner_lr=lr, inner_momentum=mom)
    h = 1e-6
    for n in prunable:
        for i in range(theta[n].numel()):
            up = {m: torch.ones_like(theta[m]) for m in prunable}
            down = {m: torch.ones_like(theta[m]) for m in prunable}
            up[n].view(-1)[i] += h
            down[n].view(-1)[i] -= h
            fd = (loss_after(up) - loss_after(down)) / (2 * h)
            assert ours[n].view(-1)[i].item() == pytest.approx(abs(fd), rel=1e-5, abs=1e-9)


def test_prospr_without_inner_steps_is_snip_on_one_batch(batches):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    a = run("prospr", model, 0.9, batches, inner_steps=0)
    b = run("snip", model, 0.9, batches, num_batches=1)
    assert same(a, b)
