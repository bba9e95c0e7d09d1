"""Masks as first-class values: a mapping from prunable-parameter name to a bool tensor.

A :class:`Masks` value checks its own content (bool / 0-1 values), validates itself against a model
(names, shapes), reports global and per-layer density, detects collapsed layers, zeroes pruned weights,
keeps them at zero after every optimizer step, and saves to / loads from a safetensors file. It works on
any ``nn.Module``: no custom layer classes are needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpai_lib.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "dpai_lib.masks/1"


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights that pruning may remove, in module order, by their ``named_parameters`` name.

    Prunable: the ``weight`` of every convolution (``nn.Conv1d/2d/3d`` and transposed) and ``nn.Linear``
    (including attention ``out_proj``), and the input projections of ``nn.MultiheadAttention``
    (``in_proj_weight`` or ``q/k/v_proj_weight``), which torchvision's transformers keep as raw
    parameters. Never prunable: biases, normalisation layers, embeddings, class tokens, positional
    embeddings. A parameter shared between modules is listed once.
    """
    ids = {}
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            ids[id(module.weight)] = True
        elif isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = getattr(module, attr, None)
                if isinstance(p, nn.Parameter):
                    ids[id(p)] = True
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


class MaskError(UserError):
    """A mask that does not fit its model, or whose content is not 0/1."""


def _as_bool(name: str, value: Any) -> torch.Tensor:
    t = torch.as_tensor(value).detach()
    if t.dtype == torch.bool:
        return t.cpu()
    if t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        bad = (t != 0) & (t != 1)
        if bool(bad.any()):
            raise MaskError(f"mask {name!r} must contain only 0 and 1; found e.g. {t[bad].flatten()[0].item()!r}")
        return (t != 0).cpu()
    raise MaskError(f"mask {name!r} has dtype {t.dtype}; expected bool or 0/1 numbers")


class Masks(Mapping[str, torch.Tensor]):
    """Immutable mapping parameter name -> bool tensor (``True`` = kept), stored on the CPU.

    ``meta`` carries what the pruner that made the masks wants to report (e.g. DPaI's per-step trace);
    it is not part of the masks' value and is not saved to files.
    """

    def __init__(self, masks: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
        self._masks: dict[str, torch.Tensor] = {str(n): _as_bool(str(n), m) for n, m in masks.items()}
        self.meta: dict[str, Any] = dict(meta or {})

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module) -> Masks:
        """A dense mask (everything kept) for every prunable parameter of ``model``."""
        return cls({n: torch.ones(p.shape, dtype=torch.bool) for n, p in prunable_parameters(model).items()})

    @classmethod
    def from_weights(cls, model: nn.Module) -> Masks:
        """Masks that keep exactly the non-zero prunable weights of ``model``."""
        return cls({n: p.detach() != 0 for n, p in prunable_parameters(model).items()})

    # -- mapping protocol --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, {self.kept():,}/{self.total():,} kept, sparsity {self.sparsity():.4%})"

    # -- checks ------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> Masks:
        """Raise :class:`MaskError` unless the keys and shapes equal ``model``'s prunable parameters."""
        params = prunable_parameters(model)
        missing = [n for n in params if n not in self._masks]
        extra = [n for n in self._masks if n not in params]
        if missing or extra:
            raise MaskError(
                "masks do not match the model's prunable parameters: "
                + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
                + (f"not prunable in this model {extra[:5]}{' ...' if len(extra) > 5 else ''}; " if extra else "")
                + f"the model's prunable parameters are {list(params)[:5]}{' ...' if len(params) > 5 else ''}"
            )
        for n, p in params.items():
            if tuple(self._masks[n].shape) != tuple(p.shape):
                raise MaskError(f"mask {n!r} has shape {tuple(self._masks[n].shape)}; the weight has {tuple(p.shape)}")
        return self

    # -- reports -----------------------------------------------------------------------------------
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def total(self) -> int:
        return int(sum(m.numel() for m in self._masks.values()))

    def density(self) -> float:
        """Global fraction of prunable weights kept."""
        return self.kept() / self.total() if self.total() else 1.0

    def sparsity(self) -> float:
        """Global fraction of prunable weights removed."""
        return 1.0 - self.density()

    def layer_kept(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self._masks.items()}

    def layer_density(self) -> dict[str, float]:
        return {n: int(m.sum()) / m.numel() for n, m in self._masks.items()}

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - d for n, d in self.layer_density().items()}

    def collapsed_layers(self) -> list[str]:
        """Names of tensors with no kept weight at all (layer collapse: the network is disconnected)."""
        return [n for n, m in self._masks.items() if not bool(m.any())]

    def report(self) -> pd.DataFrame:
        """One row per tensor: name, shape, numel, kept, density, sparsity, collapsed."""
        import pandas as pd

        rows = [
            {
                "name": n,
                "shape": "x".join(map(str, m.shape)),
                "numel": m.numel(),
                "kept": int(m.sum()),
                "density": int(m.sum()) / m.numel(),
                "sparsity": 1.0 - int(m.sum()) / m.numel(),
                "collapsed": not bool(m.any()),
            }
            for n, m in self._masks.items()
        ]
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """JSON-ready global numbers, for run records."""
        return {
            "kept": self.kept(),
            "total": self.total(),
            "density": self.density(),
            "sparsity": self.sparsity(),
            "collapsed_layers": self.collapsed_layers(),
            "layer_density": self.layer_density(),
        }

    # -- acting on a model -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place (after validating); returns ``model``."""
        self.validate(model)
        params = prunable_parameters(model)
        with torch.no_grad():
            for n, m in self._masks.items():
                p = params[n]
                p.mul_(m.to(device=p.device, dtype=p.dtype))
        return model

    def enforce(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> MaskEnforcer:
        """Zero pruned weights now and after every ``optimizer.step()`` (a step post-hook)."""
        return MaskEnforcer(model, self, optimizer)

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write a safetensors file (atomically); ``metadata`` must be JSON-serialisable."""
        from safetensors.torch import save

        from dpai_lib.store import atomic_write

        path = Path(path)
        meta = {"format": FORMAT, "order": json.dumps(list(self._masks))}
        if metadata:
            meta["user"] = json.dumps(dict(metadata))
        with atomic_write(path, "wb") as f:
            f.write(save({n: m.contiguous() for n, m in self._masks.items()}, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Masks:
        """Read a file written by :meth:`save` (tensor order preserved). A missing file is a
        ``FileNotFoundError``; a file that is not a masks file (not safetensors, another format, tensors
        missing or unlisted) is a :class:`MaskError` naming the file."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no masks file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise MaskError(f"{path}: not a dpai_lib masks file (format {meta.get('format')!r}, "
                                    f"expected {FORMAT!r})")
                try:
                    order = json.loads(meta["order"])
                except (KeyError, ValueError):
                    raise MaskError(f"{path}: damaged masks file: its metadata has no valid tensor 'order'") from None
                stored = set(f.keys())
                missing = [n for n in order if n not in stored]
                extra = sorted(stored - set(order))
                if missing or extra:
                    raise MaskError(f"{path}: damaged masks file: " + "; ".join(
                        ([f"tensors listed but missing {missing[:5]}"] if missing else [])
                        + ([f"tensors not listed {extra[:5]}"] if extra else [])))
                try:
                    return cls({n: f.get_tensor(n) for n in order})
                except MaskError as err:  # content that is not 0/1
                    raise MaskError(f"{path}: {err}") from None
        except SafetensorError as err:
            raise MaskError(f"{path}: not a masks file (not a readable safetensors file: {err})") from None

class MaskEnforcer:
    """Keeps pruned weights at exactly zero: applied once, then after every optimizer step.

    Masks are cached on the weights' device and dtype; all tensors are multiplied in one fused
    ``torch._foreach_mul_`` call. Call :meth:`remove` to detach it from the optimizer.
    """

    def __init__(self, model: nn.Module, masks: Masks, optimizer: torch.optim.Optimizer | None = None) -> None:
        masks.validate(model)
        params = prunable_parameters(model)
        self.params: list[torch.Tensor] = [params[n] for n in masks]
        self.masks = [masks[n].to(device=p.device, dtype=p.dtype) for n, p in zip(masks, self.params)]
        self._handle = optimizer.register_step_post_hook(lambda *_: self()) if optimizer is not None else None
        self()

    @torch.no_grad()
    def __call__(self) -> None:
        torch._foreach_mul_(self.params, self.masks)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
