"""Typed, frozen run configuration, loaded from YAML, with errors a user can act on.

A :class:`RunConfig` fully determines a run together with the code version: data set, model, pruning
method and sparsity, training schedule, seed and determinism. Every training hyper-parameter is a
required field - there are no hidden defaults; only engineering knobs (mixed precision, batch caps for
smoke runs) have defaults, and they are documented. Unknown or mistyped keys are errors that name the
key, the allowed keys and the closest match.
"""

from __future__ import annotations

import difflib
import typing
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that does not validate; the message lists every problem."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    name: str = Field(description="registered data set name (dpai_lib.data.list_datasets())")
    data_dir: str | None = Field(None, description="root of the data sets; None = $DPAI_DATA_DIR or ./data")
    download: bool = Field(False, description="let torchvision download CIFAR / Fashion-MNIST into data_dir")
    options: dict[str, Any] = Field(default_factory=dict, description="data-set options (e.g. synthetic sizes)")
    train_subset: int | None = Field(
        None, gt=0, description="train on this many training images only (a seeded random subset); None = all"
    )


class ModelConfig(StrictModel):
    name: str = Field(description="registered model name or tv:<torchvision name>")
    options: dict[str, Any] = Field(default_factory=dict, description="builder keyword arguments, e.g. image_size")


class PruneConfig(StrictModel):
    method: str = Field(description="registered pruner name (dpai_lib.list_pruners())")
    sparsity: float = Field(ge=0.0, lt=1.0, description="fraction of prunable weights removed")
    options: dict[str, Any] = Field(default_factory=dict, description="the pruner's hyper-parameters")
    data_batches: int | None = Field(
        None, gt=0, description="for pruners that score with data: number of training batches they get"
    )
    data_batch_size: int | None = Field(None, gt=0, description="size of those batches")


class TrainConfig(StrictModel):
    epochs: int = Field(ge=0, description="training epochs")
    batch_size: int = Field(gt=0, description="training batch size")
    test_batch_size: int = Field(gt=0, description="evaluation batch size")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, nesterov) or adamw (decoupled "
                                              "weight decay; betas 0.9, 0.999)")
    lr: float = Field(gt=0.0, description="initial (peak, for warmup_cosine) learning rate")
    momentum: float = Field(ge=0.0, lt=1.0, description="SGD momentum (must be 0 for adamw)")
    nesterov: bool = Field(description="Nesterov momentum (sgd only)")
    weight_decay: float = Field(ge=0.0, description="SGD: L2 weight decay on all parameters; AdamW: decoupled decay")
    schedule: Literal["multistep", "warmup_cosine"] = Field(
        "multistep", description="multistep: lr times lr_drop_factor at each epoch of lr_drops (stepped per epoch); "
        "warmup_cosine: linear warmup over warmup_steps iterations, then cosine to 0 at the last iteration")
    lr_drops: list[int] = Field(description="epochs at which the learning rate is multiplied by lr_drop_factor "
                                "(multistep; must be empty for warmup_cosine)")
    lr_drop_factor: float = Field(gt=0.0, le=1.0, description="MultiStepLR gamma")
    warmup_steps: int = Field(0, ge=0, description="warmup_cosine: iterations of linear warmup from 0")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    max_train_batches: int | None = Field(None, gt=0, description="cap on batches per epoch (smoke runs); None = all")
    max_test_batches: int | None = Field(None, gt=0, description="cap on evaluation batches (smoke runs); None = all")

    @field_validator("lr_drops")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or any(e <= 0 for e in v):
            raise ValueError(f"lr_drops must be strictly increasing positive epochs; got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.optimizer == "adamw" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum and nesterov are SGD's: with optimizer adamw they must be 0 and false; "
                             f"got momentum={self.momentum}, nesterov={self.nesterov}")
        if self.schedule == "warmup_cosine" and self.lr_drops:
            raise ValueError(f"lr_drops belong to the multistep schedule; with warmup_cosine they must be []; "
                             f"got {self.lr_drops}")
        if self.schedule == "multistep" and self.warmup_steps:
            raise ValueError(f"warmup_steps belongs to warmup_cosine; with multistep it must be 0; got {self.warmup_steps}")
        return self


class RunConfig(StrictModel):
    """One run, complete: seed, data, model, pruning and (optionally) training. Its canonical JSON is hashed
    into the run id, so two runs with equal configurations are the same run."""

    seed: int = Field(ge=0, description="seeds Python, NumPy and torch (and the pruner)")
    deterministic: bool = Field(description="deterministic algorithms (cuDNN deterministic, no benchmark)")
    data: DataConfig
    model: ModelConfig
    prune: PruneConfig
    train: TrainConfig | None = Field(
        description="the training schedule; null = prune and measure the masks only (no training)"
    )

    def canonical(self) -> dict[str, Any]:
        """JSON-ready dict with every field, defaults included: what the run id hashes."""
        return self.model_dump(mode="json")


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class at a validation-error location (through ``X | None`` and ``dict[str, X]``)."""
    for part in loc:
        if not isinstance(part, str):
            continue
        field = cls.model_fields.get(part)
        if field is None:  # a key of a dict[str, Model] field: stay on the value model found before
            continue
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in candidates for a in typing.get_args(c)]
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not models:
            return None
        cls = models[0]
    return cls


def _describe(errors: list[dict], root: type[BaseModel]) -> list[str]:
    lines = []
    for err in errors:
        loc = tuple(err["loc"])
        where = ".".join(map(str, loc)) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{where}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return lines


def validate_config(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain mapping into a :class:`RunConfig`, or raise :class:`ConfigError`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "\n  ".join(_describe(exc.errors(), RunConfig))
        raise ConfigError(f"{source}: invalid run configuration:\n  {problems}") from None


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a YAML run configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no configuration file at {path}")
    with path.open() as f:
        raw = yaml.safe_load(f)
    return validate_config(raw, source=str(path))
