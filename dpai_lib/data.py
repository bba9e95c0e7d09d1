"""Image data sets for training and pruning experiments.

Every data set is registered by name (``list_datasets()``) and reached through four calls:

* ``dataset_info(name)``  -> ``DataInfo`` (classes, image size, normalisation, augmentation recipe);
* ``get_dataset(name, split)`` -> a map-style dataset of ``(float32 normalised CHW tensor, int label)``;
* ``load_tensors(name, split)`` -> a whole split as uint8 tensors (small data sets only), to be fed
  through ``augment`` / ``normalize`` on the device, which avoids a DataLoader altogether.

Nothing is ever downloaded unless ``download=True`` is passed; a missing data set raises
``DatasetNotFoundError`` saying where it was looked for and how to get it.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dpai_lib.registry import Registry
from dpai_lib.store import atomic_write

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}

# Per-channel mean/std of the Fashion-MNIST *training* images after padding 28x28 -> 32x32 with black
# and repeating to 3 channels: mean and population std over all 60000*32*32 pixels, pixel values / 255
# (exact, from a 256-bin histogram; tests/test_data.py recomputes them).
FASHION_MNIST_MEAN = (0.21900, 0.21900, 0.21900)
FASHION_MNIST_STD = (0.33181, 0.33181, 0.33181)


@dataclass(frozen=True)
class DataInfo:
    """Static description of a data set as the model sees it."""

    name: str
    num_classes: int
    image_size: int  # H == W of the tensors the model sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_padding: int  # RandomCrop(image_size, padding=crop_padding) when training; 0 = no crop
    hflip: bool  # RandomHorizontalFlip(p=0.5) when training
    in_memory: bool  # True if load_tensors() supports this data set
    channels: int = 3


@dataclass
class TensorData:
    """A whole split held in memory: uint8 images [N, 3, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DataInfo

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.images.to(device), self.labels.to(device), self.info)


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on disk (and ``download`` was not requested or is impossible)."""


# ----------------------------------------------------------------------------------------------
# Tensor-level normalisation and augmentation (work on any device)


def normalize(images: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 ``(x / 255 - mean) / std`` on the same device (ToTensor + Normalize)."""
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


def _crop_windows(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``size x size`` windows of ``images`` [N, C, H, W] at (top[i], left[i]), mirrored where ``flip``."""
    n, c, _, w = images.shape
    ar = torch.arange(size, device=images.device)
    rows = (top[:, None] + ar).view(n, 1, size, 1).expand(n, c, size, w)
    cols = left[:, None] + ar
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    picked_rows = images.gather(2, rows)
    return picked_rows.gather(3, cols.view(n, 1, 1, size).expand(n, c, size, size))


def augment(images: torch.Tensor, info: DataInfo, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a uint8 batch, vectorised: per sample an independent
    ``RandomCrop(image_size, padding=crop_padding)`` (black padding) and ``RandomHorizontalFlip(0.5)``,
    then ``normalize``. Deterministic given ``generator`` (which must live on ``images.device``)."""
    n, size, device, p = images.shape[0], images.shape[-1], images.device, info.crop_padding
    padded = F.pad(images, (p, p, p, p)) if p else images
    top, left = (torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device) for _ in range(2))
    flip = torch.rand(n, generator=generator, device=device) < 0.5 if info.hflip else None
    return normalize(_crop_windows(padded, top, left, size, flip), info)


# ----------------------------------------------------------------------------------------------
# Dataset wrappers


class TensorImageDataset(Dataset):
    """Map-style view of a ``TensorData``, with torchvision's per-sample crop/flip when ``augment``."""

    def __init__(self, data: TensorData, augment: bool) -> None:
        from torchvision import transforms as T

        self.data = data
        info = data.info
        steps: list[Callable] = [T.RandomCrop(info.image_size, padding=info.crop_padding)] if info.crop_padding else []
        steps += [T.RandomHorizontalFlip()] if info.hflip else []
        self.transform = T.Compose(steps) if augment and steps else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return normalize(image[None], self.data.info)[0], int(self.data.labels[index])


class ImageFileDataset(Dataset):
    """Map-style data set over a list of (image path, label) pairs, read with PIL as RGB."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


# ----------------------------------------------------------------------------------------------
# Data set sources: one object per registered name


class _Source:
    """How to describe and load one data set. ``options`` maps allowed option names to defaults.

    ``info``, ``tensors`` and ``dataset`` take the options as keywords; each source declares its own (checked
    against ``options`` by :func:`_source` before any call), hence the open ``*args: Any, **options: Any`` here."""

    options: ClassVar[dict[str, Any]] = {}

    def info(self, *args: Any, **options: Any) -> DataInfo:
        raise NotImplementedError

    def tensors(self, split: str, root: Path, download: bool, *args: Any, **options: Any) -> TensorData:
        raise NotImplementedError

    def dataset(self, split: str, root: Path, download: bool, augment: bool, *args: Any, **options: Any) -> Dataset:
        return TensorImageDataset(self.tensors(split, root, download, *args, **options), augment)


DATASETS: Registry[_Source] = Registry("data set")


class _Cifar(_Source):
    def __init__(self, name: str, title: str, num_classes: int, folder: str, mean: tuple, std: tuple) -> None:
        self.title, self.folder = title, folder
        self._info = DataInfo(name, num_classes, 32, mean, std, crop_padding=4, hflip=True, in_memory=True)

    def info(self) -> DataInfo:
        return self._info

    def tensors(self, split: str, root: Path, download: bool) -> TensorData:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self._info.num_classes == 10 else datasets.CIFAR100
        where = root / self.folder
        how = f"pass download=True, or put the extracted '{self.folder}' folder (python version) in {root}"
        if not download and not where.is_dir():
            raise DatasetNotFoundError(f"{self.title} not found: looked in {where}; {how}")
        try:
            ds = cls(root=str(root), train=(split == "train"), download=download)
        except RuntimeError as error:  # torchvision: "not found or corrupted"
            raise DatasetNotFoundError(f"{self.title} not usable in {where} ({error}); {how}") from error
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
        return TensorData(images, torch.tensor(ds.targets, dtype=torch.int64), self._info)


DATASETS.register("cifar10")(_Cifar("cifar10", "CIFAR-10", 10, "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)))
DATASETS.register("cifar100")(_Cifar("cifar100", "CIFAR-100", 100, "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))


class _FashionMNIST(_Source):
    def info(self) -> DataInfo:
        return DataInfo("fashion_mnist", 10, 32, FASHION_MNIST_MEAN, FASHION_MNIST_STD, crop_padding=4, hflip=True, in_memory=True)

    def tensors(self, split: str, root: Path, download: bool) -> TensorData:
        from torchvision import datasets

        raw = root / "FashionMNIST" / "raw"
        if not download and not all((raw / f).is_file() for f in FASHION_MNIST_FILES):
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found: looked for {', '.join(FASHION_MNIST_FILES)} in {raw}. Either "
                f"`apt-get install dataset-fashion-mnist` and call dpai_lib.data.prepare_fashion_mnist({str(root)!r}), "
                "or pass download=True"
            )
        ds = datasets.FashionMNIST(root=str(root), train=(split == "train"), download=download)
        images = F.pad(ds.data, (2, 2, 2, 2))  # 28x28 -> 32x32, black border
        images = images[:, None].expand(-1, 3, -1, -1).contiguous()  # grey -> 3 identical channels
        return TensorData(images, ds.targets.to(torch.int64), self.info())


DATASETS.register("fashion_mnist")(_FashionMNIST())


class _Synthetic(_Source):
    """Class-conditional toy images. Each class has a smooth random prototype (bicubic upsampling of
    random 6x6 control points); a sample is a window of its class prototype at a random offset (shifts of
    up to +-image_size // 3 pixels), contrast-scaled, plus a weaker random smooth "clutter" pattern and pixel noise.
    Calibrated (seed 0): nearest class mean ~0.78 test accuracy; a 3-layer CNN ~0.6 after 1 epoch, ~0.85 after 2."""

    options: ClassVar[dict[str, Any]] = {"num_classes": 10, "image_size": 32, "train_size": 5000, "test_size": 1000, "seed": 0}
    grid, clutter, noise_std = 6, 0.5, 30.0  # control points per side; clutter vs prototype; noise in pixel units

    def info(self, num_classes: int = 10, image_size: int = 32, **_: Any) -> DataInfo:
        return DataInfo("synthetic", num_classes, image_size, (0.5,) * 3, (0.25,) * 3, crop_padding=4, hflip=True, in_memory=True)

    def tensors(self, split: str, root: Path, download: bool, num_classes: int = 10, image_size: int = 32,
                train_size: int = 5000, test_size: int = 1000, seed: int = 0) -> TensorData:
        span = 2 * max(1, image_size // 3)  # windows at offsets 0..span of a prototype of side image_size + span
        g = torch.Generator().manual_seed(seed)
        prototypes = _smooth_patterns(num_classes, image_size + span, self.grid, g)
        n = train_size if split == "train" else test_size
        g.manual_seed(seed * 1_000_003 + SPLITS.index(split) + 1)  # same distribution, other samples per split
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        top, left = (torch.randint(0, span + 1, (n,), generator=g) for _ in range(2))
        contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
        images = contrast * _crop_windows(prototypes[labels], top, left, image_size)
        images += self.clutter * _smooth_patterns(n, image_size, self.grid, g)
        images = 127.5 + images * (255 / (2 + 2 * self.clutter)) + torch.randn(images.shape, generator=g) * self.noise_std
        return TensorData(images.round().clamp(0, 255).to(torch.uint8), labels, self.info(num_classes, image_size))


def _smooth_patterns(n: int, size: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random low-frequency RGB patterns [n, 3, size, size] (values roughly in [-1, 1])."""
    coarse = torch.rand(n, 3, grid, grid, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


DATASETS.register("synthetic")(_Synthetic())


def _image_transform(info: DataInfo, augment: bool, train_steps: list, test_steps: list) -> Callable:
    from torchvision import transforms as T

    return T.Compose([*(train_steps if augment else test_steps), T.ToTensor(), T.Normalize(info.mean, info.std)])


class _TinyImageNet(_Source):
    def info(self) -> DataInfo:
        return DataInfo("tiny_imagenet", 200, 64, (0.480, 0.448, 0.397), (0.276, 0.269, 0.282), crop_padding=4, hflip=True, in_memory=False)

    def dataset(self, split: str, root: Path, download: bool, augment: bool) -> Dataset:
        from torchvision import transforms as T

        base = root / "tiny-imagenet-200"
        if not (base / "wnids.txt").is_file():
            raise DatasetNotFoundError(
                f"Tiny ImageNet not found: looked for {base / 'wnids.txt'}. It has no automatic download "
                f"(download=True cannot help): get tiny-imagenet-200.zip from the Stanford CS231n site "
                f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) and unzip it into {root}, giving "
                f"{base}/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
            )
        wnids = sorted((base / "wnids.txt").read_text().split())
        index = {wnid: i for i, wnid in enumerate(wnids)}
        folder = base / ("train" if split == "train" else "val")
        annotations = folder / "val_annotations.txt"
        if split == "test" and annotations.is_file() and (folder / "images").is_dir():
            # The validation "fix-up", done in memory: labels come from val_annotations.txt, files stay put.
            rows = (line.split("\t") for line in annotations.read_text().splitlines() if line.strip())
            samples = [(folder / "images" / row[0], index[row[1]]) for row in rows]
        else:  # train/<wnid>/images/*.JPEG, or an already re-foldered val/<wnid>/[images/]*.JPEG
            samples = [(path, index[wnid]) for wnid in wnids for path in sorted((folder / wnid).rglob("*"))
                       if path.suffix.lower() in IMAGE_SUFFIXES]
        if not samples:
            raise DatasetNotFoundError(f"Tiny ImageNet: no {split} images found under {folder}")
        info = self.info()
        train_steps = [T.RandomCrop(64, padding=4), T.RandomHorizontalFlip()]
        return ImageFileDataset(samples, _image_transform(info, augment, train_steps, []))


DATASETS.register("tiny_imagenet")(_TinyImageNet())


class _ImageNet(_Source):
    def info(self) -> DataInfo:
        return DataInfo("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_padding=0, hflip=True, in_memory=False)

    def dataset(self, split: str, root: Path, download: bool, augment: bool) -> Dataset:
        from torchvision import datasets
        from torchvision import transforms as T

        folder = root / "imagenet" / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"ImageNet not found: looked for {folder}. It has no automatic download: put the ILSVRC-2012 "
                f"images in {root / 'imagenet'}/train/<class>/*.JPEG and {root / 'imagenet'}/val/<class>/*.JPEG"
            )
        train_steps = [T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomGrayscale(0.2),
                       T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()]
        test_steps = [T.Resize(256), T.CenterCrop(224)]
        return datasets.ImageFolder(str(folder), transform=_image_transform(self.info(), augment, train_steps, test_steps))


DATASETS.register("imagenet")(_ImageNet())


# ----------------------------------------------------------------------------------------------
# Public entry points


def _source(name: str, options: dict[str, Any]) -> _Source:
    """Look up ``name`` and reject options it does not take."""
    source = DATASETS.get(name)
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        allowed = ", ".join(source.options) if source.options else "none"
        raise TypeError(f"data set {name!r} got unknown option(s) {', '.join(unknown)}; allowed options: {allowed}")
    return source


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed splits: {', '.join(SPLITS)}")


def _root(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, else ``$DPAI_DATA_DIR``, else ``./data``."""
    return Path(data_dir if data_dir is not None else os.environ.get("DPAI_DATA_DIR", "data")).expanduser()


def list_datasets() -> list[str]:
    """The names of every registered data set, sorted (the values ``DataConfig.name`` accepts)."""
    return DATASETS.names()


def dataset_info(name: str, **options: Any) -> DataInfo:
    return _source(name, options).info(**options)


def get_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
                augment: bool | None = None, **options: Any) -> Dataset:
    """Map-style data set of (float32 normalised CHW tensor, int label); ``augment`` defaults to split == "train"."""
    source = _source(name, options)
    _check_split(split)
    return source.dataset(split, _root(data_dir), download, split == "train" if augment is None else augment, **options)


def load_tensors(name: str, split: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
                 **options: Any) -> TensorData:
    """A whole split as uint8 [N, 3, H, W] images and int64 labels (for ``in_memory`` data sets only)."""
    source = _source(name, options)
    _check_split(split)
    if not source.info(**options).in_memory:
        supported = ", ".join(n for n in list_datasets() if DATASETS.get(n).info().in_memory)
        raise ValueError(f"load_tensors does not support {name!r} (too large); data sets it supports: {supported}")
    return source.tensors(split, _root(data_dir), download, **options)


def prepare_fashion_mnist(data_dir: str | os.PathLike | None, source: Path = DEBIAN_FASHION_MNIST_DIR) -> Path:
    """Gunzip Debian's Fashion-MNIST files from ``source`` into ``data_dir/FashionMNIST/raw`` (torchvision's
    layout). Idempotent (existing files are kept) and atomic per file. Returns the raw folder."""
    source = Path(source)
    missing = [source / f"{f}.gz" for f in FASHION_MNIST_FILES if not (source / f"{f}.gz").is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST source files missing: {', '.join(map(str, missing))}; "
            "install them with `apt-get install dataset-fashion-mnist` (or use download=True instead)"
        )
    raw = _root(data_dir) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        with gzip.open(source / f"{name}.gz", "rb") as src, atomic_write(target, "wb") as dst:
            shutil.copyfileobj(src, dst)  # readers never see a half-written file
    return raw
