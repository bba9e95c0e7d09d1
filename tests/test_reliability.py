"""A corrupt record, a stale or busy lock, Ctrl-C or a dying kernel never blocks or silently skips a run."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import sigint_as_at_a_terminal
from test_pipeline import TINY as PIPELINE_TINY
from test_pipeline import store_with

from dpai_lib.pipeline import ROOT, execute_run, is_done, lock_path, parse_only, plan, record_path, run_sweep
from dpai_lib.results import artefact_records, collect, scoreboard, status
from dpai_lib.runs import run_id
from dpai_lib.store import SCHEMA, RunLock, read_record, write_record

# small and quick: 8x8 synthetic images, one training batch of 32; the smoke tier differs from the others
TINY = PIPELINE_TINY | {
    "title": "reliability test",
    "base": PIPELINE_TINY["base"] | {
        "data": {"name": "synthetic", "options": {"train_size": 64, "test_size": 64, "image_size": 8}},
        "train": PIPELINE_TINY["base"]["train"] | {"batch_size": 32, "max_train_batches": 1}},
    "tiers": {"smoke": {"all": {"train": {"max_test_batches": 1}}}, "short": {}, "paper": {}},
}

TEMPLATE = """---
jupytext: {text_representation: {extension: .md, format_name: myst, format_version: 0.13}}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

```{code-cell} ipython3
:tags: [parameters]

config_json = ""
records_dir = ""
work_dir = ""
labels_json = "{}"
device = "auto"
threads = 0
```

```{code-cell} ipython3
BODY
```
"""
DYING = TEMPLATE.replace("BODY", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
SILENT = TEMPLATE.replace("BODY", "print('no record written')")


@pytest.fixture()
def tiny(tmp_path):
    return store_with(tmp_path, TINY)


def done_record(run) -> dict:
    rid = run_id(run.config)
    return {"schema": SCHEMA, "run_id": rid, "labels": {"artefact": "tiny", "setting": run.setting,
                                                         "method": run.method, "tier": run.tier},
            "status": "done", "error": None, "config": run.config.canonical(), "seed": run.config.seed,
            "results": {"masks": {"kept": 10}}, "curves": [], "timings": {"total_s": 2.0}, "provenance": {}}


def test_readers_skip_corrupt_records_name_them_and_status_counts_them(tiny, caplog):
    params_file, paths = tiny
    runs = plan(params_file, "smoke")
    assert len(runs) == 4
    for r in runs[:2]:
        write_record(record_path(r, paths), done_record(r))
    truncated, not_object = record_path(runs[2], paths), record_path(runs[3], paths)
    truncated.write_text(json.dumps(done_record(runs[2]))[:70])
    not_object.write_text("[]")
    with caplog.at_level(logging.WARNING):
        recs = artefact_records("tiny", paths=paths)
    assert sorted(r["run_id"] for r in recs) == sorted(run_id(r.config) for r in runs[:2])
    assert f"corrupt run record {truncated}: invalid JSON (truncated?)" in caplog.text
    assert f"corrupt run record {not_object}: not a JSON object but a list" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        st = status(paths=paths)
    smoke = st[st.tier == "smoke"]
    assert (smoke.done.sum(), smoke.corrupt.sum(), smoke.failed.sum(), smoke.missing.sum()) == (2, 2, 0, 0)
    assert str(truncated) in caplog.text and str(not_object) in caplog.text
    board = scoreboard(paths=paths).set_index(["artefact", "tier", "stage"])
    assert board.loc[("tiny", "smoke", "all"), ["finished", "corrupt", "state"]].tolist() == [2, 2, "partial"]
    [_, smoke_csv] = collect("tiny", paths=paths)
    assert len(smoke_csv.read_text().splitlines()) == 1 + 2  # header and the two readable records
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not is_done(runs[2], paths) and not is_done(runs[3], paths) and is_done(runs[0], paths)
    assert f"{truncated}: invalid JSON" in caplog.text and "the run will be redone" in caplog.text
    assert truncated.exists() and not_object.exists()  # readers never move or change anything


def test_run_moves_a_corrupt_record_aside_takes_an_old_empty_lock_and_redoes_the_run(tiny, caplog):
    params_file, paths = tiny
    [run] = plan(params_file, "smoke", only=parse_only(["method=random", "seed=0"]), stage="prune")
    path, lock = record_path(run, paths), lock_path(run, paths)
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": "dpai_lib.run/1", "run_id": "')  # a record cut short
    lock.parent.mkdir(parents=True)
    lock.write_text("")  # a runner died between creating its lock and writing it, two minutes ago
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with caplog.at_level(logging.WARNING):
        counts = run_sweep([run], paths=paths, device="cpu", threads=1, progress=False)
    assert counts == {"skipped": 0, "done": 1} and counts.busy_locks == []
    assert read_record(path, run_id(run.config))["status"] == "done"
    [aside] = path.parent.glob(f"{path.name}.corrupt-*")
    assert aside.read_text() == '{"schema": "dpai_lib.run/1", "run_id": "'
    assert f"corrupt run record {path}" in caplog.text and aside.name in caplog.text
    assert f"took over stale lock {lock}: empty or unreadable" in caplog.text
    assert not lock.exists() and sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, aside.name])


def test_a_busy_run_is_reported_by_its_lock_and_not_run(tiny, caplog):
    params_file, paths = tiny
    runs = plan(params_file, "smoke", only=parse_only(["seed=0"]))
    holder = RunLock(lock_path(runs[1], paths))
    assert holder.acquire()
    write_record(record_path(runs[0], paths), done_record(runs[0]))
    try:
        with caplog.at_level(logging.WARNING):
            counts = run_sweep(runs, paths=paths, device="cpu", progress=False)
    finally:
        holder.release()
    assert counts == {"skipped": 1, "busy": 1} and json.dumps(counts) == '{"skipped": 1, "busy": 1}'
    assert counts.busy_locks == [str(lock_path(runs[1], paths))]
    assert f"holds {lock_path(runs[1], paths)} (host " in caplog.text and f"pid {os.getpid()})" in caplog.text
    assert not record_path(runs[1], paths).exists()


def test_ctrl_c_inside_execute_run_records_interrupted_releases_the_lock_and_a_later_run_redoes_it(tiny, monkeypatch):
    import papermill

    params_file, paths = tiny
    [run] = plan(params_file, "smoke", only=parse_only(["method=random", "seed=0"]))
    calls = []

    def interrupted(*args, **kw):
        calls.append(kw["parameters"])
        assert RunLock(lock_path(run, paths)).owner()["pid"] == os.getpid()  # held while the notebook runs
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, paths, "cpu")
    rec = read_record(record_path(run, paths), run_id(run.config))
    assert rec["status"] == "interrupted" and rec["error"].startswith("KeyboardInterrupt")
    assert "KeyboardInterrupt" in rec["traceback"] and not lock_path(run, paths).exists()
    assert not is_done(run, paths)

    def finishes(*args, **kw):  # the notebook: writes the run's record
        write_record(Path(kw["parameters"]["records_dir"]) / f"{run_id(run.config)}.json", done_record(run))

    monkeypatch.setattr(papermill, "execute_notebook", finishes)
    assert run_sweep([run], paths=paths, device="cpu", progress=False) == {"skipped": 0, "done": 1}


def _run_with_template(tiny, name: str, text: str):
    """The tiny artefact's random/seed-0 run, its params pointing at a template ``name`` holding ``text``."""
    params_file, paths = tiny
    (paths.params.parent / name).write_text(text)
    params_file.write_text(yaml.safe_dump(dict(TINY, notebook=name)))
    [run] = plan(params_file, "smoke", only=parse_only(["method=random", "seed=0"]), stage="prune")
    return run, paths


def test_a_kernel_that_dies_leaves_an_interrupted_record_and_a_free_lock(tiny):
    run, paths = _run_with_template(tiny, "dying.md", DYING)
    assert execute_run(run, paths, "cpu") == "interrupted"
    rec = read_record(record_path(run, paths), run_id(run.config))
    assert rec["status"] == "interrupted" and rec["error"].startswith("DeadKernelError")
    assert not lock_path(run, paths).exists() and not is_done(run, paths)


def test_a_template_that_ends_without_recording_its_run_leaves_a_failed_record(tiny):
    run, paths = _run_with_template(tiny, "silent.md", SILENT)
    assert execute_run(run, paths, "cpu") == "failed"
    rec = read_record(record_path(run, paths), run_id(run.config))
    assert rec["error"] == f"RuntimeError: the notebook ended without writing {record_path(run, paths)}"
    assert rec["traceback"] is None and not lock_path(run, paths).exists()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a runner's kernels), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the kernel through /proc")
@pytest.mark.parametrize("sig,raised", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "Terminated")])
def test_ctrl_c_or_sigterm_stops_a_sweep_promptly_with_its_run_interrupted_and_nothing_left_held(
        tiny, sig, raised, reap):
    params_file, paths = tiny
    raw = dict(TINY)
    raw["base"] = dict(TINY["base"], train=dict(TINY["base"]["train"], epochs=400))  # a run of minutes
    params_file.write_text(yaml.safe_dump(raw))
    runs = plan(params_file, "smoke", only=parse_only(["seed=0"]))
    code = ("import json; from pathlib import Path; from dpai_lib.pipeline import Paths, plan, run_sweep, parse_only; "
            f"p = Paths.at(Path({str(paths.params.parent)!r})); "
            f"run_sweep(plan({str(params_file)!r}, 'smoke', only=parse_only(['seed=0'])), paths=p, device='cpu', "
            "threads=1, progress=False)")
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, start_new_session=True, preexec_fn=sigint_as_at_a_terminal)
    reap(runner)
    first = paths.work / run_id(runs[0].config) / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not first.exists() and runner.poll() is None:
        time.sleep(0.2)  # the first run is training
    assert first.exists(), runner.communicate()[1][-3000:]
    kernels = _children(runner.pid)
    assert kernels
    t0 = time.time()
    os.kill(runner.pid, sig)  # what Ctrl-C, or kill / a Slurm pre-emption, sends to the runner
    _, err = runner.communicate(timeout=60)
    assert time.time() - t0 < 20, f"not prompt: {time.time() - t0:.1f} s\n{err[-3000:]}"
    assert runner.returncode != 0 and raised in err, f"exit {runner.returncode}\n{err[-3000:]}"
    rec = read_record(record_path(runs[0], paths), run_id(runs[0].config))
    assert rec["status"] == "interrupted" and "KeyboardInterrupt" in rec["traceback"], (
        f"{rec['status']}: {str(rec.get('traceback'))[-2000:]}\n{err[-2000:]}")
    assert not record_path(runs[1], paths).exists()  # the second run never started
    assert list((paths.work / "locks").iterdir()) == []
    time.sleep(1)
    assert all(_gone(k) for k in kernels)
