"""The command line: a wrong input is one line on stderr naming it (file, key, allowed values, closest match)
and exit status 2; --debug adds the traceback; Ctrl-C is one line and status 130."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_dict, sigint_as_at_a_terminal

from dpai_lib import __main__ as cli
from dpai_lib import pipeline

ROOT = Path(__file__).resolve().parents[1]
FIG1 = ROOT / "params" / "fig1_main.yaml"


def _err(capsys, argv, status=2):
    """Run the command line; check its status and that stderr is one line; return that line."""
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """A project root of our own (DPAI_ROOT) with fig1_main.yaml in its params folder; no sweep ever runs."""
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "fig1_main.yaml").write_text(FIG1.read_text())
    monkeypatch.setenv("DPAI_ROOT", str(tmp_path))
    planned = []
    monkeypatch.setattr(pipeline, "run_sweep", lambda runs, **kw: planned.extend(runs) or {"skipped": len(runs)})
    monkeypatch.chdir(tmp_path)
    return tmp_path, planned


def _write(path, mutate):
    raw = yaml.safe_load(FIG1.read_text())
    mutate(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_missing_files_and_yaml_syntax_errors_name_the_file(root, capsys):
    tmp, _ = root
    assert _err(capsys, ["run", "params/fig1_mian.yaml", "--tier", "smoke"]) == (
        "error: no params file at params/fig1_mian.yaml; did you mean 'fig1_main.yaml'? (params has fig1_main.yaml)")
    assert _err(capsys, ["train", "nowhere.yaml"]) == "error: no configuration file at nowhere.yaml"
    (tmp / "params" / "fig1_main.yaml").write_text("artefact: fig1_main\nmethods: {dpai: {steps: 3}\nseeds: [0]\n")
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "smoke"]).startswith(
        "error: params/fig1_main.yaml: line 3, column 1: YAML syntax error: expected ',' or '}', but got '<scalar>' "
        "(while parsing a flow mapping that starts at line 2)")
    (tmp / "c.yaml").write_text("seed: [0\n")
    assert _err(capsys, ["train", "c.yaml"]).startswith("error: c.yaml: line 2, column 1: YAML syntax error:")


def test_invalid_params_files_name_the_key_and_what_is_allowed(root, capsys):
    tmp, planned = root
    params = tmp / "params" / "fig1_main.yaml"
    _write(params, lambda r: r["settings"]["resnet20_cifar10"]["method_options"]["npb"].update(alpah=0.1))
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "smoke"]).startswith(
        "error: params/fig1_main.yaml: settings.resnet20_cifar10.method_options.npb.alpah: unknown option of pruner "
        "'npb'; did you mean 'alpha'? its options: variant, alpha, beta,")
    _write(params, lambda r: r["methods"]["dpai"].update(steps="abc"))
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "smoke"]) == (
        "error: params/fig1_main.yaml: methods.dpai.steps: option 'steps' of pruner 'dpai' must be an integer; got 'abc'")
    _write(params, lambda r: r["settings"]["vgg19_cifar100"].update(sparsities=[0.9, 1.5]))
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "paper"]) == (
        "error: params/fig1_main.yaml: settings.vgg19_cifar100.sparsities.1: Input should be less than 1 (got 1.5)")
    _write(params, lambda r: r["settings"]["vgg19_cifar100"]["config"]["model"].update(name="vgg19"))
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "smoke"]).startswith(
        "error: params/fig1_main.yaml: settings.vgg19_cifar100.config.model.name: unknown model 'vgg19'; did you mean "
        "'vgg19_bn'? known models: ")
    # a typo in the paper tier stops a smoke run too: every tier is validated at load
    _write(params, lambda r: r["tiers"]["paper"].update(methods={"synflow": {"iteratons": 100}}))
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "smoke"]).startswith(
        "error: params/fig1_main.yaml: tiers.paper.methods.synflow.iteratons: unknown option of pruner 'synflow'; "
        "did you mean 'iterations'?")
    assert planned == []


def test_bad_option_values_are_one_line_with_the_allowed_ones(root, capsys):
    run = ["run", str(FIG1), "--tier", "smoke"]
    assert _err(capsys, ["run", str(FIG1), "--tier", "papr"]) == (
        "python -m dpai_lib run: error: argument --tier: invalid choice: 'papr' (choose from 'smoke', 'short', "
        "'paper'); did you mean 'paper'? (see python -m dpai_lib run --help)")
    assert _err(capsys, ["trian", "x.yaml"]).startswith(
        "python -m dpai_lib: error: argument command: invalid choice: 'trian' (choose from 'train', 'data', 'run', "
        "'collect', 'status', 'stale', 'fill'); did you mean 'train'?")
    for shard in ("abc", "3/3", "1/0", "-1/2"):
        assert _err(capsys, [*run, f"--shard={shard}"]) == (
            f"error: --shard must be i/n with 0 <= i < n (run share i of n, e.g. 0/4); got '{shard}'")
    assert _err(capsys, [*run, "--jobs", "0"]) == (
        "python -m dpai_lib run: error: argument --jobs: expected an integer >= 1; got 0 (see python -m dpai_lib run --help)")
    assert _err(capsys, [*run, "--threads", "two"]).startswith(
        "python -m dpai_lib run: error: argument --threads: expected an integer >= 0; got 'two'")
    assert _err(capsys, [*run, "--device", "gpu"]).startswith(
        "python -m dpai_lib run: error: argument --device: unknown device 'gpu'; did you mean 'cuda'? use auto, cpu, "
        "cuda, cuda:N or mps")
    assert _err(capsys, ["data", "fashion-mnist"]).startswith(
        "error: only fashion_mnist can be prepared offline; got 'fashion-mnist'; did you mean 'fashion_mnist'?")


def test_the_tier_is_required_and_its_former_name_still_works_with_a_warning(root, capsys):
    _, planned = root
    assert _err(capsys, ["run", str(FIG1)]) == "error: run: --tier is required: smoke (CPU, offline, minutes), short or paper"
    assert cli.main(["run", str(FIG1), "--budget", "smoke", "--only", "setting=resnet20_cifar10", "seed=0"]) == 0
    assert capsys.readouterr().err == "warning: --budget was renamed --tier (the run tier: smoke, short or paper)\n"
    assert planned and {r.tier for r in planned} == {"smoke"}
    assert _err(capsys, ["run", str(FIG1), "--budget", "papr"]).startswith(
        "python -m dpai_lib run: error: argument --budget: invalid choice: 'papr'")


def test_only_must_select_something_and_names_the_allowed_values(root, capsys):
    _, planned = root
    run = ["run", str(FIG1), "--tier", "smoke", "--only"]
    assert _err(capsys, [*run, "arch=resnet20"]) == (
        "error: --only arch=resnet20: unknown key 'arch'; keys: setting, method, sparsity, seed, model, dataset "
        "(as key=value[,value...])")
    assert _err(capsys, [*run, "methods=dpai"]).startswith("error: --only methods=dpai: unknown key 'methods'; did you "
                                                             "mean 'method'?")
    assert _err(capsys, [*run, "method=dpai,dpia"]) == (
        f"error: --only method=dpai,dpia: no run of {FIG1} in the smoke tier has method 'dpia'; did you mean 'dpai'? "
        "method values here: random, snip, iter_snip, synflow, phew, npb, dpai")
    assert _err(capsys, [*run, "seed=1"]) == (  # the smoke tier keeps seed 0 only
        f"error: --only seed=1: no run of {FIG1} in the smoke tier has seed '1'; seed values here: 0")
    assert _err(capsys, [*run, "sparsity=high"]) == (
        "error: --only sparsity=high: sparsity 'high' is not a number; sparsities here: 0.99")
    assert _err(capsys, [*run, "method="]) == (
        "error: --only method=: expected method=value[,value...]; method values here: random, snip, iter_snip, "
        "synflow, phew, npb, dpai")
    assert cli.main([*run, "method=dpai,npb", "sparsity=0.990000", "dataset=synthetic"]) == 0
    assert capsys.readouterr().out.startswith("6 runs planned (smoke, stage all, shard 0/1)")
    assert sorted({r.method for r in planned}) == ["dpai", "npb"] and len(planned) == 6
    planned.clear()
    raw = yaml.safe_load(FIG1.read_text())
    raw["settings"]["vgg19_cifar100"]["methods"].remove("phew")
    root[0].joinpath("params", "fig1_main.yaml").write_text(yaml.safe_dump(raw))
    assert _err(capsys, ["run", "params/fig1_main.yaml", "--tier", "smoke", "--only", "setting=vgg19_cifar100",
                         "method=phew"]) == (
        "error: --only setting=vgg19_cifar100 method=phew: each value occurs in params/fig1_main.yaml in the smoke "
        "tier, but no run has them all")
    assert planned == []


def test_only_takes_a_sparsity_as_written_to_its_precision(root, capsys):
    """The paper's compressions 0.5 and 1.5 are 1 - 10**-0.5 and 1 - 10**-1.5: ``sparsity=0.9684`` names the
    latter; a value that rounds to none, or to several, is refused with the nearest value / the candidates."""
    _, planned = root
    run = ["run", str(FIG1), "--tier", "paper", "--only", "setting=resnet20_cifar10", "method=dpai", "seed=0"]
    assert cli.main([*run, "sparsity=0.9684,0.68"]) == 0
    assert sorted(r.config.prune.sparsity for r in planned) == pytest.approx([1 - 10 ** -0.5, 1 - 10 ** -1.5], abs=1e-12)
    planned.clear()
    assert cli.main([*run, "sparsity=0.9"]) == 0  # an exact value is never widened (0.85..0.95)
    assert [r.config.prune.sparsity for r in planned] == [0.9]
    assert _err(capsys, [*run, "sparsity=0.997"]) == (
        f"error: --only sparsity=0.997: no run of {FIG1} in the paper tier has sparsity '0.997'; did you mean "
        "0.99? sparsity values here: 0.6837722339831621, 0.9, 0.9683772233983162, 0.99")
    assert _err(capsys, [*run, "sparsity=1.0"]) == (
        "error: --only sparsity=1.0: sparsity '1.0' could be any of 0.9683772233983162, 0.99; write more digits")
    assert pipeline.sparsities_matching("1e-3", [0.001, 0.0012]) == [0.001]
    assert pipeline.sparsities_matching("9e-1", [0.9683]) == []  # no written precision: equality only


def test_a_params_file_outside_the_params_folder_is_refused_unless_identical(root, capsys, tmp_path_factory):
    tmp, planned = root
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    changed = _write(elsewhere / "fig1_main.yaml", lambda r: r["methods"]["dpai"].update(steps=10))
    assert _err(capsys, ["run", str(changed), "--tier", "smoke"]) == (
        f"error: {changed}: a params file must be in the project's params folder {tmp / 'params'}: each run reads "
        f"{tmp / 'params' / 'fig1_main.yaml'} by name, which differs from this file; copy this file there (and keep "
        "its name) to run it")
    new = _write(elsewhere / "fig9_new.yaml", lambda r: r.update(artefact="fig9_new"))
    assert _err(capsys, ["run", str(new), "--tier", "smoke"]).endswith(
        f"each run reads {tmp / 'params' / 'fig9_new.yaml'} by name, which does not exist; copy this file there (and "
        "keep its name) to run it")
    assert planned == []
    same = elsewhere / "same" / "fig1_main.yaml"
    same.parent.mkdir()
    same.write_text(FIG1.read_text())
    assert cli.main(["run", str(same), "--tier", "smoke"]) == 0
    assert len(planned) == 21


def test_run_configurations_name_the_bad_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_dict(prune={"method": "dpai", "sparsity": 0.9, "options": {"stpes": 3}})))
    assert _err(capsys, ["train", str(path)]) == (
        f"error: {path}: prune.options.stpes: unknown option of pruner 'dpai'; did you mean 'steps'? its options: "
        "alpha, beta, lr, steps, budget, path_count, init_scores, trace, progress")
    path.write_text(yaml.safe_dump(run_dict(prune={"method": "random", "sparsity": 90})))
    assert _err(capsys, ["train", str(path)]) == f"error: {path}: prune.sparsity: Input should be less than 1 (got 90)"
    assert _err(capsys, ["collect", "fig1_mian"]).startswith(
        "error: unknown artefact 'fig1_mian'; did you mean 'fig1_main'? known artefacts (the params files): ")


def test_debug_shows_the_traceback_and_internal_errors_say_so(root, capsys, monkeypatch):
    assert cli.main(["--debug", "run", str(FIG1), "--tier", "smoke", "--shard", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("got 'x'")
    assert cli.main(["run", str(FIG1), "--tier", "smoke", "--shard", "x", "--debug"]) == 2  # after the command too
    assert "Traceback" in capsys.readouterr().err

    def broken(args):
        raise RuntimeError("something inside\nbroke")

    monkeypatch.setattr(cli, "_stale", broken)
    assert _err(capsys, ["stale"], status=1) == (
        "internal error: RuntimeError: something inside broke (run again with --debug for the traceback)")


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_status", interrupted)
    assert _err(capsys, ["status"], status=130) == (
        "interrupted (Ctrl-C): finished runs are kept; interrupted ones are recorded as such and resume when the "
        "command is run again")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() puts the previous handler back


@pytest.mark.parametrize("sig,status,how", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                            (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_stops_a_training_run_promptly_and_records_it(tmp_path, sig, status, how, reap):
    raw = run_dict(train=None)
    raw["prune"] = {"method": "dpai", "sparsity": 0.99, "options": {"steps": 100_000}}  # hours: only Ctrl-C ends it
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    records = tmp_path / "records"
    proc = subprocess.Popen([sys.executable, "-m", "dpai_lib", "train", str(path), "--records", str(records),
                             "--device", "cpu", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=sigint_as_at_a_terminal)
    reap(proc)
    deadline = time.monotonic() + 180  # imports and the model take long on a busy machine
    while not list(records.glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)  # into DPaI's steps
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert proc.returncode == status, err
    assert err.strip().splitlines() == [
        f"{how}: finished runs are kept; interrupted ones are recorded as such and resume when the command is run "
        "again"]
    [record] = records.glob("*.json")
    assert json.loads(record.read_text())["status"] == "interrupted"


def test_raw_library_errors_reaching_the_command_line_are_one_line_too(capsys, monkeypatch):
    from dpai_lib.config import TrainConfig

    def pydantic_error(args):
        TrainConfig.model_validate({"epochs": -1, "batch_size": 64})

    monkeypatch.setattr(cli, "_stale", pydantic_error)
    line = _err(capsys, ["stale"])
    assert line.startswith("error: epochs: Input should be greater than or equal to 0; test_batch_size: Field required")

    def yaml_error(args):
        yaml.safe_load("a: [1\nb: 2")

    monkeypatch.setattr(cli, "_stale", yaml_error)
    assert _err(capsys, ["stale"]).startswith("error: while parsing a flow sequence in \"<unicode string>\", line 1")

    def missing(args):
        open("/no/such/file.yaml")

    monkeypatch.setattr(cli, "_stale", missing)
    assert _err(capsys, ["stale"]) == "error: [Errno 2] No such file or directory: '/no/such/file.yaml'"
    assert cli.main(["stale", "--help"]) == 0
    assert "--debug" in capsys.readouterr().out
