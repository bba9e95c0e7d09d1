"""Sweeps: papermill execution, skip/resume, two runners on one store, failures, submitit, CSV schema."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpai_lib import build_model
from dpai_lib.config import ConfigError
from dpai_lib.pipeline import ROOT, Paths, parse_only, plan, run_sweep
from dpai_lib.results import COLUMNS, artefact_records, collect, scoreboard, status
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
    "tiers": {"smoke": {"all": {"train": {"max_train_batches": 1}}}, "short": {}, "paper": {}},
}


def store_with(tmp_path: Path, raw: dict) -> tuple[Path, Paths]:
    """A store under ``tmp_path`` with the params file ``raw`` (artefact ``tiny``): (params file, paths)."""
    paths = Paths.at(tmp_path)
    paths.params.mkdir()
    (paths.params / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return paths.params / "tiny.yaml", paths


@pytest.fixture()
def tiny(tmp_path):
    return store_with(tmp_path, TINY)


def _cli(params_file: Path, paths: Paths, *extra: str) -> subprocess.Popen:
    code = ("import sys, json; from pathlib import Path; from dpai_lib.pipeline import Paths, plan, run_sweep; "
            f"p = Paths.at(Path({str(paths.params.parent)!r})); "
            f"print(json.dumps(run_sweep(plan({str(params_file)!r}, 'smoke'), paths=p, device='cpu', progress=False)))")
    return subprocess.Popen([sys.executable, "-c", code, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)


def test_sweep_runs_the_template_skips_finished_runs_and_collects_a_tidy_csv(tiny, tmp_path):
    params_file, paths = tiny
    runs = plan(params_file, "smoke")
    assert len(runs) == 4
    assert run_sweep(runs, paths=paths, device="cpu", progress=False) == {"skipped": 0, "done": 4}
    for r in runs:
        rec = load_record(paths.smoke_store / f"{run_id(r.config)}.json")
        assert rec["status"] == "done" and rec["labels"] == {"artefact": "tiny", "setting": "r20",
                                                             "method": r.method, "tier": "smoke"}
        assert (paths.logs / "tiny" / f"{run_id(r.config)}.ipynb").exists()  # the executed notebook is the log
    assert run_sweep(runs, paths=paths, device="cpu", progress=False) == {"skipped": 4}
    assert collect("tiny", paths=paths) == [tmp_path / "results" / "tiny.csv", tmp_path / "runs" / "tiny.csv"]
    committed = pd.read_csv(tmp_path / "results" / "tiny.csv")  # smoke runs never reach results/
    assert list(committed.columns) == COLUMNS and committed.empty
    df = pd.read_csv(tmp_path / "runs" / "tiny.csv")
    assert list(df.columns) == COLUMNS and len(df) == 4 and set(df["status"]) == {"done"}
    assert (df.loc[df["method"] == "magnitude", "kept"] == 270_896 - int(0.9 * 270_896)).all()  # global top-k
    erk = sum(layer_kept_counts(build_model("resnet20", 10), 0.9, "erk").values())
    assert (df.loc[df["method"] == "random", "kept"] == erk).all() and df["log_paths"].notna().all()
    st = status(paths=paths)
    smoke = st[st["tier"] == "smoke"]
    assert smoke["expected"].sum() == 4 and smoke["done"].sum() == 4 and smoke["missing"].sum() == 0


def test_killed_sweep_resumes_and_two_runners_neither_lose_nor_duplicate(tiny):
    params_file, paths = tiny
    first = _cli(params_file, paths)
    deadline = time.time() + 120
    while time.time() < deadline and not list(paths.smoke_store.glob("*.json")):
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the runner and its kernel die mid-sweep
    first.wait()
    a, b = _cli(params_file, paths), _cli(params_file, paths)  # two runners on the same store
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in (a, b)]
    records = sorted(paths.smoke_store.glob("*.json"))
    assert len(records) == 4 and all(load_record(r)["status"] == "done" for r in records)
    executed = sum(o.get("done", 0) for o in outs)
    finished_before = 4 - executed
    assert finished_before >= 1  # the killed runner had finished at least one run
    assert all(o.get("failed", 0) == 0 for o in outs)
    assert not list(paths.smoke_store.rglob(".*.tmp"))


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tiny):
    params_file, paths = tiny
    raw = dict(TINY)  # valid params, and a run that fails once it has its data: a subset larger than the set
    raw["settings"] = dict(TINY["settings"], toobig={
        "config": {"data": {"train_subset": 100_000}}, "methods": ["random"], "sparsities": [0.9], "seeds": [0]})
    params_file.write_text(yaml.safe_dump(raw))
    counts = run_sweep(plan(params_file, "smoke", only=parse_only(["seed=0", "method=random"])), paths=paths,
                       device="cpu", progress=False)
    assert counts == {"skipped": 0, "done": 1, "failed": 1}
    failed = [load_record(p) for p in paths.smoke_store.glob("*.json") if load_record(p)["status"] == "failed"]
    assert len(failed) == 1 and "train_subset=100000 exceeds the 128 training images" in failed[0]["error"]


def test_submitit_local_executor_runs_a_small_sweep(tiny):
    params_file, paths = tiny
    runs = plan(params_file, "smoke", only=parse_only(["method=random"]), shard=(0, 2))
    assert len(runs) == 1
    counts = run_sweep(runs, paths=paths, executor="submitit-local", device="cpu", progress=False,
                       slurm={"timeout_min": 10})
    assert counts == {"skipped": 0, "done": 1}


def test_artefacts_share_records_of_identical_runs_and_fill_runs_only_what_is_missing(tiny, tmp_path):
    params_file, paths = tiny
    twin = dict(TINY, artefact="twin", methods={"rand": {"pruner": "random", "budget": "erk"}})
    twin["settings"] = {"again": dict(TINY["settings"]["r20"], methods=["rand"], seeds=[1])}
    (paths.params / "twin.yaml").write_text(yaml.safe_dump(twin))
    assert run_sweep(plan(params_file, "smoke", only=parse_only(["method=random"])), paths=paths, device="cpu",
                     progress=False) == {"skipped": 0, "done": 2}
    assert run_sweep(plan(paths.params / "twin.yaml", "smoke"), paths=paths, device="cpu", progress=False) == {
        "skipped": 1}  # the same configuration under another artefact's names: one record
    shared = artefact_records("twin", paths=paths)
    assert [r["labels"]["method"] for r in shared] == ["rand"] and shared[0]["labels"]["setting"] == "again"
    assert shared[0]["config"]["seed"] == 1
    board = scoreboard(paths=paths).set_index(["artefact", "tier", "stage"])
    assert board.loc[("twin", "smoke", "all"), "state"] == "complete"
    assert board.loc[("tiny", "smoke", "all"), ["expected", "finished", "state"]].tolist() == [4, 2, "partial"]
    assert board.loc[("tiny", "paper", "all"), "state"] == "not run"
    # fill runs the smoke tier of artefacts without short/paper data: here the two runs tiny still lacks
    out = subprocess.run([sys.executable, "-m", "dpai_lib", "fill", "--tier", "smoke", "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "DPAI_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"skipped": 3, "done": 2}
    assert scoreboard(paths=paths).query("tier == 'smoke' and stage == 'all'")["state"].tolist() == [
        "complete", "complete"]


def test_run_tiers_can_run_a_smaller_grid(tiny):
    params_file, _ = tiny
    raw = dict(TINY, tiers={"smoke": {"seeds": [1]}, "short": {"sparsities": [0.9]}, "paper": {}})
    params_file.write_text(yaml.safe_dump(raw))
    assert [r.config.seed for r in plan(params_file, "smoke")] == [1, 1]
    assert len(plan(params_file, "short")) == 4
    params_file.write_text(yaml.safe_dump(dict(raw, tiers={**raw["tiers"], "smoke": {"seeds": [7]}})))
    with pytest.raises(ConfigError, match="keeps no seed or no sparsity of setting 'r20'"):
        plan(params_file, "smoke")


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


def test_threads_fixes_the_torch_threads_of_each_cpu_run(tiny):
    params_file, paths = tiny
    runs = plan(params_file, "smoke", only=parse_only(["method=random", "seed=0"]))
    with pytest.raises(ValueError, match="threads must be >= 0"):
        run_sweep(runs, paths=paths, device="cpu", threads=-1, progress=False)
    assert run_sweep(runs, paths=paths, device="cpu", threads=1, progress=False) == {"skipped": 0, "done": 1}
    [rec] = artefact_records("tiny", "smoke", "all", paths=paths)
    assert rec["provenance"]["torch_threads"] == 1


def test_templates_are_found_under_the_root_first_then_in_the_repository(tmp_path):
    paths = Paths.at(tmp_path)
    ours = "book/experiments/prune_train.md"
    assert paths.template(ours) == ROOT / ours
    mine = tmp_path / ours
    mine.parent.mkdir(parents=True)
    mine.write_text("# my template\n")
    assert paths.template(ours) == mine
    assert paths.template(mine) == mine
    with pytest.raises(FileNotFoundError, match="no_such.md.*looked in"):
        paths.template("book/no_such.md")


def test_a_missing_template_fails_each_run_with_the_places_looked(tiny):
    params_file, paths = tiny
    params_file.write_text(yaml.safe_dump(dict(TINY, notebook="book/experiments/no_such.md")))
    runs = plan(params_file, "smoke", only=parse_only(["seed=0"]))
    assert run_sweep(runs, paths=paths, device="cpu", progress=False) == {"skipped": 0, "failed": 2}
    errors = {load_record(p)["error"] for p in paths.smoke_store.glob("*.json")}
    assert len(errors) == 1 and "no_such.md' not found; looked in" in errors.pop()
