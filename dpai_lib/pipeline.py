"""Sweeps over an artefact's runs: plan, execute through papermill, collect, report status.

* The store is content-addressed: a run's record is ``results/runs/<run_id>.json`` (smoke-tier runs:
  ``runs/smoke/<run_id>.json``, never committed), and the run id is the hash of the run's configuration.
  Artefacts that contain the same configuration (fig5's DPaI runs are fig1's) share one record; which
  artefacts a record belongs to is decided by expanding the params files, never by where the record lies.
* A run is done when its record says so (``done`` or ``diverged``): re-running a sweep skips it, so an
  interrupted sweep resumes where it stopped (an interrupted run resumes from its last epoch checkpoint in
  ``runs/work/<run_id>/``, with the masks saved there). Failed, interrupted and unreadable records are
  redone; an unreadable one is first moved aside (``<run_id>.json.corrupt-<time>``) with a warning.
* A run is claimed with a lock file (``locks/<run_id>.lock`` in the work folder ``runs/work``, :class:`dpai_lib.store.RunLock`)
  holding host, pid and a heartbeat, so two runners on one store never run it at once; a lock whose
  process is gone, whose heartbeat stopped, or which is empty and old is taken over atomically.
  Records are written atomically, so none is lost or half-written.
* A failed run is recorded with its error, and the sweep goes on. Ctrl-C interrupts the running kernels,
  records their runs as ``interrupted``, releases their locks and stops the sweep.
* Executors: ``local`` (``jobs`` runs at a time, spread over the local GPUs or CPU threads) and
  ``slurm`` through submitit (one array task per run); ``submitit-local`` runs the same submitit path
  as local processes, for testing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpai_lib.errors import sigterm_as_interrupt
from dpai_lib.params import PlannedRun, expand, load_artefact
from dpai_lib.runs import run_id
from dpai_lib.store import FINISHED, SCHEMA, CorruptRecordError, RunLock, quarantine, read_record, write_record

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = ("local", "slurm", "submitit-local")
FILTER_KEYS = ("setting", "method", "sparsity", "seed", "model", "dataset")


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

    def records_dir(self, tier: str) -> Path:
        """Where records of a run tier live: smoke runs are kept apart from the committed results."""
        return self.smoke_store if tier == "smoke" else self.store


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


def sparsities_matching(text: str, values: Iterable[float]) -> list[float]:
    """The sparsities among ``values`` that ``text`` names: those equal to it (to 1e-6), else those that round
    to it at the precision it is written with (``"0.9968"`` names 0.9968377223398316, the paper's compression
    2.5). ``ValueError`` when ``text`` is not a number."""
    number = float(text)
    values = list(dict.fromkeys(values))
    equal = [v for v in values if abs(v - number) < 1e-6 * max(1.0, abs(v))]
    if equal:
        return equal
    mantissa = text.strip().lower().split("e")[0]
    if "e" in text.lower() or "." not in mantissa:
        return []  # no written precision to round to
    decimals = len(mantissa.split(".")[1])
    return [v for v in values if abs(v - number) <= 0.5 * 10.0 ** -decimals + 1e-12]


def parse_only(items: Iterable[str]) -> dict[str, list[str]]:
    """``["method=dpai,npb", "seed=0"]`` -> ``{"method": ["dpai", "npb"], "seed": ["0"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS or not value:
            raise ValueError(f"--only expects key=value[,value...] with key one of {', '.join(FILTER_KEYS)}; got {item!r}")
        out.setdefault(key, []).extend(value.split(","))
    return out


def plan(params: str | os.PathLike, tier: str, *, only: dict[str, list[str]] | None = None,
         shard: tuple[int, int] = (0, 1), stage: str = "all") -> list[PlannedRun]:
    """The runs of a params file in a tier (smoke, short, paper), filtered, this shard's share (``runs[i::n]``).
    ``stage="prune"`` drops training (prune and measure only: the data-free part of an artefact)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard must be i/n with 0 <= i < n; got {i}/{n}")
    if stage not in ("all", "prune"):
        raise ValueError(f"stage must be 'all' or 'prune'; got {stage!r}")
    runs = [r for r in expand(load_artefact(params), tier) if _matches(r, only or {})]
    if stage == "prune":
        runs = [PlannedRun(r.artefact, r.setting, r.method, r.tier, r.config.model_copy(update={"train": None}))
                for r in runs]
    return runs[i::n]


def record_path(run: PlannedRun, paths: Paths) -> Path:
    return paths.records_dir(run.tier) / f"{run_id(run.config)}.json"


def lock_path(run: PlannedRun, paths: Paths) -> Path:
    return paths.work / "locks" / f"{run_id(run.config)}.lock"


def is_done(run: PlannedRun, paths: Paths) -> bool:
    """Whether the run has a finished record; an unreadable record is not one (a warning names it)."""
    try:
        return read_record(record_path(run, paths), run_id(run.config))["status"] in FINISHED
    except FileNotFoundError:
        return False
    except CorruptRecordError as exc:
        log.warning("%s; the run will be redone", exc)
        return False


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


# kernels of the runs executing in this process (their process groups), so that Ctrl-C can interrupt them
_KERNELS: set[int] = set()


def _tracking_kernel_manager(pids: list[int]) -> type:
    """A jupyter kernel manager class that records the pid of each kernel it starts in ``pids`` and
    :data:`_KERNELS` (papermill passes it on to nbclient)."""
    from jupyter_client import AsyncKernelManager

    class TrackingKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]  # the base's is typed sync
            await super().start_kernel(**kw)
            pid = getattr(self.provisioner, "pid", None)
            if pid:
                pids.append(pid)
                _KERNELS.add(pid)

    return TrackingKernelManager


def _signal_kernels(sig: int, pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)  # a kernel leads its own session: this reaches its children too
        except (ProcessLookupError, PermissionError):
            pass


def execute_run(run: PlannedRun, paths: Paths, device: str = "auto", threads: int = 0,
                lock_timeout_s: float | None = None) -> str:
    """Claim and execute one run through its papermill template; returns its final status (``skipped`` if
    done already, ``busy`` if another runner holds its lock, :func:`lock_path`).

    An unreadable record is moved aside (:func:`dpai_lib.store.quarantine`) and the run redone. A run whose
    notebook could not record its end itself is recorded here: ``failed`` for an error before or around the
    notebook, ``interrupted`` when its kernel died or on Ctrl-C (``KeyboardInterrupt`` is re-raised once the
    record is written and the lock released). Interrupted and failed runs are redone by the next sweep."""
    rid = run_id(run.config)
    if is_done(run, paths):
        return "skipped"
    lock = RunLock(lock_path(run, paths), timeout_s=lock_timeout_s)
    if not lock.acquire():
        return "busy"
    pids: list[int] = []
    try:
        record_file = record_path(run, paths)
        try:
            if read_record(record_file, rid)["status"] in FINISHED:  # finished by another runner meanwhile
                return "skipped"
        except FileNotFoundError:
            pass
        except CorruptRecordError as exc:
            quarantine(record_file, exc)
        before = _file_id(record_file)
        labels = {"artefact": run.artefact, "setting": run.setting, "method": run.method, "tier": run.tier}

        def record_unless_written(status: str, exc: BaseException) -> None:
            """The notebook writes its own record when it can; this covers a notebook that never did."""
            if _file_id(record_file) == before:
                write_record(record_file, {
                    "schema": SCHEMA, "run_id": rid, "labels": labels, "status": status,
                    "error": f"{type(exc).__name__}: {str(exc)[-2000:]}",
                    "traceback": traceback.format_exc() if sys.exc_info()[1] is not None else None,
                    "config": run.config.canonical(), "seed": run.config.seed, "results": {}, "curves": [],
                    "timings": {}, "provenance": {"hostname": socket.gethostname()}})

        try:
            import jupytext
            import papermill

            log_file = paths.logs / run.artefact / f"{rid}.ipynb"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            notebook = jupytext.read(paths.template(load_artefact(paths.params / f"{run.artefact}.yaml").notebook))
            papermill.execute_notebook(
                notebook, str(log_file), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
                kernel_manager_class=_tracking_kernel_manager(pids),
                parameters={"config_json": json.dumps(run.config.canonical()),
                            "records_dir": str(paths.records_dir(run.tier)), "work_dir": str(paths.work),
                            "labels_json": json.dumps(labels), "device": device, "threads": threads})
        except KeyboardInterrupt as exc:
            _signal_kernels(signal.SIGKILL, pids)  # its kernel stops with it
            record_unless_written("interrupted", exc)
            raise
        except Exception as exc:
            from nbclient.exceptions import DeadKernelError

            interrupted = isinstance(exc, DeadKernelError) or getattr(exc, "ename", None) == "KeyboardInterrupt"
            record_unless_written("interrupted" if interrupted else "failed", exc)
        else:  # a template that ran to its end without recording the run
            record_unless_written("failed", RuntimeError(f"the notebook ended without writing {record_file}"))
        try:
            return read_record(record_file, rid)["status"]
        except CorruptRecordError as exc:  # written by something else than dpai_lib.store
            quarantine(record_file, exc)
            return "failed"
    finally:
        _KERNELS.difference_update(pids)
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


class SweepCounts(dict):
    """Counts of a sweep's runs by final status (a plain, JSON-ready dict), with the lock files of the runs
    that another runner held in ``busy_locks``."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.busy_locks: list[str] = []


def run_sweep(runs: list[PlannedRun], *, paths: Paths | None = None, executor: str = "local", jobs: int = 1,
              device: str = "auto", threads: int = 0, slurm: dict[str, Any] | None = None,
              progress: bool = True, lock_timeout_s: float | None = None) -> SweepCounts:
    """Execute ``runs`` (skipping finished ones); returns counts by final status, with the lock files of
    busy runs in ``.busy_locks`` (each also named in a warning, with its holder).

    ``threads`` fixes the torch threads of each local CPU run (0: ``cpu_count // jobs``); set it to 1 when
    several runners share one machine, so that they do not oversubscribe its cores. ``lock_timeout_s``:
    seconds without a heartbeat after which another runner's lock is stale (default
    ``$DPAI_LOCK_TIMEOUT_S`` or 600). Ctrl-C interrupts the running kernels (their records say
    ``interrupted``), starts nothing more, releases the locks and re-raises ``KeyboardInterrupt``; SIGTERM
    does the same (called from the main thread) and raises :class:`~dpai_lib.errors.Terminated`."""
    from tqdm import tqdm

    paths = paths or Paths.at()
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = cores // jobs); got {threads}")
    todo = []
    for run in runs:
        if not is_done(run, paths):
            todo.append(run)
        elif lock_path(run, paths).exists():  # left by a runner that died after the run was recorded
            stale = RunLock(lock_path(run, paths), timeout_s=lock_timeout_s)
            if stale.acquire():  # only if it is stale: a live holder keeps it
                stale.release()
    counts = SweepCounts(skipped=len(runs) - len(todo))

    def count(run: PlannedRun, status: str) -> None:
        counts[status] = counts.get(status, 0) + 1
        if status == "busy":
            lock = lock_path(run, paths)
            counts.busy_locks.append(str(lock))
            owner = RunLock(lock).owner() or {}
            log.warning("run %s is busy: another runner holds %s (host %s, pid %s)", run_id(run.config), lock,
                        owner.get("host", "?"), owner.get("pid", "?"))

    if executor == "local":
        with sigterm_as_interrupt():
            _sweep_local(todo, paths, jobs, device, threads, lock_timeout_s, count, progress)
        return counts
    import submitit

    folder = paths.work / "submitit"
    ex: submitit.AutoExecutor | submitit.LocalExecutor
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    else:
        ex = submitit.LocalExecutor(folder=str(folder))
    ex.update_parameters(**(slurm or {}))
    n = len(todo)
    jobs_ = ex.map_array(execute_run, todo, [paths] * n, [device] * n, [0] * n, [lock_timeout_s] * n)
    for run, job in tqdm(zip(todo, jobs_), total=n, desc="jobs", disable=not progress):
        count(run, job.result())
    return counts


def _sweep_local(todo: list[PlannedRun], paths: Paths, jobs: int, device: str, threads: int,
                 lock_timeout_s: float | None, count: Any, progress: bool, grace_s: float = 5.0) -> None:
    """``jobs`` runs at a time in worker threads; the main thread only waits, so that Ctrl-C reaches it:
    then no further run starts, running kernels get SIGINT (SIGKILL after ``grace_s``), and once their
    runs are recorded and unlocked, ``KeyboardInterrupt`` propagates."""
    from tqdm import tqdm

    slots = _local_slots(jobs, device, threads)
    free = list(range(jobs))
    stop = threading.Event()

    def work(run: PlannedRun) -> str:
        if stop.is_set():
            return "cancelled"
        slot = free.pop()
        try:
            dev, n_threads = slots[slot]
            return execute_run(run, paths, dev, n_threads, lock_timeout_s)
        finally:
            free.append(slot)

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = {pool.submit(work, run): run for run in todo}
    try:
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not progress):
            count(futures[fut], fut.result())
    except KeyboardInterrupt:
        stop.set()
        for fut in futures:
            fut.cancel()
        signalled: set[int] = set()
        deadline = time.monotonic() + grace_s
        try:
            while not all(f.done() for f in futures) and time.monotonic() < deadline:
                now = set(_KERNELS)
                _signal_kernels(signal.SIGINT, now - signalled)  # kernels that start late get theirs too
                signalled |= now
                time.sleep(0.1)
        finally:  # after the grace period, or at once on a second Ctrl-C
            while not all(f.done() for f in futures):
                _signal_kernels(signal.SIGKILL, set(_KERNELS))
                time.sleep(0.1)
        raise
    finally:
        pool.shutdown(wait=True)
