"""dpai_lib.gpu_check (`make gpu-check`): its quick CPU mode runs every check on tiny sizes and writes the result
file; without a CUDA device it stops at once with one line; its schedule scaling keeps the paper's shape. No GPU
needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dpai_lib import gpu_check
from dpai_lib.pipeline import ROOT

CHECKS = ["environment", "dpai_cuda_vs_cpu", "trainer_paths", "masks_enforced", "throughput", "fmnist_schedule"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    status = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(out)])
    return status, out, json.loads((out / gpu_check.RESULT_FILE).read_text())


def test_quick_cpu_mode_runs_every_check_and_writes_the_result_file(quick):
    status, out, result = quick
    assert status == 0, json.dumps({k: v.get("error") or v.get("summary") for k, v in result["checks"].items()})
    assert result["schema"] == gpu_check.SCHEMA and result["quick"] is True and result["complete"] is True
    assert result["passed"] is True and result["device"] == "cpu" and result["dataset"] == "synthetic"
    assert result["torch"] == torch.__version__ and result["device_name"]
    assert list(result["checks"]) == CHECKS
    for name, check in result["checks"].items():
        assert check["status"] in ("pass", "info"), (name, check)
        assert check["seconds"] >= 0 and check["summary"]
    env = result["checks"]["environment"]
    assert env["torch"] == torch.__version__ and "git_commit" in env
    dpai = result["checks"]["dpai_cuda_vs_cpu"]
    assert dpai["initial_masks"]["equal"] and dpai["device"]["default_flags"]["equal"]  # cpu vs cpu: equal
    assert dpai["device"]["default_flags"]["overlap"] == 1.0
    trainer = result["checks"]["trainer_paths"]
    assert trainer["images_device"] == "cpu" and trainer["batch_device"] == "cpu"
    assert trainer["judged"]["augmentation deterministic"] and trainer["channels_last_weights"] is False
    enforced = result["checks"]["masks_enforced"]
    assert enforced["pruned_nonzero"] == 0 and enforced["kept_changed"] > 0
    tp = result["checks"]["throughput"]
    assert tp["status"] == "info" and tp["ratio"] > 0 and tp["target"] == 1.0  # quick mode: not judged
    run = result["checks"]["fmnist_schedule"]
    assert run["run_status"] == "done" and run["epochs"] == 8 and run["lr_drops"] == [3, 6]
    assert run["paper_epochs"] == 160 and run["paper_lr_drops"] == [60, 120] and run["dataset"] == "synthetic"
    record = json.loads((out / "records" / f"{run['run_id']}.json").read_text())
    assert record["labels"] == {"artefact": "gpu_check", "setting": "resnet20_fmnist", "method": "dpai", "tier": "quick"}
    assert record["config"]["train"]["epochs"] == 8 and record["config"]["prune"]["method"] == "dpai"
    assert result["total_s"] > 0 and result["within_budget"] in (True, False)


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpu_check: no CUDA device") and "--device cpu --quick" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_command_without_cuda_prints_one_line_and_no_traceback(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides any GPU of the machine running the tests
    proc = subprocess.run([sys.executable, "-m", "dpai_lib.gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gpu_check: no CUDA device")


def test_a_cpu_run_needs_quick_and_bad_counts_are_refused(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "needs --quick" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--quick", "--dpai-steps", "0", "--out", str(tmp_path)]) == 2
    assert "--dpai-steps must be >= 1" in capsys.readouterr().err


def test_the_schedule_keeps_the_papers_shape_and_fits_the_time_left():
    assert gpu_check.drops_for(160) == [60, 120]
    for epochs in gpu_check.SCHEDULE_EPOCHS:
        first, second = gpu_check.drops_for(epochs)
        assert first / epochs == 0.375 and second / epochs == 0.75
    assert gpu_check.choose_epochs(1000.0, 5.0, 100.0) == (160, True)  # 100 + 160 x 5 = 900
    assert gpu_check.choose_epochs(500.0, 5.0, 100.0) == (80, True)
    assert gpu_check.choose_epochs(10.0, 5.0, 100.0) == (8, False)


def test_mask_comparison_counts_the_overlap():
    a = {"w": torch.tensor([True, True, False, False]), "v": torch.tensor([True, False])}
    b = {"w": torch.tensor([True, False, True, False]), "v": torch.tensor([True, False])}
    got = gpu_check.compare_masks(a, b)
    assert got["equal"] is False and got["layers_differing"] == 1 and got["first_layers_differing"] == ["w"]
    assert got["kept"] == 3 and got["kept_by_both"] == 2 and got["overlap"] == pytest.approx(2 / 3, abs=1e-6)
    assert gpu_check.compare_masks(a, a)["equal"] is True
