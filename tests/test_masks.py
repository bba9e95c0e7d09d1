"""Masks: validation errors, exact kept counts, reports, files, enforcement."""

import pytest
import torch
from torch import nn

from dpai_lib import Masks, build_model, prunable_parameters, prune
from dpai_lib.masks import MaskError
from dpai_lib.sparsity import layer_kept_counts


def tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_prunable_parameters_conv_linear_and_attention():
    assert list(prunable_parameters(tiny())) == ["0.weight", "4.weight"]
    vit = build_model("vit_tiny", 10)
    names = list(prunable_parameters(vit))
    assert "conv_proj.weight" in names and "heads.head.weight" in names
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in names
    assert not any("bias" in n or "ln" in n or "pos_embedding" in n or "class_token" in n for n in names)
    # 6 blocks x (in_proj, out_proj, 2 MLP linears) + patch conv + head
    assert len(names) == 6 * 4 + 2


def test_validation_errors_name_the_problem():
    model = tiny()
    ok = Masks.ones(model)
    with pytest.raises(MaskError, match="missing.*4.weight"):
        Masks({"0.weight": ok["0.weight"]}).validate(model)
    with pytest.raises(MaskError, match="not prunable in this model.*1.weight"):
        Masks(dict(ok) | {"1.weight": torch.ones(4, dtype=torch.bool)}).validate(model)
    with pytest.raises(MaskError, match=r"shape \(4, 3, 3\)"):
        Masks(dict(ok) | {"0.weight": torch.ones(4, 3, 3, dtype=torch.bool)}).validate(model)
    with pytest.raises(MaskError, match="only 0 and 1"):
        Masks({"0.weight": torch.full((4, 3, 3, 3), 0.5)})
    assert Masks({"0.weight": torch.ones(2, 2, dtype=torch.float32)})["0.weight"].dtype == torch.bool


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.6838, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("budget", ["erk", "uniform"])
def test_random_prune_exact_kept_counts(sparsity, budget):
    model = build_model("resnet20", 10)
    masks = prune(model, "random", sparsity, input_shape=(3, 32, 32), budget=budget)
    expected = layer_kept_counts(model, sparsity, budget)
    assert masks.layer_kept() == expected
    assert masks.kept() == sum(expected.values())
    assert masks.total() == 270_896
    assert abs(masks.sparsity() - sparsity) < 2e-3


def test_reports_and_collapse():
    model = tiny()
    m = dict(Masks.ones(model))
    m["4.weight"] = torch.zeros_like(m["4.weight"])
    m["0.weight"] = m["0.weight"].clone()
    m["0.weight"][0] = False  # 27 of 108 removed
    masks = Masks(m)
    assert masks.kept() == 81
    assert masks.total() == 108 + 720
    assert masks.layer_density() == {"0.weight": 0.75, "4.weight": 0.0}
    assert masks.collapsed_layers() == ["4.weight"]
    rep = masks.report()
    assert list(rep["kept"]) == [81, 0] and list(rep["collapsed"]) == [False, True]
    assert masks.summary()["sparsity"] == pytest.approx(1 - 81 / 828)


def test_apply_and_save_load_round_trip(tmp_path):
    model = build_model("resnet20", 10)
    masks = prune(model, "random", 0.9, input_shape=(3, 32, 32), seed=3)
    path = masks.save(tmp_path / "m.safetensors", metadata={"note": "x"})
    loaded = Masks.load(path)
    assert list(loaded) == list(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    masks.apply(model)
    params = prunable_parameters(model)
    assert all(bool((params[n][~masks[n]] == 0).all()) for n in masks)
    assert Masks.from_weights(model).kept() == masks.kept()  # kaiming weights are never exactly 0
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors: not a masks file"):
        Masks.load(tmp_path / "bad.safetensors")


def test_pruned_weights_stay_exactly_zero_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    masks = prune(model, "random", 0.95, input_shape=(3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-3, nesterov=True)
    enforcer = masks.enforce(model, opt)
    params = prunable_parameters(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        # gradients of pruned weights are not zero: only the post-step hook keeps them at zero
        assert any(bool((params[n].grad[~masks[n]] != 0).any()) for n in masks)
        opt.step()
        for n in masks:
            assert bool((params[n][~masks[n]] == 0).all())
            assert bool((params[n][masks[n]] != 0).all())
    enforcer.remove()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(bool((params[n][~masks[n]] != 0).any()) for n in masks)  # hook really removed
