"""Artefact parameter files: one YAML per table or figure of the paper, expanded into run configurations.

A params file is the only home of an artefact's hyper-parameters. It names the paper artefact, the
experiment template that runs it, the shared configuration (``base``), the network / data-set settings,
the pruners with their hyper-parameters, the grid (methods x sparsities x seeds per setting) and the
run tiers (``tiers:``, formerly ``budgets:``; "budget" now means only a pruner's layer-wise budget,
``erk`` or ``uniform``):

* ``smoke`` - CPU, offline data, a few batches and few pruning steps: for tests and laptops;
* ``short`` - a reduced training schedule on the real data;
* ``paper`` - the full schedule.

Each tier is a set of overrides deep-merged over every run (``all``), per setting (``settings``) and per
pruner (``methods``), and may run a smaller grid (``seeds``, ``sparsities``); the tier is recorded with
every run. Expansion validates every run as a :class:`~dpai_lib.config.RunConfig`,
so a typo anywhere in a params file fails before anything runs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import Field, PrivateAttr, ValidationError

from dpai_lib.config import ConfigError, RunConfig, StrictModel, _describe, _joined, config_problems, read_yaml, validate_config
from dpai_lib.errors import suggest, unknown

TierName = Literal["smoke", "short", "paper"]
TIERS: tuple[TierName, ...] = ("smoke", "short", "paper")


class Tier(StrictModel):
    all: dict[str, Any] = Field(default_factory=dict, description="overrides merged into every run")
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict, description="pruner name -> prune.options overrides")
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="setting name -> overrides")
    description: str = Field("", description="what this tier is for, in words")
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="run only the settings' seeds that are in this list")
    sparsities: list[Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, description="run only the settings' sparsities that are in this list (a smaller grid for smoke runs)")


class Setting(StrictModel):
    config: dict[str, Any] = Field(description="partial run configuration: data, model, train, ...")
    methods: list[str] = Field(min_length=1, description="pruners run in this setting")
    sparsities: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        min_length=1, description="fractions of weights removed, each in [0, 1)")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="seeds (integers >= 0)")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-setting pruner options")


class Artefact(StrictModel):
    artefact: str = Field(description="the params file's name, e.g. fig1_main")
    title: str
    paper_ref: str = Field(description="where in the paper, e.g. 'Figure 1'")
    notebook: str = Field(description="experiment template (jupytext MyST) that executes one run")
    stages: list[Literal["prune", "train"]] = Field(description="what a run does: prune (+ metrics), train")
    notes: str = Field("", description="sources of the values, choices where the paper is silent")
    base: dict[str, Any] = Field(default_factory=dict, description="partial run configuration shared by every run")
    methods: dict[str, dict[str, Any]] = Field(
        description="method name -> its hyper-parameters (prune.options); a method named other than its pruner "
        "(a variant, e.g. dpai_a0.5_b0.5) gives the registered pruner under the key 'pruner'")
    settings: dict[str, Setting]
    tiers: dict[TierName, Tier]

    _source: str = PrivateAttr("")  # the file it was read from, for messages
    _runs: dict[str, list[PlannedRun]] = PrivateAttr(default_factory=dict)  # expand() per tier, validated


def _keep(values: list, allowed: list | None) -> list:
    """``values`` restricted to ``allowed`` (all of them when ``allowed`` is None); floats within 1e-9."""
    if allowed is None:
        return list(values)
    return [v for v in values if any(abs(float(v) - float(a)) <= 1e-9 for a in allowed)]


@dataclass(frozen=True)
class PlannedRun:
    """One run of an artefact: its setting, method, tier and validated configuration."""

    artefact: str
    setting: str
    method: str
    tier: str
    config: RunConfig


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win; lists are replaced, not concatenated."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_artefact(path: str | os.PathLike) -> Artefact:
    """Read and fully validate a params file, or raise :class:`ConfigError` (one line naming the file and the
    key path of each problem). Validated: the structure, every name (data sets, models, pruners, methods,
    settings) with the closest known name, every pruner option (name and type, from the pruner function's
    annotations) where it is written, and every run of every tier (smoke, short, paper) as a runnable
    configuration, so a typo in a tier nobody runs today is caught too."""
    path = Path(path)
    try:
        key = (str(path), path.read_bytes())
    except OSError:
        key = None  # read_yaml names the problem
    if key in _LOADED:  # the same file with the same content: validated already
        return _LOADED[key]
    art = _load(path)
    if key is not None:
        if len(_LOADED) >= 64:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = art
    return art


_LOADED: dict[tuple[str, bytes], Artefact] = {}  # (path as given, content) -> validated artefact


def _load(path: Path) -> Artefact:
    raw = read_yaml(path, "params file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values (artefact, title, ..., tiers), got "
                          f"{'an empty file' if raw is None else type(raw).__name__}")
    if "budgets" in raw:
        raise ConfigError(f"{path}: budgets: renamed to 'tiers' (the run tiers smoke, short, paper); rename the key "
                          f"(a pruner's layer-wise budget, erk or uniform, keeps the name 'budget')")
    try:
        art = Artefact.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_joined(str(path), _describe(exc.errors(), Artefact))) from None
    if art.artefact != path.stem:
        raise ConfigError(f"{path}: artefact: {art.artefact!r} must equal the file name {path.stem!r}")
    problems = _problems(art)
    if problems:
        raise ConfigError(_joined(str(path), problems))
    art._source = str(path)
    for tier in TIERS:
        art._runs[tier] = _expand(art, tier)
    return art


def _problems(art: Artefact) -> list[tuple[str, str]]:
    """(key path, message) for everything wrong in ``art`` where it is written: names, pruner options,
    partial configurations and the tiers' grids. The merged runs are validated after this (:func:`_expand`)."""
    from dpai_lib.pruners import check_options, list_pruners

    problems: list[tuple[str, str]] = []
    missing = [t for t in TIERS if t not in art.tiers]
    if missing:
        problems.append(("tiers", f"every tier ({', '.join(TIERS)}) must be defined, even as {{}}; missing "
                                    f"{', '.join(missing)}"))
    pruners: dict[str, str] = {}  # method -> its registered pruner
    for method, options in art.methods.items():
        pruner = options.get("pruner", method)
        if not isinstance(pruner, str) or pruner not in list_pruners():
            where, note = (f"methods.{method}.pruner", "") if "pruner" in options else (
                f"methods.{method}", " (a method named other than its pruner gives the pruner under the key 'pruner')")
            problems.append((where, unknown("pruner", pruner, list_pruners()) + note))
            continue
        pruners[method] = pruner
        problems += [(f"methods.{method}.{k}", m) for k, m in check_options(
            pruner, {k: v for k, v in options.items() if k != "pruner"})]

    def overrides(where: str, method: str, options: dict[str, Any]) -> None:
        if "pruner" in options:
            problems.append((f"{where}.pruner", f"a method's pruner is set under methods.{method} only"))
        if method in pruners:
            problems.extend((f"{where}.{k}", m) for k, m in check_options(
                pruners[method], {k: v for k, v in options.items() if k != "pruner"}))

    partials = [("base", art.base)] + [(f"settings.{s}.config", st.config) for s, st in art.settings.items()]
    for tname, tier in art.tiers.items():
        partials += [(f"tiers.{tname}.all", tier.all)]
        partials += [(f"tiers.{tname}.settings.{s}", over) for s, over in tier.settings.items()]
    for where, partial in partials:
        problems += [(f"{where}.{k}", m) for k, m in config_problems(partial, partial=True)]
    for where, partial in partials[:1 + len(art.settings)]:  # the grid sets these for every run
        for key in ("seed", "prune.method", "prune.sparsity"):
            head, _, leaf = key.rpartition(".")
            if leaf in (partial.get(head, {}) if head else partial):
                problems.append((f"{where}.{key}", "set by the grid (a setting's methods, sparsities and seeds); "
                                                   "remove it here"))
    for name, setting in art.settings.items():
        for i, method in enumerate(setting.methods):
            if method not in art.methods:
                problems.append((f"settings.{name}.methods.{i}", unknown("method", method, art.methods)
                                 + " (methods are defined under 'methods')"))
        for method, options in setting.method_options.items():  # a method not run here is allowed (unused)
            if method not in art.methods:
                problems.append((f"settings.{name}.method_options.{method}", unknown("method", method, art.methods)))
            else:
                overrides(f"settings.{name}.method_options.{method}", method, options)
    for tname, tier in art.tiers.items():
        for name in tier.settings:
            if name not in art.settings:
                problems.append((f"tiers.{tname}.settings.{name}", unknown("setting", name, art.settings)))
        for method, options in tier.methods.items():
            if method not in art.methods:
                problems.append((f"tiers.{tname}.methods.{method}", unknown("method", method, art.methods)))
            else:
                overrides(f"tiers.{tname}.methods.{method}", method, options)
        for key, keep in (("seeds", tier.seeds), ("sparsities", tier.sparsities)):
            empty = [name for name, setting in art.settings.items() if not _keep(getattr(setting, key), keep)]
            if empty:
                problems.append((f"tiers.{tname}.{key}", f"tier {tname!r} keeps no seed or no sparsity of setting "
                                 f"{', '.join(map(repr, empty))} (this tier keeps {key} {keep}; the setting has "
                                 f"{getattr(art.settings[empty[0]], key)})"))
    return problems


def expand(art: Artefact, tier: str) -> list[PlannedRun]:
    """Every run of ``art`` in ``tier``, validated, in a stable order (setting, method, sparsity, seed)."""
    if tier not in TIERS:
        raise ConfigError(f"unknown tier {tier!r};{suggest(tier, TIERS)} allowed: {', '.join(TIERS)}")
    if tier not in art._runs:  # an Artefact built without load_artefact
        problems = _problems(art)
        if problems:
            raise ConfigError(_joined(art._source or art.artefact, problems))
        art._runs[tier] = _expand(art, tier)
    return list(art._runs[tier])


def _expand(art: Artefact, tier_name: str) -> list[PlannedRun]:
    tier = art.tiers[cast(TierName, tier_name)]  # expand() checked the name
    source = art._source or art.artefact
    runs = []
    for sname, setting in art.settings.items():
        shared = deep_merge(art.base, setting.config)
        for method in setting.methods:
            options = deep_merge(art.methods[method], setting.method_options.get(method, {}))
            options = deep_merge(options, tier.methods.get(method, {}))
            for sparsity in _keep(setting.sparsities, tier.sparsities):
                for seed in _keep(setting.seeds, tier.seeds):
                    opts = dict(options)
                    pruner = opts.pop("pruner", method)
                    raw = deep_merge(shared, {"seed": seed, "prune": {"method": pruner, "sparsity": sparsity,
                                                                    "options": opts}})
                    raw = deep_merge(raw, tier.all)
                    raw = deep_merge(raw, tier.settings.get(sname, {}))
                    where = (f"{source}: the run of tiers.{tier_name}, settings.{sname}, methods.{method}, "
                             f"sparsity {sparsity}, seed {seed}")
                    runs.append(PlannedRun(art.artefact, sname, method, tier_name,
                                           validate_config(raw, where, runnable=True)))
    return runs
