"""Run records -> one tidy CSV per artefact, and the status of every artefact (expected/done/failed/missing).

Columns of ``results/<artefact>.csv`` (one row per record; see :data:`COLUMNS`): the labels (setting,
method, budget), the configuration (dataset, model, sparsity, seed, stage), the status, the masks'
effective paths / nodes / kernels / params in our exact definition and in the DPaI release's, the
pruning time, accuracies, and where the run was made (device, threads, commit).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from dpai_lib.params import BUDGETS, expand, load_artefact
from dpai_lib.runs import load_record, run_id

COLUMNS = [
    "artefact", "setting", "method", "pruner", "budget", "stage", "dataset", "model", "sparsity", "seed", "run_id",
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
        "budget": lab.get("budget"), "stage": "prune" if cfg.get("train") is None else "all",
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


def records(store: str | os.PathLike, artefact: str) -> list[dict[str, Any]]:
    folder = Path(store) / artefact
    return [load_record(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def collect(store: str | os.PathLike, artefact: str, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/<artefact>.csv`` from the artefact's records (sorted, schema :data:`COLUMNS`)."""
    rows = [record_row(artefact, r) for r in records(store, artefact)]
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["setting", "method", "sparsity", "seed", "stage", "budget"])
    path = Path(out_dir) / f"{artefact}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def status(params_dir: str | os.PathLike, store: str | os.PathLike, stage: str = "all") -> pd.DataFrame:
    """Expected / done / failed / missing runs per artefact, budget, setting and method, with the measured
    median cost (total seconds) of the finished runs and the estimated hours of the unfinished ones."""
    from dpai_lib.pipeline import plan

    rows = []
    for path in sorted(Path(params_dir).glob("*.yaml")):
        if path.stem == "smoke":
            continue
        found = {r["run_id"]: r for r in records(store, path.stem)}
        for budget in BUDGETS:
            groups: dict[tuple[str, str], list] = {}
            for r in plan(path, budget, stage=stage):
                groups.setdefault((r.setting, r.method), []).append(found.get(run_id(r.config), {}))
            for (setting, method), recs in groups.items():
                states = [r.get("status", "missing") for r in recs]
                costs = [r["timings"]["total_s"] for r in recs if r.get("status") == "done"]
                median = statistics.median(costs) if costs else None
                todo = len(recs) - states.count("done") - states.count("diverged")
                rows.append({"artefact": path.stem, "budget": budget, "stage": stage, "setting": setting,
                             "method": method, "expected": len(recs), "done": states.count("done"),
                             "diverged": states.count("diverged"), "failed": states.count("failed"),
                             "missing": todo - states.count("failed"),
                             "median_run_s": None if median is None else round(median, 1),
                             "todo_cost_h": None if median is None else round(todo * median / 3600, 2)})
    return pd.DataFrame(rows)
