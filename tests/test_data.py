"""Tests for dpai_lib.data: offline, CPU only, small fake data trees in tmp_path."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpai_lib import data as D
from dpai_lib.registry import UnknownNameError

ALL_NAMES = ["cifar10", "cifar100", "fashion_mnist", "imagenet", "synthetic", "tiny_imagenet"]
needs_debian_fmnist = pytest.mark.skipif(
    not all((D.DEBIAN_FASHION_MNIST_DIR / f"{f}.gz").is_file() for f in D.FASHION_MNIST_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({D.DEBIAN_FASHION_MNIST_DIR} missing)",
)


# ---------------------------------------------------------------------------------------------- names, options, errors


def test_registered_names_and_infos():
    assert D.list_datasets() == ALL_NAMES
    for name in ALL_NAMES:
        info = D.dataset_info(name)
        assert info.name == name and info.channels == 3 and len(info.mean) == len(info.std) == 3
    assert D.dataset_info("cifar100").num_classes == 100
    assert D.dataset_info("tiny_imagenet").image_size == 64 and not D.dataset_info("tiny_imagenet").in_memory
    assert D.dataset_info("imagenet").crop_padding == 0 and D.dataset_info("imagenet").image_size == 224


def test_unknown_name_lists_known_names():
    for call in (lambda: D.dataset_info("mnist"), lambda: D.get_dataset("mnist", "train"), lambda: D.load_tensors("mnist", "test")):
        with pytest.raises(UnknownNameError) as error:
            call()
        assert "mnist" in str(error.value) and all(name in str(error.value) for name in ALL_NAMES)


def test_bad_split():
    with pytest.raises(ValueError, match="'val'.*train, test"):
        D.get_dataset("synthetic", "val")
    with pytest.raises(ValueError, match="'validation'"):
        D.load_tensors("synthetic", "validation")


def test_options_are_checked():
    with pytest.raises(TypeError, match="num_class\\b.*num_classes, image_size, train_size, test_size, seed"):
        D.dataset_info("synthetic", num_class=3)
    with pytest.raises(TypeError, match="seed.*none"):
        D.get_dataset("cifar10", "train", seed=1)
    with pytest.raises(TypeError, match="image_size"):
        D.load_tensors("fashion_mnist", "train", image_size=28)


def test_load_tensors_only_for_in_memory_sets(tmp_path):
    with pytest.raises(ValueError, match="imagenet.*cifar10, cifar100, fashion_mnist, synthetic"):
        D.load_tensors("imagenet", "train", tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny_imagenet", "imagenet", "fashion_mnist"])
def test_missing_data_set_is_reported_with_path(name, tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as error:
        D.get_dataset(name, "test", tmp_path)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError) and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created
    if name in ("cifar10", "cifar100"):
        assert "download=True" in message
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message and "prepare_fashion_mnist" in message
        assert "download=True" in message and str(tmp_path / "FashionMNIST" / "raw") in message
    if name == "tiny_imagenet":
        assert "cs231n" in message and "val_annotations.txt" in message


def test_data_dir_defaults_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DPAI_DATA_DIR", str(tmp_path / "from_env"))
    with pytest.raises(D.DatasetNotFoundError, match="from_env"):
        D.load_tensors("cifar10", "train")


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    if not D.DEBIAN_FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({D.DEBIAN_FASHION_MNIST_DIR} missing)")
    root = tmp_path_factory.mktemp("fmnist")
    D.prepare_fashion_mnist(root)
    return root


@pytest.fixture(scope="module")
def fmnist_train(fmnist_dir) -> D.TensorData:
    return D.load_tensors("fashion_mnist", "train", fmnist_dir)


@needs_debian_fmnist
def test_prepare_fashion_mnist_layout_and_idempotence(tmp_path):
    raw = D.prepare_fashion_mnist(tmp_path)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(D.FASHION_MNIST_FILES)  # no temporary files left
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 28 * 28
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes()[:4] == bytes([0, 0, 8, 1])  # idx magic, not gzip
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert D.prepare_fashion_mnist(tmp_path) == raw
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps


def test_prepare_fashion_mnist_without_source(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.prepare_fashion_mnist(tmp_path / "data", source=tmp_path / "nowhere")


def test_fashion_mnist_tensors(fmnist_dir, fmnist_train):
    images, labels = fmnist_train.images, fmnist_train.labels
    assert images.shape == (60000, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [6000] * 10
    assert images[:, :, :2].max() == 0 and images[:, :, -2:].max() == 0  # 2-pixel black border
    assert images[:, :, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    with gzip.open(D.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as f:  # pixels are the originals
        original = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(original.copy()))
    assert len(fmnist_train) == 60000 and fmnist_train.to("cpu").info == D.dataset_info("fashion_mnist")
    test = D.load_tensors("fashion_mnist", "test", fmnist_dir)
    assert len(test) == 10000 and test.images.shape[1:] == (3, 32, 32)


def test_fashion_mnist_constants_match_recomputation(fmnist_train):
    counts = torch.bincount(fmnist_train.images[:, 0].flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    info = D.dataset_info("fashion_mnist")
    assert info.mean == D.FASHION_MNIST_MEAN and info.std == D.FASHION_MNIST_STD
    for c in range(3):
        assert abs(info.mean[c] - mean.item()) < 1e-3 and abs(info.std[c] - std.item()) < 1e-3


@pytest.mark.parametrize("name", ["fashion_mnist", "synthetic"])
def test_get_dataset_agrees_with_load_tensors(name, request):
    data_dir = request.getfixturevalue("fmnist_dir") if name == "fashion_mnist" else None
    tensors = D.load_tensors(name, "test", data_dir)
    dataset = D.get_dataset(name, "test", data_dir)  # augment defaults to False for "test"
    assert len(dataset) == len(tensors)
    for i in (0, 1, len(tensors) - 1):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and isinstance(label, int) and label == tensors.labels[i].item()
        assert torch.equal(image, D.normalize(tensors.images[i : i + 1], tensors.info)[0])
    augmented, _ = D.get_dataset(name, "train", data_dir, augment=True)[0]
    assert augmented.shape == (3, 32, 32) and augmented.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- normalize / augment


def test_normalize():
    info = D.dataset_info("cifar10")
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1).double(), torch.tensor(info.std).view(1, 3, 1, 1).double()
    expected = (images.double() / 255 - mean) / std
    out = D.normalize(images, info)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.allclose(out.double(), expected, atol=1e-5)


def _unnormalize(x: torch.Tensor, info: D.DataInfo) -> torch.Tensor:
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    return ((x.cpu() * std + mean) * 255).round().to(torch.uint8)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_augment_is_random_crop_plus_flip(device):
    info = D.dataset_info("cifar10")
    p, n = info.crop_padding, 256
    images = torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = D.augment(images.to(device), info, torch.Generator(device).manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == images.shape and out.device.type == device
    again = D.augment(images.to(device), info, torch.Generator(device).manual_seed(0))
    other = D.augment(images.to(device), info, torch.Generator(device).manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)

    pixels, padded = _unnormalize(out, info), torch.nn.functional.pad(images, (p, p, p, p))
    matches = torch.zeros(n, dtype=torch.long)
    seen: set[tuple[int, int, bool]] = set()
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, :, dy : dy + 32, dx : dx + 32]
            for flip in (False, True):
                hit = (pixels == (crop.flip(-1) if flip else crop)).flatten(1).all(1)
                matches += hit
                seen |= {(dy, dx, flip)} if hit.any() else set()
    assert (matches == 1).all()  # every sample is exactly one crop of the zero-padded input, maybe flipped
    assert {flip for _, _, flip in seen} == {False, True}
    offsets = {(dy, dx) for dy, dx, _ in seen}
    assert len(offsets) > 40  # 81 possible offsets, uniform: ~77 expected in 256 draws
    assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == set(range(2 * p + 1))


def test_augment_without_crop_or_flip_is_normalize():
    info = dataclasses.replace(D.dataset_info("cifar10"), crop_padding=0, hflip=False)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(D.augment(images, info, torch.Generator().manual_seed(0)), D.normalize(images, info))


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_and_options():
    a, b = D.load_tensors("synthetic", "train"), D.load_tensors("synthetic", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (5000, 3, 32, 32) and a.images.dtype == torch.uint8 and a.labels.dtype == torch.int64
    assert torch.bincount(a.labels).tolist() == [500] * 10
    assert not torch.equal(a.images, D.load_tensors("synthetic", "train", seed=1).images)
    test = D.load_tensors("synthetic", "test")
    assert len(test) == 1000 and not torch.equal(test.images, a.images[:1000])
    small = D.load_tensors("synthetic", "train", num_classes=4, image_size=16, train_size=40, seed=3)
    assert small.images.shape == (40, 3, 16, 16) and torch.bincount(small.labels).tolist() == [10] * 4
    assert small.info == D.dataset_info("synthetic", num_classes=4, image_size=16) and small.info.num_classes == 4
    assert len(D.get_dataset("synthetic", "test", test_size=30)) == 30


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_is_learnable_but_not_trivial(seed):
    train, test = D.load_tensors("synthetic", "train", seed=seed), D.load_tensors("synthetic", "test", seed=seed)
    x, xt = train.images.float().flatten(1), test.images.float().flatten(1)
    means = torch.stack([x[train.labels == c].mean(0) for c in range(10)])

    def accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
        return (torch.cdist(features, means).argmin(1) == labels).float().mean().item()

    # nearest class mean: measured ~0.78-0.85 on train and test for seeds 0..4
    assert accuracy(xt, test.labels) > 0.6
    assert accuracy(x, train.labels) < 0.95


# ---------------------------------------------------------------------------------------------- image folders


def _save_jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


def _class_of_pixel(image: torch.Tensor, info: D.DataInfo) -> int:
    red = _unnormalize(image[None], info)[0, 0, 32, 32].item()
    return round((red - 30) / 80)


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    """A 3-class tiny-imagenet-200 tree; an image of class k has red value 30 + 80 * k."""
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # class index follows sorted order: n01 -> 0, n02 -> 1, n03 -> 2
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        k = sorted(wnids).index(wnid)
        for i in range(2):
            _save_jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (30 + 80 * k, 10 * i, 0))
    rows = []
    for i, wnid in enumerate(["n02", "n03", "n01", "n03", "n02"]):
        _save_jpeg(base / "val" / "images" / f"val_{i}.JPEG", (30 + 80 * sorted(wnids).index(wnid), 0, 50))
        rows.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_tiny_imagenet_val_follows_annotations(tiny_root):
    info = D.dataset_info("tiny_imagenet")
    before = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*"))
    val = D.get_dataset("tiny_imagenet", "test", tiny_root)
    assert len(val) == 5
    labels = [val[i][1] for i in range(5)]
    assert labels == [1, 2, 0, 2, 1]
    assert all(_class_of_pixel(val[i][0], info) == labels[i] for i in range(5))
    assert sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*")) == before  # user's files untouched
    train = D.get_dataset("tiny_imagenet", "train", tiny_root)
    assert len(train) == 6 and sorted(train[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]
    image, _ = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32


def test_tiny_imagenet_refoldered_val(tiny_root):
    val_dir = tiny_root / "tiny-imagenet-200" / "val"
    for line in (val_dir / "val_annotations.txt").read_text().splitlines():
        file, wnid = line.split("\t")[:2]
        (val_dir / wnid / "images").mkdir(parents=True, exist_ok=True)
        shutil.move(val_dir / "images" / file, val_dir / wnid / "images" / file)
    (val_dir / "images").rmdir()
    val = D.get_dataset("tiny_imagenet", "test", tiny_root)
    info = D.dataset_info("tiny_imagenet")
    assert len(val) == 5 and sorted(val[i][1] for i in range(5)) == [0, 1, 1, 2, 2]
    assert all(_class_of_pixel(val[i][0], info) == val[i][1] for i in range(5))


def test_imagenet_image_folder(tmp_path):
    for split in ("train", "val"):
        for k, cls in enumerate(["cat", "dog"]):
            _save_jpeg(tmp_path / "imagenet" / split / cls / "a.JPEG", (100 * k, 50, 50), size=(300, 260))
            _save_jpeg(tmp_path / "imagenet" / split / cls / "b.JPEG", (100 * k, 80, 50), size=(120, 90))
    for split in ("train", "test"):
        dataset = D.get_dataset("imagenet", split, tmp_path)
        assert len(dataset) == 4 and sorted(dataset[i][1] for i in range(4)) == [0, 0, 1, 1]
        for i in range(4):
            image, _ = dataset[i]
            assert image.shape == (3, 224, 224) and image.dtype == torch.float32
