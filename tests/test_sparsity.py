"""Compression/sparsity arithmetic, and ERK budgets against tables computed independently from the DPaI
release's ERK rule (``ERK_sparsify`` in its ``npb.py``) for the release's architectures; see book/sources.md."""

import math

import pytest

from dpai_lib import build_model, erk_densities
from dpai_lib.sparsity import compression_to_sparsity, kept_count, layer_kept_counts, sparsity_to_compression, uniform_densities

C = (0.5, 1.0, 1.5, 2.0)  # 68.38, 90, 96.84, 99 %


def test_compression_round_trip_and_paper_values():
    assert [round(100 * compression_to_sparsity(c), 2) for c in (0.5, 1, 1.5, 2, 2.5, 3)] == [
        68.38, 90.0, 96.84, 99.0, 99.68, 99.9]
    for c in (0.5, 1.7, 3.0):
        assert sparsity_to_compression(compression_to_sparsity(c)) == pytest.approx(c)
    with pytest.raises(ValueError, match="1.5"):
        sparsity_to_compression(1.5)


def _pruned_pct(model, c):
    d = erk_densities(model, 10 ** -c)
    return {n: round(100 * (1 - v), 2) for n, v in d.items()}


def test_erk_resnet20_table():
    model = build_model("resnet20", 10)
    expected = {  # layer -> pruned % at the four sparsities
        "conv1.weight": (0.00, 1.70, 69.97, 90.50),
        "layers.0.conv1.weight": (3.63, 71.98, 91.44, 97.29),
        "layers.3.conv1.weight": (31.53, 80.09, 93.92, 98.08),
        "layers.3.conv2.weight": (55.62, 87.10, 96.06, 98.75),
        "layers.3.shortcut.0.weight": (0.00, 0.00, 49.33, 83.98),
        "layers.6.conv1.weight": (67.67, 90.60, 97.13, 99.09),
        "layers.8.conv2.weight": (78.76, 93.83, 98.11, 99.40),
        "layers.6.shortcut.0.weight": (0.00, 18.72, 75.17, 92.15),
        "fc.weight": (0.00, 0.00, 40.01, 81.03),
    }
    for i, c in enumerate(C):
        got = _pruned_pct(model, c)
        for name, row in expected.items():
            assert got[name] == pytest.approx(row[i], abs=0.011), (name, c)


def test_erk_vgg19_table():
    model = build_model("vgg19_bn", 100)
    convs = [n for n in erk_densities(model, 0.5) if n.startswith("features")]
    expected = {
        convs[0]: (0, 0, 0, 24.34), convs[1]: (0, 32.49, 79.34, 93.49), convs[2]: (0, 50.13, 84.73, 95.19),
        convs[3]: (0, 67.00, 89.90, 96.82), convs[4]: (19.60, 75.44, 92.48, 97.63),
        convs[6]: (46.61, 83.69, 95.01, 98.43), convs[8]: (60.11, 87.81, 96.27, 98.82),
        convs[15]: (73.46, 91.89, 97.52, 99.22), "fc.weight": (0, 0, 32.05, 78.59),
    }
    for i, c in enumerate(C):
        got = _pruned_pct(model, c)
        for name, row in expected.items():
            assert got[name] == pytest.approx(row[i], abs=0.011), (name, c)


def test_erk_resnet18_table():
    model = build_model("resnet18", 200)
    expected = {
        "conv1.weight": (0, 0, 0, 49.73), "layer1.0.conv1.weight": (0, 55.30, 86.28, 95.67),
        "layer2.0.conv1.weight": (0, 66.97, 89.86, 96.80), "layer2.1.conv2.weight": (17.44, 78.15, 93.29, 97.89),
        "layer2.0.shortcut.0.weight": (0, 0, 10.62, 71.82), "layer3.0.conv1.weight": (38.55, 83.74, 95.01, 98.43),
        "layer3.0.conv2.weight": (59.19, 89.20, 96.69, 98.95), "layer3.0.shortcut.0.weight": (0, 0, 55.54, 85.98),
        "layer4.0.conv1.weight": (69.51, 91.93, 97.52, 99.22), "layer4.1.conv1.weight": (79.71, 94.63, 98.35, 99.48),
        "layer4.0.shortcut.0.weight": (0, 27.75, 77.83, 93.01), "fc.weight": (0, 14.49, 73.76, 91.73),
    }
    for i, c in enumerate(C):
        got = _pruned_pct(model, c)
        for name, row in expected.items():
            assert got[name] == pytest.approx(row[i], abs=0.011), (name, c)


@pytest.mark.parametrize("density", [0.3162, 0.1, 0.01, 0.001])
def test_erk_meets_global_density(density):
    model = build_model("resnet20", 10)
    d = erk_densities(model, density)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in d}
    kept = sum(v * math.prod(shapes[n]) for n, v in d.items())
    total = sum(math.prod(s) for s in shapes.values())
    assert kept == pytest.approx(density * total, rel=1e-9)
    assert all(0 < v <= 1 for v in d.values())


def test_kept_counts_rounding_and_uniform():
    assert kept_count(1000, 0.0105) == 11  # numel - int(0.9895 * 1000) = 1000 - 989
    shapes = {"a": (10, 10), "b": (7, 3)}
    assert uniform_densities(shapes, 0.25) == {"a": 0.25, "b": 0.25}
    assert layer_kept_counts(shapes, 0.75, "uniform") == {"a": 25, "b": 21 - int(0.75 * 21)}
    with pytest.raises(ValueError, match="allowed: erk, uniform"):
        layer_kept_counts(shapes, 0.5, "gaussian")
    with pytest.raises(ValueError, match="fraction"):
        layer_kept_counts(shapes, 99, "erk")
