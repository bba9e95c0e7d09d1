"""Run records -> one tidy CSV per artefact, and the status of every artefact (expected/done/failed/missing).

Columns of ``results/<artefact>.csv`` (one row per record; see :data:`COLUMNS`): the labels (setting,
method, tier), the configuration (dataset, model, sparsity, seed, stage), the status, the masks'
effective paths / nodes / kernels / params in our exact definition and in the DPaI release's, the
pruning time, accuracies, and where the run was made (device, threads, commit).

Readers for the book: :func:`load_table` (the collected CSV), :func:`artefact_records` (the full records,
e.g. DPaI's per-step trace), :func:`load_paper` (the paper's numbers, transcribed with their source) and
:func:`scoreboard` (which artefacts are complete, partial or not run, by tier).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from dpai_lib.params import TIERS, PlannedRun, load_artefact
from dpai_lib.runs import run_id
from dpai_lib.store import CorruptRecordError, atomic_write, read_record

if TYPE_CHECKING:
    from dpai_lib.pipeline import Paths

log = logging.getLogger(__name__)
CORRUPT = {"status": "corrupt"}  # what read() gives for an unreadable record

COLUMNS = [
    "artefact", "setting", "method", "pruner", "tier", "stage", "dataset", "model", "sparsity", "seed", "run_id",
    "status", "error", "log_paths", "nodes", "kernels", "params", "log_paths_dpai", "nodes_dpai",
    "kernels_dpai", "params_dpai", "kept", "collapsed_layers", "prune_s", "train_s", "total_s",
    "final_test_acc", "best_test_acc", "epochs_run", "device_name", "torch_threads", "git_commit",
]


def record_row(artefact: str, rec: dict[str, Any]) -> dict[str, Any]:
    cfg, res, lab = rec["config"], rec.get("results", {}), rec.get("labels", {})
    exact = res.get("node_path", {}).get("exact", {})
    release = res.get("node_path", {}).get("dpai", {})
    masks = res.get("masks", {})
    timings, prov = rec.get("timings", {}), rec.get("provenance", {})
    return {
        "artefact": artefact, "setting": lab.get("setting"), "method": lab.get("method", cfg["prune"]["method"]),
        "pruner": cfg["prune"]["method"],
        "tier": lab.get("tier"), "stage": "prune" if cfg.get("train") is None else "all",
        "dataset": cfg["data"]["name"], "model": cfg["model"]["name"], "sparsity": cfg["prune"]["sparsity"],
        "seed": cfg["seed"], "run_id": rec["run_id"], "status": rec["status"], "error": rec.get("error"),
        "log_paths": exact.get("log_paths"), "nodes": exact.get("nodes"), "kernels": exact.get("kernels"),
        "params": exact.get("params"), "log_paths_dpai": release.get("log_paths"), "nodes_dpai": release.get("nodes"),
        "kernels_dpai": release.get("kernels"), "params_dpai": release.get("params"), "kept": masks.get("kept"),
        "collapsed_layers": len(masks.get("collapsed_layers", [])) if masks else None,
        "prune_s": timings.get("prune_s"), "train_s": timings.get("train_s"), "total_s": timings.get("total_s"),
        "final_test_acc": res.get("final_test_acc"), "best_test_acc": res.get("best_test_acc"),
        "epochs_run": res.get("epochs_run"), "device_name": prov.get("device_name"),
        "torch_threads": prov.get("torch_threads"), "git_commit": prov.get("git_commit"),
    }


def read(path: Path, rid: str) -> dict[str, Any] | None:
    """The record at ``path`` for run ``rid``; None if there is none; :data:`CORRUPT` (and a warning naming
    the file and what is wrong) if it cannot be read: readers skip it, ``run`` redoes the run."""
    try:
        return read_record(path, rid)
    except FileNotFoundError:
        return None
    except CorruptRecordError as exc:
        log.warning("skipping %s; `python -m dpai_lib run` redoes the run", exc)
        return CORRUPT


def _paths(paths: Paths | None) -> Paths:
    from dpai_lib.pipeline import Paths

    return paths or Paths.at()


def artefact_runs(artefact: str, *, paths: Paths | None = None) -> list[PlannedRun]:
    """Every planned run of an artefact: each run tier (paper first), the full runs and their data-free
    (prune-only) part; a configuration that several tiers or stages share is listed once, under the first."""
    from dpai_lib.pipeline import plan

    params_dir = _paths(paths).params
    art = load_artefact(params_dir / f"{artefact}.yaml")
    stages = ("all", "prune") if "train" in art.stages else ("prune",)
    seen: set[str] = set()
    runs = []
    for tier in reversed(TIERS):
        for stage in stages:
            for r in plan(params_dir / f"{artefact}.yaml", tier, stage=stage):
                rid = run_id(r.config)
                if rid not in seen:
                    seen.add(rid)
                    runs.append(r)
    return runs


def artefact_records(artefact: str, tier: str | None = None, stage: str | None = None, *,
                     paths: Paths | None = None) -> list[dict[str, Any]]:
    """The run records of an artefact's planned runs that exist in the store, with ``labels`` set to this
    artefact's (setting, method, tier) - a record shared with another artefact keeps its own labels on
    disk. ``tier`` (smoke|short|paper) and ``stage`` (prune|all) filter. An unreadable record is skipped
    with a warning naming it."""
    paths = _paths(paths)
    out = []
    for r in artefact_runs(artefact, paths=paths):
        run_stage = "prune" if r.config.train is None else "all"
        if (tier is not None and r.tier != tier) or (stage is not None and run_stage != stage):
            continue
        rid = run_id(r.config)
        rec = read(paths.records_dir(r.tier) / f"{rid}.json", rid)
        if rec is None or rec is CORRUPT:
            continue
        rec["labels"] = {"artefact": artefact, "setting": r.setting, "method": r.method, "tier": r.tier}
        out.append(rec)
    return out


def _table_path(artefact: str, tier: str, paths: Paths) -> Path:
    return paths.records_dir(tier).parent / f"{artefact}.csv"


def collect(artefact: str, *, paths: Paths | None = None) -> list[Path]:
    """Write the artefact's records as tidy CSVs (schema :data:`COLUMNS`, one row per record, sorted):
    ``results/<artefact>.csv`` from the short and paper tiers (committed) and ``runs/<artefact>.csv`` from
    the smoke tier (local only, where there are smoke records)."""
    paths = _paths(paths)
    recs = artefact_records(artefact, paths=paths)
    out = []
    for smoke in (False, True):
        rows = [record_row(artefact, r) for r in recs if (r["labels"]["tier"] == "smoke") == smoke]
        path = _table_path(artefact, "smoke" if smoke else "paper", paths)
        if smoke and not rows:
            path.unlink(missing_ok=True)
            continue
        df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["setting", "method", "sparsity", "seed", "stage", "tier"])
        with atomic_write(path) as f:
            df.to_csv(f, index=False)
        out.append(path)
    return out


def artefacts(paths: Paths | None = None) -> list[str]:
    """The artefact names: every params file except the single-run ``smoke.yaml``."""
    return sorted(p.stem for p in _paths(paths).params.glob("*.yaml") if p.stem != "smoke")


def load_table(artefact: str, *, smoke: bool = True, paths: Paths | None = None) -> pd.DataFrame:
    """The artefact's collected results: ``results/<artefact>.csv`` and, with ``smoke``, the local smoke-tier
    rows (``tier == "smoke"``: offline stand-in data); an empty frame with :data:`COLUMNS` if none. A table
    collected before the rename has its ``budget`` column read as ``tier``."""
    paths = _paths(paths)
    parts = [pd.read_csv(p).rename(columns={"budget": "tier"}) for p in [_table_path(artefact, "paper", paths)]
             + ([_table_path(artefact, "smoke", paths)] if smoke else []) if p.exists()]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)


PAPER_COLUMNS = ["artefact", "setting", "method", "sparsity", "metric", "value", "std", "source", "certainty", "note"]


def load_paper(artefact: str, *, paths: Paths | None = None) -> pd.DataFrame:
    """The paper's numbers for an artefact, transcribed once with their source (``results/paper/<artefact>.csv``,
    long format :data:`PAPER_COLUMNS`); an empty frame where the paper's numbers were not available."""
    path = _paths(paths).store.parent / "paper" / f"{artefact}.csv"
    if not path.exists():
        return pd.DataFrame(columns=PAPER_COLUMNS)
    df = pd.read_csv(path)
    if list(df.columns) != PAPER_COLUMNS:
        raise ValueError(f"{path}: columns must be {PAPER_COLUMNS}; got {list(df.columns)}")
    return df


def status(stage: str = "all", *, paths: Paths | None = None) -> pd.DataFrame:
    """Expected / done / diverged / failed / corrupt / missing runs per artefact, tier, setting and method,
    with the measured median cost (total seconds) of the finished runs and the estimated hours of the
    unfinished ones. ``corrupt`` counts unreadable records (each named in a warning; ``run`` redoes them);
    ``missing`` counts runs without a record, or with one of an interrupted run."""
    from dpai_lib.pipeline import plan

    paths = _paths(paths)
    rows = []
    for name in artefacts(paths):
        for tier in TIERS:
            groups: dict[tuple[str, str], list] = {}
            for r in plan(paths.params / f"{name}.yaml", tier, stage=stage):
                rid = run_id(r.config)
                rec = read(paths.records_dir(tier) / f"{rid}.json", rid)
                groups.setdefault((r.setting, r.method), []).append(rec or {})
            for (setting, method), recs in groups.items():
                states = [r.get("status", "missing") for r in recs]
                costs = [r["timings"]["total_s"] for r in recs
                         if r.get("status") == "done" and "total_s" in r["timings"]]
                median = statistics.median(costs) if costs else None
                todo = len(recs) - states.count("done") - states.count("diverged")
                rows.append({"artefact": name, "tier": tier, "stage": stage, "setting": setting,
                             "method": method, "expected": len(recs), "done": states.count("done"),
                             "diverged": states.count("diverged"), "failed": states.count("failed"),
                             "corrupt": states.count("corrupt"),
                             "missing": todo - states.count("failed") - states.count("corrupt"),
                             "median_run_s": None if median is None else round(median, 1),
                             "todo_cost_h": None if median is None else round(todo * median / 3600, 2)})
    return pd.DataFrame(rows)


def stale_records(*, paths: Paths | None = None) -> list[Path]:
    """Record files of the short/paper store that no current grid plans: made with an older version of
    their pruner or model (a run id hashes both, see :func:`dpai_lib.runs.run_id`) or from a grid that
    changed since. They are never read by ``collect``; ``python -m dpai_lib stale --delete`` removes them."""
    paths = _paths(paths)
    current = {run_id(r.config) for name in artefacts(paths) for r in artefact_runs(name, paths=paths)
               if r.tier != "smoke"}
    return sorted(p for p in paths.store.glob("*.json") if p.stem not in current)


def scoreboard(*, paths: Paths | None = None) -> pd.DataFrame:
    """Per artefact, run tier and stage (``prune``: the data-free masks; ``all``: pruned and trained,
    only for artefacts that train): expected and finished runs and a state, ``complete`` / ``partial`` /
    ``not run``."""
    paths = _paths(paths)
    table = pd.concat([status("prune", paths=paths), status("all", paths=paths)])
    rows = []
    for name in artefacts(paths):
        trains = "train" in load_artefact(paths.params / f"{name}.yaml").stages
        for tier in TIERS:
            for stage in ("prune", "all") if trains else ("prune",):
                part = table[(table.artefact == name) & (table.tier == tier) & (table.stage == stage)]
                expected, finished = int(part.expected.sum()), int(part.done.sum() + part.diverged.sum())
                state = "complete" if finished == expected else "partial" if finished else "not run"
                rows.append({"artefact": name, "tier": tier, "stage": stage, "expected": expected,
                             "finished": finished, "failed": int(part.failed.sum()),
                             "corrupt": int(part.corrupt.sum()), "state": state})
    return pd.DataFrame(rows)
