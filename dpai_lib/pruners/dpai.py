"""DPaI: differentiable pruning at initialisation with the node-path balance principle.

Xiang, Nguyen-Tri, Nguyen, Pham, Than, Tran-Thanh, Wen, ICLR 2025. Implemented as the official release
does it (``npb.py`` and ``main.py`` of ``QuanNguyen-Tri/DPaI``, commit 137c555; see ``book/sources.md``):

* one score per prunable weight, ``s ~ N(0, 1)`` (or ``init_scores``); the mask of layer ``l`` keeps
  the ``k_l`` largest ``|s|``, ``k_l`` from the ERK (or uniform) budget, recomputed at every step;
* the path count ``R_P`` is measured by forwarding an all-ones input of the data set's resolution
  through the network with the masks as weights, no biases, and norms / activations / dropout as
  identities (``path_count="release"``: every conv/linear divides its input by its maximum and the
  log-maxima are added back, exact for chains and approximate on residual networks; ``"exact"``: the
  exact log-space count of :class:`dpai_lib.metrics.PathCounter`, right on residual networks too);
* ``g = d log R_P / d s`` by the straight-through estimator (``dm/ds = sign(s)``); a weight is
  effective if ``|d log R_P / d m| * m > 0``; node (output channel) and kernel (out, in pair; a single
  weight for linear layers) indicators mark the effective ones;
* the score gradient ``-[(1-a) g + a((1-b) g (1-node_ok) + b g (1-kernel_ok))]`` feeds Adam at a
  constant learning rate for ``steps`` steps (the release creates a MultiStepLR but never steps it).

Transformers: every linear weight, attention input and output projections included, is scored and is
really used in the pruning forward (the masks replace ``in_proj_weight`` and ``out_proj.weight`` inside
``nn.MultiheadAttention``, whose inputs are max-normalised like a linear layer's); the release left the
attention with its real weights and its ``out_proj`` mask random. LayerNorm is an identity and
``pos_embedding`` is zero, as in the release; GELU is an identity too (the release kept GELU in its ViT
count; the pruning network of :mod:`dpai_lib.paths` removes every activation).

Beyond the release: ``init_scores``, ``path_count="exact"``, and exact-k selection that is identical to
a full sort of ``|s|`` whenever no two scores tie (it uses ``kthvalue``, O(n), instead of sorting every
layer at every step). Defaults are the release's run script (``experiments/run.sh``: alpha 0.99,
beta 0.5, lr 0.005, 3000 steps), its example for ResNet-20 / CIFAR-10.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.metrics import PathCounter
from dpai_lib.paths import ReleasePathCount
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._select import Budget, check_choice, topk_mask
from dpai_lib.sparsity import layer_kept_counts

PathCount = Literal["release", "exact"]
PATH_COUNTS = typing.get_args(PathCount)


class _TrackedTopK:
    """Top-k of one layer's ``|s|`` at every step, searching near the previous threshold.

    Scores move little per Adam step, so the k-th largest value stays close to where it was: count
    the entries above ``t + w`` and inside ``(t - w, t + w]``; if the k-th largest lies in that band,
    select inside the (small) band only; otherwise widen ``w`` and try again, or fall back to the full
    :func:`~dpai_lib.pruners._select.topk_mask`. Ties at the threshold (float32 ``randn`` repeats values,
    and Adam moves equal scores with equal gradients alike) keep the earliest indices, so the result is
    always the mask of a stable descending sort.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.threshold: float | None = None
        self.width = 1e-3

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        n, k = a.numel(), self.k
        if k >= n or k == 0 or self.threshold is None:
            return self._full(a)
        for _ in range(4):
            lo, hi = self.threshold - self.width, self.threshold + self.width
            mask = a > hi
            above = int(torch.count_nonzero(mask))
            if above <= k:
                idx = _true_indices((a > lo) ^ mask)  # the band (lo, hi], ascending flat indices
                if k < above + idx.numel():  # the boundary lies strictly inside the band
                    vals = a.reshape(-1)[idx]
                    t = vals.kthvalue(idx.numel() - (k - above)).values
                    take = vals > t
                    missing = k - above - int(torch.count_nonzero(take))
                    if missing > 0:  # ties at t: the earliest entries are kept, as a stable sort would
                        take[torch.nonzero(vals == t).flatten()[:missing]] = True
                    mask.view(-1)[idx[take]] = True
                    self.threshold = float(t)
                    return mask
            self.width *= 4
        return self._full(a)

    def _full(self, a: torch.Tensor) -> torch.Tensor:
        mask = topk_mask(a, self.k)
        if 0 < self.k < a.numel():
            self.threshold = float(a[~mask].max())
        return mask


def _true_indices(flags: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Ascending flat indices of the ``True`` entries of a contiguous bool tensor with few of them:
    ``nonzero`` on the blocks of ``block`` entries that hold one (a byte-wise max finds them), which is
    several times faster than ``nonzero`` on the whole tensor."""
    flat = flags.view(-1)
    nb = flat.numel() // block
    head = flat[: nb * block].view(nb, block)
    rows = torch.nonzero(head.view(torch.uint8).amax(1)).flatten()
    r, c = torch.nonzero(head[rows], as_tuple=True)
    tail = torch.nonzero(flat[nb * block:]).flatten()
    return torch.cat((rows[r] * block + c, tail + nb * block))


def _indicators(g_mask: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Node (output unit) and kernel indicators of the effective weights (``|g| * m > 0``), shaped to
    broadcast against the weight: ``(out, 1, ...)`` and ``(out, in, 1, ...)`` (linear: per weight)."""
    eff = (g_mask != 0) & mask
    if eff.dim() > 2:  # conv: (out, in, *kernel)
        kernel = eff.flatten(2).view(torch.uint8).amax(2).bool()  # any(2), several times faster
        node = kernel.any(1)
        return node.view(-1, *([1] * (eff.dim() - 1))), kernel.view(*kernel.shape, *([1] * (eff.dim() - 2)))
    return eff.any(1).view(-1, 1), eff


@register_pruner("dpai", needs_data=False, version=2)
def dpai_prune(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: tuple[int, ...],
    data=None,
    seed: int = 0,
    alpha: float = 0.99,
    beta: float = 0.5,
    lr: float = 0.005,
    steps: int = 3000,
    budget: Budget = "erk",
    path_count: PathCount = "release",
    init_scores: Mapping[str, torch.Tensor] | None = None,
    trace: bool = True,
    progress: bool = False,
) -> Masks:
    """DPaI masks; ``masks.meta["trace"]`` holds the per-step objective, log paths, nodes, kernels."""
    check_choice("path_count", path_count, PATH_COUNTS)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0; got steps={steps!r}, lr={lr!r}")
    params = prunable_parameters(model)
    device = next(iter(params.values())).device
    counts = layer_kept_counts({n: p.shape for n, p in params.items()}, sparsity, budget)
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for name, p in params.items():
        if init_scores is not None:
            if name not in init_scores or tuple(init_scores[name].shape) != tuple(p.shape):
                raise ValueError(f"init_scores must give a tensor of shape {tuple(p.shape)} for {name!r}")
            s = init_scores[name].detach().to(device=device, dtype=torch.float32).clone()
        else:
            s = torch.randn(p.shape, generator=gen).to(device)
        scores[name] = s.requires_grad_(True)
    counter = (PathCounter if path_count == "exact" else ReleasePathCount)(model, input_shape)
    optimizer = torch.optim.Adam(list(scores.values()), lr=lr, fused=True)
    selectors = {n: _TrackedTopK(counts[n]) for n in scores}
    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def evaluate(update: bool) -> None:
        with torch.no_grad():
            masks = {n: selectors[n](s.abs()) for n, s in scores.items()}
        # bool -> float through uint8: the same values, several times faster than a direct cast
        weights = {n: m.view(torch.uint8).to(torch.float32).requires_grad_(True) for n, m in masks.items()}
        log_paths = counter(weights)
        if not torch.isfinite(log_paths):
            raise RuntimeError(f"DPaI: the masks leave no input-output path (log paths = {float(log_paths)}) at "
                               f"step {len(rows)}; the sparsity is too high for this network")
        grads = torch.autograd.grad(log_paths, list(weights.values()), allow_unused=True)
        nodes = kernels = 0
        with torch.no_grad():
            for (name, s), g in zip(scores.items(), grads):
                g = torch.zeros_like(s) if g is None else g
                node_ok, kernel_ok = _indicators(g, masks[name])
                nodes += int(node_ok.sum())
                kernels += int(kernel_ok.sum())
                if update:
                    # -[(1-a) g + a((1-b) g (1-node) + b g (1-kernel))] with g = dlogR/dm * sign(s); the
                    # bracket is a per-kernel coefficient, so the full-size work is two multiplications
                    coef = (1 - alpha) + alpha * (1 - beta) * (~node_ok) + alpha * beta * (~kernel_ok)
                    s.grad = g.mul_(torch.sign(s)).mul_(-coef)
        lp = float(log_paths.detach())
        objective = (1 - alpha) * lp + alpha * ((1 - beta) * math.log(max(nodes, 1)) + beta * math.log(max(kernels, 1)))
        if trace:
            rows.append({"step": len(rows), "objective": objective, "log_paths": lp, "nodes": nodes,
                         "kernels": kernels, "seconds": time.perf_counter() - t0})
        if update:
            optimizer.step()

    evaluate(update=False)
    for _ in tqdm(range(steps), desc="dpai", disable=not progress, unit="step"):
        evaluate(update=True)
    evaluate(update=False)
    with torch.no_grad():
        final = {n: topk_mask(s.abs(), counts[n]).cpu() for n, s in scores.items()}
    meta = {"method": "dpai", "trace": rows, "seconds": time.perf_counter() - t0,
            # the optimisation steps alone (rows 1..steps), without the set-up and the two evaluations
            "seconds_per_step": ((rows[steps]["seconds"] - rows[0]["seconds"]) / steps) if (trace and steps) else None}
    return Masks(final, meta=meta)
