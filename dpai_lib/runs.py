"""Run records: one JSON file per run, named by the hash of its configuration.

A record holds the configuration, seed, results, per-epoch curves, timings and provenance (package,
Python, torch, CUDA versions, device name, threads, git commit and dirty flag); its schema, the one
reader and the atomic writer are in :mod:`dpai_lib.store`. ``run_id`` is a hash of the canonical
configuration, so re-running a finished configuration is a no-op. A run interrupted during training
resumes from its last epoch checkpoint, and only with the masks that checkpoint was trained with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dpai_lib.config import RunConfig
from dpai_lib.store import FINISHED, SCHEMA, CorruptRecordError, quarantine, read_record, write_record

load_record = read_record  # the one reader of records (dpai_lib.store), under the name callers know


def code_versions(config: RunConfig) -> dict[str, int]:
    """The code versions a run depends on: its model's and its pruner's (see ``Registry.register``)."""
    from dpai_lib.models import model_version
    from dpai_lib.pruners import pruner_version

    return {"model": model_version(config.model.name), "pruner": pruner_version(config.prune.method)}


def run_id(config: RunConfig) -> str:
    """First 16 hex digits of the SHA-256 of the canonical configuration JSON plus the code versions of
    its model and pruner (those above 1: so ids made before versions existed stay valid until a bump)."""
    versions = {f"{k}_version": v for k, v in code_versions(config).items() if v != 1}
    blob = json.dumps({**config.canonical(), **versions}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and with what a run was made."""
    from dpai_lib import __version__

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    status = _git("status", "--porcelain", "--untracked-files=no")
    import torchvision

    return {
        "dpai_lib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "device": str(device),
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def execute(
    config: RunConfig,
    records_dir: str | os.PathLike,
    work_dir: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
    num_workers: int = 0,
    labels: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Prune and train one configuration; write ``records_dir/<run_id>.json``; return (path, record).

    A finished record is returned as it is (the run is not repeated). Checkpoints and the mask file go to
    ``work_dir/<run_id>/`` (default ``records_dir/work``), so an interrupted run resumes. ``labels``
    (e.g. artefact, setting, method, tier) are stored with the record. A run that
    raises is recorded with ``status: "failed"`` (``"interrupted"`` for Ctrl-C) and its error, then the exception propagates.
    """
    from dpai_lib import data as datamod
    from dpai_lib.models import build_model
    from dpai_lib.pruners import prune
    from dpai_lib.seed import seed_everything
    from dpai_lib.trainer import resolve_device, train

    rid = run_id(config)
    path = Path(records_dir) / f"{rid}.json"
    if path.exists():
        try:
            existing = read_record(path, rid)
        except CorruptRecordError as exc:
            quarantine(path, exc)  # unreadable: moved aside, and the run is redone
        else:
            if existing["status"] in FINISHED:
                return path, existing
    work = Path(work_dir if work_dir is not None else Path(records_dir) / "work") / rid
    dev = resolve_device(device)
    record: dict[str, Any] = {"schema": SCHEMA, "run_id": rid, "labels": dict(labels or {}),
                              "status": "running", "error": None,
                              "config": config.canonical(), "code_versions": code_versions(config),
                              "seed": config.seed, "results": {}, "curves": [],
                              "timings": {"started": _now()}, "provenance": provenance(dev)}
    t_start = time.perf_counter()
    try:
        record["determinism"] = seed_everything(config.seed, config.deterministic)
        dc = config.data
        info = datamod.dataset_info(dc.name, **dc.options)
        train_set = test_set = None
        if config.train is not None or _needs_data(config.prune.method):  # data-free pruning needs no files
            train_set, test_set = _load_data(dc, info.in_memory)
            if dc.train_subset is not None:
                train_set = _subset(train_set, dc.train_subset, config.seed)
        model = build_model(config.model.name, info.num_classes, **config.model.options)
        prune_data = _pruning_batches(config, train_set)
        t0 = time.perf_counter()
        masks = prune(model, config.prune.method, config.prune.sparsity, seed=config.seed, data=prune_data,
                      input_shape=(info.channels, info.image_size, info.image_size), **config.prune.options)
        record["timings"]["prune_s"] = time.perf_counter() - t0
        if config.train is not None and (work / "checkpoint.pt").exists():
            check_resume(masks, work / "masks.safetensors", work / "checkpoint.pt")  # keep the file it was made with
        else:
            masks.save(work / "masks.safetensors", metadata={"run_id": rid})
        record["results"]["masks"] = masks.summary()
        record["results"]["node_path"] = _node_path(model, masks, (info.channels, info.image_size, info.image_size))
        if "trace" in masks.meta:
            record["curves_prune"] = masks.meta["trace"]
        if "report" in masks.meta:  # a pruner's JSON-ready summary of how it went (e.g. NPB's solver statuses)
            record["results"]["pruner_report"] = masks.meta["report"]
        if config.train is None:
            record["status"] = "done"
            record["timings"].update(finished=_now(), total_s=time.perf_counter() - t_start)
            write_record(path, record)
            return path, record
        assert train_set is not None and test_set is not None  # loaded above whenever config.train is set
        result = train(model, masks, train_set, test_set, config.train, seed=config.seed, device=dev,
                       checkpoint_path=work / "checkpoint.pt", progress=progress, num_workers=num_workers)
        record["status"] = "done" if result.status == "completed" else "diverged"
        record["error"] = result.stop_reason
        record["curves"] = result.curves
        record["results"].update(final_test_acc=result.final_test_acc, best_test_acc=result.best_test_acc,
                                 best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                                 resumed_from_epoch=result.resumed_from_epoch)
        record["timings"]["train_s"] = result.train_seconds
        record["timings"]["train_images_per_s"] = result.train_images / result.train_seconds if result.train_seconds else None
    except BaseException as exc:
        record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        record["timings"].update(finished=_now(), total_s=time.perf_counter() - t_start)
        write_record(path, record)
        raise
    record["timings"].update(finished=_now(), total_s=time.perf_counter() - t_start)
    write_record(path, record)
    return path, record


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run: it was trained with other masks."""


def check_resume(masks, masks_file: Path, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` unless the masks it was trained with - the run's saved mask file,
    ``masks_file`` - are exactly ``masks`` (this run's, just pruned), and its weights are zero wherever
    they prune. Kept counts alone are not enough: two masks can keep as many weights and differ."""
    from dpai_lib.masks import Masks

    fix = f"delete {checkpoint.parent} to start the run over"
    try:
        saved = Masks.load(masks_file)
    except Exception as exc:  # missing, truncated, not a masks file
        raise ResumeError(f"cannot resume {checkpoint}: its mask file {masks_file} is missing or unreadable "
                          f"({type(exc).__name__}: {exc}); {fix}") from None
    differ = [n for n in masks
              if n not in saved or saved[n].shape != masks[n].shape or not torch.equal(saved[n], masks[n])]
    differ += [n for n in saved if n not in masks]
    if differ:
        count = sum(int((saved[n] != masks[n]).sum()) for n in differ if n in saved and n in masks
                    and saved[n].shape == masks[n].shape)
        raise ResumeError(f"cannot resume {checkpoint}: it was trained with the masks in {masks_file}, which differ "
                          f"from this run's masks in {len(differ)} layers ({', '.join(differ[:3])}"
                          f"{', ...' if len(differ) > 3 else ''}; {count} weights); {fix}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state.get("model", {}) if isinstance(state, dict) else {}
    leaks = [n for n in saved if n not in weights or weights[n].shape != saved[n].shape
             or bool(weights[n][~saved[n]].ne(0).any())]
    if leaks:
        raise ResumeError(f"cannot resume {checkpoint}: its weights are not zero where the masks in {masks_file} "
                          f"prune them ({', '.join(leaks[:3])}{', ...' if len(leaks) > 3 else ''}): it was trained "
                          f"with other masks; {fix}")


def _needs_data(method: str) -> bool:
    from dpai_lib.pruners import PRUNERS, _load_builtin

    _load_builtin()
    return bool(getattr(PRUNERS.get(method), "needs_data", False))


def _load_data(dc, in_memory: bool):
    from dpai_lib import data as datamod

    load = datamod.load_tensors if in_memory else datamod.get_dataset
    return tuple(load(dc.name, split, dc.data_dir, download=dc.download, **dc.options) for split in ("train", "test"))


def _node_path(model, masks, input_shape) -> dict[str, Any]:
    """Effective paths / nodes / kernels / params of the masks, in our exact definition and in the DPaI
    release's (the paper's numbers use the latter); a variant that cannot handle the network says why."""
    from dpai_lib.metrics import node_path_stats

    out: dict[str, Any] = {}
    for variant in ("exact", "dpai"):
        try:
            stats = node_path_stats(model, masks, input_shape, variant=variant)
        except NotImplementedError as exc:
            out[variant] = {"error": str(exc)}
            continue
        out[variant] = {k: stats[k] for k in ("log_paths", "nodes", "kernels", "params")}
        out[variant]["layers"] = stats["layers"]
    return out


def _pruning_batches(config: RunConfig, train_set) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """For pruners that need data: ``data_batches`` batches of ``data_batch_size`` training images, drawn
    without replacement by a permutation seeded with the run's seed, normalised, not augmented."""
    from dpai_lib.data import TensorData, normalize

    pc = config.prune
    if not _needs_data(pc.method):
        return None
    if pc.data_batches is None or pc.data_batch_size is None:
        raise ValueError(f"pruner {pc.method!r} scores weights with data: set prune.data_batches and "
                         "prune.data_batch_size in the run configuration")
    need = pc.data_batches * pc.data_batch_size
    if need > len(train_set):
        raise ValueError(f"prune.data_batches x prune.data_batch_size = {need} exceeds the {len(train_set)} training images")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed))[:need]
    batches = []
    for chunk in order.split(pc.data_batch_size):
        if isinstance(train_set, TensorData):
            batches.append((normalize(train_set.images[chunk], train_set.info), train_set.labels[chunk]))
        else:
            items = [train_set[int(i)] for i in chunk]
            batches.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return batches


def _subset(data, n: int, seed: int):
    from torch.utils.data import Subset

    from dpai_lib.data import TensorData

    if n > len(data):
        raise ValueError(f"train_subset={n} exceeds the {len(data)} training images")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(data, TensorData):
        return TensorData(data.images[idx].contiguous(), data.labels[idx].contiguous(), data.info)
    return Subset(data, idx.tolist())
