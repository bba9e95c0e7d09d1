"""Bad inputs fail early with one line that names them: prune() arguments, masks files, run configurations
and params files (every tier, every name, every pruner option)."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from dpai_lib import build_model, prune
from dpai_lib.config import ConfigError
from dpai_lib.errors import UserError
from dpai_lib.masks import FORMAT, MaskError, Masks
from dpai_lib.params import expand, load_artefact
from dpai_lib.pruners import check_options

PARAMS = Path(__file__).resolve().parents[1] / "params"


@pytest.fixture(scope="module")
def resnet20():
    return build_model("resnet20", 10)


# -- prune(): the common entry point ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpai", "magnitude", "random"])
def test_a_model_without_prunable_weights_is_refused_by_name(method):
    with pytest.raises(ValueError, match=rf"^Sequential has no prunable weights .*pruner '{method}' has nothing to prune$"):
        prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), method, 0.9, input_shape=(4,))


def test_an_input_shape_the_model_cannot_take_is_named_with_the_models_error(resnet20):
    with pytest.raises(ValueError, match=r"^input_shape \(1, 32, 32\) does not fit this CifarResNet: .*RuntimeError: "
                                         r".*expected input\[1, 1, 32, 32\] to have 3 channels"):
        prune(resnet20, "random", 0.9, input_shape=(1, 32, 32))
    with pytest.raises(TypeError, match=r"^input_shape must be one input's shape .*e\.g\. \(3, 32, 32\); got 32$"):
        prune(resnet20, "random", 0.9, input_shape=32)
    for bad in [(3, 0, 32), (), (3, 32.0, 32)]:
        with pytest.raises(ValueError, match=rf"^input_shape must be one input's shape .*; got {re.escape(repr(bad))}$"):
            prune(resnet20, "random", 0.9, input_shape=bad)


def test_the_shape_check_leaves_batch_norm_statistics_and_train_flags_alone(monkeypatch):
    model = build_model("resnet20", 10)
    model.train()
    model.layers[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    captured = {}

    from dpai_lib.pruners import PRUNERS, list_pruners

    def _probe(model, sparsity, *, input_shape, data=None, seed=0):  # what a pruner receives
        captured["flags"] = [m.training for m in model.modules()]
        captured["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return Masks.ones(model)

    _probe.needs_data = False
    list_pruners()
    monkeypatch.setitem(PRUNERS._entries, "_probe", _probe)  # registered for this test only
    prune(model, "_probe", 0.0, input_shape=(3, 32, 32))
    assert captured["flags"] == flags
    assert all(torch.equal(captured["state"][k], v) for k, v in before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_seeds_must_be_non_negative_integers(resnet20):
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0; got -1$"):
        prune(resnet20, "random", 0.9, input_shape=(3, 32, 32), seed=-1)
    for bad, shown in [(1.5, "1.5"), ("0", "'0'"), (True, "True")]:
        with pytest.raises(TypeError, match=rf"^seed must be an integer >= 0; got {re.escape(shown)}$"):
            prune(resnet20, "random", 0.9, input_shape=(3, 32, 32), seed=bad)


def test_arguments_in_the_wrong_order_give_a_short_error_not_the_models_repr(resnet20):
    for args, match in [(("dpai", resnet20, 0.9), r"^prune\(model, method, sparsity.*takes the network first; got 'dpai'"),
                        ((resnet20, 0.9, "dpai"), r"^the pruning method must be a pruner name \(dpai, .*\); got 0\.9"),
                        ((resnet20, resnet20, 0.9), r"^the pruning method must be .*; got a CifarResNet module"),
                        ((resnet20, "dpai", resnet20), r"^sparsity must be a number in \[0, 1\); got a CifarResNet module$")]:
        with pytest.raises(TypeError, match=match) as err:
            prune(*args, input_shape=(3, 32, 32))
        assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_unknown_pruners_and_options_suggest_the_closest_name(resnet20):
    with pytest.raises(UserError, match=r"^unknown pruner 'dpia'; did you mean 'dpai'\? known pruners: dpai, grasp"):
        prune(resnet20, "dpia", 0.9, input_shape=(3, 32, 32))
    with pytest.raises(TypeError, match=r"no hyper-parameter 'stpes'; did you mean 'steps'\? valid: alpha=0\.99"):
        prune(resnet20, "dpai", 0.9, input_shape=(3, 32, 32), stpes=3)


def test_option_types_come_from_the_pruner_functions_annotations():
    assert check_options("dpai", {"steps": 3, "alpha": 1, "beta": 0.5, "budget": "uniform"}) == []  # int is a float
    assert check_options("npb", {"max_p": None, "max_p_drop_layers": [3, 7, 11], "time_limit_s": 5}) == []
    assert check_options("dpai", {"steps": "abc", "lr": True, "alpah": 0.5}) == [
        ("steps", "option 'steps' of pruner 'dpai' must be an integer; got 'abc'"),
        ("lr", "option 'lr' of pruner 'dpai' must be a number; got True"),
        ("alpah", "unknown option of pruner 'dpai'; did you mean 'alpha'? its options: alpha, beta, lr, steps, "
                  "budget, path_count, init_scores, trace, progress")]
    assert check_options("npb", {"max_p": 9.5, "max_p_drop_layers": "3"}) == [
        ("max_p", "option 'max_p' of pruner 'npb' must be an integer or null; got 9.5"),
        ("max_p_drop_layers", "option 'max_p_drop_layers' of pruner 'npb' must be a list of integers or null; got '3'")]


def test_choice_options_are_checked_against_the_values_their_pruner_allows():
    assert check_options("random", {"budget": "erkk"}) == [
        ("budget", "option 'budget' of pruner 'random' must be one of 'erk', 'uniform'; got 'erkk'; did you mean 'erk'?")]
    assert check_options("synflow", {"schedule": "linear", "scope": "layer", "ties": "prune_all"}) == []
    assert check_options("dpai", {"path_count": "exakt"}) == [
        ("path_count", "option 'path_count' of pruner 'dpai' must be one of 'release', 'exact'; got 'exakt'; did you "
                       "mean 'exact'?")]


# -- masks files -----------------------------------------------------------------------------------


def test_a_garbage_or_damaged_masks_file_is_named(tmp_path):
    good = Masks({"w": torch.tensor([1, 0, 1], dtype=torch.bool)}).save(tmp_path / "good.safetensors")
    assert torch.equal(Masks.load(good)["w"], torch.tensor([True, False, True]))
    cases = {
        "text.safetensors": (lambda p: p.write_text("not a tensor file\n" * 5), "not a masks file \\(not a readable safetensors"),
        "cut.safetensors": (lambda p: p.write_bytes(good.read_bytes()[:-2]), "not a masks file \\(not a readable safetensors"),
        "other.safetensors": (lambda p: save_file({"w": torch.ones(3)}, str(p)),
                              "not a dpai_lib masks file \\(format None, expected 'dpai_lib.masks/1'\\)"),
        "lacking.safetensors": (lambda p: save_file({"w": torch.ones(3)}, str(p), metadata={
            "format": FORMAT, "order": json.dumps(["w", "v"])}), "damaged masks file: tensors listed but missing \\['v'\\]"),
        "no_order.safetensors": (lambda p: save_file({"w": torch.ones(3)}, str(p), metadata={"format": FORMAT}),
                                 "damaged masks file: its metadata has no valid tensor 'order'"),
        "halves.safetensors": (lambda p: save_file({"w": torch.full((3,), 0.5)}, str(p), metadata={
            "format": FORMAT, "order": json.dumps(["w"])}), "mask 'w' must contain only 0 and 1"),
    }
    for name, (write, match) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(MaskError, match=rf"^{re.escape(str(path))}: {match}"):
            Masks.load(path)
    with pytest.raises(FileNotFoundError, match=r"^no masks file at .*missing\.safetensors$"):
        Masks.load(tmp_path / "missing.safetensors")


# -- params files: every problem named where it is written, before anything runs -------------------

FIG1 = yaml.safe_load((PARAMS / "fig1_main.yaml").read_text())
R20 = ("settings", "resnet20_cifar10")


def _set(raw, keys, value):
    *head, last = keys
    for k in head:
        raw = raw[k]
    if value is _DELETE:
        del raw[last]
    else:
        raw[last] = value


_DELETE = object()
BAD_PARAMS = [
    ((*R20, "method_options", "npb", "alpah"), 1.0,
     "settings.resnet20_cifar10.method_options.npb.alpah: unknown option of pruner 'npb'; did you mean 'alpha'? "
     "its options: variant, alpha, beta, max_p,"),
    (("methods", "dpai", "steps"), "abc", "methods.dpai.steps: option 'steps' of pruner 'dpai' must be an integer; got 'abc'"),
    (("tiers", "paper", "methods"), {"synflow": {"iterations": 1.5}},  # a tier nobody runs in the tests
     "tiers.paper.methods.synflow.iterations: option 'iterations' of pruner 'synflow' must be an integer; got 1.5"),
    (("methods", "dpai", "alpha"), 1, None),  # an int is a valid float
    (("methods", "random", "budget"), "ERK", "methods.random.budget: option 'budget' of pruner 'random' must be one of "
                                             "'erk', 'uniform'; got 'ERK'; did you mean 'erk'?"),
    ((*R20, "config", "model", "name"), "resnet2",
     "settings.resnet20_cifar10.config.model.name: unknown model 'resnet2'; did you mean 'resnet20'? known models: "),
    ((*R20, "config", "model", "name"), "tv:resnet05",
     "settings.resnet20_cifar10.config.model.name: unknown torchvision model 'tv:resnet05'; did you mean 'tv:resnet50'?"),
    ((*R20, "config", "model", "options"), {"image_sise": 32},
     "settings.resnet20_cifar10.config.model.options.image_sise: unknown option of model 'resnet20'; its options: none"),
    ((*R20, "config", "data", "name"), "cifar",
     "settings.resnet20_cifar10.config.data.name: unknown data set 'cifar'; did you mean 'cifar10'? known data sets: "
     "cifar10, cifar100, fashion_mnist, imagenet, synthetic, tiny_imagenet"),
    (("tiers", "smoke", "all", "data", "options", "train_sise"), 3,
     "tiers.smoke.all.data.options.train_sise: unknown option of data set 'synthetic'; did you mean 'train_size'?"),
    (("tiers", "smoke", "all", "data", "options", "train_size"), "big",
     "tiers.smoke.all.data.options.train_size: option 'train_size' of data set 'synthetic' must be an integer; got 'big'"),
    (("methods", "dpia"), {}, "methods.dpia: unknown pruner 'dpia'; did you mean 'dpai'? known pruners: dpai, grasp,"),
    (("methods", "variant"), {"pruner": "dpa"}, "methods.variant.pruner: unknown pruner 'dpa'; did you mean 'dpai'?"),
    ((*R20, "methods", 6), "dpia", "settings.resnet20_cifar10.methods.6: unknown method 'dpia'; did you mean 'dpai'? "
                                   "known methods: random, snip, iter_snip, synflow, phew, npb, dpai"),
    ((*R20, "method_options", "npbb"), {}, "settings.resnet20_cifar10.method_options.npbb: unknown method 'npbb'; did "
                                           "you mean 'npb'? known methods: random, snip,"),
    (("tiers", "smoke", "methods", "dpia"), {}, "tiers.smoke.methods.dpia: unknown method 'dpia'; did you mean 'dpai'?"),
    (("tiers", "short", "settings", "resnet20_cifar1"), {},
     "tiers.short.settings.resnet20_cifar1: unknown setting 'resnet20_cifar1'; did you mean 'resnet20_cifar10'?"),
    ((*R20, "sparsities"), [0.9, 99], "settings.resnet20_cifar10.sparsities.1: Input should be less than 1 (got 99)"),
    ((*R20, "seeds"), [], "settings.resnet20_cifar10.seeds: List should have at least 1 item after validation, not 0"),
    (("base", "train", "lr_drop"), [3], "base.train.lr_drop: unknown key; did you mean 'lr_drops'? allowed keys here: amp,"),
    (("base", "seed"), 3, "base.seed: set by the grid (a setting's methods, sparsities and seeds); remove it here"),
    (("tiers", "smoke", "seeds"), [7], "tiers.smoke.seeds: tier 'smoke' keeps no seed or no sparsity of setting "
                                         "'resnet20_cifar10', 'vgg19_cifar100', 'resnet18_tinyimagenet' (this tier keeps seeds [7]"),
    (("tiers", "short"), _DELETE, "tiers: every tier (smoke, short, paper) must be defined, even as {}; missing short"),
    ((*R20, "config", "prune", "data_batches"), _DELETE,  # snip needs pruning data: caught on the merged runs
     "the run of tiers.short, settings.resnet20_cifar10, methods.snip, sparsity 0.6837722339831621, seed 0: "
     "prune.data_batches: pruner 'snip' scores weights with data: set both prune.data_batches and prune.data_batch_size"),
    (("tiers", "paper", "all"), {"train": {"optimizer": "adamw"}},
     "the run of tiers.paper, settings.resnet20_cifar10, methods.random, sparsity 0.6837722339831621, seed 0: train: "
     "momentum and nesterov are SGD's: with optimizer adamw they must be 0 and false; got momentum=0.9, nesterov=False"),
]


@pytest.mark.parametrize("keys,value,expected", BAD_PARAMS, ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None)
def test_a_bad_params_file_is_refused_at_load_naming_the_file_and_the_key(tmp_path, keys, value, expected):
    raw = copy.deepcopy(FIG1)
    _set(raw, keys, value)
    path = tmp_path / "params" / "fig1_main.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if expected is None:
        assert len(expand(load_artefact(path), "paper")) == 252
        return
    with pytest.raises(ConfigError) as err:
        load_artefact(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_unreadable_params_files_are_one_line_errors(tmp_path):
    path = tmp_path / "fig1_main.yaml"
    with pytest.raises(ConfigError, match=rf"^no params file at {re.escape(str(path))}$"):
        load_artefact(path)
    path.write_text("artefact: fig1_main\nsettings: [a\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line 3, column 1: YAML syntax error: expected ',' or ']'"):
        load_artefact(path)
    path.write_text("")
    with pytest.raises(ConfigError, match=r": expected a mapping of keys to values .* got an empty file$"):
        load_artefact(path)
    with pytest.raises(ConfigError, match=r": is a folder, not a params file$"):
        load_artefact(tmp_path)
    with pytest.raises(ConfigError, match=r"^unknown tier 'papr'; did you mean 'paper'\? allowed: smoke, short, paper$"):
        expand(load_artefact(PARAMS / "fig1_main.yaml"), "papr")


def test_the_former_budgets_key_is_refused_with_its_new_name(tmp_path):
    raw = copy.deepcopy(FIG1)
    raw["budgets"] = raw.pop("tiers")
    path = tmp_path / "fig1_main.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=r"^.*fig1_main.yaml: budgets: renamed to 'tiers' \(the run tiers smoke, short, paper\)"):
        load_artefact(path)


def test_a_run_configuration_names_unknown_names_and_missing_pruning_data(tmp_path):
    from conftest import run_dict

    from dpai_lib.config import load_config, validate_config

    raw = run_dict(prune={"method": "snip", "sparsity": 0.9, "options": {"budgett": "erk"}}, model={"name": "vgg19"})
    with pytest.raises(ConfigError) as err:
        validate_config(raw, "c.yaml")
    assert str(err.value) == (
        "c.yaml: model.name: unknown model 'vgg19'; did you mean 'vgg19_bn'? known models: efficientnet_b0, resnet18, "
        "resnet20, vgg19_bn, vit_b_16, vit_tiny (or 'tv:<torchvision name>'); prune.options.budgett: unknown option of "
        "pruner 'snip'; did you mean 'budget'? its options: num_batches, train_mode, scope, budget, ties")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_dict(prune={"method": "snip", "sparsity": 0.9})))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: prune.data_batches: pruner 'snip' scores weights "
                                          r"with data: set both prune.data_batches and prune.data_batch_size"):
        load_config(path)


def test_the_budget_choice_type_lists_every_layerwise_budget():
    import typing

    from dpai_lib.pruners._select import Budget
    from dpai_lib.sparsity import LAYERWISE_BUDGETS

    assert set(typing.get_args(Budget)) == set(LAYERWISE_BUDGETS)
