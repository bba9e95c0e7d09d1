"""Command line: ``python -m dpai_lib <command>``.

* ``train CONFIG.yaml [--records DIR] [--device auto]`` - prune and train one run configuration, write its
  record (``DIR/<run_id>.json``) and print where it is; a finished run is not repeated.
* ``data fashion_mnist [--data-dir DIR]`` - unpack Debian's Fashion-MNIST into ``DIR/FashionMNIST/raw``.
* ``run params/X.yaml --tier {smoke,short,paper} [--only key=v1,v2 ...] [--shard i/n] [--stage prune]
  [--executor local|slurm|submitit-local] [--jobs N]`` - every run of an artefact through its papermill
  template; finished runs are skipped, so a sweep resumes where it stopped.
* ``collect [ARTEFACT ...]`` - run records -> ``results/<artefact>.csv`` (smoke tier: ``runs/<artefact>.csv``).
* ``status [--stage prune] [--tier T]`` - expected / done / failed / missing runs and their measured cost.
* ``fill --tier smoke [--jobs N]`` - run the tier of every artefact whose data is missing (no finished run,
  data-free or trained, in the short or paper tier): what ``make book`` does before it renders.

A wrong input (a missing or invalid file, an unknown name, a bad option value, an ``--only`` that matches
nothing) is one line on stderr that names it and what is allowed, and exit status 2; ``--debug`` adds the
traceback. Ctrl-C prints one line and exits with status 130, SIGTERM (``kill``, Slurm pre-emption) likewise
with status 143; the runs they stop are recorded ``interrupted`` and resume when run again.
``--budget`` is the former name of ``--tier`` (still accepted, with a warning).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from dpai_lib.errors import Terminated, UserError, one_line, sigterm_as_interrupt, suggest

INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)
TERMINATED = 143  # 128 + SIGTERM
USAGE = 2  # a wrong input: usage, file, name or value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and a closest-match hint for a wrong choice."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.search(r"invalid choice: '?([^'\s]*)'? \(choose from (.*)\)", message)
        if m:
            choices = [c.strip(" '") for c in m.group(2).split(",")]
            message = f"{message};{suggest(m.group(1), choices)}".removesuffix(";")
        self.exit(USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class _FormerTier(argparse.Action):
    """``--budget``, the former name of ``--tier``: still works, and says it was renamed (a pruner's layer-wise
    budget, erk or uniform, keeps the name budget)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print("warning: --budget was renamed --tier (the run tier: smoke, short or paper)", file=sys.stderr)
        setattr(namespace, self.dest, values)


TIER_CHOICES = ["smoke", "short", "paper"]


def _tier_option(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """``--tier`` (``default`` None and the command's own check when it is required) and the hidden
    ``--budget``, so that messages name ``--tier`` only."""
    p.add_argument("--tier", choices=TIER_CHOICES, default=default, help=help)
    p.add_argument("--budget", dest="tier", action=_FormerTier, choices=TIER_CHOICES, help=argparse.SUPPRESS)


def _count(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (checked before anything runs)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        hint = " did you mean 'cuda'?" if text.lower().startswith("gpu") else suggest(text, ["auto", "cpu", "cuda", "mps"])
        raise argparse.ArgumentTypeError(f"unknown device {text!r};{hint} use auto, cpu, cuda, cuda:N or mps")
    return text


def _check_local_device(device: str) -> None:
    """A CUDA device asked of a local run must exist here (a Slurm job's GPUs are on other machines)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def _train(args: argparse.Namespace) -> int:
    from dpai_lib.config import load_config
    from dpai_lib.runs import execute

    config = load_config(args.config)
    _check_local_device(args.device)
    path, record = execute(config, args.records, device=args.device, progress=not args.no_progress,
                           num_workers=args.num_workers)
    res = record["results"]
    print(json.dumps({k: record[k] for k in ("run_id", "status", "error")} | {
        "sparsity": res.get("masks", {}).get("sparsity"), "final_test_acc": res.get("final_test_acc"),
        "best_test_acc": res.get("best_test_acc"), "total_s": round(record["timings"]["total_s"], 1)}, indent=1))
    print(f"run record: {path}")
    return 0 if record["status"] == "done" else 1


def _data(args: argparse.Namespace) -> int:
    from dpai_lib.data import prepare_fashion_mnist

    if args.name != "fashion_mnist":
        hint = suggest(args.name, ["fashion_mnist"])
        raise UserError(f"only fashion_mnist can be prepared offline; got {args.name!r};{hint} the other data sets "
                        "download with data.download: true or are put in place by hand (README)")
    print(f"Fashion-MNIST ready in {prepare_fashion_mnist(args.data_dir)}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(2)) >= 1 or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard must be i/n with 0 <= i < n (run share i of n, e.g. 0/4); got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _check_params_home(path: Path, params_dir: Path) -> None:
    """Runs are executed from ``<params folder>/<artefact>.yaml`` by name, so a params file elsewhere would
    silently run that file instead: refuse it unless it is that file or identical to it."""
    home = params_dir / f"{path.stem}.yaml"
    if home.is_file() and (home.resolve() == path.resolve() or home.read_bytes() == path.read_bytes()):
        return
    why = "which differs from this file" if home.is_file() else "which does not exist"
    raise UserError(f"{path}: a params file must be in the project's params folder {params_dir}: each run reads "
                    f"{home} by name, {why}; copy this file there (and keep its name) to run it")


def _check_only(items: list[str], runs: list, source: str) -> list[str]:
    """Every ``--only`` key and value must select something among ``runs`` (the unfiltered runs of the tier),
    else the sweep would silently plan nothing. Returns the items with each sparsity written in full (a
    sparsity may be given to the precision it is shown with: ``sparsity=0.9968``)."""
    from dpai_lib.pipeline import FILTER_KEYS, sparsities_matching

    present: dict[str, list[Any]] = {k: [] for k in FILTER_KEYS}
    for r in runs:
        for key, value in (("setting", r.setting), ("method", r.method), ("sparsity", r.config.prune.sparsity),
                           ("seed", r.config.seed), ("model", r.config.model.name), ("dataset", r.config.data.name)):
            if value not in present[key]:
                present[key].append(value)
    resolved = []
    for item in items:
        key, sep, text = item.partition("=")
        if key not in FILTER_KEYS:
            raise UserError(f"--only {item}: unknown key {key!r};{suggest(key, FILTER_KEYS)} keys: "
                            f"{', '.join(FILTER_KEYS)} (as key=value[,value...])")
        if not sep or not text or "" in text.split(","):
            raise UserError(f"--only {item}: expected {key}=value[,value...]; {key} values here: "
                            f"{', '.join(map(str, present[key]))}")
        values = []
        for value in text.split(","):
            if key == "sparsity":
                try:
                    found = sparsities_matching(value, present[key])
                except ValueError:
                    raise UserError(f"--only {item}: sparsity {value!r} is not a number; sparsities here: "
                                    f"{', '.join(map(str, present[key]))}") from None
                if len(found) > 1:
                    raise UserError(f"--only {item}: sparsity {value!r} could be any of "
                                    f"{', '.join(map(str, found))}; write more digits")
                if found:
                    values.append(repr(found[0]))
                    continue
                nearest = min(present[key], key=lambda v: abs(v - float(value)), default=None)
                hint = f" did you mean {nearest!r}?" if nearest is not None else ""
            else:
                if value in map(str, present[key]):
                    values.append(value)
                    continue
                hint = suggest(value, map(str, present[key]))
            raise UserError(f"--only {item}: no run of {source} has {key} {value!r};{hint} {key} values here: "
                            f"{', '.join(map(str, present[key]))}")
        resolved.append(f"{key}={','.join(values)}")
    return resolved


def _run(args: argparse.Namespace) -> int:
    from dpai_lib.params import load_artefact
    from dpai_lib.pipeline import Paths, parse_only, plan, run_sweep

    if args.tier is None:
        raise UserError("run: --tier is required: smoke (CPU, offline, minutes), short or paper")
    shard = _shard(args.shard)
    paths, params = Paths.at(), Path(args.params)
    load_artefact(params)  # a missing or invalid file is named before anything else
    _check_params_home(params, paths.params)
    if args.executor == "local":
        _check_local_device(args.device)
    source = f"{params} in the {args.tier} tier"
    only = parse_only(_check_only(args.only, plan(params, args.tier, stage=args.stage), source))
    if only and not plan(params, args.tier, only=only, stage=args.stage):
        raise UserError(f"--only {' '.join(args.only)}: each value occurs in {source}, but no run has them all")
    runs = plan(params, args.tier, only=only, shard=shard, stage=args.stage)
    slurm = {"timeout_min": args.timeout_min}
    if args.executor == "slurm":
        slurm |= {"gpus_per_node": args.gpus_per_job, "slurm_array_parallelism": args.array_parallelism}
        if args.partition:
            slurm["slurm_partition"] = args.partition
    print(f"{len(runs)} runs planned ({args.tier}, stage {args.stage}, shard {args.shard})")
    counts = run_sweep(runs, paths=paths, executor=args.executor, jobs=args.jobs, device=args.device,
                       threads=args.threads, slurm=slurm)
    print(json.dumps(counts))
    for lock in getattr(counts, "busy_locks", []):  # run_sweep's counts carry them
        print(f"busy (held by another runner): {lock}", file=sys.stderr)
    return 0 if not counts.get("failed") else 1


def _collect(args: argparse.Namespace) -> int:
    from dpai_lib.results import artefacts, collect

    known = artefacts()
    for name in args.artefacts:
        if name not in known:
            raise UserError(f"unknown artefact {name!r};{suggest(name, known)} known artefacts (the params files): "
                            f"{', '.join(known)}")
    for name in args.artefacts or known:
        print(" ".join(str(p) for p in collect(name)))
    return 0


def _fill(args: argparse.Namespace) -> int:
    from dpai_lib.pipeline import Paths, plan, run_sweep
    from dpai_lib.results import artefacts, scoreboard

    _check_local_device(args.device)
    board = scoreboard()
    paths = Paths.at()
    total: dict[str, int] = {}
    for name in artefacts():
        rows = board[board.artefact == name]
        full = "all" if (rows.stage == "all").any() else "prune"
        have = rows[rows.tier.isin(["short", "paper"])].finished.max()
        if have:
            print(f"{name}: has {have} finished runs in the short/paper tiers; nothing to fill")
            continue
        runs = plan(paths.params / f"{name}.yaml", args.tier, stage=full)  # validates every tier
        print(f"{name}: no short/paper data; running its {args.tier} tier ({len(runs)} runs)")
        for k, v in run_sweep(runs, paths=paths, jobs=args.jobs, device=args.device).items():
            total[k] = total.get(k, 0) + v
    print(json.dumps(total))
    return 0 if not total.get("failed") else 1


def _status(args: argparse.Namespace) -> int:
    import pandas as pd

    from dpai_lib.results import status

    table = status(stage=args.stage)
    if args.tier:
        table = table[table["tier"] == args.tier]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table.to_string(index=False))
    return 0


def _stale(args: argparse.Namespace) -> int:
    from dpai_lib.results import stale_records

    stale = stale_records()
    for path in stale:
        print(path)
        if args.delete:
            path.unlink()
    print(f"{len(stale)} stale records" + (" deleted" if args.delete and stale else ""), file=sys.stderr)
    return 0


def _report(err: BaseException) -> str:
    """One line for an error the user can fix: its message, or pydantic's key paths and messages."""
    import pydantic

    if isinstance(err, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
    text = one_line(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))
    return text or type(err).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    import pydantic
    import yaml

    return (UserError, ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError, yaml.YAMLError, pydantic.ValidationError)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)  # --debug after the command, too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    parser = _Parser(prog="python -m dpai_lib", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="prune and train one run configuration (YAML)", parents=[common])
    p.add_argument("config", help="run configuration file, e.g. params/smoke.yaml")
    p.add_argument("--records", default="runs/records", help="folder of run records (default: runs/records)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--num-workers", type=_count(0), default=0, help="DataLoader workers for image-folder data sets")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
    p = sub.add_parser("data", help="prepare an offline data set", parents=[common])
    p.add_argument("name", help="fashion_mnist")
    p.add_argument("--data-dir", default=None, help="data root (default: $DPAI_DATA_DIR or ./data)")
    p.set_defaults(func=_data)
    p = sub.add_parser("run", help="execute every run of an artefact's params file", parents=[common])
    p.add_argument("params", help="params file, e.g. params/fig1_main.yaml")
    _tier_option(p, None, help="run tier (required): smoke (CPU, offline, minutes), short or paper")
    p.add_argument("--only", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="keep runs whose setting/method/sparsity/seed/model/dataset is one of the values")
    p.add_argument("--shard", default="0/1", help="run only share i of n (runs[i::n]), e.g. 0/4")
    p.add_argument("--stage", default="all", choices=["all", "prune"],
                   help="prune = prune and measure only (no training: the data-free part)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local"])
    p.add_argument("--jobs", type=_count(1), default=1, help="local runs at a time (GPUs shared round-robin; on "
                   "the CPU each gets cores/jobs threads)")
    p.add_argument("--threads", type=_count(0), default=0, help="torch threads per local CPU run (default 0: "
                   "cores/jobs; use 1 when several runners share the machine)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--gpus-per-job", type=_count(1), default=1, help="slurm: GPUs per job")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--timeout-min", type=_count(1), default=24 * 60, help="submitit: time limit per job in minutes")
    p.add_argument("--array-parallelism", type=_count(1), default=64, help="slurm: array tasks running at once")
    p.set_defaults(func=_run)
    p = sub.add_parser("collect", help="run records -> results/<artefact>.csv", parents=[common])
    p.add_argument("artefacts", nargs="*", help="artefact names (default: all params files)")
    p.set_defaults(func=_collect)
    p = sub.add_parser("status", help="expected / done / failed / missing runs per artefact", parents=[common])
    p.add_argument("--stage", default="all", choices=["all", "prune"])
    _tier_option(p, None, help="only this run tier")
    p.set_defaults(func=_status)
    p = sub.add_parser("stale", help="list (or delete) records that no current grid plans: made with an older "
                       "pruner or model version, or from a grid that changed", parents=[common])
    p.add_argument("--delete", action="store_true", help="delete them")
    p.set_defaults(func=_stale)
    p = sub.add_parser("fill", help="run a tier of every artefact that has no short/paper data yet", parents=[common])
    _tier_option(p, "smoke", help="run tier (default smoke)")
    p.add_argument("--jobs", type=_count(1), default=1, help="local runs at a time")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_fill)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 1 some run failed or an internal error, 2 a wrong
    input (one line on stderr), 130 interrupted by Ctrl-C, 143 terminated by SIGTERM."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else USAGE
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except KeyboardInterrupt as stop:
        if args.debug:
            traceback.print_exc()
        how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted (Ctrl-C)"
        print(f"{how}: finished runs are kept; interrupted ones are recorded as such and resume when the command "
              "is run again", file=sys.stderr)
        return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED
    except _user_errors() as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_report(err)}", file=sys.stderr)
        return USAGE
    except Exception as err:  # a fault of the code, not of the input
        if args.debug:
            traceback.print_exc()
        print(f"internal error: {type(err).__name__}: {_report(err)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _entry() -> int:
    status = main()
    if status == INTERRUPTED:  # a second Ctrl-C while the interpreter winds down stops it at once
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return status


if __name__ == "__main__":
    sys.exit(_entry())
