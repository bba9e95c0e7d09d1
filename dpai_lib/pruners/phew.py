"""PHEW: Paths with Higher Edge Weights (Patil & Dovrolis, ICML 2021), data-free.

PHEW keeps the weights visited by random walks over the network's layer graph that are biased towards
large initial weight magnitudes. **Units** are channels (convolutions) or features (linear layers); the
*kernel* from input unit ``i`` to output unit ``j`` of a layer is ``weight[j, i]`` (``kh x kw`` weights for a
convolution, one weight for a linear layer), and its L1 norm is ``N[j, i] = sum |weight[j, i]|``.

The variant implemented here
----------------------------
* **Transitions.** A *forward* walk at input unit ``i`` of a layer moves to output unit ``j`` with
  probability ``N[j, i] / sum_j' N[j', i]``; a *backward* walk at output unit ``j`` moves to input unit ``i``
  with probability ``N[j, i] / sum_i' N[j, i']`` (the reverse transition probabilities). Inside the kernel
  it crossed, the walk picks **one** weight with probability ``|w| / N[j, i]``; that weight is kept. A
  unit whose kernels are all zero moves to a uniform unit, and an all-zero kernel gives a uniform weight,
  as in PHEW's code; a zero weight in a non-zero kernel is never picked.
* **Walks.** Walk ``0, 2, 4, ...`` are forward walks from an input unit to the network output, walks
  ``1, 3, 5, ...`` backward walks from an output unit (class) to the input. Start units are chosen round
  robin (forward: input channels ``0, 1, 2, 0, ...``; backward: classes ``0, 1, ..., C-1, 0, ...``). The
  input units are the channels of the input, or the features after a flatten that directly follows the
  input (a plain MLP on images starts at pixels). A flatten between layers maps channel ``c`` forwards to
  a uniformly chosen feature of its block ``[c*HW, (c+1)*HW)`` and feature ``f`` backwards to channel
  ``f // HW`` (PHEW's ``conv_to_linear_unit``); after a global average pool ``HW = 1``.
* **Budget.** Walks continue until exactly ``kept_count(total, 1 - sparsity)`` distinct weights are kept
  (:func:`dpai_lib.sparsity.kept_count`). A walk that only re-visits kept weights adds nothing. The last
  walk is **cut mid-walk** when the budget is reached, so up to (route length - 1) weights of that one walk
  may lie on a partial path; every other kept weight lies on a complete input-to-output path of kept
  weights. Sparsity 0 returns the dense mask without walking. A budget above the number of weights with
  a non-zero chance of being picked is a ``ValueError`` at once; if ``max_walks`` walks do not reach the
  budget (the last weights to find have tiny magnitudes, e.g. at sparsities near 0), a ``RuntimeError``
  says so.
* **Layer graph.** Derived by tracing the model with ``torch.fx`` and propagating one input of
  ``input_shape`` (the pruning network of :mod:`dpai_lib.paths`: normalisation, activations and dropout
  removed, whether modules or functions). Units flow through pooling layers unchanged,
  through flatten/reshape as above, and a sum of tensors (residual ``+``) is a merge. At a tensor that
  feeds several branches (a residual block's input), a forward walk chooses a branch; at a merge a
  backward walk chooses one of the summands:

  - branches that reach a prunable layer before the merge ("weighted": the main branch and a 1x1
    convolution shortcut) share the probability equally: a **coin flip between the 1x1 shortcut and the
    main branch**, as PHEW's ``PHEW_Res``;
  - an identity branch (reaches the merge with no prunable layer) is taken with probability
    ``identity_skip`` (default ``0.0``: a walk always goes through the main branch of an identity block,
    as PHEW's code does; ``identity_skip=0.5`` makes identity blocks a coin flip too).

  Supported: ``nn.Conv1d/2d/3d`` with ``groups=1`` and ``nn.Linear`` on ``(N, features)`` inputs, joined by
  the operations above, with one input tensor and one output tensor - i.e. ``resnet20``, ``resnet18``,
  ``vgg19_bn``, plain MLP/CNN ``nn.Sequential`` models and torchvision ResNets. Anything else (grouped or
  depth-wise convolutions, concatenation, products of two tensors as in squeeze-excitation, attention,
  transposed convolutions, prunable weights outside the traced graph, models ``torch.fx`` cannot trace)
  raises ``NotImplementedError`` naming the structure.

Hyper-parameters (keyword-only, with defaults)
----------------------------------------------
``identity_skip=0.0``
    probability that a walk takes an identity shortcut instead of the block's main branch, in [0, 1].
``max_walks=50_000_000``
    give up (``RuntimeError``) after this many walks without reaching the budget (about 10 minutes on
    VGG-19 on one CPU core; the paper settings need 10^3 - 10^6 walks).
``batch_walks=32_768``
    walks simulated together as one batch of tensors (memory/speed trade-off). It changes how the
    random stream is consumed, so masks depend on it (and on ``seed``); the defaults are deterministic.

Implementation. Walks run in parallel: a batch of walkers advances node by node through the traced
graph in topological order (backward walks in reverse order); unit transitions are sampled by one
``torch.searchsorted`` on per-layer cumulative transition tables offset by the row index, weights inside
a kernel by comparing a uniform number with the kernel's cumulative normalised ``|w|``. All randomness
comes from one ``torch.Generator`` seeded with ``seed``. The walks do not depend on the mask, so batches
are merged afterwards: kept positions are taken in walk order (walk index, then step within the walk) and
the first new ones up to the budget are kept. The batch size adapts to the remaining budget, so the
overshoot (walks simulated but not used) is small.

Differences from PHEW's code (``Prune/phew_utils.py`` at c4a0d40, read, not run). PHEW checks the
budget only between walks (it overshoots by up to one walk; we stop exactly, mid-walk) and has no score
threshold (``np.percentile`` belongs to its score-based pruners); its pure-Python loops pick one unit at a
time with ``np.random.choice`` (ours: vectorised, ``torch.Generator``, so the random streams differ); it
walks over the list of weight tensors in ``parameters()`` order and finds shortcuts by their 1x1 kernel at
fixed offsets (as we read it, its forward coin flip replaces the conv *before* a downsampling block by
that block's shortcut), while we follow the traced architecture; it also keeps bias masks that follow
the weights (we have no bias masks: biases are never pruned). PHEW's ``--prune_perc`` is the
percent pruned with ``int()`` rounding; here ``sparsity`` is the fraction removed with the library's
``kept_count`` rounding. The walk statistics are the same: transition and kernel probabilities,
alternation, round-robin starts, coin flip at 1x1 shortcuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.paths import pruning_network
from dpai_lib.pruners import register_pruner
from dpai_lib.sparsity import kept_count

# Pooling passes units through unchanged (norms, activations and dropout are already gone from the
# pruning network, see dpai_lib.paths).
_PASS_MODULES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Identity,
)
_RESHAPE_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten)
_PASS_FUNCTIONS = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "contiguous", "clone", "detach",
})
_RESHAPE_FUNCTIONS = frozenset({"flatten", "view", "reshape"})
_ADD_FUNCTIONS = frozenset({"add", "add_", "iadd"})
_SCALAR_FUNCTIONS = frozenset({"add", "add_", "iadd", "sub", "mul", "mul_", "truediv", "div", "neg"})
_U_MAX = 1.0 - 1e-12  # keeps row + u strictly inside its row of an offset cumulative table


@dataclass
class _Layer:
    name: str
    offset: int  # position of this weight in the concatenation of all prunable weights
    n_in: int
    n_out: int
    k: int  # weights per kernel
    fcum: torch.Tensor  # (n_in * n_out,) float64: row i = i + cumsum(P_fwd[i, :])
    bcum: torch.Tensor  # (n_out * n_in,) float64: row j = j + cumsum(P_bwd[j, :])
    kcum: torch.Tensor | None  # (n_out * n_in, k) float32 cumulative |w| / N, or None when k == 1


@dataclass
class _Node:
    kind: str  # "input", "layer", "pass", "flatten", "add", "output"
    label: str
    units: int
    inputs: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    layer: int = -1  # index into the layer list (kind "layer")
    column: int = -1  # rank among layer nodes in topological order (kind "layer")
    factor: int = 1  # features per channel (kind "flatten")
    fwd_cum: torch.Tensor | None = None  # cumulative branch probabilities over users
    bwd_cum: torch.Tensor | None = None  # cumulative branch probabilities over inputs


def _fn_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"phew: cannot derive the walk graph through {what}; supported: Conv1d/2d/3d (groups=1) and Linear "
        "layers joined by normalisation, activation, pooling, dropout, flatten and residual additions"
    )


class _Graph:
    """The network as a walk graph: traced nodes that carry units, with per-layer sampling tables."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], identity_skip: float) -> None:
        params = prunable_parameters(model)
        self.names = list(params)
        self.offsets: dict[str, int] = {}
        total = 0
        for name, p in params.items():
            self.offsets[name] = total
            total += p.numel()
        self.total = total
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        gm = pruning_network(model)  # a copy: the same weights under the same names
        by_id = {id(p): n for n, p in prunable_parameters(gm).items()}
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros((1, *input_shape), device=next(iter(params.values())).device))

        def is_tensor(n: torch.fx.Node) -> bool:
            return isinstance(n.meta.get("tensor_meta"), TensorMetadata)

        graph_nodes = list(gm.graph.nodes)
        placeholders = [n for n in graph_nodes if n.op == "placeholder" and is_tensor(n)]
        if len(placeholders) != 1:
            raise _unsupported(f"a model with {len(placeholders)} tensor inputs")
        out_nodes = [n for n in graph_nodes if n.op == "output"]
        out_arg = out_nodes[0].args[0]
        if not isinstance(out_arg, torch.fx.Node) or not is_tensor(out_arg):
            raise _unsupported("an output that is not one tensor")

        # Nodes on an input -> output path (tensor-valued).
        reach = {placeholders[0]}
        for n in graph_nodes:
            if n in reach:
                continue
            if is_tensor(n) and any(a in reach for a in n.all_input_nodes):
                reach.add(n)
        coreach = {out_arg}
        for n in reversed(graph_nodes):
            if n in coreach or n not in reach:
                continue
            if any(u in coreach for u in n.users):
                coreach.add(n)
        relevant = [n for n in graph_nodes if n in reach and n in coreach]
        index = {n: i for i, n in enumerate(relevant)}

        self.nodes: list[_Node] = []
        self.layers: list[_Layer] = []
        used: set[str] = set()
        for fx_node in relevant:
            shape = tuple(fx_node.meta["tensor_meta"].shape)
            label = f"{fx_node.op} {fx_node.target}"
            if len(shape) < 2:
                raise _unsupported(f"{label} with output shape {shape} (no unit dimension)")
            node = _Node(kind="pass", label=label, units=shape[1])
            node.inputs = [index[a] for a in fx_node.all_input_nodes if a in index]
            node.users = [index[u] for u in fx_node.users if u in index]
            self.nodes.append(node)
            in_shapes = [tuple(a.meta["tensor_meta"].shape) for a in fx_node.all_input_nodes if a in index]
            if fx_node.op == "placeholder":
                node.kind = "input"
                continue
            module = gm.get_submodule(fx_node.target) if fx_node.op == "call_module" else None
            weight = getattr(module, "weight", None) if module is not None else None
            if module is not None and isinstance(weight, nn.Parameter) and id(weight) in by_id:
                name = by_id[id(weight)]
                node.kind, node.layer = "layer", self._add_layer(name, module, weight, in_shapes, shape, label)
                used.add(name)
                continue
            if len(node.inputs) != 1:
                name = _fn_name(fx_node)
                if fx_node.op in ("call_function", "call_method") and name in _ADD_FUNCTIONS:
                    if any(s[1] != shape[1] for s in in_shapes):
                        raise _unsupported(f"{label} (a sum of tensors with different unit counts {in_shapes})")
                    node.kind = "add"
                    continue
                raise _unsupported(f"{label} ({len(node.inputs)} tensor inputs)")
            in_shape = in_shapes[0]
            if fx_node.op == "call_module":
                if isinstance(module, _RESHAPE_MODULES):
                    self._reshape(node, in_shape, shape, label)
                elif isinstance(module, _PASS_MODULES):
                    self._check_pass(in_shape, shape, label)
                else:
                    raise _unsupported(f"module {fx_node.target!r} of type {type(module).__name__}")
            elif fx_node.op in ("call_function", "call_method"):
                name = _fn_name(fx_node)
                if name in _RESHAPE_FUNCTIONS:
                    self._reshape(node, in_shape, shape, label)
                elif name in _PASS_FUNCTIONS or name in _SCALAR_FUNCTIONS:
                    self._check_pass(in_shape, shape, label)
                else:
                    raise _unsupported(f"{fx_node.op} {name!r}")
            else:
                raise _unsupported(label)

        missing = [n for n in self.names if n not in used]
        if missing:
            raise _unsupported(f"prunable weights that are not conv/linear layers on the traced path: {missing[:5]}")

        self.input = index[placeholders[0]]
        self.end = index[out_arg]
        self.n_out_units = self.nodes[self.end].units
        # Forward walks start after the unit-carrying chain that directly follows the input (e.g. a flatten).
        start = self.input
        while len(self.nodes[start].users) == 1:
            nxt = self.nodes[self.nodes[start].users[0]]
            if nxt.kind not in ("pass", "flatten") or len(nxt.inputs) != 1:
                break
            start = self.nodes[start].users[0]
        self.start = start
        self.n_in_units = self.nodes[start].units

        column = 0
        for node in self.nodes:
            if node.kind == "layer":
                node.column, column = column, column + 1
        self.n_columns = column
        for node in self.nodes:
            if len(node.users) > 1:
                node.fwd_cum = self._branch_cum([self._weighted_forward(u) for u in node.users], identity_skip)
            if node.kind == "add":
                node.bwd_cum = self._branch_cum([self._weighted_backward(p) for p in node.inputs], identity_skip)
        if self.nodes[self.end].kind == "input":
            raise _unsupported("a model with no prunable layer between input and output")

    # -- graph construction helpers -----------------------------------------------------------------
    @staticmethod
    def _check_pass(in_shape: tuple[int, ...], out_shape: tuple[int, ...], label: str) -> None:
        if len(in_shape) < 2 or in_shape[1] != out_shape[1]:
            raise _unsupported(f"{label} (changes the unit dimension: {in_shape} -> {out_shape})")

    @staticmethod
    def _reshape(node: _Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...], label: str) -> None:
        if len(in_shape) >= 2 and len(out_shape) >= 2 and in_shape[1] == out_shape[1]:
            if in_shape[0] == out_shape[0]:
                return  # only the spatial dimensions are reshaped: units unchanged
        elif len(out_shape) == 2 and in_shape[0] == out_shape[0] and len(in_shape) > 2:
            factor = math.prod(in_shape[2:])
            if out_shape[1] == in_shape[1] * factor:
                node.kind, node.factor = "flatten", factor
                return
        raise _unsupported(f"{label} (reshape {in_shape} -> {out_shape})")

    def _add_layer(self, name: str, module: nn.Module, weight: torch.Tensor, in_shapes: list, out_shape: tuple,
                   label: str) -> int:
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise _unsupported(f"{label} (transposed convolution)")
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.groups != 1:
                raise _unsupported(f"{label} (grouped/depth-wise convolution, groups={module.groups})")
        elif isinstance(module, nn.Linear):
            if len(in_shapes) != 1 or len(in_shapes[0]) != 2:
                raise _unsupported(f"{label} (a linear layer on inputs of shape {in_shapes}, not (N, features))")
        else:
            raise _unsupported(f"{label} of type {type(module).__name__}")
        n_out, n_in = weight.shape[0], weight.shape[1]
        if len(in_shapes) != 1 or in_shapes[0][1] != n_in or out_shape[1] != n_out:
            raise _unsupported(f"{label} (unit counts {in_shapes} -> {out_shape} do not match its weight)")
        absw = weight.detach().to("cpu", torch.float64).abs().reshape(n_out, n_in, -1)
        k = absw.shape[2]
        norms = absw.sum(-1)  # N[j, i]
        self.layers.append(_Layer(
            name=name, offset=self.offsets[name], n_in=n_in, n_out=n_out, k=k,
            fcum=_offset_cumulative(norms.t()), bcum=_offset_cumulative(norms),
            kcum=None if k == 1 else _kernel_cumulative(absw.reshape(n_out * n_in, k)),
        ))
        return len(self.layers) - 1

    def _weighted_forward(self, i: int) -> bool:
        while True:
            node = self.nodes[i]
            if node.kind == "layer":
                return True
            if node.kind in ("pass", "flatten") and len(node.users) == 1:
                i = node.users[0]
                continue
            return False

    def _weighted_backward(self, i: int) -> bool:
        while True:
            node = self.nodes[i]
            if node.kind == "layer":  # a layer that feeds other branches too is where the branches split
                return len(node.users) == 1
            if node.kind in ("pass", "flatten") and len(node.users) == 1:
                i = node.inputs[0]
                continue
            return False

    @staticmethod
    def _branch_cum(weighted: list[bool], identity_skip: float) -> torch.Tensor:
        w = torch.tensor(weighted)
        n_w, n_i = int(w.sum()), int((~w).sum())
        if n_w == 0 or n_i == 0:
            probs = torch.full((len(weighted),), 1.0 / len(weighted), dtype=torch.float64)
        else:
            probs = torch.where(w, (1.0 - identity_skip) / n_w, identity_skip / n_i).to(torch.float64)
        cum = probs.cumsum(0)
        cum[-1] = 1.0
        return cum

    # -- walking --------------------------------------------------------------------------------------
    def walk(self, starts: torch.Tensor, forward: bool, gen: torch.Generator) -> torch.Tensor:
        """Walk from ``starts`` (units of the input, or of the output when backward); returns the global
        weight index picked in every layer (column = the layer's topological rank; -1 = not visited)."""
        m = starts.numel()
        picks = torch.full((m, self.n_columns), -1, dtype=torch.long)
        unit = starts.clone()
        first = self.start if forward else self.end
        pending: dict[int, list[torch.Tensor]] = {first: [torch.arange(m)]}
        order = range(len(self.nodes)) if forward else range(len(self.nodes) - 1, -1, -1)
        for i in order:
            if i not in pending:
                continue
            idx = torch.cat(pending.pop(i)) if len(pending[i]) > 1 else pending.pop(i)[0]
            node = self.nodes[i]
            if node.kind == "layer":
                self._step(node, idx, unit, picks, forward, gen)
            elif node.kind == "flatten" and not (forward and i == self.start):
                if forward:
                    unit[idx] = unit[idx] * node.factor + torch.randint(node.factor, (idx.numel(),), generator=gen)
                else:
                    unit[idx] = unit[idx] // node.factor
            nexts, cum = (node.users, node.fwd_cum) if forward else (node.inputs, node.bwd_cum)
            if not nexts:
                continue  # reached the output (forward) or the input (backward)
            if len(nexts) == 1:
                pending.setdefault(nexts[0], []).append(idx)
                continue
            if cum is None:  # several inputs that are not a sum cannot occur (rejected when building)
                raise AssertionError("branch without probabilities")
            choice = torch.searchsorted(cum, torch.rand(idx.numel(), generator=gen, dtype=torch.float64), right=True)
            choice.clamp_(max=len(nexts) - 1)
            for b, nxt in enumerate(nexts):
                sel = idx[choice == b]
                if sel.numel():
                    pending.setdefault(nxt, []).append(sel)
        return picks

    def _step(self, node: _Node, idx: torch.Tensor, unit: torch.Tensor, picks: torch.Tensor, forward: bool,
              gen: torch.Generator) -> None:
        layer = self.layers[node.layer]
        rows = unit[idx]
        if forward:
            new = _sample_rows(layer.fcum, rows, layer.n_out, gen)
            kernel = new * layer.n_in + rows
        else:
            new = _sample_rows(layer.bcum, rows, layer.n_in, gen)
            kernel = rows * layer.n_in + new
        flat = kernel * layer.k
        if layer.kcum is not None:
            u = torch.rand(idx.numel(), 1, generator=gen)
            flat += (layer.kcum[kernel] <= u).sum(1).clamp_(max=layer.k - 1)
        picks[idx, node.column] = layer.offset + flat
        unit[idx] = new


def _offset_cumulative(weights: torch.Tensor) -> torch.Tensor:
    """Row-normalised cumulative sums of a non-negative (rows, cols) table, row ``r`` shifted by ``r``
    and flattened: one searchsorted for ``r + u`` then samples column ~ weights[r] (all-zero rows:
    uniform)."""
    rows, cols = weights.shape
    sums = weights.sum(1, keepdim=True)
    probs = torch.where(sums > 0, weights / sums.clamp_min(1e-300), torch.full_like(weights, 1.0 / cols))
    cum = probs.cumsum(1)
    cum[:, -1] = 1.0
    return (cum + torch.arange(rows, dtype=torch.float64)[:, None]).flatten()


def _kernel_cumulative(absw: torch.Tensor) -> torch.Tensor:
    sums = absw.sum(1, keepdim=True)
    k = absw.shape[1]
    probs = torch.where(sums > 0, absw / sums.clamp_min(1e-300), torch.full_like(absw, 1.0 / k))
    cum = probs.cumsum(1).float()
    cum[:, -1] = 2.0  # never <= u: the last position closes every kernel
    return cum


def _sample_rows(table: torch.Tensor, rows: torch.Tensor, cols: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(rows.numel(), generator=gen, dtype=torch.float64) * _U_MAX
    pos = torch.searchsorted(table, rows.to(torch.float64) + u, right=True)
    return (pos - rows * cols).clamp_(0, cols - 1)


def _selectable(graph: _Graph, model: nn.Module) -> int:
    """Weights with a non-zero chance of being picked by some walk step (an upper bound for the budget)."""
    params = prunable_parameters(model)
    count = 0
    for layer in graph.layers:
        absw = params[layer.name].detach().abs().reshape(layer.n_out, layer.n_in, -1)
        norms = absw.sum(-1)
        zero_kernel = norms == 0
        crossable = ~zero_kernel | (norms.sum(0, keepdim=True) == 0) | (norms.sum(1, keepdim=True) == 0)
        pickable = (absw > 0) | zero_kernel[..., None]
        count += int((pickable & crossable[..., None]).sum())
    return count


def _phew_select(model: nn.Module, sparsity: float, *, input_shape: tuple[int, ...], seed: int,
                 identity_skip: float, max_walks: int, batch_walks: int) -> tuple[Masks, dict]:
    """The PHEW masks and a record of the run: ``walks`` (walks whose weights were used),
    ``simulated`` (walks simulated), ``cut_walk_kept`` (global indices kept from the walk cut at the
    budget; empty when the budget ended exactly with a walk), ``offsets`` (name -> global offset)."""
    if not 0.0 <= float(identity_skip) <= 1.0:
        raise ValueError(f"identity_skip must be a probability in [0, 1]; got {identity_skip!r}")
    if int(max_walks) < 1 or int(batch_walks) < 2:
        raise ValueError(f"max_walks must be >= 1 and batch_walks >= 2; got {max_walks!r}, {batch_walks!r}")
    batch_walks = int(batch_walks) // 2 * 2
    graph = _Graph(model, tuple(input_shape), float(identity_skip))
    budget = kept_count(graph.total, 1.0 - sparsity)
    if budget == graph.total:  # sparsity 0: nothing to choose
        return Masks.ones(model), {"walks": 0, "simulated": 0, "cut_walk_kept": torch.empty(0, dtype=torch.long),
                                   "offsets": dict(graph.offsets)}
    selectable = _selectable(graph, model)
    if budget > selectable:
        raise ValueError(
            f"phew: the budget of {budget:,} kept weights exceeds the {selectable:,} weights that a walk can "
            f"pick (zero weights in non-zero kernels are never picked); use a higher sparsity"
        )
    gen = torch.Generator().manual_seed(int(seed))
    kept = torch.zeros(graph.total, dtype=torch.bool)
    remaining, simulated, used = budget, 0, 0
    n_fwd = n_bwd = 0
    rate = float(max(1, graph.n_columns))  # new weights per walk, re-estimated after every batch
    cut: torch.Tensor = torch.empty(0, dtype=torch.long)
    while remaining > 0:
        if simulated >= max_walks:
            raise RuntimeError(
                f"phew: {simulated:,} walks kept {budget - remaining:,} of the {budget:,} weights asked for; the "
                f"walks rarely find new weights at this density - raise max_walks or use a higher sparsity"
            )
        size = math.ceil(1.1 * remaining / max(rate, 1e-6)) + 2
        size = max(64, min(batch_walks, size, max_walks - simulated))
        half = (size + 1) // 2
        fwd = graph.walk((n_fwd + torch.arange(half)) % graph.n_in_units, True, gen)
        bwd = graph.walk((n_bwd + torch.arange(half)) % graph.n_out_units, False, gen)
        n_fwd, n_bwd, simulated = n_fwd + half, n_bwd + half, simulated + 2 * half
        # Walk order: forward 0, backward 0, forward 1, ...; steps in walking order inside each walk.
        seq = torch.stack([fwd, bwd.flip(1)], dim=1).reshape(-1)
        walk_id = torch.arange(2 * half).repeat_interleave(graph.n_columns)
        visited = seq >= 0
        seq, walk_id = seq[visited], walk_id[visited]
        fresh = ~kept[seq]
        seq, walk_id = seq[fresh], walk_id[fresh]
        if seq.numel() == 0:
            rate /= 4
            continue
        uniq, inverse = torch.unique(seq, return_inverse=True)
        first = torch.full((uniq.numel(),), seq.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(seq.numel()), reduce="amin")
        first = first.sort().values
        new, new_walk = seq[first], walk_id[first]
        rate = max(new.numel() / (2 * half), 1e-6)
        take = min(remaining, new.numel())
        kept[new[:take]] = True
        remaining -= take
        if remaining == 0:
            last = int(new_walk[take - 1])
            used += last + 1
            if take < new.numel() and int(new_walk[take]) == last:
                cut = new[:take][new_walk[:take] == last]
        else:
            used += 2 * half
    masks, start = {}, 0
    for name in graph.names:
        shape = graph.shapes[name]
        size = math.prod(shape)
        masks[name] = kept[start:start + size].view(shape)
        start += size
    info = {"walks": used, "simulated": simulated, "cut_walk_kept": cut, "offsets": dict(graph.offsets)}
    return Masks(masks), info


@register_pruner("phew", needs_data=False)
def phew_prune(
    model: nn.Module, sparsity: float, *, input_shape: tuple[int, ...], data=None, seed: int = 0,
    identity_skip: float = 0.0, max_walks: int = 50_000_000, batch_walks: int = 32_768,
) -> Masks:
    """PHEW masks from biased random walks over ``model``'s initial weights; see the module docstring."""
    masks, _ = _phew_select(model, sparsity, input_shape=input_shape, seed=seed, identity_skip=identity_skip,
                            max_walks=max_walks, batch_walks=batch_walks)
    return masks


def phew_visit_counts(model: nn.Module, num_walks: int, *, input_shape: tuple[int, ...], seed: int = 0,
                      identity_skip: float = 0.0) -> dict[str, torch.Tensor]:
    """How often each prunable weight is picked by the first ``num_walks`` PHEW walks (alternating
    forward/backward, round-robin starts), as name -> int64 tensor of the weight's shape. A diagnostic of
    the walk bias; ``model`` is not modified."""
    import copy

    work = copy.deepcopy(model)
    graph = _Graph(work, tuple(input_shape), float(identity_skip))
    gen = torch.Generator().manual_seed(int(seed))
    n_f, n_b = (num_walks + 1) // 2, num_walks // 2
    fwd = graph.walk(torch.arange(n_f) % graph.n_in_units, True, gen)
    bwd = graph.walk(torch.arange(n_b) % graph.n_out_units, False, gen)
    seq = torch.cat([fwd.flatten(), bwd.flatten()])
    counts = torch.bincount(seq[seq >= 0], minlength=graph.total)
    return {n: counts[graph.offsets[n]:graph.offsets[n] + math.prod(graph.shapes[n])].view(graph.shapes[n])
            for n in graph.names}


__all__ = ["phew_prune", "phew_visit_counts"]
