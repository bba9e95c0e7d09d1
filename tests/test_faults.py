"""Fault injection: a sweep killed (SIGKILL, runner and sometimes its kernels) at ten random moments and
resumed each time loses no run, never repeats a finished one, leaves no corrupt record and no lock that
blocks the next runner."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import TINY as RELIABILITY_TINY
from test_reliability import _children, store_with

from dpai_lib.pipeline import ROOT, Paths, plan, record_path
from dpai_lib.runs import run_id
from dpai_lib.store import read_record

TINY = RELIABILITY_TINY | {  # 4 runs of 3 epochs of one batch: checkpoints to resume from
    "title": "fault injection",
    "base": RELIABILITY_TINY["base"] | {"train": RELIABILITY_TINY["base"]["train"] | {"epochs": 3}},
    "tiers": {"smoke": {}, "short": {}, "paper": {}},
}
KILLS = 10


def _runner(paths: Paths, params_file: Path) -> subprocess.Popen:
    code = ("import json; from pathlib import Path; from dpai_lib.pipeline import Paths, plan, run_sweep; "
            f"p = Paths.at(Path({str(paths.params.parent)!r})); "
            f"c = run_sweep(plan({str(params_file)!r}, 'smoke'), paths=p, jobs=2, threads=1, device='cpu', "
            "progress=False); print(json.dumps({**c, 'busy_locks': c.busy_locks}))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)


def _finished(paths: Paths, runs) -> dict[str, tuple[int, int]]:
    """run id -> (inode, mtime) of every record that says done."""
    out = {}
    for r in runs:
        path = record_path(r, paths)
        try:
            if read_record(path, run_id(r.config))["status"] == "done":
                st = path.stat()
                out[run_id(r.config)] = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            pass
    return out


def _held_by(paths: Paths, pid: int) -> bool:
    for lock in (paths.work / "locks").glob("*.lock"):
        try:
            if json.loads(lock.read_text()).get("pid") == pid:
                return True
        except (OSError, ValueError):
            pass
    return False


def _happened(event: str, runner: subprocess.Popen, paths: Paths, since: float) -> bool:
    if event == "kernel":  # the runner has started a kernel
        return bool(_children(runner.pid))
    return any(p.stat().st_mtime > since for p in paths.smoke_store.glob("*.json"))  # a record was written


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the kernels through /proc")
def test_a_sweep_killed_ten_times_at_random_loses_repeats_and_corrupts_nothing(tmp_path):
    params_file, paths = store_with(tmp_path, TINY)
    runs = plan(params_file, "smoke")
    ids = sorted(run_id(r.config) for r in runs)
    assert len(ids) == 4
    rng = random.Random(20261203)
    # when each kill comes: 7 times at a random moment after the runner starts (spread over 1-10 s: starting,
    # planning, holding locks, starting kernels), twice within 3 s after a kernel has started, and last, within
    # 2 s after a record was written (runs finishing, others still going)
    delays: list = [1 + 9 * (i + rng.random()) / 7 for i in range(7)] + ["kernel", "kernel"]
    rng.shuffle(delays)
    delays.append("record")
    hits = {"kernel": 0, "lock": 0}
    finished: dict[str, tuple[int, int]] = {}
    for k, delay in enumerate(delays):
        t0 = time.time()
        runner = _runner(paths, params_file)
        if isinstance(delay, str):
            deadline = time.time() + 180
            while not _happened(delay, runner, paths, t0) and time.time() < deadline and runner.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 3 if delay == "kernel" else 2))
        else:
            time.sleep(delay)
        kernels = _children(runner.pid)
        hits["kernel"] += bool(kernels)
        hits["lock"] += _held_by(paths, runner.pid)
        os.killpg(runner.pid, signal.SIGKILL)  # the runner dies at once, its locks held, its runs half made
        if k % 2 == 0:
            for pid in kernels:  # and, every other time, its kernels too (a machine that goes down)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        runner.communicate()
        now = _finished(paths, runs)
        assert {rid: now.get(rid) for rid in finished} == finished, "a finished run was run again"
        finished = now
    time.sleep(1.5)  # orphaned kernels notice that their runner is gone
    final = _runner(paths, params_file)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["busy_locks"] == [] and "busy" not in counts and "failed" not in counts, counts
    assert counts["skipped"] == len(finished) and counts["skipped"] + counts.get("done", 0) == 4, counts
    assert {rid: v for rid, v in _finished(paths, runs).items() if rid in finished} == finished
    # nothing lost, nothing twice, nothing corrupt, no lock left behind
    names = sorted(p.name for p in paths.smoke_store.iterdir() if not p.name.startswith("."))
    assert names == [f"{i}.json" for i in ids]
    assert all(read_record(paths.smoke_store / f"{i}.json", i)["status"] == "done" for i in ids)
    assert [p.name for p in (paths.work / "locks").iterdir()] == []
    print(f"kills with a kernel running: {hits['kernel']}, with a lock held: {hits['lock']}, runs finished "
          f"before the last kill: {len(finished)}")
    assert hits["kernel"] >= 2 and hits["lock"] >= 3, hits  # the kills did land while runs were under way
    assert finished, "no run finished before the last kill"
