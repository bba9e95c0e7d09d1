"""Node and path metrics of a sparse network: exact path counts in log space, and the DPaI / NPB numbers.

Three definitions share the name "effective paths / nodes" in the literature (this library's exact count,
the DPaI release's ``npb.py`` and NPB's ``Utils/metrics.py``; the sources are listed in ``book/sources.md``);
:func:`node_path_stats` computes each of them under its own ``variant``:

``"exact"`` (this library's definition).
    The network is a DAG whose **units** are its scalar activations (every channel x spatial position of
    every intermediate tensor; the input units are those of a single input of ``input_shape``) and whose
    **edges** are

    * the kept weights of convolutions and linear layers; a conv weight ``W[o, i, *k]`` is one edge
      ``(i, p + k) -> (o, p)`` at every output position ``p`` where the kernel is applied (zero padding adds
      no units; reflect/replicate/circular padding copies units, i.e. adds edges);
    * fixed edges from every input unit of a pooling window to its output unit (max and average pooling
      alike, adaptive pools with PyTorch's windows ``[floor(jL/n), ceil((j+1)L/n))``, ``mean``/``sum``
      reductions);
    * identity edges of residual additions (from both operands), concatenation, flatten/reshape/permute
      and elementwise identities. BatchNorm and other normalisations, ReLU and other activations,
      dropout, biases, adding a constant and scaling by a constant add no edges and block nothing
    (identities); a constant tensor concatenated to activations (a class token) is units without paths.

    A path runs from an input unit to an output unit along edges. ``log_paths`` is the natural log of the
    number of paths, ``-inf`` when there is none. It is computed exactly up to float64 rounding by
    interpreting the ``torch.fx`` graph of the model with counts carried as ``(v, s)`` pairs meaning
    ``v * exp(s)``: every op that creates edges divides its output by its maximum ``c`` and adds ``log c``
    to ``s``; an addition or concatenation first brings its operands to the larger ``s``. Nothing can
    overflow, and no approximation is made for residual networks. Any op the interpreter does not know
    (attention, gating products, ...) raises ``NotImplementedError`` naming it; ``nn.MultiheadAttention``
    (ViT) is therefore unsupported in this variant.

    A kept weight is **effective** if it lies on at least one input->output path, i.e. some edge it
    provides goes from a unit with ``P_in > 0`` (paths from the inputs) to one with ``P_out > 0`` (paths
    to the outputs); equivalently its gradient of the path count is non-zero. This is decided with exact
    0/1 reachability (no float underflow). ``params`` counts effective weights; ``kernels`` counts the
    ``(out, in)`` channel pairs of a conv with >= 1 effective weight (for a linear layer an effective
    kernel is an effective weight); ``nodes`` counts the output channels (conv) / output features
    (linear) of every prunable layer, shortcuts and classifier included, having >= 1 effective weight.
    The node and kernel counting conventions are those of the DPaI release, so the numbers are
    comparable with the DPaI paper.

``"dpai"``: the DPaI release's count, see :func:`_dpai_stats`.

``"npb"``: NPB's ``measure_node_path`` (``Utils/metrics.py`` of ``pvh1602/NPB``), see :func:`_npb_stats`.
"""

from __future__ import annotations

import builtins
import copy
import functools
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from types import EllipsisType
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _ntuple

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.paths import ReleasePathCount, pruning_network, target_name

VARIANTS = ("exact", "dpai", "npb")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Tensor methods that move or convert values without creating edges (identity blocks - norms,
# activations, dropout - are already gone from the pruning network, see dpai_lib.paths).
_NOOP_METHODS = {"clone", "contiguous", "float", "double", "to", "detach"}
_NOOP_FUNCTIONS = {torch.clone, torch.detach}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                    torch.transpose, torch.movedim}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "expand",
                  "movedim"}
_POOL_ARGS = {  # functional pooling -> (module class, names of the arguments after the input)
    getattr(F, f"{fn}{n}d"): (getattr(nn, f"{cls}{n}d"), names)
    for n in (1, 2, 3)
    for fn, cls, names in [
        ("max_pool", "MaxPool", ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
        ("avg_pool", "AvgPool",
         ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")),
        ("adaptive_avg_pool", "AdaptiveAvgPool", ("output_size",)),
        ("adaptive_max_pool", "AdaptiveMaxPool", ("output_size", "return_indices")),
    ]
}
_WINDOW_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE_POOLS = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


# ------------------------------------------------------------------------------------------------------
# Pooling as sums over windows (the fixed edges of a pooling layer)
# ------------------------------------------------------------------------------------------------------
def _window_sum(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over the windows of a (max or average) pooling module: an all-ones depthwise convolution."""
    if getattr(pool, "return_indices", False):
        raise NotImplementedError("exact path counting: pooling with return_indices=True")
    n = x.dim() - 2
    k, s, p = _ntuple(n)(pool.kernel_size), _ntuple(n)(pool.stride), _ntuple(n)(pool.padding)
    d = _ntuple(n)(getattr(pool, "dilation", 1))
    out = type(pool).forward(pool, torch.empty(x.shape, device="meta")).shape[2:]  # PyTorch's size (ceil_mode)
    pads: list[int] = []
    for i in reversed(range(n)):  # F.pad lists the last dimension first
        extra = max(0, (out[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 - (x.shape[2 + i] + 2 * p[i]))
        pads += [p[i], p[i] + extra]
    ones = torch.ones((x.shape[1], 1, *k), dtype=x.dtype, device=x.device)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    y = conv(F.pad(x, pads), ones, stride=s, dilation=d, groups=x.shape[1])
    window: tuple[EllipsisType | slice, ...] = (..., *[slice(0, o) for o in out])
    return y[window]


def _adaptive_sum(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over the windows of an adaptive pooling module: window mean times window size."""
    if getattr(pool, "return_indices", False):
        raise NotImplementedError("exact path counting: adaptive pooling with return_indices=True")
    n = x.dim() - 2
    sizes = [L if o is None else o for o, L in zip(_ntuple(n)(pool.output_size), x.shape[2:])]
    pools: tuple[Callable[..., torch.Tensor], ...] = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
    y = pools[n - 1](x, sizes)
    for i, (L, o) in enumerate(zip(x.shape[2:], sizes)):
        j = torch.arange(o, device=x.device)
        width = -((-(j + 1) * L) // o) - (j * L) // o  # ceil((j+1)L/o) - floor(jL/o)
        y = y * width.to(y.dtype).view([o if a == 2 + i else 1 for a in range(y.dim())])
    return y


# ------------------------------------------------------------------------------------------------------
# The exact counter: a torch.fx interpreter on (normalised counts, log scale) pairs
# ------------------------------------------------------------------------------------------------------
class _Paths:
    """Path counts of the units of one tensor: ``v * exp(s)`` (``s`` a detached 0-d tensor, ``-inf`` if all 0)."""

    __slots__ = ("s", "v")

    def __init__(self, v: torch.Tensor, s: torch.Tensor) -> None:
        self.v, self.s = v, s


class _Reach(torch.autograd.Function):
    """0/1 reachability: forward marks units with a path from an input, backward units with a path to an output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return (g > 0).to(g.dtype)


def _has_paths(value: Any) -> bool:
    found: list[bool] = []

    def visit(a: Any) -> Any:
        found.append(isinstance(a, _Paths))
        return a

    fx.node.map_aggregate(value, visit)
    return any(found)


class PathCounter:
    """Exact log path count of one architecture, traced once with ``torch.fx`` and reusable.

    ``counter(weights)`` returns ``log`` of the number of input->output paths (module docstring,
    variant "exact") where ``weights[name]`` replaces each prunable parameter; with 0/1 masks that is the
    number of paths made of kept weights; with general non-negative weights it is the sum over paths of
    the product of their weights (weights must be non-negative). The result is a scalar tensor on the
    weights' device, differentiable
    w.r.t. ``weights``. The per-op normalising constants ``c`` are detached: ``log(f / c) + log c`` has the
    gradient of ``log f`` for any constant ``c``, so the gradient is exact. With no path at all the value is
    ``-inf`` and the gradient is not finite. ``counter.effective(masks)`` gives the effective weights.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, dtype: torch.dtype = torch.float64):
        """Trace ``model`` (not modified; only its structure is read). ``input_shape``: one input, e.g.
        ``(3, 32, 32)``. ``dtype``: the arithmetic (float64: exact to ~1e-15 relative; float32 is faster on a
        GPU, still overflow-free, exact to ~1e-6)."""
        self.input_shape, self.dtype = tuple(input_shape), dtype
        self.names = list(prunable_parameters(model))
        self.graph_module = pruning_network(model)
        weight_name = {id(p): n for n, p in prunable_parameters(self.graph_module).items()}
        modules = dict(self.graph_module.named_modules())
        self._steps: list[tuple[fx.Node, Callable[..., Any]]] = []
        for node in self.graph_module.graph.nodes:
            self._steps.append((node, self._plan(node, modules, weight_name)))

    # -- planning: one handler per graph node -------------------------------------------------------------
    def _plan(self, node: fx.Node, modules: dict[str, nn.Module], weight_name: dict[int, str]) -> Callable:
        if node.op == "placeholder":
            first = node is next(iter(self.graph_module.graph.nodes))
            if first:
                return lambda ctx: _Paths(ctx["ones"], ctx["zero"])
            if node.args:
                return lambda ctx, default=node.args[0]: default
            raise NotImplementedError(f"exact path counting: forward() input {node.target!r} has no default")
        if node.op == "get_attr":
            attr = target_name(node)
            return lambda ctx: functools.reduce(getattr, attr.split("."), self.graph_module)
        if node.op == "output":
            return lambda ctx, out: out
        if node.op == "call_module":
            target = target_name(node)
            m = modules[target]
            return functools.partial(self._dispatch, self._plan_module(m, target, weight_name), m)
        if node.op == "call_method":
            method = target_name(node)
            raw: Callable = lambda x, *a, **k: getattr(x, method)(*a, **k)  # noqa: E731
            what = f"tensor method .{method}()"
            key: Any = {"add_": "add", "__add__": "add", "__iadd__": "add", "mul_": "mul", "div_": "div"}.get(method, method)
        else:  # call_function: the target is the function itself
            fn = node.target
            assert callable(fn), f"call_function node with a non-callable target {fn!r}"
            raw, what, key = fn, f"function {getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}", fn
        return functools.partial(self._dispatch, self._path_op(node.op, key, raw, what), raw)

    def _path_op(self, op: str, key: Any, raw: Callable, what: str) -> Callable:
        """The handler of a call whose arguments include activations (``_Paths``)."""
        if key in (_NOOP_METHODS if op == "call_method" else _NOOP_FUNCTIONS):
            return lambda ctx, x, *a, **k: x
        if key in (_SHAPE_METHODS if op == "call_method" else _SHAPE_FUNCTIONS):
            return lambda ctx, x, *a, **k: _Paths(raw(x.v, *a, **k), x.s)
        if key in ("size", "dim"):
            return lambda ctx, x, *a: raw(x.v, *a)
        if key in ("sum", "mean", torch.sum, torch.mean):
            return self._reduce
        if key in ("add", operator.add, operator.iadd, torch.add):
            return self._add
        if key in (operator.sub, operator.isub):  # x - constant: a bias, no edges
            return lambda ctx, a, b: a if not isinstance(b, _Paths) else self._unsupported(what)
        if key in ("mul", operator.mul, operator.imul, torch.mul):  # scaling by a constant: no edges
            return lambda ctx, a, b: (
                self._unsupported(f"{what} of two activations (gating, attention)")
                if isinstance(a, _Paths) and isinstance(b, _Paths) else a if isinstance(a, _Paths) else b)
        if key in ("div", operator.truediv, operator.itruediv, torch.div):
            return lambda ctx, a, b, **k: a if not isinstance(b, _Paths) else self._unsupported(what)
        if key in (torch.cat, torch.concat, torch.stack):
            return lambda ctx, xs, dim=0: self._concat(ctx, raw, xs, dim)
        if key is operator.getitem:
            return lambda ctx, x, i: _Paths(x.v[i], x.s) if isinstance(x, _Paths) else x[i]
        if key is builtins.getattr:
            return lambda ctx, x, a: (getattr(x.v, a) if a in ("shape", "ndim", "dtype", "device")
                                      else self._unsupported(f"attribute .{a}"))
        if key in _POOL_ARGS:
            cls, names = _POOL_ARGS[key]
            return lambda ctx, x, *a, **k: self._pool(ctx, cls(**dict(zip(names, a)), **k), x)
        return lambda ctx, *a, **k: self._unsupported(what)

    @staticmethod
    def _dispatch(path_op: Callable, raw: Callable, ctx: dict, *args: Any, **kwargs: Any) -> Any:
        return path_op(ctx, *args, **kwargs) if _has_paths((args, kwargs)) else raw(*args, **kwargs)

    @staticmethod
    def _unsupported(what: str) -> Any:
        raise NotImplementedError(
            f"exact path counting does not support {what} on activations (add a rule in dpai_lib/metrics.py)")

    def _plan_module(self, m: nn.Module, target: str, weight_name: dict[int, str]) -> Callable:
        if isinstance(m, _CONVS + (nn.Linear,)):
            name = weight_name[id(m.weight)]
            if isinstance(m, nn.Linear):
                return lambda ctx, x: self._renorm(ctx, _Paths(F.linear(x.v, ctx["w"][name]), x.s))
            return lambda ctx, x: self._renorm(ctx, _Paths(m._conv_forward(x.v, ctx["w"][name], None), x.s))
        if isinstance(m, _WINDOW_POOLS + _ADAPTIVE_POOLS):
            return lambda ctx, x: self._pool(ctx, m, x)
        if isinstance(m, (nn.Flatten, nn.Unflatten, nn.modules.padding._ReflectionPadNd,
                          nn.modules.padding._ReplicationPadNd)):  # units moved or copied
            return lambda ctx, x: _Paths(m(x.v), x.s)
        if isinstance(m, nn.modules.padding._ConstantPadNd):  # padded units are constants: no paths
            return lambda ctx, x: _Paths(F.pad(x.v, m.padding), x.s)
        raise NotImplementedError(
            f"exact path counting does not support module {type(m).__name__} ('{target}'); supported: conv/linear, "
            "pooling, flatten, padding, and the identity blocks of dpai_lib.paths (normalisation, activations, "
            "dropout); add a rule in dpai_lib/metrics.py or dpai_lib/paths.py"
        )

    # -- the operations on path counts ---------------------------------------------------------------
    @staticmethod
    def _renorm(ctx: dict, p: _Paths) -> _Paths:
        """After an op that creates edges: divide by the (detached) maximum and move its log into ``s``."""
        if ctx["reach"]:
            return _Paths(_Reach.apply(p.v), p.s)
        c = p.v.detach().amax()
        return _Paths(p.v / torch.where(c > 0, c, torch.ones_like(c)), p.s + torch.log(c))

    @staticmethod
    def _align(ps: list[_Paths]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The operands' ``v`` on the common (largest) scale ``s``."""
        s = functools.reduce(torch.maximum, [p.s for p in ps])
        s0 = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        return [p.v * torch.exp(p.s - s0) for p in ps], s

    def _pool(self, ctx: dict, pool: nn.Module, x: _Paths) -> _Paths:
        summed = _window_sum(pool, x.v) if isinstance(pool, _WINDOW_POOLS) else _adaptive_sum(pool, x.v)
        return self._renorm(ctx, _Paths(summed, x.s))

    def _reduce(self, ctx: dict, x: _Paths, dim: Any = None, keepdim: bool = False, **kw: Any) -> _Paths:
        v = x.v.sum() if dim is None else x.v.sum(dim, keepdim)
        return self._renorm(ctx, _Paths(v, x.s))

    def _add(self, ctx: dict, a: Any, b: Any, *, alpha: Any = 1) -> Any:
        if not isinstance(a, _Paths) or not isinstance(b, _Paths):  # adding a constant (a bias): no edges
            return a if isinstance(a, _Paths) else b
        (va, vb), s = self._align([a, b])
        return self._renorm(ctx, _Paths(va + vb, s))

    def _concat(self, ctx: dict, fn: Callable, xs: list, dim: int) -> _Paths:
        ps = [x for x in xs if isinstance(x, _Paths)]
        vs, s = self._align(ps) if ps else ([], ctx["zero"])
        it = iter(vs)  # constant tensors (e.g. a class token) are units without paths: zeros
        return _Paths(fn([next(it) if isinstance(x, _Paths) else ctx["ones"].new_zeros(x.shape) for x in xs], dim), s)

    # -- running ---------------------------------------------------------------------------------------
    def _run(self, weights: Mapping[str, torch.Tensor], reach: bool) -> list[_Paths]:
        missing = [n for n in self.names if n not in weights]
        extra = [n for n in weights if n not in self.names]
        if missing or extra:
            raise KeyError(f"weights must have exactly the prunable parameters: missing {missing[:5]}, "
                           f"unknown {extra[:5]}")
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
        w = {n: t.to(self.dtype) for n, t in weights.items()}
        ctx = {"w": w, "reach": reach, "ones": torch.ones((1, *self.input_shape), dtype=self.dtype, device=device),
               "zero": torch.zeros((), dtype=self.dtype, device=device)}
        env: dict[fx.Node, Any] = {}
        for node, step in self._steps:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = step(ctx, *args, **kwargs) if node.op not in ("placeholder", "get_attr") else step(ctx)
            if node.op == "output":
                outs: list[_Paths] = []
                fx.node.map_aggregate(env[node], lambda a: outs.append(a) if isinstance(a, _Paths) else a)  # noqa: B023
                if not outs:
                    raise NotImplementedError("exact path counting: the model's output carries no activations")
                return outs
        raise RuntimeError("graph without output")  # pragma: no cover

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        vs, s = self._align(self._run(weights, reach=False))
        total = sum(v.sum() for v in vs)
        assert isinstance(total, torch.Tensor)  # _run returns at least one output (it raises otherwise)
        return torch.log(total) + s

    def effective(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bool tensor per prunable parameter: kept and on at least one input->output path (exact)."""
        device = next(iter(masks.values())).device if masks else torch.device("cpu")
        w = {n: torch.as_tensor(m, device=device).to(self.dtype).requires_grad_() for n, m in masks.items()}
        total = sum(p.v.sum() for p in self._run(w, reach=True))
        assert isinstance(total, torch.Tensor)  # _run returns at least one output (it raises otherwise)
        grads = (torch.autograd.grad(total, list(w.values()), allow_unused=True) if total.requires_grad
                 else [None] * len(w))
        return {n: (g > 0) & (t.detach() != 0) if g is not None else torch.zeros_like(t, dtype=torch.bool)
                for (n, t), g in zip(w.items(), grads)}


def log_path_count(model: nn.Module, weights: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]) -> torch.Tensor:
    """Exact, differentiable log path count (see :class:`PathCounter`; build one of those for repeated calls)."""
    return PathCounter(model, input_shape)(weights)


# ------------------------------------------------------------------------------------------------------
# Counting effective params / kernels / nodes, and the three variants
# ------------------------------------------------------------------------------------------------------
def _kernels(eff: torch.Tensor) -> int:
    return int(eff.flatten(2).any(2).sum()) if eff.dim() > 2 else int(eff.sum())


def _out_nodes(eff: torch.Tensor) -> int:
    return int(eff.flatten(1).any(1).sum()) if eff.dim() > 1 else int(eff.sum())


def _summary(variant: str, log_paths: float | torch.Tensor, eff: Mapping[str, torch.Tensor], masks: Masks,
             nodes: Callable[[str, torch.Tensor], int] = lambda name, e: _out_nodes(e)) -> dict:
    layers = {n: {"nodes": nodes(n, e.cpu()), "kernels": _kernels(e.cpu()), "params": int(e.sum()),
                  "kept": int(masks[n].sum())} for n, e in eff.items()}
    totals = {k: sum(layer[k] for layer in layers.values()) for k in ("nodes", "kernels", "params")}
    return {"variant": variant, "log_paths": float(log_paths), **totals, "layers": layers}


def _exact_stats(model: nn.Module, masks: Masks, input_shape: tuple[int, ...]) -> dict:
    counter = PathCounter(copy.deepcopy(model), input_shape)
    with torch.no_grad():
        log_paths = counter({n: m.double() for n, m in masks.items()})
    return _summary("exact", log_paths, counter.effective(masks), masks)


def _dpai_stats(model: nn.Module, masks: Masks, input_shape: tuple[int, ...]) -> dict:
    """The DPaI release's numbers (``npb.py``, ``NPB_objective``): the count DPaI optimises,
    :class:`~dpai_lib.paths.ReleasePathCount`, in float64 on a CPU copy.

    All-ones input of shape ``(1, *input_shape)`` through the pruning network of :mod:`dpai_lib.paths`
    (norms, activations - modules and functions alike -, dropout and SE blocks removed; pooling: max stays
    max, average stays average). Every conv and linear computes ``layer(x / max(x), weight=mask,
    bias=None)`` (the max is not detached, as in the release) and ``log_paths = log(sum(output)) + sum(log
    max(x))`` over every call. This equals the exact log count for chains without pooling only.
    Effective weight: ``|d log_paths / d mask| * mask > 0``; nodes: output channels / features with an
    effective weight, every layer; kernels as "exact". Where the release would divide by a zero maximum
    (NaN), the layer divides by 1; a result of zero paths gives ``-inf`` and no effective weight.
    Attention projections are masked and their inputs max-normalised as in our DPaI (the release's
    attention ran on its real weights, so its ``in_proj_weight`` was never effective).
    """
    counter = ReleasePathCount(copy.deepcopy(model).cpu(), input_shape, dtype=torch.float64)
    mask_w = {n: m.double().requires_grad_() for n, m in masks.items()}
    log_paths = counter(mask_w)
    if not bool(torch.isfinite(log_paths)):
        return _summary("dpai", -math.inf, {n: torch.zeros_like(m) for n, m in masks.items()}, masks)
    grads = dict(zip(mask_w, torch.autograd.grad(log_paths, list(mask_w.values()), allow_unused=True)))
    eff = {n: (grads[n].abs() * m > 0) if grads.get(n) is not None else torch.zeros_like(m) for n, m in masks.items()}
    return _summary("dpai", log_paths.item(), eff, masks)


def _replace_forward(module: nn.Module, forward: Callable[..., Any]) -> None:
    """Give ``module`` its own ``forward`` (an instance attribute; ``nn.Module`` declares ``forward`` as a
    replaceable callable, its subclasses as a method)."""
    module.forward = forward


def _npb_stats(model: nn.Module, masks: Masks, input_shape: tuple[int, ...]) -> dict:
    """NPB's ``measure_node_path``, on a float64 CPU copy in eval mode.

    BatchNorm modules are identities; ``AvgPool`` / ``AdaptiveAvgPool`` modules become sum pooling (our
    models use modules; NPB's lottery models pool functionally, which NPB cannot rescale, so its published
    counts are divided by those averages; its AvgPool2d rescale also appears to use the kernel size, not
    its square: we use the true window sum); max pooling is unchanged. All parameters (weights, biases,
    norm affines) are 1, pruned weights 0; input ones. ``log_paths = log(sum(output))`` with the sum in
    float64: beyond ``log_paths ~ 709.78`` the sum overflows to ``inf`` (a warning is issued; gradients,
    and hence the effective counts, are then unreliable too: use "exact"). Biases add "paths".
    Effective weight: kept, with a non-zero gradient of the sum. Nodes: for each conv that is not a
    shortcut (parameter name containing "shortcut", NPB's rule, or "downsample", torchvision's name), its
    input channels with an effective weight; for each linear layer (the classifier in our models) its
    effective input features plus its effective output features.
    """
    net = copy.deepcopy(model).double().cpu().eval()
    params = prunable_parameters(net)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
        for n, p in params.items():
            p.copy_(masks[n])
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _replace_forward(m, lambda x: x)
        elif isinstance(m, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)):
            pool = _window_sum if isinstance(m, nn.modules.pooling._AvgPoolNd) else _adaptive_sum
            _replace_forward(m, functools.partial(pool, m))
    total = net(torch.ones((1, *input_shape), dtype=torch.float64)).sum()
    total.backward()
    count = total.item()
    if math.isinf(count):
        warnings.warn("NPB path count overflows float64 (log_paths > 709.78); use variant='exact'",
                      RuntimeWarning, stacklevel=3)
    log_paths = math.log(count) if count > 0 else -math.inf
    eff = {n: (p.grad != 0) & masks[n] if p.grad is not None else torch.zeros_like(masks[n])
           for n, p in params.items()}

    def nodes(name: str, e: torch.Tensor) -> int:
        if e.dim() == 2:
            return int(e.any(0).sum()) + int(e.any(1).sum())
        if "shortcut" in name or "downsample" in name:
            return 0
        return int(e.transpose(0, 1).flatten(1).any(1).sum())

    return _summary("npb", log_paths, eff, masks, nodes)


def node_path_stats(model: nn.Module, masks: Mapping[str, Any], input_shape: tuple[int, ...], *,
                    variant: str = "exact") -> dict:
    """Effective paths, nodes, kernels and parameters of ``model`` pruned by ``masks``.

    ``variant``: ``"exact"`` (default; the exact DAG definition of the module docstring), ``"dpai"`` (the
    DPaI release's numbers) or ``"npb"`` (NPB's ``measure_node_path``). ``input_shape`` is one input's
    shape, e.g. ``(3, 32, 32)``. Returns ``{"variant", "log_paths" (natural log of the number of
    effective paths; -inf if none), "nodes", "kernels", "params" (effective counts), "layers": {name:
    {"nodes", "kernels", "params", "kept"}}}`` (``layers`` has every prunable parameter; for "npb" a layer's
    ``nodes`` is its contribution to NPB's node count). ``masks`` (name -> bool / 0-1 tensor) must match the
    model's prunable parameters (:class:`~dpai_lib.masks.MaskError` otherwise). ``model`` is never modified
    (the variants work on a float64 CPU deep copy).

    The variants differ in what they count (module docstring): "exact" counts every input->output path
    of the unit DAG (pooling windows summed, residual branches aligned) and decides effectiveness by exact
    reachability; "dpai" keeps max/avg pooling and the release's per-layer max normalisation (exact for
    pooling-free chains only) and calls a weight effective if ``|d log_paths / d mask| > 0``; "npb" sets
    every parameter, biases included, to 1 (biases add "paths"), leaves max pooling as a max and counts
    nodes as non-shortcut conv input channels plus classifier inputs and outputs. "exact" and "dpai" count
    nodes as output channels / features of every prunable layer, as the DPaI code does.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(map(repr, VARIANTS))}")
    masks = (masks if isinstance(masks, Masks) else Masks(masks)).validate(model)
    stats = {"exact": _exact_stats, "dpai": _dpai_stats, "npb": _npb_stats}[variant]
    with torch.enable_grad():
        return stats(model, masks, tuple(input_shape))
