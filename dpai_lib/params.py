"""Artefact parameter files: one YAML per table or figure of the paper, expanded into run configurations.

A params file is the only home of an artefact's hyper-parameters. It names the paper artefact, the
experiment template that runs it, the shared configuration (``base``), the network / data-set settings,
the pruners with their hyper-parameters, the grid (methods x sparsities x seeds per setting) and the
budget tiers:

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
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from dpai_lib.config import ConfigError, RunConfig, StrictModel, _describe, validate_config

BUDGETS = ("smoke", "short", "paper")


class Budget(StrictModel):
    all: dict[str, Any] = Field(default_factory=dict, description="overrides merged into every run")
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict, description="pruner name -> prune.options overrides")
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="setting name -> overrides")
    description: str = Field("", description="what this tier is for, in words")
    seeds: list[int] | None = Field(None, description="run only the settings' seeds that are in this list")
    sparsities: list[float] | None = Field(
        None, description="run only the settings' sparsities that are in this list (a smaller grid for smoke runs)")


class Setting(StrictModel):
    config: dict[str, Any] = Field(description="partial run configuration: data, model, train, ...")
    methods: list[str] = Field(description="pruners run in this setting")
    sparsities: list[float] = Field(description="fractions of weights removed")
    seeds: list[int] = Field(description="seeds")
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
    budgets: dict[Literal["smoke", "short", "paper"], Budget]

    @model_validator(mode="after")
    def _consistent(self) -> Artefact:
        missing = [b for b in BUDGETS if b not in self.budgets]
        if missing:
            raise ValueError(f"budgets must define every tier {BUDGETS}; missing {missing}")
        for tier, budget in self.budgets.items():
            unknown = [s for s in budget.settings if s not in self.settings]
            if unknown:
                raise ValueError(f"budget {tier!r} overrides unknown settings {unknown}")
            for name, setting in self.settings.items():
                if not _keep(setting.seeds, budget.seeds) or not _keep(setting.sparsities, budget.sparsities):
                    raise ValueError(f"budget {tier!r} keeps no seed or no sparsity of setting {name!r} "
                                     f"(seeds {setting.seeds}, sparsities {setting.sparsities})")
        for name, setting in self.settings.items():
            unknown = [m for m in setting.methods if m not in self.methods]
            if unknown:
                raise ValueError(f"setting {name!r} runs {unknown}, which are not under 'methods'")
        return self


def _keep(values: list, allowed: list | None) -> list:
    """``values`` restricted to ``allowed`` (all of them when ``allowed`` is None); floats within 1e-9."""
    if allowed is None:
        return list(values)
    return [v for v in values if any(abs(float(v) - float(a)) <= 1e-9 for a in allowed)]


@dataclass(frozen=True)
class PlannedRun:
    """One run of an artefact: its setting, method, budget and validated configuration."""

    artefact: str
    setting: str
    method: str
    budget: str
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}")
    raw = yaml.safe_load(path.read_text())
    try:
        art = Artefact.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(exc.errors(), Artefact))
        raise ConfigError(f"{path}: invalid params file:\n  {problems}") from None
    if art.artefact != path.stem:
        raise ConfigError(f"{path}: 'artefact: {art.artefact}' must equal the file name {path.stem!r}")
    return art


def expand(art: Artefact, budget: str) -> list[PlannedRun]:
    """Every run of ``art`` under ``budget``, validated, in a stable order (setting, method, sparsity, seed)."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; allowed: {', '.join(BUDGETS)}")
    tier = art.budgets[budget]
    runs = []
    for sname, setting in art.settings.items():
        for method in setting.methods:
            options = deep_merge(art.methods[method], setting.method_options.get(method, {}))
            options = deep_merge(options, tier.methods.get(method, {}))
            for sparsity in _keep(setting.sparsities, tier.sparsities):
                for seed in _keep(setting.seeds, tier.seeds):
                    raw = deep_merge(art.base, setting.config)
                    opts = dict(options)
                    pruner = opts.pop("pruner", method)
                    raw = deep_merge(raw, {"seed": seed, "prune": {"method": pruner, "sparsity": sparsity,
                                                                    "options": opts}})
                    raw = deep_merge(raw, tier.all)
                    raw = deep_merge(raw, tier.settings.get(sname, {}))
                    where = f"{art.artefact} [{budget}] {sname}/{method}/s={sparsity}/seed={seed}"
                    runs.append(PlannedRun(art.artefact, sname, method, budget, validate_config(raw, where)))
    return runs
