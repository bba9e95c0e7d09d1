"""Training a pruned network: SGD with step drops, masks enforced after every step, resumable.

Everything that shapes training comes from a :class:`~dpai_lib.config.TrainConfig`. In-memory data
(:class:`~dpai_lib.data.TensorData`) is batched from tensors with augmentation done on the training
device (the whole set is moved to the GPU once when it fits); other data sets go through a DataLoader.
On CUDA the model runs channels-last under bf16 autocast (``amp``). A checkpoint is written atomically
after every epoch; calling :func:`train` again with the same checkpoint path resumes from it and ends in
the same state as an uninterrupted run (data order and augmentation are seeded per epoch, the global RNG
state is restored). A non-finite loss stops the run with that reason.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dpai_lib.config import TrainConfig
from dpai_lib.data import TensorData, augment, normalize
from dpai_lib.masks import Masks

GPU_RESIDENT_LIMIT = 4 * 2**30  # bytes of uint8 images moved to the GPU once


@dataclass
class TrainResult:
    status: str  # "completed" or "diverged"
    stop_reason: str | None
    epochs_run: int
    final_test_acc: float | None
    best_test_acc: float | None
    best_epoch: int | None
    curves: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    train_seconds: float = 0.0
    train_images: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else must be a valid, available device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {device!r}: {err}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def _batches(
    data: TensorData | Dataset, batch_size: int, *, train: bool, generator: torch.Generator | None,
    device: torch.device, num_workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    assert generator is not None or not train, "training batches are drawn with the epoch's generator"
    rng = generator if train else None  # not None exactly when train
    if isinstance(data, TensorData):
        n = len(data)
        order = torch.randperm(n, generator=rng, device=rng.device) if rng is not None else None
        images, labels = data.images, data.labels
        for start in range(0, n, batch_size):
            if order is not None:
                idx = order[start:start + batch_size]
                x = images[idx.to(images.device)].to(device, non_blocking=True)
                y = labels[idx.to(labels.device)].to(device, non_blocking=True)
            else:
                x = images[start:start + batch_size].to(device, non_blocking=True)
                y = labels[start:start + batch_size].to(device, non_blocking=True)
            yield (augment(x, data.info, rng) if rng is not None else normalize(x, data.info)), y
    else:
        cpu_gen = (torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=rng, device=rng.device)))
                   if rng is not None else None)
        loader = DataLoader(data, batch_size=batch_size, shuffle=train, generator=cpu_gen, num_workers=num_workers,
                            pin_memory=device.type == "cuda", drop_last=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _num_batches(data: TensorData | Dataset, batch_size: int, cap: int | None) -> int:
    n = math.ceil(len(cast(Sized, data)) / batch_size)  # map-style data sets have a length (DataLoader needs it)
    return min(n, cap) if cap else n


def _prepare(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData | Dataset, batch_size: int, *, device: str | torch.device = "auto",
    amp: bool = True, max_batches: int | None = None, num_workers: int = 0,
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``data`` (no augmentation)."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for i, (x, y) in enumerate(_batches(data, batch_size, train=False, generator=None, device=device, num_workers=num_workers)):
        if max_batches is not None and i >= max_batches:
            break
        with _autocast(device, amp):
            out = model(_prepare(x, device))
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return float(loss_sum) / seen, int(correct) / seen


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from dpai_lib.store import atomic_write

    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def make_optimizer(model: nn.Module, config: TrainConfig,
                   batches_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and learning-rate schedule of ``config``. ``multistep`` is stepped once per epoch;
    ``warmup_cosine`` once per iteration: ``lr * s / warmup_steps`` for the first ``warmup_steps`` iterations,
    then ``lr * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 to 1 over the remaining iterations."""
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "multistep":
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.lr_drops,
                                                                gamma=config.lr_drop_factor)
    total, warmup = config.epochs * batches_per_epoch, config.warmup_steps
    if warmup >= total > 0:
        raise ValueError(f"warmup_steps ({warmup}) must be below the run's iterations (epochs x batches = {total})")

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: nn.Module,
    masks: Masks,
    train_data: TensorData | Dataset,
    test_data: TensorData | Dataset,
    config: TrainConfig,
    *,
    seed: int,
    device: str | torch.device = "auto",
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 0,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place with its pruned weights held at zero; evaluate after every epoch.

    ``seed`` fixes the data order and augmentation of every epoch. ``checkpoint_path``: where the
    per-epoch checkpoint lives; an existing one is resumed (it must come from the same config and
    masks). ``on_epoch_end(epoch, row)`` is called after each epoch's checkpoint is written.
    """
    device = resolve_device(device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        if isinstance(train_data, TensorData) and train_data.images.numel() <= GPU_RESIDENT_LIMIT:
            train_data, test_data = train_data.to(device), (
                test_data.to(device) if isinstance(test_data, TensorData) else test_data)
    n_train = _num_batches(train_data, config.batch_size, config.max_train_batches)
    optimizer, scheduler = make_optimizer(model, config, n_train)
    per_iteration = config.schedule == "warmup_cosine"
    enforcer = masks.enforce(model, optimizer)
    fingerprint = {"config": config.model_dump(mode="json"), "seed": seed, "kept": masks.layer_kept()}

    result = TrainResult("completed", None, 0, None, None, None)
    start_epoch = 0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {ckpt} belongs to another run (config, seed or masks differ); "
                             "delete it or use another checkpoint path")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        result = TrainResult(**state["result"])
        start_epoch = result.resumed_from_epoch = result.epochs_run
        enforcer()

    check_every = 1 if device.type == "cpu" else 25
    epochs = tqdm(range(start_epoch, config.epochs), desc="epochs", initial=start_epoch, total=config.epochs,
                  disable=not progress, unit="ep")
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        gen = _epoch_generator(seed, epoch, device if isinstance(train_data, TensorData) else torch.device("cpu"))
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen, lr = 0, optimizer.param_groups[0]["lr"]
        batches = _batches(train_data, config.batch_size, train=True, generator=gen, device=device, num_workers=num_workers)
        bar = tqdm(batches, total=n_train, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, unit="batch")
        for step, (x, y) in enumerate(bar):
            if step >= n_train:
                break
            with _autocast(device, config.amp):
                out = model(_prepare(x, device))
                loss = F.cross_entropy(out.float(), y)
            if step % check_every == 0 or step == n_train - 1:
                if not torch.isfinite(loss):
                    result.status = "diverged"
                    result.stop_reason = f"non-finite training loss ({float(loss.detach())}) at epoch {epoch + 1}, batch {step + 1}"
                    epochs.close()
                    bar.close()
                    enforcer.remove()
                    return result
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # the mask enforcer re-zeroes pruned weights in a step post-hook
            if per_iteration:
                scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
        if not per_iteration:
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's kernels are done before the clock is read
        train_seconds = time.perf_counter() - t0
        test_loss, test_acc = evaluate(model, test_data, config.test_batch_size, device=device, amp=config.amp,
                                       max_batches=config.max_test_batches, num_workers=num_workers)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / max(seen, 1),
               "train_acc": int(correct) / max(seen, 1), "test_loss": test_loss, "test_acc": test_acc,
               "seconds": time.perf_counter() - t0, "train_images_per_s": seen / train_seconds}
        result.curves.append(row)
        result.epochs_run = epoch + 1
        result.final_test_acc = test_acc
        result.train_seconds += train_seconds
        result.train_images += seen
        if result.best_test_acc is None or test_acc > result.best_test_acc:
            result.best_test_acc, result.best_epoch = test_acc, epoch + 1
        epochs.set_postfix(loss=f"{row['train_loss']:.3f}", test_acc=f"{test_acc:.3f}")
        if ckpt is not None:
            _save_checkpoint(ckpt, {
                "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "result": result.as_dict(),
            })
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    enforcer.remove()
    return result
