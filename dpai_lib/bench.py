"""Benchmarks: ``python -m dpai_lib.bench <what>``.

``train`` measures the training throughput (images/s over ONE epoch) of our trainer
(:func:`dpai_lib.trainer.train` on in-memory data, augmentation done on the training device, channels-last +
bf16 autocast on CUDA) against the textbook PyTorch loop (a ``DataLoader`` over ``get_dataset(...,
augment=True)`` with per-sample torchvision crop/flip, fp32 SGD, cross-entropy, masks re-multiplied
after every step). Both sides train the same model from the same initial weights with the same random
ERK masks at 90% sparsity, on the same first ``--images`` training images, with the same batch size
(128) and optimiser (SGD lr 0.1, momentum 0.9, weight decay 1e-4), on the same device. Each side is
warmed up on a few batches (with a throw-away copy of the model) before the timed epoch; with
``--repeats R`` each side times R epochs (alternating with the other side, each from the initial weights)
and the best is kept. Default ``--images``: the whole training set on CUDA; on the CPU 4096 for resnet20
and 2048 for vgg19_bn (about 1-2 minutes in all on 2 idle cores).

* ours:  the trainer's own measured training throughput (``TrainResult.train_images / train_seconds``;
  evaluation is excluded from it and capped at one batch anyway).
* plain: wall time of the epoch's loop, ``time.perf_counter`` around it, CUDA synchronised before each
  clock read.

Targets (ratio ours / plain): >= 1.0x on CPU (no slower than the textbook loop), >= 2.0x on CUDA.
They are reported as PASS/FAIL; the exit code is 0 regardless unless ``--check`` is given.

``prune`` times every registered pruner at one sparsity (default 99%) on ``resnet20`` (32x32),
``vgg19_bn`` (32x32) and ``resnet18`` (64x64), one torch thread by default; data-scoring pruners get one
synthetic batch of 128 images. DPaI runs ``--dpai-steps`` steps and its seconds per step are compared with
the official release measured on this machine type with one thread (resnet20 0.038, vgg19_bn 2.54,
resnet18 1.58 s/step); targets <= 0.5x (resnet20) and <= 0.2x (the two large networks).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.config import TrainConfig
from dpai_lib.data import TensorData, dataset_info, get_dataset, load_tensors
from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.models import TORCHVISION_PREFIX, build_model, list_models
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
OTHERS_CPU_WARN = 0.05  # warn when other processes used more than this fraction of the cores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _OthersMeter:
    """Fraction of the machine's cores that OTHER processes kept busy while it was running (None where
    ``/proc/stat`` is missing). Near 0 on an idle machine; CPU timings taken while it is large are unreliable."""

    def __init__(self) -> None:
        self.machine, self.own, self.wall = _machine_cpu_seconds(), time.process_time(), time.perf_counter()

    def read(self) -> float | None:
        machine = _machine_cpu_seconds()
        if machine is None or self.machine is None:
            return None
        others = (machine - self.machine) - (time.process_time() - self.own)
        return max(0.0, others) / ((time.perf_counter() - self.wall) * (os.cpu_count() or 1))


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_workers(device: torch.device) -> int:
    """DataLoader workers of the plain loop: none on the CPU (worker processes would compete with the
    compute threads for the same cores); on CUDA up to 8, leaving a core for the main process."""
    return max(0, min(8, _usable_cores() - 1)) if device.type == "cuda" else 0


def _bench_config(max_train_batches: int | None = None) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=BATCH_SIZE, test_batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
                       weight_decay=1e-4, lr_drops=[], lr_drop_factor=1.0, max_train_batches=max_train_batches,
                       max_test_batches=1)


def _first(data: TensorData, n: int) -> TensorData:
    return TensorData(data.images[:n], data.labels[:n], data.info)


def _ours(model: nn.Module, masks: Masks, train_data: TensorData, test_data: TensorData, device: torch.device,
          seed: int, warmup: bool) -> float:
    """Images/s of one epoch of our trainer (on a copy of ``model``), as the trainer itself measures it."""
    if warmup:  # a few batches on a throw-away copy
        train(copy.deepcopy(model), masks, train_data, test_data, _bench_config(WARMUP_BATCHES), seed=seed,
              device=device, progress=False)
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


def _plain_loader(dataset: torch.utils.data.Dataset, device: torch.device, workers: int,
                  seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


def _plain(model: nn.Module, masks: Masks, loader: torch.utils.data.DataLoader, device: torch.device,
           warmup: bool) -> float:
    """Images/s of one epoch of the plain loop (on a copy of ``model``)."""
    if warmup:  # a few batches on a throw-away copy
        _plain_epoch(copy.deepcopy(model), masks, loader, device, max_batches=WARMUP_BATCHES)
    images, seconds = _plain_epoch(copy.deepcopy(model), masks, loader, device)
    return images / seconds


def bench_train(args: argparse.Namespace) -> int:
    """``train`` sub-command: ours vs plain training throughput per model; prints a table."""
    import pandas as pd

    unknown = [m for m in args.models if not m.startswith(TORCHVISION_PREFIX) and m not in list_models()]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())} or tv:<name>", file=sys.stderr)
        return 2
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
        t0, meter = time.perf_counter(), _OthersMeter()
        train_data = _first(full_train, n)
        loader = _plain_loader(torch.utils.data.Subset(full_dataset, range(n)), device, workers, args.seed)
        ours_runs, plain_runs = [], []
        for r in range(args.repeats):  # alternate the two sides, so slow phases of a shared machine hit both
            ours_runs.append(_ours(model, masks, train_data, test_data, device, args.seed, warmup=r == 0))
            plain_runs.append(_plain(model, masks, loader, device, warmup=r == 0))
        del loader  # ends its worker processes
        others = meter.read()
        ours, plain = max(ours_runs), max(plain_runs)
        ratio = ours / plain
        row = {"model": name, "device": str(device), "threads": torch.get_num_threads(), "workers": workers,
               "images": n, "ours_img_s": round(ours, 1), "plain_img_s": round(plain, 1),
               "ratio": round(ratio, 3), "target": f">={target:g}x", "result": "PASS" if ratio >= target else "FAIL",
               "others_cpu": None if others is None else round(others, 3),
               "ours_runs": [round(v, 1) for v in ours_runs], "plain_runs": [round(v, 1) for v in plain_runs],
               "bench_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"  {name}: {n} images, ours {', '.join(map(str, row['ours_runs']))} img/s, plain "
              f"{', '.join(map(str, row['plain_runs']))} img/s, ratio {ratio:.2f} ({row['bench_s']} s"
              + ("" if others is None else f"; other processes used {others:.0%} of the cores") + ")", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = pd.DataFrame(rows).drop(columns=["others_cpu", "ours_runs", "plain_runs", "bench_s"])
    print()
    print(table.to_string(index=False))
    busy = [f"{r['model']} {r['others_cpu']:.0%}" for r in rows if (r["others_cpu"] or 0) > OTHERS_CPU_WARN]
    if device.type == "cpu" and busy:
        # Other processes on the same cores stall torch's intra-op threads; timings then swing by several times.
        print(f"WARNING: other processes used part of the machine's {os.cpu_count()} cores during the run "
              f"({', '.join(busy)}); CPU numbers are unreliable - rerun on an idle machine, or with --repeats 3",
              file=sys.stderr)
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


# Release's DPaI seconds per step, measured on this machine type with one thread (issue text).
RELEASE_DPAI_S_PER_STEP = {"resnet20": 0.038, "vgg19_bn": 2.54, "resnet18": 1.58}
DPAI_TARGET_RATIO = {"resnet20": 0.5, "vgg19_bn": 0.2, "resnet18": 0.2}
PRUNE_MODELS = {"resnet20": (10, 32), "vgg19_bn": (100, 32), "resnet18": (200, 64)}


def bench_prune(args: argparse.Namespace) -> int:
    """Wall time of every pruner at one sparsity on the paper networks, and DPaI's seconds per step."""
    import pandas as pd

    from dpai_lib.data import load_tensors, normalize
    from dpai_lib.pruners import list_pruners, needs_data

    torch.set_num_threads(args.threads)
    known = list_pruners()  # also loads every pruner module
    methods = args.methods or known
    rows = []
    for name in args.models:
        classes, size = PRUNE_MODELS[name]
        model = build_model(name, classes)
        synth = load_tensors("synthetic", "train", num_classes=classes, image_size=size, train_size=args.batch_size,
                             test_size=1)
        data = [(normalize(synth.images, synth.info), synth.labels)]
        for method in methods:
            hp = {"steps": args.dpai_steps} if method == "dpai" else {}
            t0 = time.perf_counter()
            masks = prune(model, method, args.sparsity, input_shape=(3, size, size),
                          data=data if needs_data(method) else None, **hp)
            seconds = time.perf_counter() - t0
            row = {"model": name, "method": method, "sparsity": args.sparsity, "threads": torch.get_num_threads(),
                   "seconds": round(seconds, 2), "collapsed_layers": len(masks.collapsed_layers())}
            if method == "dpai":
                per_step = masks.meta["seconds_per_step"]
                release = RELEASE_DPAI_S_PER_STEP[name]
                fixed = seconds - per_step * args.dpai_steps  # set-up and evaluations, paid once
                row |= {"seconds": f"{seconds:.1f} ({args.dpai_steps} steps)",
                        "dpai_s_per_step": round(per_step, 4), "dpai_3000_steps_s": round(fixed + per_step * 3000),
                        "vs_release": round(per_step / release, 3), "target": f"<= {DPAI_TARGET_RATIO[name]}x",
                        "verdict": "PASS" if per_step / release <= DPAI_TARGET_RATIO[name] else "FAIL"}
            rows.append(row)
            print(f"{name:9s} {method:10s} {row['seconds']}", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    print(table.fillna("").to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = any(r.get("verdict") == "FAIL" for r in rows)
    return 1 if (args.check and failed) else 0


def _replace_forward(module: nn.Module, forward: Callable[..., torch.Tensor]) -> None:
    """Give ``module`` its own ``forward`` (an instance attribute; ``nn.Module`` declares ``forward`` as a
    replaceable callable, its subclasses as a method)."""
    module.forward = forward


def _masked_linear(m: nn.Linear, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight * k, m.bias)


def _masked_conv(m: nn.Conv2d, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return m._conv_forward(x, m.weight * k, m.bias)


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError("synaptic_flow_loop: a prunable weight got no gradient (it is not used by the forward)")
    return p.grad


def synaptic_flow_loop(model: nn.Module, sparsity: float, input_shape: tuple[int, ...], iterations: int) -> Masks:
    """SynFlow as Synaptic-Flow's ``prune_loop`` runs it (written from its description, not its code), in
    float64 for equal work with ours: every conv/linear multiplies its weight by a float mask buffer in its
    forward; ``abs`` of every parameter and buffer; per round an all-ones input, ``R = sum(f(1))``,
    backward, score ``|dR/dw * w|``; global threshold = the k-th smallest score (``torch.kthvalue``), keep
    ``score > threshold`` at the kept fraction ``d ** ((e + 1) / E)``."""
    from dpai_lib.pruners._gradients import iteration_sparsities

    net = copy.deepcopy(model).double().eval()
    params = prunable_parameters(net)
    masks = {n: torch.ones_like(p) for n, p in params.items()}
    owner = {id(m.weight): m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for n, p in params.items():
        module, mask = owner[id(p)], masks[n]
        if isinstance(module, nn.Linear):
            _replace_forward(module, functools.partial(_masked_linear, module, mask))
        else:
            _replace_forward(module, functools.partial(_masked_conv, module, mask))
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    x = torch.ones((1, *input_shape), dtype=torch.float64)
    for target in iteration_sparsities(sparsity, iterations, "exponential"):
        net.zero_grad()
        net(x).sum().backward()
        scores = torch.cat([(_grad(p) * p).detach().abs().flatten() for p in params.values()])
        n_prune = int(target * scores.numel())
        if n_prune < 1:
            continue
        threshold = scores.kthvalue(n_prune).values
        start = 0
        with torch.no_grad():
            for n, p in params.items():
                masks[n].copy_((scores[start:start + p.numel()] > threshold).view(p.shape))
                start += p.numel()
    return Masks({n: m.bool() for n, m in masks.items()})


def bench_synflow(args: argparse.Namespace) -> int:
    """Our SynFlow (float64, ties like Synaptic-Flow) against :func:`synaptic_flow_loop` on equal work."""
    import pandas as pd

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        classes, size = PRUNE_MODELS[name]
        torch.manual_seed(args.seed)
        model = build_model(name, classes)
        times: dict[str, list[float]] = {"ours": [], "loop": []}
        results = {}
        for _ in range(args.repeats):
            for side in ("ours", "loop"):
                t0 = time.perf_counter()
                if side == "ours":
                    results[side] = prune(model, "synflow", args.sparsity, input_shape=(3, size, size),
                                          iterations=args.iterations, ties="prune_all")
                else:
                    results[side] = synaptic_flow_loop(model, args.sparsity, (3, size, size), args.iterations)
                times[side].append(time.perf_counter() - t0)
        equal = all(torch.equal(results["ours"][n], results["loop"][n]) for n in results["loop"])
        ours, loop = min(times["ours"]), min(times["loop"])
        rows.append({"model": name, "iterations": args.iterations, "threads": torch.get_num_threads(),
                     "ours_s": round(ours, 2), "loop_s": round(loop, 2), "ratio": round(ours / loop, 3),
                     "equal_masks": equal, "target": "<= 1.0x",
                     "verdict": "PASS" if ours / loop <= 1.0 and equal else "FAIL"})
        print(f"{name:9s} ours {ours:.2f}s loop {loop:.2f}s equal={equal}", file=sys.stderr, flush=True)
    print(pd.DataFrame(rows).to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if (args.check and any(r["verdict"] == "FAIL" for r in rows)) else 0


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
    p.add_argument("--repeats", type=int, default=1,
                   help="timed epochs per side, alternating ours / plain; the best of each is reported (default: 1; "
                        "use 3 on a shared or noisy machine)")
    p.add_argument("--dataset", default="fashion_mnist", help="in-memory data set (default: fashion_mnist)")
    p.add_argument("--data-dir", default="data", help="data root (default: data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, masks and data order (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--check", action="store_true", help="exit non-zero if a model misses the target")
    p.set_defaults(func=bench_train)
    p = sub.add_parser("prune", help="wall time of every pruner on the paper networks, DPaI seconds per step")
    p.add_argument("--models", nargs="+", default=list(PRUNE_MODELS), choices=list(PRUNE_MODELS),
                   help="resnet20 (32x32), vgg19_bn (32x32), resnet18 (64x64) (default: all)")
    p.add_argument("--methods", nargs="+", default=None, help="pruners to time (default: all registered)")
    p.add_argument("--sparsity", type=float, default=0.99, help="fraction of weights removed (default: 0.99)")
    p.add_argument("--dpai-steps", type=int, default=50,
                   help="DPaI steps actually run; the 3000-step time is extrapolated from them (default: 50)")
    p.add_argument("--batch-size", type=int, default=128, help="synthetic batch for data-scoring pruners (default: 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the release timings)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--check", action="store_true", help="exit non-zero if DPaI misses its target")
    p.set_defaults(func=bench_prune)
    p = sub.add_parser("synflow", help="our SynFlow vs a Synaptic-Flow-style loop (float64, equal masks)")
    p.add_argument("--models", nargs="+", default=list(PRUNE_MODELS), choices=list(PRUNE_MODELS))
    p.add_argument("--sparsity", type=float, default=0.99, help="fraction of weights removed (default: 0.99)")
    p.add_argument("--iterations", type=int, default=100, help="SynFlow rounds (default: 100, the paper's)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side, alternating; the best is kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--check", action="store_true", help="exit non-zero on a FAIL (slower, or masks differ)")
    p.set_defaults(func=bench_synflow)
    args = parser.parse_args(argv)
    if getattr(args, "images", None) is not None and args.images < 1:
        parser.error("--images must be positive")
    if getattr(args, "repeats", 1) < 1:
        parser.error("--repeats must be positive")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
