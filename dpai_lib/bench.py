"""Benchmarks: ``python -m dpai_lib.bench <what>``.

``train`` measures the training throughput (images/s over ONE epoch) of our trainer
(:func:`dpai_lib.train.train` on in-memory data, augmentation done on the training device, channels-last +
bf16 autocast on CUDA) against the textbook PyTorch loop (a ``DataLoader`` over ``get_dataset(...,
augment=True)`` with per-sample torchvision crop/flip, fp32 SGD, cross-entropy, masks re-multiplied
after every step). Both sides train the same model from the same initial weights with the same random
ERK masks at 90% sparsity, on the same first ``--images`` training images, with the same batch size
(128) and optimiser (SGD lr 0.1, momentum 0.9, weight decay 1e-4), on the same device. Each side is
warmed up on a few batches (with a throw-away copy of the model) before the timed epoch.

* ours:  the trainer's own measured training throughput (``TrainResult.train_images / train_seconds``;
  evaluation is excluded from it and capped at one batch anyway).
* plain: wall time of the epoch's loop, ``time.perf_counter`` around it, CUDA synchronised before each
  clock read.

Targets (ratio ours / plain): >= 1.0x on CPU (no slower than the textbook loop), >= 2.0x on CUDA.
They are reported as PASS/FAIL; the exit code is 0 regardless unless ``--check`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.config import TrainConfig
from dpai_lib.data import TensorData, dataset_info, get_dataset, load_tensors
from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.models import build_model
from dpai_lib.pruners import prune
from dpai_lib.trainer import resolve_device, train

TRAIN_MODELS = ("resnet20", "vgg19_bn")
# Default number of images per model on the CPU (keeps the whole default run to a few minutes on 2 cores);
# on CUDA the default is the whole training set.
CPU_DEFAULT_IMAGES = {"resnet20": 4096, "vgg19_bn": 2048}
CPU_DEFAULT_IMAGES_OTHER = 2048
TARGETS = {"cpu": 1.0, "cuda": 2.0}
BATCH_SIZE = 128
SPARSITY = 0.9
WARMUP_BATCHES = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_workers(device: torch.device) -> int:
    """DataLoader workers of the plain loop: none on the CPU (worker processes would compete with the
    compute threads for the same cores); on CUDA up to 8, leaving a core for the main process."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def _bench_config(max_train_batches: int | None = None) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=BATCH_SIZE, test_batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
                       weight_decay=1e-4, lr_drops=[], lr_drop_factor=1.0, max_train_batches=max_train_batches,
                       max_test_batches=1)


def _first(data: TensorData, n: int) -> TensorData:
    return TensorData(data.images[:n], data.labels[:n], data.info)


def _ours(model: nn.Module, masks: Masks, train_data: TensorData, test_data: TensorData, device: torch.device,
          seed: int) -> float:
    """Images/s of one epoch of our trainer, as the trainer itself measures it."""
    train(copy.deepcopy(model), masks, train_data, test_data, _bench_config(WARMUP_BATCHES), seed=seed,
          device=device, progress=False)  # warm-up on a throw-away copy
    result = train(copy.deepcopy(model), masks, train_data, test_data, _bench_config(), seed=seed, device=device,
                   progress=False)
    if result.status != "completed":
        raise RuntimeError(f"our trainer stopped: {result.stop_reason}")
    return result.train_images / result.train_seconds


def _plain_epoch(model: nn.Module, masks: Masks, loader: torch.utils.data.DataLoader, device: torch.device,
                 max_batches: int | None = None) -> tuple[int, float]:
    """The textbook loop (fp32, default memory format); returns (images, seconds)."""
    model.to(device).train()
    params = prunable_parameters(model)
    pairs = [(params[n], masks[n].to(device=params[n].device, dtype=params[n].dtype)) for n in masks]
    with torch.no_grad():
        for p, m in pairs:
            p.mul_(m)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    seen = 0
    _sync(device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)
        seen += len(y)
    _sync(device)
    return seen, time.perf_counter() - t0


def _plain(model: nn.Module, masks: Masks, dataset: torch.utils.data.Dataset, device: torch.device, workers: int,
           seed: int) -> float:
    """Images/s of one epoch of the plain loop (after a warm-up on a throw-away copy of the model)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    _plain_epoch(copy.deepcopy(model), masks, loader, device, max_batches=WARMUP_BATCHES)
    images, seconds = _plain_epoch(copy.deepcopy(model), masks, loader, device)
    return images / seconds


def bench_train(args: argparse.Namespace) -> int:
    """``train`` sub-command: ours vs plain training throughput per model; prints a table."""
    import pandas as pd

    device = resolve_device(args.device)
    workers = _default_workers(device) if args.workers is None else args.workers
    info = dataset_info(args.dataset)
    full_train = load_tensors(args.dataset, "train", args.data_dir)
    test_data = load_tensors(args.dataset, "test", args.data_dir)
    full_dataset = get_dataset(args.dataset, "train", args.data_dir, augment=True)
    input_shape = tuple(full_train.images.shape[1:])
    target = TARGETS.get(device.type, 1.0)
    print(f"device {device} | torch threads {torch.get_num_threads()} | plain DataLoader workers {workers}"
          f"{' (default)' if args.workers is None else ''} | data {args.dataset} | batch {BATCH_SIZE} | "
          f"random ERK masks at {SPARSITY:.0%}", flush=True)

    rows: list[dict[str, Any]] = []
    for name in args.models:
        if args.images is not None:
            n = args.images
        elif device.type == "cuda":
            n = len(full_train)
        else:
            n = CPU_DEFAULT_IMAGES.get(name, CPU_DEFAULT_IMAGES_OTHER)
        n = min(n, len(full_train))
        torch.manual_seed(args.seed)
        model = build_model(name, num_classes=info.num_classes)
        masks = prune(model, "random", SPARSITY, input_shape=input_shape, seed=args.seed, budget="erk")
        t0 = time.perf_counter()
        ours = _ours(model, masks, _first(full_train, n), test_data, device, args.seed)
        plain = _plain(model, masks, torch.utils.data.Subset(full_dataset, range(n)), device, workers, args.seed)
        ratio = ours / plain
        row = {"model": name, "device": str(device), "threads": torch.get_num_threads(), "workers": workers,
               "images": n, "ours_img_s": round(ours, 1), "plain_img_s": round(plain, 1),
               "ratio": round(ratio, 3), "target": f">={target:g}x", "result": "PASS" if ratio >= target else "FAIL",
               "bench_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"  {name}: ours {ours:.1f} img/s, plain {plain:.1f} img/s, ratio {ratio:.2f} "
              f"({row['bench_s']} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = pd.DataFrame(rows).drop(columns=["bench_s"])
    print()
    print(table.to_string(index=False))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"rows written to {path}")
    failed = [r["model"] for r in rows if r["result"] == "FAIL"]
    if args.check and failed:
        print(f"FAIL: below the {target:g}x target on {device.type}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpai_lib.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train", help="one-epoch training throughput: our trainer vs the textbook loop",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(TRAIN_MODELS),
                   help=f"models to time (default: {' '.join(TRAIN_MODELS)})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--images", type=int, default=None,
                   help="training images per epoch, the first N of the training set (default: the whole set on "
                        "CUDA; on the CPU " + ", ".join(f"{k} {v}" for k, v in CPU_DEFAULT_IMAGES.items())
                        + f", other models {CPU_DEFAULT_IMAGES_OTHER})")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the plain loop (default: 0 on the CPU, min(8, cores - 1) on CUDA)")
    p.add_argument("--dataset", default="fashion_mnist", help="in-memory data set (default: fashion_mnist)")
    p.add_argument("--data-dir", default="data", help="data root (default: data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, masks and data order (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--check", action="store_true", help="exit non-zero if a model misses the target")
    p.set_defaults(func=bench_train)
    args = parser.parse_args(argv)
    if getattr(args, "images", None) is not None and args.images < 1:
        parser.error("--images must be positive")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
