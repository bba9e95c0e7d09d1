"""The pruning network: one traced graph of a model in which the blocks that carry no edges are gone.

Path counting (the DPaI release's count, the exact count of :mod:`dpai_lib.metrics`), DPaI, NPB and
PHEW all look at the same network: the model's convolutions, linear layers, attention, pooling, additions
and reshapes, with every **normalisation, activation, dropout and gating block removed**, whether the
model calls it as a module (``nn.ReLU``), as a function (``F.relu``, ``torch.relu``, in-place variants) or
as a tensor method (``x.relu()``). :func:`pruning_network` traces the model once with ``torch.fx`` and
deletes those nodes from the graph, so the result does not depend on how a model spells its activations.

Why this matters: with ReLU left in, an all-ones forward through masked weights is unchanged (all values
are >= 0), but the *gradient* of ReLU at 0 is 0, so a unit that currently has no path gets no path
gradient and can never be revived by DPaI's score updates. The DPaI release swaps ``nn.ReLU`` modules
for identities; its ResNets call ``F.relu``, which a module swap cannot reach, so a module swap alone is
not the release's network for them.

The table (:data:`IDENTITY_MODULES`, :data:`IDENTITY_FUNCTIONS`, :data:`IDENTITY_METHODS`) is the single
list of what is an identity here; add to it to support a new block. torchvision's squeeze-excitation and
stochastic-depth blocks are identities too (as in the DPaI release), kept whole as leaves of the trace.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from dpai_lib.masks import prunable_parameters

IDENTITY_MODULE_NAMES = (
    "BatchNorm1d BatchNorm2d BatchNorm3d SyncBatchNorm LazyBatchNorm1d LazyBatchNorm2d LazyBatchNorm3d "
    "GroupNorm LayerNorm RMSNorm LocalResponseNorm InstanceNorm1d InstanceNorm2d InstanceNorm3d "
    "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Identity "
    "ReLU ReLU6 LeakyReLU PReLU RReLU ELU SELU CELU GELU SiLU Mish Hardswish Hardsigmoid Hardtanh Sigmoid Tanh "
    "Softplus Softsign Tanhshrink LogSigmoid Softmax LogSoftmax Threshold"
).split()
#: Modules that are identities in the pruning network (torchvision's SE and stochastic depth are added
#: by :func:`identity_modules`, which imports torchvision lazily).
IDENTITY_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n) for n in IDENTITY_MODULE_NAMES if hasattr(nn, n))
#: Functions that are identities in the pruning network (their first argument passes through).
IDENTITY_FUNCTIONS = frozenset(
    f for f in (
        F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu,
        torch.selu, torch.selu_, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
        F.hardtanh_, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.softsign, F.logsigmoid,
        # torch.threshold_ is F.threshold_ (the same object; torch's functional.pyi does not declare F.threshold_)
        F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.threshold, torch.threshold_, F.prelu,
        F.rrelu, F.rrelu_, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
        F.feature_alpha_dropout, torch.dropout, torch.dropout_, F.batch_norm, F.layer_norm, F.group_norm,
        F.instance_norm, F.local_response_norm, getattr(F, "rms_norm", None),
    ) if f is not None)
#: Tensor methods that are identities in the pruning network.
IDENTITY_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax",
})


@functools.cache
def identity_modules() -> tuple[type[nn.Module], ...]:
    """:data:`IDENTITY_MODULES` plus torchvision's ``SqueezeExcitation`` and ``StochasticDepth``."""
    from torchvision.ops import SqueezeExcitation, StochasticDepth

    return IDENTITY_MODULES + (SqueezeExcitation, StochasticDepth)


class _Tracer(fx.Tracer):
    """Identity blocks are leaves (so SE blocks are not traced into), as are torch.nn modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, identity_modules()) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with identity blocks as leaves; ``NotImplementedError`` naming the
    model and the reason when it cannot be traced (data-dependent control flow, for instance)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:
        raise NotImplementedError(
            f"the pruning network needs a torch.fx-traceable model; {type(model).__name__} is not: "
            f"{type(err).__name__}: {err}") from err
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def target_name(node: fx.Node) -> str:
    """The qualified name a ``call_module``, ``call_method`` or ``get_attr`` node targets (``torch.fx`` keeps
    a callable as the target of ``call_function`` nodes only)."""
    assert isinstance(node.target, str), f"{node.op} node with a non-name target {node.target!r}"
    return node.target


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a graph node is an identity of the pruning network (module, function or method)."""
    if node.op == "call_module":
        return isinstance(modules[target_name(node)], identity_modules())
    if node.op == "call_function":
        return node.target in IDENTITY_FUNCTIONS
    if node.op == "call_method":
        return node.target in IDENTITY_METHODS
    return False


def _passed_through(node: fx.Node) -> fx.Node:
    """The argument an identity node passes on: its first positional argument (or ``input=``)."""
    arg = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(arg, fx.Node):
        raise NotImplementedError(f"pruning network: cannot tell what {node.format_node()} passes through")
    return arg


def pruning_network(model: nn.Module) -> fx.GraphModule:
    """The model's pruning network: a deep copy in eval mode, traced, with every identity block (see the
    module docstring) removed from the graph and ``pos_embedding`` tensors zeroed (ViT, as in the DPaI
    release). ``model`` is not modified. Prunable parameters keep their names; the parameters of removed
    blocks (norm affines) are gone. Raises ``NotImplementedError`` for a model ``torch.fx`` cannot trace."""
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in net.modules():
            pos_embedding = getattr(module, "pos_embedding", None)
            if isinstance(pos_embedding, torch.Tensor):
                pos_embedding.zero_()
    gm = trace(net)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if is_identity(node, modules):
            node.replace_all_uses_with(_passed_through(node))
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


class ReleasePathCount:
    """``log R_P`` as the release computes it, on the model's :func:`~dpai_lib.paths.pruning_network`:
    an all-ones input, the weights given to ``__call__`` (masks) in place of the prunable parameters,
    biases 0, pooling unchanged; each conv/linear divides its input by the input's maximum (1 where the
    maximum is 0, so an empty layer gives ``-inf``, not NaN) and ``log R_P = log(sum(output)) + sum(log
    maxima)``. Differentiable w.r.t. the weights; ``dtype`` is the arithmetic (the release: float32)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32) -> None:
        self.net = pruning_network(model).to(dtype)
        self.names = list(prunable_parameters(model))
        self.present = set(dict(self.net.named_parameters()))  # without the convs of blocks made identities (SE)
        self.logs: list[torch.Tensor] = []
        device = next(iter(prunable_parameters(model).values())).device
        self.dtype = dtype
        self.x = torch.ones(1, *input_shape, device=device, dtype=dtype)
        self.zero_biases = {n: torch.zeros_like(p) for n, p in self.net.named_parameters() if n.endswith("bias")}
        for module in self.net.modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
                module.register_forward_pre_hook(self._normalise)

    def _normalise(self, module: nn.Module, args: tuple) -> tuple:
        # Attention (ours, not the release's): query, key and value are divided by the query's maximum,
        # so the value paths are counted like a linear layer's and deep ViTs do not overflow.
        n = 3 if isinstance(module, nn.MultiheadAttention) else 1
        c = args[0].max()
        c = torch.where(c > 0, c, torch.ones_like(c))
        self.logs.append(torch.log(c))
        return (*(a / c for a in args[:n]), *args[n:])

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.logs = []
        weights = {n: w.to(self.dtype) for n, w in weights.items() if n in self.present}
        out = functional_call(self.net, {**self.zero_biases, **weights}, (self.x,))
        return torch.log(out.sum()) + torch.stack(self.logs).sum()
