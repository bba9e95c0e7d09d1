"""Sweeps: papermill execution, skip/resume, two runners on one store, failures, submitit, CSV schema."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpai_lib import build_model
from dpai_lib.pipeline import ROOT, Paths, parse_only, plan, run_sweep
from dpai_lib.results import COLUMNS, collect, status
from dpai_lib.runs import load_record, run_id
from dpai_lib.sparsity import layer_kept_counts

TINY = {
    "artefact": "tiny",
    "title": "pipeline test",
    "paper_ref": "none",
    "notebook": "book/experiments/prune_train.md",
    "stages": ["prune", "train"],
    "base": {"deterministic": True,
             "data": {"name": "synthetic", "options": {"train_size": 128, "test_size": 64}},
             "model": {"name": "resnet20"},
             "train": {"epochs": 1, "batch_size": 64, "test_batch_size": 64, "lr": 0.05, "momentum": 0.9,
                       "nesterov": False, "weight_decay": 1e-4, "lr_drops": [], "lr_drop_factor": 0.1}},
    "methods": {"random": {"budget": "erk"}, "magnitude": {}},
    "settings": {"r20": {"config": {}, "methods": ["random", "magnitude"], "sparsities": [0.9], "seeds": [0, 1]}},
    "budgets": {"smoke": {"all": {"train": {"max_train_batches": 1}}}, "short": {}, "paper": {}},
}


@pytest.fixture()
def tiny(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    (params / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    paths = Paths(store=tmp_path / "store", work=tmp_path / "work", logs=tmp_path / "logs", params=params)
    return params / "tiny.yaml", paths


def _cli(params_file: Path, paths: Paths, *extra: str) -> subprocess.Popen:
    code = ("import sys, json; from pathlib import Path; from dpai_lib.pipeline import Paths, plan, run_sweep; "
            f"p = Paths(Path({str(paths.store)!r}), Path({str(paths.work)!r}), Path({str(paths.logs)!r}), "
            f"Path({str(paths.params)!r})); "
            f"print(json.dumps(run_sweep(plan({str(params_file)!r}, 'smoke'), paths=p, device='cpu', progress=False)))")
    return subprocess.Popen([sys.executable, "-c", code, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)


def test_sweep_runs_the_template_skips_finished_runs_and_collects_a_tidy_csv(tiny, tmp_path):
    params_file, paths = tiny
    runs = plan(params_file, "smoke")
    assert len(runs) == 4
    assert run_sweep(runs, paths=paths, device="cpu", progress=False) == {"skipped": 0, "done": 4}
    for r in runs:
        rec = load_record(paths.store / "tiny" / f"{run_id(r.config)}.json")
        assert rec["status"] == "done" and rec["labels"] == {"artefact": "tiny", "setting": "r20",
                                                             "method": r.method, "budget": "smoke"}
        assert (paths.logs / "tiny" / f"{run_id(r.config)}.ipynb").exists()  # the executed notebook is the log
    assert run_sweep(runs, paths=paths, device="cpu", progress=False) == {"skipped": 4}
    df = pd.read_csv(collect(paths.store, "tiny", tmp_path / "out"))
    assert list(df.columns) == COLUMNS and len(df) == 4 and set(df["status"]) == {"done"}
    assert (df.loc[df["method"] == "magnitude", "kept"] == 270_896 - int(0.9 * 270_896)).all()  # global top-k
    erk = sum(layer_kept_counts(build_model("resnet20", 10), 0.9, "erk").values())
    assert (df.loc[df["method"] == "random", "kept"] == erk).all() and df["log_paths"].notna().all()
    st = status(params_file.parent, paths.store)
    smoke = st[st["budget"] == "smoke"]
    assert smoke["expected"].sum() == 4 and smoke["done"].sum() == 4 and smoke["missing"].sum() == 0


def test_killed_sweep_resumes_and_two_runners_neither_lose_nor_duplicate(tiny):
    params_file, paths = tiny
    first = _cli(params_file, paths)
    deadline = time.time() + 120
    while time.time() < deadline and not list((paths.store / "tiny").glob("*.json")):
        time.sleep(0.5)
    import os

    os.killpg(first.pid, signal.SIGKILL)  # the runner and its kernel die mid-sweep
    first.wait()
    a, b = _cli(params_file, paths), _cli(params_file, paths)  # two runners on the same store
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in (a, b)]
    records = sorted((paths.store / "tiny").glob("*.json"))
    assert len(records) == 4 and all(load_record(r)["status"] == "done" for r in records)
    executed = sum(o.get("done", 0) for o in outs)
    finished_before = 4 - executed
    assert finished_before >= 1  # the killed runner had finished at least one run
    assert all(o.get("failed", 0) == 0 for o in outs)
    assert not list(paths.store.rglob(".*.tmp"))


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tiny):
    params_file, paths = tiny
    raw = dict(TINY)
    raw["methods"] = {"random": {"budget": "erk"}, "magnitude": {"no_such_option": 1}}
    params_file.write_text(yaml.safe_dump(raw))
    counts = run_sweep(plan(params_file, "smoke", only=parse_only(["seed=0"])), paths=paths, device="cpu",
                       progress=False)
    assert counts == {"skipped": 0, "done": 1, "failed": 1}
    failed = [load_record(p) for p in (paths.store / "tiny").glob("*.json") if load_record(p)["status"] == "failed"]
    assert len(failed) == 1 and "no_such_option" in failed[0]["error"]


def test_submitit_local_executor_runs_a_small_sweep(tiny):
    params_file, paths = tiny
    runs = plan(params_file, "smoke", only=parse_only(["method=random"]), shard=(0, 2))
    assert len(runs) == 1
    counts = run_sweep(runs, paths=paths, executor="submitit-local", device="cpu", progress=False,
                       slurm={"timeout_min": 10})
    assert counts == {"skipped": 0, "done": 1}


def test_plan_filters_shards_and_prune_stage(tiny):
    params_file, _ = tiny
    all_runs = plan(params_file, "smoke")
    shards = [plan(params_file, "smoke", shard=(i, 3)) for i in range(3)]
    assert sorted(run_id(r.config) for s in shards for r in s) == sorted(run_id(r.config) for r in all_runs)
    assert all(r.config.train is None for r in plan(params_file, "paper", stage="prune"))
    with pytest.raises(ValueError, match="key one of setting, method"):
        parse_only(["arch=resnet20"])
    with pytest.raises(ValueError, match="shard"):
        plan(params_file, "smoke", shard=(3, 3))
