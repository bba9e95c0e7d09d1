"""NPB: Node-Path Balancing pruning at initialisation (Pham et al., NeurIPS 2023), data-free.

"Towards Data-Agnostic Pruning At Initialization: What Makes a Good Sparse Mask?" treats the network
as a graph whose nodes are channels (neurons) and whose edges are kernels (weights), and builds a mask
layer by layer, from the input to the output, that balances many *effective nodes* (channels with a
connection) against many *effective paths* (input-to-output chains of kept weights).

Algorithm (re-implemented from NPB's paper and its public code, github.com/pvh1602/NPB; none copied)
-------------------------------------------------------------------------------------------
1. **Budgets.** Every prunable layer ``l`` keeps exactly ``n_l`` weights:
   :func:`dpai_lib.sparsity.layer_kept_counts` with ``budget`` (``"erk"``, NPB's default, or
   ``"uniform"``), i.e. :func:`~dpai_lib.sparsity.kept_count` of the layer density.
2. **Path-counting network.** A float64 CPU copy of the model's pruning network
   (:func:`dpai_lib.paths.pruning_network`: norms, activations and dropout removed), every
   conv/linear bias is **0** and every prunable weight is **1** (a layer not yet decided is all-ones);
   the input is ``ones(1, *input_shape)``. Pooling modules are left as they are (average pooling is a
   constant factor for the path term; max pooling stays a max, as in NPB).
3. **Forward order and P_in.** Layers are processed in the order in which the forward pass calls them.
   A forward pre-hook on each prunable module reads the tensor that actually enters it and sums it over
   the batch and spatial positions: ``P_in[i]`` = number of (partial) paths from the input to input
   channel ``i`` under the masks already decided. The layer's MILP is solved *inside its pre-hook* and
   its weight is replaced by the mask before the module runs, so one forward pass decides every layer
   and each layer sees exactly the already-decided upstream masks (equivalent to re-running the
   forward after each decided layer; layers not yet decided lie downstream and do not influence the
   tensor entering the current one). No list-index bookkeeping is used, so max-pools, shortcuts and
   any other module in between are accounted for (NPB's VGG bookkeeping bug cannot occur).
4. **Layer MILP** (:func:`solve_layer`), integer ``M[i, j]`` in ``{0..kmax}`` = number of kept weights
   in the kernel from input channel ``i`` to output channel ``j``, ``sum(M) = n`` (NPB: ``<= n``;
   the objective never decreases when a weight is added, so the equality costs nothing and makes the
   kept count exact). Maximise ``alpha * A + (1 - alpha) * B + beta * Reg`` with

   * ``A = [C_in + C_out - sum_i pos(min_n - sum_j M_ij) - sum_j pos(min_n - sum_i M_ij)] / (C_in + C_out)``
     (``pos`` through non-negative auxiliary variables ``u_i >= min_n - sum_j M_ij``,
     ``v_j >= min_n - sum_i M_ij``),
   * ``B = sum_i P_in[i] sum_j M_ij / max_path``. ``variant="release"`` (:func:`release_max_path`):
     NPB's normaliser, ``row * sum(m largest P_in) + rest * (m+1)-th largest``, ``row = kmax * C_out``,
     ``m = n // row``; NPB slices the m largest as ``sort(P_in)[-m:]``, the whole array when ``m = 0``,
     so a layer whose budget fills no whole row divides by ``row * sum(P_in) + n * max(P_in)``: the
     path term then weighs less against the node term. ``variant="library"`` (:func:`max_path`): the
     largest value the sum can take (whole rows to the largest ``P_in`` first, then a part row);
   * ``Reg = (n - sum_ij pos(1 - M_ij)) / n`` through auxiliary kernel indicators ``e_ij <= M_ij``,
     ``e_ij <= 1`` (``sum pos(1 - M_ij) = C_in C_out - sum e_ij`` at the optimum).

   The auxiliaries are declared continuous: at every optimum they take the integer values above,
   because ``M`` is integer. The objective is multiplied by ``n`` for the solver (HiGHS' absolute gap
   tolerance would otherwise stop it early on such small numbers). Solved with
   :func:`scipy.optimize.milp` (HiGHS; presolve off - on these problems it removed nothing and took
   ~90% of the time) under ``time_limit_s`` and ``mip_rel_gap``; a solve that hits the
   time limit keeps HiGHS' best solution (a :class:`NPBTimeLimitWarning` names the layers); one that
   ends with no solution at all falls back to a deterministic greedy solution (also warned).
5. **Layer kinds.**

   * the first layer called (the stem conv): full kernels allowed (``kmax = k``), never chunked;
   * other convolutions: ``kmax = min(max_p, k)`` (``k`` = kernel positions, ``max_p=None`` -> ``k``),
     raised to ``ceil(n_chunk / (C_in * C_out_chunk))`` when the budget would not fit;
   * *shortcut* convolutions - a 1x1 convolution whose input tensor is the very tensor that an
     earlier prunable layer already received (a residual downsample branch): ``beta = shortcut_beta``
     (NPB solves them with the function default 0.001; ``alpha`` unchanged). After each shortcut,
     ``max_p`` is lowered by ``max_p_step`` while it is above 5 (NPB: 9 -> 7 -> 5 on ResNet-20);
   * linear layers: ``kmax = 1``, ``beta = 0``;
   * chunking: a conv (not the first) with ``C_out * C_in > chunk_threshold`` is split by output
     channels into ``ceil(C_out / chunk_size)`` near-equal chunks (each ``<= chunk_size``); a linear
     layer with ``f_out * f_in > linear_chunk_threshold`` likewise with ``linear_chunk_size``. Each
     chunk is its own MILP (all input channels, its output channels) and gets its share of ``n_l``
     (cumulative rounding, so the chunk budgets add up to ``n_l`` exactly). Every output channel is in
     a chunk (NPB leaves the trailing ``C_out mod chunk_size`` channels untouched).
6. **Kernel expansion.** ``M[i, j]`` positions of the kernel are chosen uniformly at random with a
   ``torch.Generator`` seeded with ``seed`` (one generator, layers in forward order): reproducible.
7. **fine_tune.** A kept weight is *ineffective* when the gradient of the summed output of the
   path-counting network (final masks as weights) with respect to it is 0: it lies on no
   input-to-output path.

   * ``variant="release"`` (NPB's ``fine_tune_mask``): convolutions in forward order (linear layers
     are left alone, as in NPB); a layer with more than one ineffective kept weight drops them and
     refills as many positions: the groups (kernels; for a shortcut, input columns) are visited by
     decreasing number of effective weights and filled whole, the last one only with the positions
     still needed, those with the largest path gradient (:func:`_fill_groups`). Differences from NPB:
     the last group is not filled whole (NPB overshoots the budget by up to a kernel), gradients are
     recomputed after each changed layer (NPB reuses the first backward for every later layer), and
     weights still ineffective after the refill are kept (NPB drops them and adds their number to the
     next layer's refill, so weights dropped at the last convolution are lost): kept counts stay exact.
   * ``variant="library"``: each ineffective weight is moved to a pruned position with the largest
     path gradient (= the number of paths that weight would add; ties by position), as long as
     positive-gradient positions remain; gradients recomputed after every changed layer. No weight
     that was effective becomes ineffective.

Defaults follow NPB's run script for ResNet-20 / CIFAR-10 (``--alpha 0.01 --beta 1 --max_p 9``, ERK,
``chunk_size`` 32, ``min_n`` 1) and its code (chunk threshold 64*32 for CIFAR ResNets, linear chunks of
10 above 5120 weights, shortcut beta 0.001, ``max_p`` step 2). For ResNet-18 / Tiny-ImageNet NPB used
``alpha=0.01, beta=2, chunk_size=16, max_p=6`` and the threshold 128*128 (``chunk_threshold=16384``).

Differences from NPB's release (pvh1602/NPB), on purpose
----------------------------------------------------------
* exact kept counts: ``sum(M) = n_l`` and the library's ERK rounding (NPB: ``<= ceil(d * numel)``);
* P_in from pre-hooks on the modules themselves (NPB indexes a list of hooked tensors, which is off
  by one or more entries for conv1/3/7/11 of VGG-19);
* biases are 0 in the path-counting copy (NPB sets them to 1, so its P_in is not a pure path count);
* every output channel is solved (remainder chunk) and each chunk's budget adds up to ``n_l``;
* shortcuts are found by structure, not by the substring ``"shortcut"`` in the name; NPB's VGG
  ``max_p`` decrements are reproduced by ``max_p_drop_layers`` (set in params/ for VGG-19), not by
  the model's class name;
* reproducible kernel positions (seeded ``torch.Generator``; NPB's numpy RNG is never seeded);
* HiGHS via :func:`scipy.optimize.milp` with a time limit and gap (NPB: cvxpy's default solver); the
  report (``masks.meta["report"]``, kept in run records) says whether any chunk hit the time limit;
* ``fine_tune`` keeps kept counts exact (see 7);
* not implemented: NPB's ``--is_scale_weight`` (positions by weight magnitude),
  ``--is_node_constraint`` and the ERK+ / uniform-with-dense-ends / score-derived budgets (use
  ``budget="uniform"`` or ``"erk"``).

Variants
--------
``variant="release"`` (default, pruner version 2) follows NPB's code in the path normaliser, the
``min_n`` capping (first layer, shortcuts and linear layers get ``min_n = 1``; other convolutions
``min(min_n, ceil(n_chunk / kernels))``) and the fine-tune rule. ``variant="library"`` is this
library's version-1 design: the attainable maximum as normaliser, ``min_n`` for every layer, and the
path-gain fine-tune.

Supported layers: ``nn.Conv1d/2d/3d`` with ``groups=1`` and ``nn.Linear``, each called once per forward.
Anything else among :func:`~dpai_lib.masks.prunable_parameters` (grouped/depthwise or transposed
convolutions, attention projections) is rejected with a ``ValueError``; so is a shared layer.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.paths import pruning_network
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._select import Budget, check_choice
from dpai_lib.sparsity import LAYERWISE_BUDGETS, layer_kept_counts

logger = logging.getLogger(__name__)

MAX_P_FLOOR = 5  # NPB lowers max_p after a shortcut only while it is above this value
VARIANTS = ("release", "library")  # NPB's release behaviour, or this library's earlier re-design
Variant = Literal["release", "library"]


class NPBTimeLimitWarning(RuntimeWarning):
    """A layer MILP stopped at ``time_limit_s`` (or found no solution and used the greedy fallback)."""


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_Layer: TypeAlias = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  # the layers NPB handles


# ---------------------------------------------------------------------------------------------------
# The layer MILP
# ---------------------------------------------------------------------------------------------------
def max_path(p_in: np.ndarray, c_out: int, n: int, kmax: int) -> float:
    """The library's path normaliser: the largest ``sum_i P_in[i] * sum_j M_ij`` with ``0 <= M <= kmax`` and
    ``sum M <= n``, i.e. whole rows (``kmax * c_out`` weights each) for the largest ``P_in`` first, then a
    fractional row."""
    p = np.sort(np.asarray(p_in, dtype=np.float64))[::-1]
    row = kmax * c_out
    full, rest = divmod(int(n), row)
    total = float(p[:full].sum())
    if rest and full < p.size:
        total += float(p[full]) * rest / row
    return total * row


def release_max_path(p_in: np.ndarray, c_out: int, n: int, kmax: int) -> float:
    """NPB's path normaliser (``optimize_layerwise``): with ``row = c_out * kmax``, ``m = n // row`` and
    ``rest = n - m * row``, ``row * (sum of the m largest P_in) + rest * (the (m+1)-th largest P_in)``; the
    second term is left out when there is no (m+1)-th value. NPB takes the m largest as the slice
    ``sort(P_in)[-m:]``, which for ``m == 0`` is the *whole* array: a layer whose budget fills no whole row
    is normalised by ``row * sum(P_in) + n * max(P_in)``, up to ``C_in`` times the attainable maximum."""
    p = np.sort(np.asarray(p_in, dtype=np.float64))
    row = kmax * c_out
    m = int(n) // row
    rest = int(n) - m * row
    top = p[max(p.size - m, 0):] if m > 0 else p  # the m largest; all of them when m == 0 (NPB's [-0:])
    total = float(top.sum()) * row
    if m < p.size:
        total += rest * float(p[p.size - 1 - m])
    return total


def path_normaliser(p_in: np.ndarray, c_out: int, n: int, kmax: int, variant: str = "release") -> float:
    """The divisor of the path term: :func:`release_max_path` or (``variant="library"``) :func:`max_path`."""
    return (release_max_path if variant == "release" else max_path)(p_in, c_out, n, kmax)


def layer_objective(M: np.ndarray, p_in: np.ndarray, n: int, *, kmax: int, alpha: float, beta: float,
                    min_n: int = 1, variant: str = "release") -> float:
    """NPB's layer objective ``alpha*A + (1-alpha)*B + beta*Reg`` of an integer ``M`` (C_in x C_out), with the
    path normaliser of ``variant``."""
    M = np.asarray(M)
    p = np.asarray(p_in, dtype=np.float64)
    c_in, c_out = M.shape
    rows, cols = M.sum(1), M.sum(0)
    node = (c_in + c_out - np.maximum(0, min_n - rows).sum() - np.maximum(0, min_n - cols).sum()) / (c_in + c_out)
    mp = path_normaliser(p, c_out, n, kmax, variant)
    path = float(p @ rows) / mp if mp > 0 else 0.0
    reg = (n - int((M == 0).sum())) / n if n > 0 else 0.0
    return float(alpha * node + (1 - alpha) * path + beta * reg)


def _greedy(p: np.ndarray, c_out: int, n: int, kmax: int) -> np.ndarray:
    """A feasible, deterministic fallback: one weight per kernel, rows by decreasing P_in, then fill
    the rows of the largest P_in up to kmax."""
    c_in = p.size
    order = np.argsort(-p, kind="stable")
    M = np.zeros((c_in, c_out), dtype=np.int64)
    flat = M[order].reshape(-1)  # rows in P_in order
    first = min(n, flat.size)
    flat[:first] = 1
    left = n - first
    if left:
        extra = np.minimum(kmax - 1, np.maximum(0, left - np.arange(flat.size) * (kmax - 1)))
        flat += extra.astype(np.int64)
    M[order] = flat.reshape(c_in, c_out)
    return M


@dataclass
class LayerSolve:
    """The result of one layer (or chunk) MILP."""

    M: np.ndarray  # (C_in, C_out) kept weights per kernel
    status: str  # "optimal", "time_limit", "fallback", "trivial"
    objective: float
    seconds: float
    mip_gap: float | None = None
    message: str = ""


def solve_layer(p_in: Sequence[float] | np.ndarray, c_out: int, n: int, *, kmax: int, alpha: float, beta: float,
                min_n: int = 1, time_limit_s: float | None = None, mip_rel_gap: float | None = None,
                variant: str = "release") -> LayerSolve:
    """Solve NPB's layer integer program for ``C_in = len(p_in)`` inputs and ``c_out`` outputs.

    Returns the integer kernel counts ``M`` (``C_in x C_out``, entries in ``0..kmax``, summing to
    exactly ``n``) and the solver status. ``n`` must not exceed ``kmax * C_in * c_out``. ``variant``
    chooses the path normaliser (:func:`path_normaliser`).
    """
    check_choice("variant", variant, VARIANTS)
    t0 = time.perf_counter()
    p = np.asarray(p_in, dtype=np.float64).reshape(-1)
    c_in = p.size
    nk = c_in * c_out
    n = int(n)
    if not 0 <= n <= kmax * nk:
        raise ValueError(f"cannot keep {n} weights in {c_in}x{c_out} kernels of at most {kmax}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("P_in must be finite and non-negative")

    def done(M: np.ndarray, status: str, gap: float | None = None, message: str = "") -> LayerSolve:
        obj = layer_objective(M, p, n, kmax=kmax, alpha=alpha, beta=beta, min_n=min_n, variant=variant)
        return LayerSolve(M, status, obj, time.perf_counter() - t0, gap, message)

    if n == 0 or n == kmax * nk:
        return done(np.full((c_in, c_out), kmax if n else 0, dtype=np.int64), "trivial")

    scale = float(n)  # objective in units of 1/n: keeps HiGHS' absolute tolerances meaningful
    use_node, use_reg = alpha > 0, beta > 0
    n_e = nk if use_reg else 0
    n_uv = c_in + c_out if use_node else 0
    nv = nk + n_e + n_uv
    c = np.zeros(nv)
    mp = path_normaliser(p, c_out, n, kmax, variant)
    if mp > 0 and alpha < 1:
        c[:nk] = -(1 - alpha) * scale * np.repeat(p / mp, c_out)
    blocks = []
    lbs: list[npt.ArrayLike] = []
    ubs: list[npt.ArrayLike] = []
    # sum(M) = n
    blocks.append(sp.hstack([sp.csr_matrix(np.ones((1, nk))), sp.csr_matrix((1, n_e + n_uv))]))
    lbs.append([n])
    ubs.append([n])
    if use_reg:
        c[nk:2 * nk] = -beta * scale / n
        eye = sp.identity(nk, format="csr")
        blocks.append(sp.hstack([-eye, eye, sp.csr_matrix((nk, n_uv))]))  # e_ij - M_ij <= 0
        lbs.append(np.full(nk, -np.inf))
        ubs.append(np.zeros(nk))
    if use_node:
        c[nk + n_e:] = alpha * scale / (c_in + c_out)
        row_sum = sp.kron(sp.identity(c_in), np.ones((1, c_out)), format="csr")
        col_sum = sp.kron(np.ones((1, c_in)), sp.identity(c_out), format="csr")
        blocks.append(sp.hstack([row_sum, sp.csr_matrix((c_in, n_e)), sp.identity(c_in),
                                 sp.csr_matrix((c_in, c_out))]))  # u_i + sum_j M_ij >= min_n
        blocks.append(sp.hstack([col_sum, sp.csr_matrix((c_out, n_e)), sp.csr_matrix((c_out, c_in)),
                                 sp.identity(c_out)]))  # v_j + sum_i M_ij >= min_n
        lbs.append(np.full(c_in + c_out, float(min_n)))
        ubs.append(np.full(c_in + c_out, np.inf))
    A = sp.vstack(blocks, format="csr")
    lower = np.zeros(nv)
    upper = np.concatenate([np.full(nk, float(kmax)), np.ones(n_e), np.full(n_uv, float(min_n))])
    integrality = np.concatenate([np.ones(nk), np.zeros(n_e + n_uv)])
    options: dict[str, Any] = {"disp": False, "presolve": False}
    if time_limit_s is not None:
        options["time_limit"] = float(time_limit_s)
    if mip_rel_gap is not None:
        options["mip_rel_gap"] = float(mip_rel_gap)
    res = milp(c, integrality=integrality, bounds=Bounds(lower, upper),
               constraints=LinearConstraint(A, np.concatenate(lbs), np.concatenate(ubs)), options=options)
    gap = getattr(res, "mip_gap", None)
    if res.x is not None:
        M = np.rint(res.x[:nk]).astype(np.int64).reshape(c_in, c_out)
        if int(M.sum()) == n and M.min() >= 0 and M.max() <= kmax:
            return done(M, "optimal" if res.status == 0 else "time_limit", gap, res.message)
    return done(_greedy(p, c_out, n, kmax), "fallback", gap, res.message)


# ---------------------------------------------------------------------------------------------------
# Whole-network pruning
# ---------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """What NPB did for one prunable layer (in forward order)."""

    name: str
    kind: str  # "first", "conv", "shortcut" or "linear"
    shape: tuple[int, ...]
    kept: int  # n_l, the exact number of weights kept
    alpha: float
    beta: float
    kmax: list[int]  # per chunk
    chunks: list[tuple[int, int]]  # output-channel ranges [start, stop)
    p_in: np.ndarray  # path mass per input channel / feature
    M: np.ndarray  # (C_in, C_out) kernel counts chosen by the MILP (before fine_tune)
    status: list[str]  # per chunk
    objective: list[float]  # per chunk
    seconds: float
    min_n: list[int] = field(default_factory=list)  # per chunk, as given to the MILP
    moved: int = 0  # weights moved by fine_tune
    ineffective_after: int = 0  # kept weights still on no path after fine_tune

    @property
    def hit_time_limit(self) -> bool:
        return any(s in ("time_limit", "fallback") for s in self.status)


@dataclass
class NPBReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    variant: str = "release"
    time_limit_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (plain ints, floats, strings and lists; no arrays): ``variant``,
        ``time_limit_hit`` (a chunk stopped at ``time_limit_s`` or fell back to the greedy solution),
        ``time_limit_layers``, ``status_counts`` (all chunks), ``seconds`` and one entry per layer."""
        totals: dict[str, int] = {}
        for r in self.layers:
            for st in r.status:
                totals[st] = totals.get(st, 0) + 1
        slow = [r.name for r in self.layers if r.hit_time_limit]
        return {
            "variant": self.variant,
            "time_limit_s": self.time_limit_s,
            "time_limit_hit": bool(slow),
            "time_limit_layers": slow,
            "status_counts": dict(sorted(totals.items())),
            "seconds": float(self.seconds),
            "layers": [
                {"name": r.name, "kind": r.kind, "kept": int(r.kept), "alpha": float(r.alpha), "beta": float(r.beta),
                 "kmax": [int(k) for k in r.kmax], "min_n": [int(k) for k in r.min_n], "chunks": len(r.chunks),
                 "status": list(r.status), "status_counts": {st: r.status.count(st) for st in sorted(set(r.status))},
                 "seconds": float(r.seconds), "moved": int(r.moved), "ineffective_after": int(r.ineffective_after)}
                for r in self.layers
            ],
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _check(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"npb: {name} must be {what}; got {value!r}")


def _forward_with_pre_hook(net: nn.Module, modules, hook, x: torch.Tensor) -> None:
    """One no-grad forward of ``net`` with ``hook`` as a forward pre-hook on each of ``modules``."""
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()


def _path_counting_copy(model: nn.Module) -> nn.Module:
    """float64 CPU :func:`~dpai_lib.paths.pruning_network` (norms, activations - modules and functions -
    and dropout removed), biases 0, prunable weights 1."""
    net = pruning_network(model).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (*_CONV_TYPES, nn.Linear)):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _supported_layers(net: nn.Module) -> dict[str, _Layer]:
    """name of the prunable weight -> its module; raises for layer types NPB cannot handle."""
    owners: dict[int, nn.Module] = {}
    for module in net.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), module)
    layers: dict[str, _Layer] = {}
    for name, p in prunable_parameters(net).items():
        owner = owners.get(id(p))
        if isinstance(owner, nn.Linear) or (isinstance(owner, _CONV_TYPES) and owner.groups == 1):
            layers[name] = owner
        else:
            what = type(owner).__name__ if owner is not None else "a raw parameter"
            extra = f" with groups={owner.groups}" if isinstance(owner, _CONV_TYPES) else ""
            raise ValueError(
                f"npb: prunable parameter {name!r} belongs to {what}{extra}; NPB handles nn.Conv1d/2d/3d "
                "with groups=1 and nn.Linear only"
            )
    return layers


def _input_mass(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Sum of the tensor entering ``module`` over batch and positions: one value per input channel."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).sum(0).numpy()
    return x.sum(dim=[d for d in range(x.dim()) if d != 1]).numpy()


def _chunks(c_out: int, size: int | None) -> list[tuple[int, int]]:
    """Output-channel ranges: ``ceil(c_out / size)`` near-equal parts, each at most ``size``."""
    if size is None or c_out <= size:
        return [(0, c_out)]
    parts = -(-c_out // size)
    edges = [c_out * k // parts for k in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _expand(M: np.ndarray, kernel: int, gen: torch.Generator) -> torch.Tensor:
    """Bool mask (C_out, C_in, kernel): M[i, j] random positions of kernel (j, i)."""
    counts = torch.from_numpy(np.ascontiguousarray(M.T))  # (C_out, C_in)
    if kernel == 1:
        return (counts > 0).unsqueeze(-1)
    scores = torch.rand((*counts.shape, kernel), generator=gen, dtype=torch.float64)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)
    return ranks < counts.unsqueeze(-1)


def _forward_order(net: nn.Module, layers: dict[str, _Layer], x: torch.Tensor) -> tuple[list[str], set[str]]:
    """Prunable layers in the order the forward calls them, and the shortcut convolutions."""
    by_module = {id(m): n for n, m in layers.items()}
    order: list[str] = []
    calls: dict[str, int] = {}
    seen_inputs: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold the inputs so that their ids stay unique
    shortcuts: set[str] = set()

    def hook(module: nn.Module, args: tuple) -> None:
        name = by_module[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:
            return
        order.append(name)
        inp = args[0]
        if (isinstance(module, _CONV_TYPES) and math.prod(module.kernel_size) == 1 and id(inp) in seen_inputs):
            shortcuts.add(name)
        seen_inputs.setdefault(id(inp), name)
        keep.append(inp)

    _forward_with_pre_hook(net, layers.values(), hook, x)
    shared = sorted(n for n, c in calls.items() if c > 1)
    if shared:
        raise ValueError(f"npb: layers called more than once per forward are not supported: {shared}")
    missing = [n for n in layers if n not in calls]
    if missing:
        raise ValueError(f"npb: the forward pass never calls the module of {missing}; NPB needs every prunable "
                         "layer on the input-to-output graph (called as a module)")
    return order, shortcuts


def _path_gradients(net: nn.Module, weights: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the summed output of the path-counting network w.r.t. each of ``weights`` (a pruned
    position's gradient = the paths that weight would add; a kept weight's = the paths through it)."""
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = list(torch.autograd.grad(net(x).sum(), weights))
    finally:
        for w in weights:
            w.requires_grad_(False)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise ValueError("npb: path counts overflow float64 in fine_tune")
    return grads


def _fine_tune(net: nn.Module, layers: dict[str, _Layer], order: list[str], x: torch.Tensor,
               reports: dict[str, LayerReport]) -> None:
    """variant "library": move kept weights that lie on no input-to-output path to the pruned positions
    that add the most paths (gradient of the summed output), layer by layer in forward order."""
    weights = [layers[n].weight for n in order]
    grads: list[torch.Tensor] | None = None
    for idx, name in enumerate(order):
        if grads is None:
            grads = _path_gradients(net, weights, x)
        w, g = weights[idx].detach(), grads[idx]
        kept = w.reshape(-1) > 0
        gflat = g.reshape(-1)
        ineffective = torch.nonzero(kept & (gflat == 0)).reshape(-1)
        moved = 0
        if ineffective.numel():
            cand_score = torch.where(~kept & (gflat > 0), gflat, torch.zeros_like(gflat))
            n_cand = int((cand_score > 0).sum())
            moved = min(int(ineffective.numel()), n_cand)
            if moved:
                best = torch.sort(cand_score, descending=True, stable=True).indices[:moved]
                new = kept.clone()
                new[ineffective[:moved]] = False
                new[best] = True
                with torch.no_grad():
                    weights[idx].copy_(new.reshape(w.shape).to(w.dtype))
                grads = None  # recompute after a change
        reports[name].moved = moved
        reports[name].ineffective_after = int(ineffective.numel()) - moved


def _fill_groups(eff: torch.Tensor, grad: torch.Tensor, n_add: int) -> torch.Tensor:
    """NPB's filling rule on ``eff`` (groups x positions, bool): visit the groups by decreasing number of
    effective weights (ties: lower index first) and set their free positions until ``n_add`` were set;
    the last group visited gets only the positions still needed, those of largest ``grad`` (ties: lower
    position first)."""
    new = eff.clone()
    visit = torch.sort(eff.sum(1), descending=True, stable=True).indices
    free = (~eff).sum(1)[visit]
    ahead = torch.cumsum(free, 0) - free  # free positions in the groups visited before
    new[visit[ahead + free <= n_add]] = True
    partial = torch.nonzero((ahead < n_add) & (ahead + free > n_add)).reshape(-1)
    if partial.numel():
        k = int(partial[0])
        g = int(visit[k])
        score = torch.where(eff[g], torch.full_like(grad[g], -1.0), grad[g])
        new[g, torch.sort(score, descending=True, stable=True).indices[: n_add - int(ahead[k])]] = True
    return new


def _group(t: torch.Tensor, columns: bool) -> torch.Tensor:
    """A conv weight-shaped tensor as NPB's fine-tune groups: kernels (``C_out*C_in x kernel``) or, for a
    shortcut, input columns (``C_in x C_out*kernel``)."""
    c_out, c_in = t.shape[:2]
    if columns:
        return t.reshape(c_out, c_in, -1).transpose(0, 1).reshape(c_in, -1)
    return t.reshape(c_out * c_in, -1)


def _ungroup(t: torch.Tensor, shape: torch.Size, columns: bool) -> torch.Tensor:
    """The inverse of :func:`_group` for a weight of ``shape``."""
    if columns:
        return t.reshape(shape[1], shape[0], -1).transpose(0, 1).reshape(shape)
    return t.reshape(shape)


def _fine_tune_release(net: nn.Module, layers: dict[str, _Layer], order: list[str], shortcuts: set[str],
                       x: torch.Tensor, reports: dict[str, LayerReport]) -> None:
    """variant "release" (NPB's ``fine_tune_mask`` with exact counts): convolutions in forward order; a
    layer with more than one ineffective kept weight drops them and refills as many positions by
    :func:`_fill_groups`, the groups being the kernels (shortcuts: the input columns). Gradients are
    recomputed after each changed layer; linear layers are left as they are."""
    weights = [layers[n].weight for n in order]
    grads: list[torch.Tensor] | None = None
    for idx, name in enumerate(order):
        if not isinstance(layers[name], _CONV_TYPES):
            continue
        if grads is None:
            grads = _path_gradients(net, weights, x)
        w, g = weights[idx].detach(), grads[idx]
        kept = w > 0
        eff = kept & (g != 0)
        n_ineff = int(kept.sum()) - int(eff.sum())
        if n_ineff <= 1:  # NPB: `if n_ineff > 1`
            continue
        columns = name in shortcuts
        new = _ungroup(_fill_groups(_group(eff, columns), _group(g, columns), n_ineff), w.shape, columns)
        reports[name].moved = int((new & ~kept).sum())
        if reports[name].moved:
            with torch.no_grad():
                weights[idx].copy_(new.to(w.dtype))
            grads = None  # recompute after a change
    grads = _path_gradients(net, weights, x)
    for name, w, g in zip(order, weights, grads):
        reports[name].ineffective_after = int(((w > 0) & (g == 0)).sum())


def npb_masks_and_report(
    model: nn.Module, sparsity: float, *, input_shape: tuple[int, ...], seed: int = 0, variant: str = "release",
    alpha: float = 0.01, beta: float = 1.0, max_p: int | None = 9, max_p_drop_layers: Sequence[int] | None = None,
    min_n: int = 1, budget: str = "erk", chunk_size: int = 32, chunk_threshold: int = 64 * 32,
    linear_chunk_size: int = 10, linear_chunk_threshold: int = 5120, shortcut_beta: float = 0.001,
    max_p_step: int = 2, fine_tune: bool = True, time_limit_s: float | None = 60.0, mip_rel_gap: float = 1e-4,
) -> tuple[Masks, NPBReport]:
    """NPB masks for ``model`` plus a per-layer :class:`NPBReport`; the arguments are those of
    :func:`npb_prune`. ``model`` is not modified."""
    t_start = time.perf_counter()
    check_choice("variant", variant, VARIANTS)
    _check(_is_real(alpha) and 0 <= alpha <= 1, "alpha", alpha, "a number in [0, 1]")
    _check(_is_real(beta) and beta >= 0, "beta", beta, "a finite number >= 0")
    _check(_is_real(shortcut_beta) and shortcut_beta >= 0, "shortcut_beta", shortcut_beta, "a finite number >= 0")
    _check(max_p is None or (_is_int(max_p) and max_p >= 1), "max_p", max_p, "None or an integer >= 1")
    _check(max_p_drop_layers is None or (isinstance(max_p_drop_layers, (tuple, list)) and all(
        _is_int(i) and i >= 0 for i in max_p_drop_layers)), "max_p_drop_layers", max_p_drop_layers,
        "None or a list of forward-order layer indices >= 0, e.g. [3, 7, 11]")
    drops = sorted(set(max_p_drop_layers or ()))
    _check(not drops or max_p is not None, "max_p_drop_layers", max_p_drop_layers,
           "None (or empty) when max_p is None: there is no max_p to lower")
    _check(_is_int(min_n) and min_n >= 1, "min_n", min_n, "an integer >= 1")
    for nm, v in (("chunk_size", chunk_size), ("linear_chunk_size", linear_chunk_size)):
        _check(_is_int(v) and v >= 1, nm, v, "an integer >= 1")
    for nm, v in (("chunk_threshold", chunk_threshold), ("linear_chunk_threshold", linear_chunk_threshold),
                  ("max_p_step", max_p_step), ("seed", seed)):
        _check(_is_int(v) and v >= 0, nm, v, "an integer >= 0")
    _check(isinstance(fine_tune, bool), "fine_tune", fine_tune, "True or False")
    _check(time_limit_s is None or (_is_real(time_limit_s) and time_limit_s > 0), "time_limit_s", time_limit_s,
           "None or a number of seconds > 0")
    _check(_is_real(mip_rel_gap) and 0 <= mip_rel_gap < 1, "mip_rel_gap", mip_rel_gap, "a number in [0, 1)")
    check_choice("budget", budget, tuple(LAYERWISE_BUDGETS))
    _check(isinstance(input_shape, (tuple, list)) and len(input_shape) > 0
           and all(_is_int(d) and d >= 1 for d in input_shape), "input_shape", input_shape,
           "one input's shape, e.g. (3, 32, 32)")
    release = variant == "release"

    net = _path_counting_copy(model)
    layers = _supported_layers(net)
    counts = layer_kept_counts({n: m.weight.shape for n, m in layers.items()}, sparsity, budget)
    x = torch.ones((1, *input_shape), dtype=torch.float64)
    order, shortcuts = _forward_order(net, layers, x)
    _check(not drops or drops[-1] < len(order), "max_p_drop_layers", max_p_drop_layers,
           f"indices below the number of prunable layers ({len(order)})")
    by_module = {id(m): n for n, m in layers.items()}
    gen = torch.Generator().manual_seed(int(seed))
    reports: dict[str, LayerReport] = {}
    state: dict[str, int | None] = {"max_p": max_p}

    def decide(module: nn.Module, args: tuple) -> None:
        name = by_module[id(module)]
        if name in reports:
            return
        t0 = time.perf_counter()
        if len(reports) in drops:  # NPB's VGG schedule: lowered from this layer on, with no floor
            current = state["max_p"]
            assert current is not None  # max_p_drop_layers with max_p None is rejected above
            state["max_p"] = max(1, current - max_p_step)
        p_in = _input_mass(module, args[0])
        if not np.all(np.isfinite(p_in)):
            raise ValueError(f"npb: path counts overflow float64 at {name!r}")
        w = layers[name].weight  # layers[name] is module
        c_out, c_in = w.shape[0], w.shape[1]
        kernel = math.prod(w.shape[2:])
        n = counts[name]
        if isinstance(module, nn.Linear):
            kind, kmax, beta_l = "linear", 1, 0.0
            size = linear_chunk_size if c_out * c_in > linear_chunk_threshold else None
        elif not reports:
            kind, kmax, beta_l, size = "first", kernel, float(beta), None
        elif name in shortcuts:
            kind, kmax, beta_l = "shortcut", kernel, float(shortcut_beta)
            size = chunk_size if c_out * c_in > chunk_threshold else None
        else:
            kind, beta_l = "conv", float(beta)
            kmax = kernel if state["max_p"] is None else min(state["max_p"], kernel)
            size = chunk_size if c_out * c_in > chunk_threshold else None
        ranges = _chunks(c_out, size)
        M = np.zeros((c_in, c_out), dtype=np.int64)
        kmaxes, min_ns, statuses, objectives = [], [], [], []
        for a, b in ranges:
            n_c = n * b // c_out - n * a // c_out  # cumulative rounding: the chunk budgets add up to n
            k_c = min(kernel, max(kmax, -(-n_c // (c_in * (b - a)))))
            if not release:
                min_n_c = int(min_n)
            elif kind == "conv":  # NPB caps min_n at the smallest average kernel fill, ceil(n / kernels)
                min_n_c = min(int(min_n), -(-n_c // (c_in * (b - a))))
            else:  # NPB gives min_n to the non-first, non-shortcut convolutions only
                min_n_c = 1
            sol = solve_layer(p_in, b - a, n_c, kmax=k_c, alpha=float(alpha), beta=beta_l, min_n=min_n_c,
                              time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap, variant=variant)
            M[:, a:b] = sol.M
            kmaxes.append(k_c)
            min_ns.append(min_n_c)
            statuses.append(sol.status)
            objectives.append(sol.objective)
        mask = _expand(M, kernel, gen).reshape(w.shape)
        with torch.no_grad():
            w.copy_(mask.to(w.dtype))
        reports[name] = LayerReport(name, kind, tuple(w.shape), n, float(alpha), beta_l, kmaxes, ranges, p_in, M,
                                    statuses, objectives, time.perf_counter() - t0, min_n=min_ns)
        logger.debug("npb %s (%s, n=%d, %d chunk(s), kmax=%s): %s in %.2fs", name, kind, n, len(ranges), kmaxes,
                     statuses, time.perf_counter() - t0)
        if kind == "shortcut" and state["max_p"] is not None and state["max_p"] > MAX_P_FLOOR:
            state["max_p"] -= max_p_step

    _forward_with_pre_hook(net, layers.values(), decide, x)
    if fine_tune and release:
        _fine_tune_release(net, layers, order, shortcuts, x, reports)
    elif fine_tune:
        _fine_tune(net, layers, order, x, reports)

    report = NPBReport([reports[n] for n in order], time.perf_counter() - t_start, variant,
                       None if time_limit_s is None else float(time_limit_s))
    slow = [r for r in report.layers if r.hit_time_limit]
    if slow:
        warnings.warn(
            "npb: the MILP of " + ", ".join(f"{r.name} ({r.status.count('time_limit')} time limit, "
                                             f"{r.status.count('fallback')} greedy fallback)" for r in slow)
            + f" stopped at time_limit_s={time_limit_s}; the masks use the best solution found, so they depend on "
            "the machine's speed (raise time_limit_s or mip_rel_gap for reproducible masks)",
            NPBTimeLimitWarning, stacklevel=3,
        )
    logger.info("npb (%s): %d layers in %.1fs", variant, len(order), report.seconds)
    masks = Masks({name: (layers[name].weight.detach() > 0) for name in prunable_parameters(net)},
                  meta={"report": report.as_dict()})
    return masks, report


@register_pruner("npb", needs_data=False, version=2)
def npb_prune(
    model: nn.Module, sparsity: float, *, input_shape: tuple[int, ...], data=None, seed: int = 0,
    variant: Variant = "release", alpha: float = 0.01, beta: float = 1.0, max_p: int | None = 9,
    max_p_drop_layers: Sequence[int] | None = None, min_n: int = 1, budget: Budget = "erk",
    chunk_size: int = 32, chunk_threshold: int = 64 * 32, linear_chunk_size: int = 10,
    linear_chunk_threshold: int = 5120, shortcut_beta: float = 0.001, max_p_step: int = 2, fine_tune: bool = True,
    time_limit_s: float | None = 60.0, mip_rel_gap: float = 1e-4,
) -> Masks:
    """NPB masks (see the module docstring for the algorithm and every deviation from NPB's code).

    Hyper-parameters (defaults = NPB's ResNet-20/CIFAR-10 run script where it sets them):

    * ``variant`` (``"release"``): ``"release"`` follows NPB's code where this library used to differ
      (path normaliser, ``min_n`` capping, the kernel-filling ``fine_tune``); ``"library"`` is this
      library's earlier design (see the module docstring, "Variants").
    * ``alpha`` (0.01): weight of the node term; ``1 - alpha`` weighs the path term.
    * ``beta`` (1.0): weight of the kernel regulariser (conv layers other than shortcuts).
    * ``max_p`` (9): most kept weights per kernel for convs after the first (``None`` = whole kernel).
    * ``max_p_drop_layers`` (None): forward-order indices of prunable layers before which ``max_p`` is
      lowered by ``max_p_step`` (no floor), NPB's VGG schedule; VGG-19 as released: ``[3, 7, 11]``.
    * ``min_n`` (1): connections a node needs to count as covered in the node term (``"release"``: given
      to convolutions other than the first and the shortcuts, capped at ``ceil(n_chunk / kernels)``).
    * ``budget`` (``"erk"``): layer-wise kept counts, ``"erk"`` or ``"uniform"``.
    * ``chunk_size`` (32) / ``chunk_threshold`` (2048 = 64*32, NPB's CIFAR-ResNet value; NPB uses
      128*128 elsewhere): convs with ``C_out * C_in > chunk_threshold`` are solved in chunks of at most
      ``chunk_size`` output channels.
    * ``linear_chunk_size`` (10) / ``linear_chunk_threshold`` (5120): the same for linear layers.
    * ``shortcut_beta`` (0.001): ``beta`` of 1x1 shortcut convolutions.
    * ``max_p_step`` (2): ``max_p`` is lowered by this after each shortcut while above 5 (0 = never).
    * ``fine_tune`` (True): move ineffective kept weights onto paths afterwards (NPB always does).
    * ``time_limit_s`` (60): wall-clock limit of each MILP (one per chunk); ``None`` = no limit.
      Hitting it raises a :class:`NPBTimeLimitWarning` (the masks then depend on the machine).
    * ``mip_rel_gap`` (1e-4, HiGHS' default): relative optimality gap at which a MILP stops.

    HiGHS runs without presolve (it removed nothing on these problems and took ~90% of the time).
    ``data`` is ignored (data-free). Kept counts equal :func:`~dpai_lib.sparsity.layer_kept_counts`
    exactly. For the per-layer report use :func:`npb_masks_and_report`.
    """
    masks, _ = npb_masks_and_report(
        model, sparsity, input_shape=input_shape, seed=seed, variant=variant, alpha=alpha, beta=beta, max_p=max_p,
        max_p_drop_layers=max_p_drop_layers, min_n=min_n,
        budget=budget, chunk_size=chunk_size, chunk_threshold=chunk_threshold, linear_chunk_size=linear_chunk_size,
        linear_chunk_threshold=linear_chunk_threshold, shortcut_beta=shortcut_beta, max_p_step=max_p_step,
        fine_tune=fine_tune, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap,
    )
    return masks
