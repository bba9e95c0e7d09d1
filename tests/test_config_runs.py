"""Run configuration errors, run ids, run records and the command line."""

import json
import subprocess
import sys

import pydantic
import pytest
import yaml
from conftest import run_dict

from dpai_lib.config import ConfigError, load_config, validate_config
from dpai_lib.data import DatasetNotFoundError
from dpai_lib.runs import execute, load_record, run_id


def test_unknown_key_names_it_the_allowed_keys_and_a_close_match():
    raw = run_dict()
    raw["train"] = raw["train"] | {"learning_rate": 0.1}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    msg = str(err.value)
    assert "train.learning_rate: unknown key" in msg
    assert "allowed keys here: amp, batch_size" in msg and "lr_drops" in msg

    raw = run_dict()
    raw["prune"] = raw["prune"] | {"sparsty": 0.9}
    with pytest.raises(ConfigError, match="did you mean 'sparsity'"):
        validate_config(raw)


def test_mistyped_and_missing_values_are_named():
    raw = run_dict()
    raw["train"] = raw["train"] | {"lr": "fast"}
    with pytest.raises(ConfigError, match=r"train\.lr: .*got 'fast'"):
        validate_config(raw)
    raw = run_dict()
    del raw["train"]["weight_decay"]
    with pytest.raises(ConfigError, match="train.weight_decay: required key is missing"):
        validate_config(raw)
    raw = run_dict(prune={"method": "random", "sparsity": 99})
    with pytest.raises(ConfigError, match="prune.sparsity"):
        validate_config(raw)
    raw = run_dict()
    raw["train"] = raw["train"] | {"lr_drops": [120, 60]}
    with pytest.raises(ConfigError, match="strictly increasing"):
        validate_config(raw)


def test_yaml_loading_and_frozen(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_dict()))
    cfg = load_config(path)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.seed = 3
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_run_id_is_a_stable_content_hash():
    a, b = validate_config(run_dict()), validate_config(run_dict())
    assert run_id(a) == run_id(b) and len(run_id(a)) == 16
    assert run_id(validate_config(run_dict(seed=1))) != run_id(a)
    # defaults are part of the hash: writing a default explicitly changes nothing
    explicit = run_dict()
    explicit["train"] = explicit["train"] | {"amp": True}
    assert run_id(validate_config(explicit)) == run_id(a)


def test_execute_writes_a_complete_record_and_skips_a_finished_run(tmp_path):
    cfg = validate_config(run_dict())
    path, record = execute(cfg, tmp_path / "records", device="cpu", progress=False)
    assert path.name == f"{run_id(cfg)}.json"
    on_disk = load_record(path)
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["status"] == "done" and on_disk["config"] == cfg.canonical() and on_disk["seed"] == 0
    assert set(on_disk["provenance"]) >= {"dpai_lib", "torch", "cuda", "device_name", "git_commit", "git_dirty"}
    assert on_disk["determinism"]["deterministic"] is True
    res = on_disk["results"]
    assert res["epochs_run"] == 1 and 0 <= res["final_test_acc"] <= 1
    assert res["masks"]["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert len(on_disk["curves"]) == 1 and on_disk["timings"]["prune_s"] >= 0
    assert (tmp_path / "records" / "work" / run_id(cfg) / "masks.safetensors").exists()
    assert not list((tmp_path / "records").glob(".*.tmp"))
    _, again = execute(cfg, tmp_path / "records", device="cpu", progress=False)
    assert again["timings"] == on_disk["timings"]  # not re-run


def test_missing_data_is_a_clear_error_and_a_failed_record(tmp_path):
    cfg = validate_config(run_dict(data={"name": "cifar10", "data_dir": str(tmp_path / "nowhere")}))
    with pytest.raises(DatasetNotFoundError) as err:
        execute(cfg, tmp_path / "records", device="cpu", progress=False)
    assert str(tmp_path / "nowhere") in str(err.value)
    record = load_record(tmp_path / "records" / f"{run_id(cfg)}.json")
    assert record["status"] == "failed" and "DatasetNotFoundError" in record["error"]


def test_command_line_trains_and_prints_the_record(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_dict()))
    out = subprocess.run([sys.executable, "-m", "dpai_lib", "train", str(path), "--records", str(tmp_path / "r"),
                          "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"run record: {tmp_path / 'r'}" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(run_dict(seeds=[1])))
    out = subprocess.run([sys.executable, "-m", "dpai_lib", "train", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "seeds: unknown key" in out.stderr


def test_data_pruners_get_seeded_batches_from_the_config(tmp_path):
    raw = run_dict(prune={"method": "snip", "sparsity": 0.9})
    raw["train"] = raw["train"] | {"epochs": 0}
    with pytest.raises(ValueError, match="prune.data_batches and prune.data_batch_size"):
        execute(validate_config(raw), tmp_path / "a", device="cpu", progress=False)
    raw["prune"] = {"method": "snip", "sparsity": 0.9, "data_batches": 2, "data_batch_size": 32}
    _, record = execute(validate_config(raw), tmp_path / "b", device="cpu", progress=False)
    assert record["status"] == "done"
    assert record["results"]["masks"]["kept"] == 270_896 - int(0.9 * 270_896)


def test_prune_only_runs_need_no_data_files_and_record_node_path_stats(tmp_path):
    raw = run_dict(data={"name": "cifar10", "data_dir": str(tmp_path / "no-cifar-here")}, train=None)
    raw["prune"] = {"method": "dpai", "sparsity": 0.99, "options": {"steps": 3}}
    _, record = execute(validate_config(raw), tmp_path / "r", device="cpu", progress=False)
    assert record["status"] == "done" and record["curves"] == []
    exact, release = record["results"]["node_path"]["exact"], record["results"]["node_path"]["dpai"]
    assert exact["log_paths"] > 0 and exact["nodes"] <= 10 + 16 * 7 + 32 * 7 + 64 * 7
    assert release["log_paths"] > 0 and set(exact["layers"]) == set(record["results"]["masks"]["layer_density"])
    assert len(record["curves_prune"]) == 3 + 2


def test_resume_uses_the_runs_saved_masks_and_refuses_a_checkpoint_made_with_other_masks(tmp_path):
    import torch

    from dpai_lib.masks import Masks
    from dpai_lib.runs import ResumeError

    raw = run_dict(data={"name": "synthetic", "options": {"train_size": 64, "test_size": 64, "image_size": 8}})
    raw["train"] = raw["train"] | {"batch_size": 32, "max_train_batches": 1}
    cfg = validate_config(raw)
    records = tmp_path / "records"
    work = records / "work" / run_id(cfg)
    masks_file, ckpt = work / "masks.safetensors", work / "checkpoint.pt"
    path, first = execute(cfg, records, device="cpu", progress=False)
    assert first["results"]["resumed_from_epoch"] is None and ckpt.exists()
    path.unlink()  # as if the run had been interrupted after its last checkpoint
    _, resumed = execute(cfg, records, device="cpu", progress=False)
    assert resumed["status"] == "done" and resumed["results"]["resumed_from_epoch"] == 1
    assert resumed["results"]["final_test_acc"] == first["results"]["final_test_acc"]

    saved = Masks.load(masks_file)
    name = next(n for n in saved if 0 < int(saved[n].sum()) < saved[n].numel())
    moved = Masks({n: (m.flatten().roll(1).view_as(m) if n == name else m) for n, m in saved.items()})
    assert moved.layer_kept() == saved.layer_kept() and not torch.equal(moved[name], saved[name])
    moved.save(masks_file)  # as many weights kept in every layer, other ones: kept counts cannot tell
    path.unlink()
    with pytest.raises(ResumeError) as err:
        execute(cfg, records, device="cpu", progress=False)
    msg = str(err.value)
    assert f"cannot resume {ckpt}: it was trained with the masks in {masks_file}" in msg
    assert f"differ from this run's masks in 1 layers ({name};" in msg and f"delete {work}" in msg
    failed = load_record(path)
    assert failed["status"] == "failed" and "ResumeError" in failed["error"] and str(masks_file) in failed["error"]

    saved.save(masks_file)  # the run's own masks again, but a checkpoint trained with others
    state = torch.load(ckpt, weights_only=False)
    state["model"][name][~saved[name]] = 0.5
    torch.save(state, ckpt)
    with pytest.raises(ResumeError, match=f"its weights are not zero where the masks in {masks_file} prune them "
                                          rf"\({name}\)"):
        execute(cfg, records, device="cpu", progress=False)

    masks_file.unlink()
    with pytest.raises(ResumeError, match=f"its mask file {masks_file} is missing or unreadable"):
        execute(cfg, records, device="cpu", progress=False)
