"""Model registry and the pruning entry point."""

import pytest
import torch

from dpai_lib import build_model, list_models, list_pruners, prunable_parameters, prune
from dpai_lib.registry import UnknownNameError


@pytest.mark.parametrize("name,classes,size,weights", [
    ("resnet20", 10, 32, 270_896), ("vgg19_bn", 100, 32, 20_070_080), ("resnet18", 200, 64, 11_261_632),
])
def test_paper_networks_have_the_reference_weight_counts(name, classes, size, weights):
    model = build_model(name, classes)
    assert sum(p.numel() for p in prunable_parameters(model).values()) == weights
    if name != "vgg19_bn":  # keep the suite fast
        assert model(torch.zeros(2, 3, size, size)).shape == (2, classes)


def test_resnet20_structure_and_init():
    model = build_model("resnet20", 10)
    names = list(prunable_parameters(model))
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert sum("shortcut" in n for n in names) == 2  # two 1x1 stride-2 conv shortcuts
    bn = model.bn1
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))
    w = model.layers[8].conv2.weight
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)  # Kaiming normal, fan-in


def test_vits_and_torchvision_by_name():
    vit = build_model("vit_b_16", 200, image_size=64)
    assert vit.image_size == 64
    small = build_model("vit_tiny", 10)
    assert small(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert build_model("tv:resnet18", 7).fc.out_features == 7
    assert "efficientnet_b0" in list_models() and "tv:resnet50" in list_models(include_torchvision=True)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="known models: .*resnet20"):
        build_model("resnet21", 10)
    with pytest.raises(UnknownNameError, match="torchvision"):
        build_model("tv:not_a_net", 10)
    with pytest.raises(UnknownNameError, match="known pruners: .*random"):
        prune(build_model("resnet20", 10), "sinp", 0.9, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="positive integer"):
        build_model("resnet20", 0)


def test_prune_rejects_unknown_hparams_and_bad_sparsity():
    model = build_model("resnet20", 10)
    with pytest.raises(TypeError, match="no hyper-parameter 'budgett'.*budget='erk'"):
        prune(model, "random", 0.9, input_shape=(3, 32, 32), budgett="erk")
    with pytest.raises(ValueError, match="fraction"):
        prune(model, "random", 90, input_shape=(3, 32, 32))
    assert "random" in list_pruners()


def test_prune_is_deterministic_and_leaves_the_model_untouched():
    model = build_model("resnet20", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = prune(model, "random", 0.99, input_shape=(3, 32, 32), seed=1)
    b = prune(model, "random", 0.99, input_shape=(3, 32, 32), seed=1)
    c = prune(model, "random", 0.99, input_shape=(3, 32, 32), seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
