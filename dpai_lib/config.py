"""Typed, frozen run configuration, loaded from YAML, with errors a user can act on.

A :class:`RunConfig` fully determines a run together with the code version: data set, model, pruning
method and sparsity, training schedule, seed and determinism. Every training hyper-parameter is a
required field - there are no hidden defaults; only engineering knobs (mixed precision, batch caps for
smoke runs) have defaults, and they are documented. Unknown or mistyped keys are errors that name the
key, the allowed keys and the closest match.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from dpai_lib.errors import UserError, one_line, short, suggest, unknown


class ConfigError(UserError):
    """A configuration that does not validate; the message (one line) names the file, each bad key and what is
    allowed."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    name: str = Field(description="registered data set name (dpai_lib.data.list_datasets())")
    data_dir: str | None = Field(default=None, description="root of the data sets; None = $DPAI_DATA_DIR or ./data")
    download: bool = Field(default=False, description="let torchvision download CIFAR / Fashion-MNIST into data_dir")
    options: dict[str, Any] = Field(default_factory=dict, description="data-set options (e.g. synthetic sizes)")
    train_subset: int | None = Field(
        default=None, gt=0, description="train on this many training images only (a seeded random subset); None = all"
    )


class ModelConfig(StrictModel):
    name: str = Field(description="registered model name or tv:<torchvision name>")
    options: dict[str, Any] = Field(default_factory=dict, description="builder keyword arguments, e.g. image_size")


class PruneConfig(StrictModel):
    method: str = Field(description="registered pruner name (dpai_lib.list_pruners())")
    sparsity: float = Field(ge=0.0, lt=1.0, description="fraction of prunable weights removed")
    options: dict[str, Any] = Field(default_factory=dict, description="the pruner's hyper-parameters")
    data_batches: int | None = Field(
        default=None, gt=0, description="for pruners that score with data: number of training batches they get"
    )
    data_batch_size: int | None = Field(default=None, gt=0, description="size of those batches")


class TrainConfig(StrictModel):
    epochs: int = Field(ge=0, description="training epochs")
    batch_size: int = Field(gt=0, description="training batch size")
    test_batch_size: int = Field(gt=0, description="evaluation batch size")
    optimizer: Literal["sgd", "adamw"] = Field(default="sgd", description="sgd (momentum, nesterov) or adamw (decoupled "
                                              "weight decay; betas 0.9, 0.999)")
    lr: float = Field(gt=0.0, description="initial (peak, for warmup_cosine) learning rate")
    momentum: float = Field(ge=0.0, lt=1.0, description="SGD momentum (must be 0 for adamw)")
    nesterov: bool = Field(description="Nesterov momentum (sgd only)")
    weight_decay: float = Field(ge=0.0, description="SGD: L2 weight decay on all parameters; AdamW: decoupled decay")
    schedule: Literal["multistep", "warmup_cosine"] = Field(
        default="multistep", description="multistep: lr times lr_drop_factor at each epoch of lr_drops (stepped per epoch); "
        "warmup_cosine: linear warmup over warmup_steps iterations, then cosine to 0 at the last iteration")
    lr_drops: list[int] = Field(description="epochs at which the learning rate is multiplied by lr_drop_factor "
                                "(multistep; must be empty for warmup_cosine)")
    lr_drop_factor: float = Field(gt=0.0, le=1.0, description="MultiStepLR gamma")
    warmup_steps: int = Field(default=0, ge=0, description="warmup_cosine: iterations of linear warmup from 0")
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on CPU)")
    max_train_batches: int | None = Field(default=None, gt=0, description="cap on batches per epoch (smoke runs); None = all")
    max_test_batches: int | None = Field(default=None, gt=0, description="cap on evaluation batches (smoke runs); None = all")

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


def _describe(errors: list[ErrorDetails], root: type[BaseModel], *, partial: bool = False) -> list[tuple[str, str]]:
    """(key path, message) per pydantic error. ``partial``: the input is a part of a configuration that is
    merged with others before it runs (a params file's ``base``, a setting's ``config``, ...), so missing
    keys and checks that need the whole section (e.g. momentum vs optimizer) are left to the merged run."""
    problems = []
    for err in errors:
        loc = tuple(err["loc"])
        where = ".".join(map(str, loc)) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = suggest(loc[-1], allowed)
            problems.append((where, f"unknown key;{hint} allowed keys here: {', '.join(allowed)}"))
        elif err["type"] == "missing":
            if not partial:
                problems.append((where, "required key is missing"))
        elif partial and err["type"] in ("value_error", "assertion_error") and _model_at(root, loc) is not None:
            continue  # a check of a whole section (model validator): judged on the merged run
        else:
            msg, value = err["msg"].removeprefix("Value error, "), err.get("input")
            got = "" if isinstance(value, Mapping) and err["type"] == "value_error" else f" (got {short(value)})"
            problems.append((where, f"{msg}{got}"))
    return problems


def _joined(source: str, problems: list[tuple[str, str]], limit: int = 4) -> str:
    """One line: ``source: key.path: problem; other.key: problem (and N more)``."""
    text = "; ".join(f"{where}: {msg}" if where else msg for where, msg in problems[:limit])
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return one_line(f"{source}: {text}{more}")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _keyword_problems(options: Mapping[str, Any], defaults: Mapping[str, Any], owner: str) -> list[tuple[str, str]]:
    """Options checked against a data set's or model builder's keywords: names, and int/float/bool/str types
    taken from the defaults (strictly; an int is a valid float)."""
    from pydantic import ConfigDict, TypeAdapter

    problems = []
    for name, value in options.items():
        if name not in defaults:
            problems.append((str(name), f"unknown option of {owner};{suggest(name, defaults)} its options: "
                                        f"{', '.join(defaults) or 'none'}"))
            continue
        kind = type(defaults[name])
        if kind in (int, float, bool, str):
            try:
                TypeAdapter(kind, config=ConfigDict(strict=True)).validate_python(value)
            except ValidationError:
                problems.append((str(name), f"option {name!r} of {owner} must be {_WORDS[kind]}; got {short(value)}"))
    return problems


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def name_problems(raw: Mapping[str, Any], *, runnable: bool = False) -> list[tuple[str, str]]:
    """What a (possibly partial) run configuration names that does not exist, as (key path, message): the
    data set, model and pruner names (with the closest known name), their options (names and types) and,
    with ``runnable``, the pruning data that a pruner scoring with data needs. Keys that are absent are not
    judged here (the structural validation says which are required)."""
    from dpai_lib import data as datamod
    from dpai_lib.models import MODELS, TORCHVISION_PREFIX, list_models
    from dpai_lib.pruners import check_options, list_pruners, needs_data

    problems: list[tuple[str, str]] = []
    data, model, prune = _mapping(raw.get("data")), _mapping(raw.get("model")), _mapping(raw.get("prune"))
    name = data.get("name")
    if isinstance(name, str):
        if name not in datamod.DATASETS:
            problems.append(("data.name", unknown("data set", name, datamod.list_datasets())))
        else:
            problems += [(f"data.options.{k}", m) for k, m in _keyword_problems(
                _mapping(data.get("options")), datamod.DATASETS.get(name).options, f"data set {name!r}")]
    name = model.get("name")
    if isinstance(name, str):
        if name.startswith(TORCHVISION_PREFIX):
            from dpai_lib.models import _torchvision_names

            tv = _torchvision_names()
            if name[len(TORCHVISION_PREFIX):] not in tv:
                problems.append(("model.name", unknown("torchvision model", name, [TORCHVISION_PREFIX + n for n in tv])))
        elif name not in list_models():
            problems.append(("model.name", unknown("model", name, list_models()) + " (or 'tv:<torchvision name>')"))
        else:
            sig = inspect.signature(MODELS.get(name))
            defaults = {n: p.default for n, p in sig.parameters.items()
                        if n != "num_classes" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
                problems += [(f"model.options.{k}", m) for k, m in _keyword_problems(
                    _mapping(model.get("options")), defaults, f"model {name!r}")]
    method = prune.get("method")
    if isinstance(method, str):
        if method not in list_pruners():
            problems.append(("prune.method", unknown("pruner", method, list_pruners())))
        else:
            problems += [(f"prune.options.{k}", m) for k, m in check_options(method, _mapping(prune.get("options")))]
            if runnable and needs_data(method) and (
                    prune.get("data_batches") is None or prune.get("data_batch_size") is None):
                problems.append(("prune.data_batches", f"pruner {method!r} scores weights with data: set both "
                                 "prune.data_batches and prune.data_batch_size (the number and size of the "
                                 "training batches it gets)"))
    return problems


def config_problems(raw: Mapping[str, Any], *, partial: bool = False, runnable: bool = False) -> list[tuple[str, str]]:
    """Every problem of a run configuration (or, with ``partial``, of a part of one), as (key path, message):
    unknown or mistyped keys, then unknown names and options (:func:`name_problems`)."""
    try:
        RunConfig.model_validate(dict(raw))
        problems = []
    except ValidationError as exc:
        problems = _describe(exc.errors(), RunConfig, partial=partial)
    return problems + name_problems(raw, runnable=runnable and not partial)


def validate_config(raw: Mapping[str, Any], source: str = "config", *, runnable: bool = False) -> RunConfig:
    """Validate a plain mapping into a :class:`RunConfig`, or raise :class:`ConfigError` (one line naming
    ``source``, each bad key and what is allowed). Names of data sets, models and pruners and the pruner's
    options are checked too; ``runnable`` also requires what running needs (pruning data for the pruners
    that score with data)."""
    if raw is None:
        raise ConfigError(f"{source}: the configuration is empty; expected a mapping of keys to values")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    problems = config_problems(raw, runnable=runnable)
    if problems:
        raise ConfigError(_joined(source, problems))
    return RunConfig.model_validate(dict(raw))


def read_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    """The content of a YAML file, or a :class:`ConfigError` naming the file: missing, a folder, unreadable,
    or a YAML syntax error (with its line and column)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
        hint = suggest(path.name, near)
        raise ConfigError(f"no {what} at {path}" + (f";{hint} ({path.parent} has {', '.join(near)})" if hint else ""))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read this {what}: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            context += f" that starts at line {start.line + 1}"
        raise ConfigError(one_line(f"{path}: {at}YAML syntax error: {problem}" + (f" ({context})" if context else ""))) from None


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a YAML run configuration file and validate it as a runnable configuration."""
    return validate_config(read_yaml(path, "configuration file"), source=str(path), runnable=True)
