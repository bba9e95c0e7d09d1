"""Params files validate and expand to the paper's grids; errors name the bad key."""

from pathlib import Path

import pytest
import yaml

from dpai_lib.config import ConfigError
from dpai_lib.params import TIERS, expand, load_artefact
from dpai_lib.runs import run_id
from dpai_lib.sparsity import compression_to_sparsity

PARAMS = sorted((Path(__file__).resolve().parents[1] / "params").glob("*.yaml"))
ARTEFACTS = [p for p in PARAMS if p.name != "smoke.yaml"]


@pytest.mark.parametrize("path", ARTEFACTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("tier", TIERS)
def test_every_params_file_expands_to_valid_unique_runs(path, tier):
    runs = expand(load_artefact(path), tier)
    ids = [run_id(r.config) for r in runs]
    assert len(ids) == len(set(ids))
    assert all(r.tier == tier and r.artefact == path.stem for r in runs)


def test_fig1_is_the_papers_grid():
    art = load_artefact(PARAMS[0].parent / "fig1_main.yaml")
    runs = expand(art, "paper")
    assert len(runs) == 3 * 7 * 4 * 3
    assert {(r.config.data.name, r.config.model.name) for r in runs} == {
        ("cifar10", "resnet20"), ("cifar100", "vgg19_bn"), ("tiny_imagenet", "resnet18")}
    assert {r.method for r in runs} == {"random", "snip", "iter_snip", "synflow", "phew", "npb", "dpai"}
    assert sorted({round(r.config.prune.sparsity, 12) for r in runs}) == [
        round(compression_to_sparsity(c), 12) for c in (0.5, 1.0, 1.5, 2.0)]
    assert {r.config.seed for r in runs} == {0, 1, 2}
    r20 = next(r.config for r in runs if r.setting == "resnet20_cifar10" and r.method == "dpai")
    assert r20.prune.options == {"alpha": 0.99, "beta": 0.5, "lr": 0.005, "steps": 3000}
    assert (r20.train.epochs, r20.train.lr, r20.train.lr_drops, r20.train.weight_decay) == (160, 0.1, [60, 120], 1e-4)
    tiny = next(r.config for r in runs if r.setting == "resnet18_tinyimagenet" and r.method == "npb")
    assert tiny.prune.options["beta"] == 2.0 and tiny.train.lr_drops == [30, 60, 80]
    smoke = expand(art, "smoke")
    assert all(r.config.data.name == "synthetic" and r.config.train.max_train_batches == 2 for r in smoke)
    assert next(r.config for r in smoke if r.method == "dpai").prune.options["steps"] == 5


def test_bad_params_files_name_the_problem(tmp_path):
    raw = yaml.safe_load((PARAMS[0].parent / "fig1_main.yaml").read_text())
    raw["settings"]["resnet20_cifar10"]["sparsity"] = [0.9]
    bad = tmp_path / "fig1_main.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="settings.resnet20_cifar10.sparsity: unknown key.*'sparsities'"):
        load_artefact(bad)
    raw = yaml.safe_load((PARAMS[0].parent / "fig1_main.yaml").read_text())
    raw["settings"]["resnet20_cifar10"]["config"]["train"]["lr_drop"] = [1]
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="train.lr_drop: unknown key"):
        expand(load_artefact(bad), "paper")
    (tmp_path / "other.yaml").write_text((PARAMS[0].parent / "fig1_main.yaml").read_text())
    with pytest.raises(ConfigError, match="must equal the file name"):
        load_artefact(tmp_path / "other.yaml")


def test_fig2_is_a_36_point_alpha_beta_grid_of_dpai_variants():
    runs = expand(load_artefact(PARAMS[0].parent / "fig2_alpha_beta.yaml"), "paper")
    dpai = [r for r in runs if r.config.prune.method == "dpai"]
    assert len(dpai) == 36 * 2 and len({r.method for r in dpai}) == 36
    assert {(r.config.prune.options["alpha"], r.config.prune.options["beta"]) for r in dpai} == {
        (a, b) for a in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0) for b in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)}
    assert all("pruner" not in r.config.prune.options for r in runs)


def test_appendix_tables_and_prune_only_figures_expand_to_their_grids():
    p = PARAMS[0].parent
    t8 = expand(load_artefact(p / "table8_extreme.yaml"), "paper")
    assert len(t8) == 2 * 2 * 5 and {r.config.seed for r in t8} == set(range(5))
    assert sorted({round(r.config.prune.sparsity, 12) for r in t8}) == [
        round(compression_to_sparsity(c), 12) for c in (2.5, 3.0)]
    t7 = expand(load_artefact(p / "table7_erk_vs_uniform.yaml"), "paper")
    assert {r.config.prune.options.get("budget", "erk") for r in t7} == {"erk", "uniform"} and len(t7) == 2 * 3 * 3
    for name in ("fig3_prune_time", "fig5_convergence"):
        assert all(r.config.train is None for r in expand(load_artefact(p / f"{name}.yaml"), "paper"))
    assert len(expand(load_artefact(p / "fig3_prune_time.yaml"), "paper")) == 3 * 7 * 4


def test_imagenet_and_vit_tables_expand_to_their_grids_with_warmup_cosine_training():
    p = PARAMS[0].parent
    t1 = expand(load_artefact(p / "table1_imagenet.yaml"), "paper")
    assert {(r.method, r.config.model.name, r.config.data.name) for r in t1} == {
        ("synflow", "efficientnet_b0", "imagenet"), ("dpai", "efficientnet_b0", "imagenet")}
    assert len(t1) == 2 * 2 * 3 and {r.config.prune.sparsity for r in t1} == {0.7, 0.95}
    t9 = expand(load_artefact(p / "table9_vit.yaml"), "paper")
    assert sorted({r.method for r in t9}) == ["dpai", "random", "synflow"] and len(t9) == 3 * 3
    assert {r.config.prune.sparsity for r in t9} == {0.99} and t9[0].config.model.options == {"image_size": 64}
    for r in t1 + t9:
        assert r.config.train.schedule == "warmup_cosine" and r.config.train.warmup_steps == 10_000
    assert {r.config.train.optimizer for r in t9} == {"adamw"} and {r.config.train.optimizer for r in t1} == {"sgd"}
    smoke = expand(load_artefact(p / "table9_vit.yaml"), "smoke")
    assert len(smoke) == 3 and smoke[0].config.data.name == "synthetic" and smoke[0].config.seed == 0
    assert smoke[0].config.model.name == "vit_tiny"  # the CPU stand-in for ViT-B/16
