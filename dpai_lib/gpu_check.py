"""The GPU check: ``python -m dpai_lib.gpu_check --out DIR`` (``make gpu-check``).

One script that runs, on one CUDA device and within ``--budget-s`` seconds (default 480: 8 minutes on
one H100), the code paths the CPU test suite never reaches, and writes ``DIR/gpu_check.json`` (rewritten
after every check, so a run cut short keeps what it measured):

1. ``environment`` - device name, compute capability, memory, torch / CUDA / cuDNN versions, bf16
   support, TF32 flags, git commit (:func:`dpai_lib.runs.provenance`).
2. ``dpai_cuda_vs_cpu`` - DPaI masks of ResNet-20 (10 classes, 32x32, 99 %, seed 0, ``--dpai-steps``
   steps, default 300) made on the CUDA device and on the CPU. The scores are drawn on the CPU in both
   cases, so the initial masks (0 steps) must be equal: that is checked strictly. After some steps the
   masks can differ for floating-point reasons alone: the release's path count sums float32 values in
   another order on the GPU, and cuDNN convolutions use TF32 (10-bit mantissa) by default; Adam
   normalises every score's gradient, so a tiny difference can flip a weight at the top-k threshold, and
   flips change later gradients. The check reports equality per layer or, where the masks differ, their
   overlap (weights kept by both / weights kept), the first step at which the traces differ, and the
   exact node-path numbers of both masks; it repeats the comparison with TF32 off and deterministic
   cuDNN, to tell the two causes apart. Only different initial masks are a failure.
3. ``trainer_paths`` - :func:`dpai_lib.trainer.train` on CUDA with the CUDA DPaI masks for
   ``--train-batches`` batches of Fashion-MNIST: the training images are resident on the GPU (uint8) and
   augmented there (seen by a spy on the trainer's batch iterator), the forward pass runs under bf16
   autocast (a forward hook reads the output dtype), 4-d weights are channels-last, the loss stays
   finite; on-device augmentation is deterministic per generator and its normalisation matches the CPU's
   (within 1e-5: CUDA divides by a scalar through its reciprocal).
4. ``masks_enforced`` - after those optimiser steps (momentum and weight decay included) every pruned
   weight is exactly 0 and the kept weights did change.
5. ``throughput`` - our trainer vs the textbook loop (a ``DataLoader`` with per-sample torchvision
   crop/flip, fp32), one epoch of the whole training set each, the same model, masks, batch size and
   optimiser (the functions of :mod:`dpai_lib.bench`); best of ``--repeats``; target >= 2x.
6. ``fmnist_schedule`` - one run of ``params/cpu_fmnist.yaml`` (DPaI, 99 %, seed 0: the CPU study's own
   configuration) through :func:`dpai_lib.runs.execute` on CUDA, with the whole training set each epoch,
   the whole test set, and the paper's Table 6 schedule (160 epochs, drops at 60 and 120) scaled to the
   largest of 160, 120, 80, 40, 24, 16 or 8 epochs (drops at 37.5 % and 75 %) that the time left allows;
   its run record is written to ``DIR/records/`` (a run already finished there is not repeated: a second
   call reports its record).

Exit status: 0 every check passed (``info`` is not a failure), 1 a check failed, 2 it cannot run here
(no CUDA device, no Fashion-MNIST, a bad option) - one line on stderr, no traceback.

``--device cpu --quick`` runs the same code on tiny sizes and generated data on the CPU (a minute), so
that tests can run it without a GPU; in that mode nothing is judged that only a GPU can show (bf16,
channels-last, residency, the 2x throughput target), and the run is labelled ``quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULT_FILE = "gpu_check.json"
SCHEMA = 1
DEFAULT_BUDGET_S = 480.0
PARAMS = Path(__file__).resolve().parents[1] / "params" / "cpu_fmnist.yaml"
SCHEDULE_EPOCHS = (160, 120, 80, 40, 24, 16, 8)  # multiples of 8: drops at exactly 37.5 % and 75 %
PAPER_EPOCHS, PAPER_DROPS = 160, (60, 120)  # Table 6, ResNet-20 / CIFAR-10
MARGIN_S = 30.0  # kept free at the end of the budget


class CannotRun(Exception):
    """The check cannot run here (no CUDA device, no data): one line, exit status 2."""


def no_cuda_message() -> str:
    built = torch.version.cuda
    why = f"torch {torch.__version__} (built with CUDA {built})" if built else f"torch {torch.__version__} (a CPU-only build)"
    return (f"gpu_check: no CUDA device: {why} sees no GPU (torch.cuda.is_available() is False); run it on a "
            "machine with one, or `python -m dpai_lib.gpu_check --device cpu --quick --out DIR` to exercise the "
            "code on the CPU")


def drops_for(epochs: int) -> list[int]:
    """The paper's drop epochs (60 and 120 of 160: 37.5 % and 75 %) scaled to ``epochs``."""
    return [round(epochs * d / PAPER_EPOCHS) for d in PAPER_DROPS]


def choose_epochs(seconds_left: float, epoch_s: float, fixed_s: float) -> tuple[int, bool]:
    """The largest of :data:`SCHEDULE_EPOCHS` whose estimated time (``fixed_s + epochs * epoch_s``) fits
    ``seconds_left``, and whether it fits at all (if none does, the smallest is returned with ``False``)."""
    for epochs in SCHEDULE_EPOCHS:
        if fixed_s + epochs * epoch_s <= seconds_left:
            return epochs, True
    return SCHEDULE_EPOCHS[-1], False


class Report:
    """The result file: checks in order, rewritten after each one."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.path = out / RESULT_FILE
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "tool": "python -m dpai_lib.gpu_check", "quick": bool(args.quick),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget_s, "options": {k: v for k, v in vars(args).items() if k != "out"},
            "complete": False, "passed": None, "total_s": 0.0, "checks": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self) -> None:
        from dpai_lib.store import atomic_write

        self.data["total_s"] = round(self.elapsed(), 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as f:
            f.write(json.dumps(self.data, indent=1, default=str) + "\n")

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one check; an exception is recorded as a failure (with its traceback) and the next check runs."""
        t0 = time.perf_counter()
        try:
            result = fn()
        except CannotRun:
            raise
        except Exception as exc:  # a failed check, recorded; the others still run
            result = {"status": "fail", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["checks"][name] = result
        self.write()
        print(f"[{result['status']}] {name} ({result['seconds']} s): {result.get('summary', result.get('error', ''))}",
              flush=True)
        return result


# ------------------------------------------------------------------------------------------------------------
# the checks


def check_environment(device: torch.device) -> dict[str, Any]:
    from dpai_lib.runs import provenance

    out: dict[str, Any] = {"status": "pass", **provenance(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
                "bf16_supported": torch.cuda.is_bf16_supported(), "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "device_count": torch.cuda.device_count()}
        if not out["bf16_supported"]:
            out["status"] = "fail"
    out["summary"] = f"{out['device_name']} | torch {out['torch']} | CUDA {out.get('cuda')} | cuDNN {out.get('cudnn')}"
    return out


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """TF32 off and deterministic cuDNN (no autotuning) inside; the previous flags afterwards."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def compare_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Equality per layer and the overlap of two masks of the same model (same kept counts per layer)."""
    kept = sum(int(m.sum()) for m in a.values())
    both = sum(int((a[n].cpu() & b[n].cpu()).sum()) for n in a)
    differ = [n for n in a if not torch.equal(a[n].cpu(), b[n].cpu())]
    return {"equal": not differ, "layers": len(a), "layers_differing": len(differ), "first_layers_differing": differ[:5],
            "kept": kept, "kept_by_both": both, "overlap": round(both / kept, 6) if kept else 1.0}


def _first_divergence(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, Any]:
    """The first DPaI step whose node or kernel counts differ, and the largest difference of log paths."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if (x["nodes"], x["kernels"]) != (y["nodes"], y["kernels"])), None)
    diffs = [abs(x["log_paths"] - y["log_paths"]) for x, y in zip(a, b)]
    return {"first_step_counts_differ": first, "log_paths_diff_step0": diffs[0] if diffs else None,
            "log_paths_diff_max": max(diffs) if diffs else None}


def check_dpai(device: torch.device, steps: int, sparsity: float, seed: int) -> tuple[dict[str, Any], Any]:
    """DPaI on ``device`` vs on the CPU (see the module docstring); returns (result, the device's masks)."""
    from dpai_lib.metrics import node_path_stats
    from dpai_lib.models import build_model
    from dpai_lib.pruners import prune

    shape = (3, 32, 32)
    torch.manual_seed(seed)
    model = build_model("resnet20", 10)
    on_device = copy.deepcopy(model).to(device)

    def dpai(net: torch.nn.Module, n: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        masks = prune(net, "dpai", sparsity, input_shape=shape, seed=seed, steps=n, alpha=0.99, beta=0.5, lr=0.005)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return masks, time.perf_counter() - t0

    init_cpu, _ = dpai(model, 0)
    init_dev, _ = dpai(on_device, 0)
    cpu, cpu_s = dpai(model, steps)
    out: dict[str, Any] = {"model": "resnet20", "sparsity": sparsity, "seed": seed, "steps": steps,
                           "initial_masks": compare_masks(init_cpu, init_dev), "cpu_s": round(cpu_s, 2),
                           "cpu_s_per_step": cpu.meta["seconds_per_step"]}
    stats = {"cpu": node_path_stats(model, cpu, shape)}
    variants: dict[str, Any] = {}
    device_masks = None
    for label, flags in (("default_flags", contextlib.nullcontext), ("tf32_off_deterministic", strict_float32)):
        if device.type != "cuda" and label != "default_flags":
            continue  # on the CPU there are no TF32 or cuDNN flags to vary
        with flags():
            masks, seconds = dpai(on_device, steps)
        if device_masks is None:  # the masks made with the default flags, for the trainer checks
            device_masks = masks
        stats[label] = node_path_stats(model, masks, shape)
        variants[label] = {**compare_masks(cpu, masks), **_first_divergence(cpu.meta["trace"], masks.meta["trace"]),
                           "device_s": round(seconds, 2), "device_s_per_step": masks.meta["seconds_per_step"],
                           "log_paths_exact": stats[label]["log_paths"], "nodes_exact": stats[label]["nodes"],
                           "kernels_exact": stats[label]["kernels"]}
    out["cpu_log_paths_exact"], out["cpu_nodes_exact"] = stats["cpu"]["log_paths"], stats["cpu"]["nodes"]
    out["cpu_kernels_exact"] = stats["cpu"]["kernels"]
    out["device"] = variants
    if not out["initial_masks"]["equal"]:
        out["status"] = "fail"
        out["summary"] = "the initial masks (0 steps) differ: the scores are not drawn alike on both devices"
    elif all(v["equal"] for v in variants.values()):
        out["status"] = "pass"
        out["summary"] = f"masks after {steps} steps equal on {device.type} and cpu"
    else:
        out["status"] = "info"
        out["summary"] = (f"initial masks equal; after {steps} steps the masks differ for floating-point reasons: "
                          + "; ".join(f"{k}: overlap {v['overlap']:.4f}, {v['layers_differing']} of {v['layers']} layers, "
                                      f"counts first differ at step {v['first_step_counts_differ']}"
                                      for k, v in variants.items()))
    return out, device_masks


def check_trainer(device: torch.device, masks: Any, train_data: Any, test_data: Any, batches: int, seed: int,
                  batch_size: int = 128) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our trainer's CUDA paths (see the module docstring); returns (trainer result, masks result)."""
    from dpai_lib import trainer as T
    from dpai_lib.config import TrainConfig
    from dpai_lib.data import TensorData, augment, normalize
    from dpai_lib.masks import prunable_parameters
    from dpai_lib.models import build_model

    cuda = device.type == "cuda"
    # on-device augmentation: deterministic per generator; its normalisation equals the CPU's
    x_cpu = train_data.images[:256]
    x_dev = x_cpu.to(device)
    a1 = augment(x_dev, train_data.info, torch.Generator(device=device).manual_seed(seed))
    a2 = augment(x_dev, train_data.info, torch.Generator(device=device).manual_seed(seed))
    norm_diff = float((normalize(x_dev, train_data.info).cpu() - normalize(x_cpu, train_data.info)).abs().max())
    aug: dict[str, Any] = {"device": str(a1.device), "dtype": str(a1.dtype), "shape": list(a1.shape),
                           "deterministic": torch.equal(a1, a2), "normalize_max_abs_diff_vs_cpu": norm_diff}

    torch.manual_seed(seed)
    model = build_model("resnet20", train_data.info.num_classes)
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    seen: dict[str, Any] = {}
    original = T._batches

    def spy(data: Any, *args: Any, **kw: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if kw.get("train"):
            seen.setdefault("images_device", str(data.images.device) if isinstance(data, TensorData) else "DataLoader")
        for x, y in original(data, *args, **kw):
            if kw.get("train"):
                seen.setdefault("batch_device", str(x.device))
            yield x, y

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            seen.setdefault("forward_dtype", str(output.dtype))

    config = TrainConfig(epochs=1, batch_size=batch_size, test_batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
                         weight_decay=1e-4, lr_drops=[], lr_drop_factor=0.1, amp=True, max_train_batches=batches,
                         max_test_batches=4)
    handle = model.register_forward_hook(hook)
    T._batches = spy  # type: ignore[assignment]
    try:
        result = T.train(model, masks, train_data, test_data, config, seed=seed, device=device, progress=False)
    finally:
        T._batches = original  # type: ignore[assignment]
        handle.remove()
    four_d = [p for p in model.parameters() if p.dim() == 4]
    channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    trainer = {"batches": batches, "batch_size": batch_size, "status_of_training": result.status,
               "stop_reason": result.stop_reason,
               "train_loss": result.curves[-1]["train_loss"] if result.curves else None,
               "test_acc_4_batches": result.final_test_acc, "images_per_s": round(result.train_images / result.train_seconds, 1),
               "channels_last_weights": channels_last, "augmentation": aug, **seen}
    wanted = {"finite loss": result.status == "completed", "augmentation deterministic": aug["deterministic"],
              "normalisation equals the CPU's (within 1e-5)": norm_diff <= 1e-5}
    if cuda:
        wanted |= {"images resident on the GPU": seen.get("images_device", "").startswith("cuda"),
                   "batches on the GPU": seen.get("batch_device", "").startswith("cuda"),
                   "augmentation on the GPU": str(aug["device"]).startswith("cuda"),
                   "bf16 autocast forward": seen.get("forward_dtype") == "torch.bfloat16",
                   "channels-last weights": channels_last}
    failed = [k for k, ok in wanted.items() if not ok]
    trainer["judged"] = wanted
    trainer["status"] = "fail" if failed else "pass"
    trainer["summary"] = (f"failed: {', '.join(failed)}" if failed else
                          f"{'; '.join(wanted)}; {trainer['images_per_s']} images/s over {batches} batches")

    params = prunable_parameters(model)
    leaks = {n: int((params[n].detach()[~m.to(params[n].device)] != 0).sum()) for n, m in masks.items()}
    changed = sum(int((params[n].detach().cpu()[m] != before[n][m]).sum()) for n, m in masks.items())
    leaked = {n: c for n, c in leaks.items() if c}
    enforced = {"pruned_weights": masks.total() - masks.kept(), "pruned_nonzero": sum(leaks.values()),
                "layers_with_nonzero_pruned": sorted(leaked)[:5], "kept": masks.kept(), "kept_changed": changed,
                "steps": batches}
    ok = not leaked and changed > 0
    enforced["status"] = "pass" if ok else "fail"
    enforced["summary"] = (f"all {enforced['pruned_weights']} pruned weights exactly 0 after {batches} steps; "
                           f"{changed} of {masks.kept()} kept weights changed" if ok else
                           f"{enforced['pruned_nonzero']} pruned weights nonzero, {changed} kept weights changed")
    return trainer, enforced


def check_throughput(device: torch.device, train_data: Any, test_data: Any, dataset: Any, images: int, repeats: int,
                     seed: int, judge: bool) -> dict[str, Any]:
    """Our trainer vs the textbook DataLoader loop (:mod:`dpai_lib.bench`), one epoch of ``images`` each."""
    from torch.utils.data import Subset

    from dpai_lib import bench
    from dpai_lib.models import build_model
    from dpai_lib.pruners import prune

    n = min(images, len(train_data))
    workers = bench._default_workers(device)
    torch.manual_seed(seed)
    model = build_model("resnet20", train_data.info.num_classes)
    masks = prune(model, "random", bench.SPARSITY, input_shape=tuple(train_data.images.shape[1:]), seed=seed, budget="erk")
    subset = bench._first(train_data, n)
    loader = bench._plain_loader(Subset(dataset, range(n)), device, workers, seed)
    ours, plain = [], []
    for r in range(repeats):  # alternating, as bench does
        ours.append(bench._ours(model, masks, subset, test_data, device, seed, warmup=r == 0))
        plain.append(bench._plain(model, masks, loader, device, warmup=r == 0))
    del loader
    ratio = max(ours) / max(plain)
    target = bench.TARGETS.get(device.type, 1.0)
    out = {"model": "resnet20", "images": n, "batch_size": bench.BATCH_SIZE, "masks": f"random ERK {bench.SPARSITY:.0%}",
           "plain_workers": workers, "repeats": repeats, "ours_img_s": [round(v, 1) for v in ours],
           "plain_img_s": [round(v, 1) for v in plain], "ratio": round(ratio, 3), "target": target}
    if judge:
        out["status"] = "pass" if ratio >= target else "fail"
    else:
        out["status"] = "info"
        out["note"] = "quick mode: tiny sizes, the target is not judged"
    out["summary"] = (f"ours {max(ours):.0f} img/s vs plain DataLoader loop {max(plain):.0f} img/s: {ratio:.2f}x "
                      f"(target >= {target:g}x{'' if judge else ', not judged'})")
    return out


def check_schedule(device: torch.device, out_dir: Path, quick: bool, data_dir: str | None, seconds_left: float,
                   epoch_s: float, prune_s: float, method: str, sparsity: float, seed: int) -> dict[str, Any]:
    """One run of the CPU study's configuration on ``device`` with the paper's schedule scaled to fit."""
    from dpai_lib.config import validate_config
    from dpai_lib.params import deep_merge, expand, load_artefact
    from dpai_lib.runs import execute, run_id

    tier = "smoke" if quick else "paper"
    runs = [r for r in expand(load_artefact(PARAMS), tier) if r.method == method and r.config.seed == seed
            and abs(r.config.prune.sparsity - sparsity) < 1e-9]
    if not runs:
        raise ValueError(f"{PARAMS} has no {tier}-tier run of method {method!r} at sparsity {sparsity} with seed {seed}")
    if quick:
        epochs, fits = SCHEDULE_EPOCHS[-1], True
        train = {"epochs": epochs, "lr_drops": drops_for(epochs), "batch_size": 32, "test_batch_size": 64,
                 "max_train_batches": 1, "max_test_batches": 1}
    else:
        epochs, fits = choose_epochs(seconds_left, epoch_s, prune_s + MARGIN_S)
        train = {"epochs": epochs, "lr_drops": drops_for(epochs), "max_train_batches": None, "max_test_batches": None}
    over: dict[str, Any] = {"deterministic": False, "train": train}
    if data_dir is not None:
        over["data"] = {"data_dir": data_dir}
    raw = deep_merge(runs[0].config.canonical(), over)
    config = validate_config(raw, f"{PARAMS} ({tier} tier, {method}, {sparsity}, seed {seed}) for the GPU check",
                             runnable=True)
    labels = {"artefact": "gpu_check", "setting": runs[0].setting, "method": method, "tier": "quick" if quick else "gpu"}
    path, record = execute(config, out_dir / "records", out_dir / "work", device=str(device), progress=False,
                           labels=labels)
    res, timings = record["results"], record["timings"]
    out = {"params": str(PARAMS.relative_to(PARAMS.parents[1])), "tier_source": tier, "method": method,
           "sparsity": sparsity, "seed": seed, "dataset": config.data.name, "run_id": run_id(config),
           "record": str(path), "epochs": epochs, "lr_drops": train["lr_drops"], "paper_epochs": PAPER_EPOCHS,
           "paper_lr_drops": list(PAPER_DROPS), "fits_budget": fits, "estimated_epoch_s": round(epoch_s, 2),
           "run_status": record["status"], "final_test_acc": res.get("final_test_acc"),
           "best_test_acc": res.get("best_test_acc"), "best_epoch": res.get("best_epoch"),
           "prune_s": timings.get("prune_s"), "train_s": timings.get("train_s"), "total_s": timings.get("total_s"),
           "train_images_per_s": timings.get("train_images_per_s"),
           "log_paths_exact": res.get("node_path", {}).get("exact", {}).get("log_paths"),
           "nodes_exact": res.get("node_path", {}).get("exact", {}).get("nodes")}
    out["status"] = "pass" if record["status"] == "done" else "fail"
    acc = res.get("final_test_acc")
    out["summary"] = (f"{method} {sparsity:.2%}, {epochs} epochs (drops {train['lr_drops']}): final test acc "
                      + (f"{100 * acc:.2f} %" if acc is not None else "none") + f", train {out['train_s'] or 0:.0f} s"
                      + ("" if fits else " (the smallest schedule; over the budget)"))
    return out


# ------------------------------------------------------------------------------------------------------------


def _load(name: str, data_dir: str | None, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    from dpai_lib.data import DatasetNotFoundError, get_dataset, load_tensors

    try:
        train = load_tensors(name, "train", data_dir, **options)
        test = load_tensors(name, "test", data_dir, **options)
        dataset = get_dataset(name, "train", data_dir, augment=True, **options)
    except DatasetNotFoundError as exc:
        raise CannotRun(f"gpu_check: {exc} (`make data` unpacks Debian's copy into data/)") from None
    return train, test, dataset


def run_checks(args: argparse.Namespace) -> int:
    """Every check in order; returns the exit status (0 all passed, 1 a check failed)."""
    from dpai_lib.trainer import resolve_device

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CannotRun(no_cuda_message())
    if not args.device.startswith("cuda") and not args.quick:
        raise CannotRun(f"gpu_check: --device {args.device} needs --quick (the full sizes are for a GPU; on a CPU they "
                        "take hours)")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    report = Report(out, args)
    if args.quick:
        name, options = "synthetic", {"train_size": 512, "test_size": 256}
        steps, batches, batch_size, images, repeats = min(args.dpai_steps, 2), min(args.train_batches, 2), 32, 64, 1
    else:
        name, options = "fashion_mnist", {}
        steps, batches, batch_size, images, repeats = args.dpai_steps, args.train_batches, 128, 60_000, args.repeats
    train_data, test_data, dataset = _load(name, args.data_dir, options)
    report.data["dataset"] = name
    report.data["device"] = str(device)
    env = report.run("environment", lambda: check_environment(device))
    report.data["device_name"] = env.get("device_name")
    report.data["torch"] = torch.__version__
    report.write()

    held: dict[str, Any] = {}

    def dpai() -> dict[str, Any]:
        result, held["masks"] = check_dpai(device, steps, args.sparsity, args.seed)
        return result

    dpai_result = report.run("dpai_cuda_vs_cpu", dpai)
    if held.get("masks") is None:  # DPaI failed: the trainer checks get random masks instead
        from dpai_lib.models import build_model
        from dpai_lib.pruners import prune

        held["masks"] = prune(build_model("resnet20", 10), "random", args.sparsity, input_shape=(3, 32, 32), seed=args.seed)

    def trainer() -> dict[str, Any]:
        result, held["enforced"] = check_trainer(device, held["masks"], train_data, test_data, batches, args.seed,
                                                 batch_size)
        return result

    report.run("trainer_paths", trainer)
    report.run("masks_enforced", lambda: held.get("enforced") or {"status": "fail", "summary": "the trainer check did not run"})
    tp = report.run("throughput", lambda: check_throughput(device, train_data, test_data, dataset, images, repeats,
                                                            args.seed, judge=not args.quick))
    # the run's time per epoch: the whole training set at our trainer's rate, plus the test set (about 3x faster)
    rate = max(tp.get("ours_img_s") or [0.0]) or 100.0
    epoch_s = 1.15 * (len(train_data) + len(test_data) / 3) / rate
    per_step = (dpai_result.get("device", {}).get("default_flags", {}).get("device_s_per_step") or 0.05)
    prune_s = per_step * 3000 + 15.0  # DPaI's 3000 steps, the node-path metrics and start-up
    report.run("fmnist_schedule", lambda: check_schedule(
        device, out, args.quick, args.data_dir, args.budget_s - report.elapsed(), epoch_s, prune_s, args.method,
        args.sparsity, args.seed))
    statuses = [c["status"] for c in report.data["checks"].values()]
    report.data["complete"] = True
    report.data["passed"] = "fail" not in statuses
    report.data["within_budget"] = report.elapsed() <= args.budget_s
    report.write()
    print(f"{'PASS' if report.data['passed'] else 'FAIL'}: {statuses.count('pass')} passed, {statuses.count('info')} "
          f"info, {statuses.count('fail')} failed in {report.elapsed():.0f} s (budget {args.budget_s:.0f} s); "
          f"results in {report.path}")
    return 0 if report.data["passed"] else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpai_lib.gpu_check", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and the run record (created)")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda); cpu only with --quick")
    p.add_argument("--quick", action="store_true", help="tiny sizes and generated data: exercises the code in about a minute")
    p.add_argument("--data-dir", default=None, help="data root holding FashionMNIST/raw (default: $DPAI_DATA_DIR or ./data)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds the whole check may take; the last run's schedule is sized to it (default: {DEFAULT_BUDGET_S:g})")
    p.add_argument("--dpai-steps", type=int, default=300, help="DPaI steps of the CUDA vs CPU comparison (default: 300)")
    p.add_argument("--train-batches", type=int, default=200, help="training batches of the trainer check (default: 200)")
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per side of the throughput check (default: 2)")
    p.add_argument("--method", default="dpai", help="method of the Fashion-MNIST run, from params/cpu_fmnist.yaml (default: dpai)")
    p.add_argument("--sparsity", type=float, default=0.99, help="sparsity of the DPaI comparison and the run (default: 0.99)")
    p.add_argument("--seed", type=int, default=0, help="seed of every check (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's own choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("dpai_steps", "train_batches", "repeats"):
        if getattr(args, name) < 1:
            print(f"gpu_check: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        return run_checks(args)
    except CannotRun as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
