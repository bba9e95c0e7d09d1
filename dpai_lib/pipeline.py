"""Sweeps over an artefact's runs: plan, execute through papermill, collect, report status.

* The store is content-addressed: a run's record is ``results/runs/<run_id>.json`` (smoke-tier runs:
  ``runs/smoke/<run_id>.json``, never committed), and the run id is the hash of the run's configuration.
  Artefacts that contain the same configuration (fig5's DPaI runs are fig1's) share one record; which
  artefacts a record belongs to is decided by expanding the params files, never by where the record lies.
* A run is done when its record says so: re-running a sweep skips it, so an interrupted sweep resumes
  where it stopped (an interrupted run resumes from its last epoch checkpoint in ``runs/work/<run_id>/``).
* A run is claimed with an exclusive lock file (``<run_id>.lock`` in the work folder's ``locks``,
  created atomically; a lock whose process is gone is taken over), so two runners on one store never
  run it twice, and records are written atomically, so none is lost or half-written.
* A failed run is recorded with its error, and the sweep goes on.
* Executors: ``local`` (``jobs`` runs at a time, spread over the local GPUs or CPU threads) and
  ``slurm`` through submitit (one array task per run); ``submitit-local`` runs the same submitit path
  as local processes, for testing.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpai_lib.params import PlannedRun, expand, load_artefact
from dpai_lib.runs import SCHEMA, load_record, run_id, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = ("local", "slurm", "submitit-local")
FILTER_KEYS = ("setting", "method", "sparsity", "seed", "model", "dataset")
FINISHED = ("done", "diverged")


@dataclass(frozen=True)
class Paths:
    """Where a sweep reads and writes. The default is the repository's folders (``DPAI_ROOT`` overrides the
    repository root, e.g. to keep results of an installed package in a working folder)."""

    store: Path = ROOT / "results" / "runs"  # run records of the short and paper tiers, <run_id>.json
    smoke_store: Path = ROOT / "runs" / "smoke"  # run records of the smoke tier (offline stand-in data)
    work: Path = ROOT / "runs" / "work"  # checkpoints, mask files, locks
    logs: Path = ROOT / "runs" / "logs"  # executed notebooks, <artefact>/<run_id>.ipynb
    params: Path = ROOT / "params"  # where <artefact>.yaml is read from by executing processes

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> Paths:
        """The folders under ``root`` (default: ``$DPAI_ROOT`` or the repository)."""
        root = Path(root or os.environ.get("DPAI_ROOT") or ROOT)
        return cls(root / "results" / "runs", root / "runs" / "smoke", root / "runs" / "work", root / "runs" / "logs",
                   root / "params")

    def template(self, notebook: str | os.PathLike) -> Path:
        """An experiment template named by a params file: an absolute path as is; a relative one under this
        root (a user's own templates beside their params) and then under the repository (ours)."""
        path = Path(notebook)
        if path.is_absolute():
            candidates = [path]
        else:
            candidates = list(dict.fromkeys([self.params.parent / path, ROOT / path]))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"experiment template {str(notebook)!r} not found; looked in "
                                f"{', '.join(str(c) for c in candidates)}")

    def records_dir(self, budget: str) -> Path:
        """Where records of a budget tier live: smoke runs are kept apart from the committed results."""
        return self.smoke_store if budget == "smoke" else self.store


def _matches(run: PlannedRun, only: dict[str, list[str]]) -> bool:
    values = {"setting": run.setting, "method": run.method, "sparsity": run.config.prune.sparsity,
              "seed": run.config.seed, "model": run.config.model.name, "dataset": run.config.data.name}
    for key, allowed in only.items():
        v = values[key]
        if isinstance(v, float):
            if not any(abs(v - float(a)) < 1e-6 * max(1.0, abs(v)) for a in allowed):
                return False
        elif str(v) not in allowed:
            return False
    return True


def parse_only(items: Iterable[str]) -> dict[str, list[str]]:
    """``["method=dpai,npb", "seed=0"]`` -> ``{"method": ["dpai", "npb"], "seed": ["0"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS or not value:
            raise ValueError(f"--only expects key=value[,value...] with key one of {', '.join(FILTER_KEYS)}; got {item!r}")
        out.setdefault(key, []).extend(value.split(","))
    return out


def plan(params: str | os.PathLike, budget: str, *, only: dict[str, list[str]] | None = None,
         shard: tuple[int, int] = (0, 1), stage: str = "all") -> list[PlannedRun]:
    """The runs of a params file under a budget, filtered, this shard's share (``runs[i::n]``).
    ``stage="prune"`` drops training (prune and measure only: the data-free part of an artefact)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard must be i/n with 0 <= i < n; got {i}/{n}")
    if stage not in ("all", "prune"):
        raise ValueError(f"stage must be 'all' or 'prune'; got {stage!r}")
    runs = [r for r in expand(load_artefact(params), budget) if _matches(r, only or {})]
    if stage == "prune":
        runs = [PlannedRun(r.artefact, r.setting, r.method, r.budget, r.config.model_copy(update={"train": None}))
                for r in runs]
    return runs[i::n]


def record_path(run: PlannedRun, paths: Paths) -> Path:
    return paths.records_dir(run.budget) / f"{run_id(run.config)}.json"


def is_done(run: PlannedRun, paths: Paths) -> bool:
    p = record_path(run, paths)
    return p.exists() and load_record(p)["status"] in FINISHED


class RunLock:
    """An exclusive claim on one run, by atomic file creation; stale locks of dead processes are taken."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            self.held = True
            return True
        return False

    def _stale(self) -> bool:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False  # being written right now
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell for another machine
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def execute_run(run: PlannedRun, paths: Paths, device: str = "auto", threads: int = 0) -> str:
    """Claim and execute one run through its papermill template; returns its final status
    (``skipped`` if done already, ``busy`` if another runner holds it)."""
    import jupytext
    import papermill

    rid = run_id(run.config)
    if is_done(run, paths):
        return "skipped"
    lock = RunLock(paths.work / "locks" / f"{rid}.lock")
    if not lock.acquire():
        return "busy"
    try:
        if is_done(run, paths):  # finished by another runner between our check and our claim
            return "skipped"
        log = paths.logs / run.artefact / f"{rid}.ipynb"
        log.parent.mkdir(parents=True, exist_ok=True)
        labels = {"artefact": run.artefact, "setting": run.setting, "method": run.method, "budget": run.budget}
        try:
            notebook = jupytext.read(paths.template(load_artefact(paths.params / f"{run.artefact}.yaml").notebook))
            papermill.execute_notebook(
                notebook, str(log), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
                parameters={"config_json": json.dumps(run.config.canonical()),
                            "records_dir": str(paths.records_dir(run.budget)), "work_dir": str(paths.work),
                            "labels_json": json.dumps(labels), "device": device, "threads": threads})
        except Exception as exc:  # the notebook records its own failures; this covers everything before
            record_file = record_path(run, paths)
            if not record_file.exists() or load_record(record_file)["status"] in ("running",):
                write_json_atomic(record_file, {
                    "schema": SCHEMA, "run_id": rid, "labels": labels, "status": "failed",
                    "error": f"{type(exc).__name__}: {str(exc)[-2000:]}", "traceback": traceback.format_exc(),
                    "config": run.config.canonical(), "seed": run.config.seed, "results": {}, "curves": [],
                    "timings": {}, "provenance": {}})
        return load_record(record_path(run, paths))["status"]
    finally:
        lock.release()


def _local_slots(jobs: int, device: str, threads: int = 0) -> list[tuple[str, int]]:
    """(device, torch threads) for each local worker: GPUs round-robin, else CPU with ``threads`` each
    (0: the cores shared out, ``cpu_count // jobs``)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        return [(f"cuda:{k % n}", 0) for k in range(jobs)]
    dev = "cpu" if device == "auto" else device
    return [(dev, threads or max(1, (os.cpu_count() or 1) // jobs)) for _ in range(jobs)]


def run_sweep(runs: list[PlannedRun], *, paths: Paths | None = None, executor: str = "local", jobs: int = 1,
              device: str = "auto", threads: int = 0, slurm: dict[str, Any] | None = None,
              progress: bool = True) -> dict[str, int]:
    """Execute ``runs`` (skipping finished ones); returns counts by final status.

    ``threads`` fixes the torch threads of each local CPU run (0: ``cpu_count // jobs``); set it to 1 when
    several runners share one machine, so that they do not oversubscribe its cores."""
    from tqdm import tqdm

    paths = paths or Paths.at()
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = cores // jobs); got {threads}")
    todo = [r for r in runs if not is_done(r, paths)]
    counts = {"skipped": len(runs) - len(todo)}
    if executor == "local":
        slots = _local_slots(jobs, device, threads)
        free = list(range(jobs))

        def work(run: PlannedRun) -> str:
            slot = free.pop()
            try:
                dev, threads = slots[slot]
                return execute_run(run, paths, dev, threads)
            finally:
                free.append(slot)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for status in tqdm(pool.map(work, todo), total=len(todo), desc="runs", disable=not progress):
                counts[status] = counts.get(status, 0) + 1
        return counts
    import submitit

    folder = paths.work / "submitit"
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    else:
        ex = submitit.LocalExecutor(folder=str(folder))
    ex.update_parameters(**(slurm or {}))
    jobs_ = ex.map_array(execute_run, todo, [paths] * len(todo), [device] * len(todo), [0] * len(todo))
    for job in tqdm(jobs_, desc="jobs", disable=not progress):
        status = job.result()
        counts[status] = counts.get(status, 0) + 1
    return counts
