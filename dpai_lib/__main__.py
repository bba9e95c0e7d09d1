"""Command line: ``python -m dpai_lib <command>``.

* ``train CONFIG.yaml [--records DIR] [--device auto]`` - prune and train one run configuration, write its
  record (``DIR/<run_id>.json``) and print where it is; a finished run is not repeated.
* ``data fashion_mnist [--data-dir DIR]`` - unpack Debian's Fashion-MNIST into ``DIR/FashionMNIST/raw``.
* ``run params/X.yaml --budget {smoke,short,paper} [--only key=v1,v2 ...] [--shard i/n] [--stage prune]
  [--executor local|slurm|submitit-local] [--jobs N]`` - every run of an artefact through its papermill
  template; finished runs are skipped, so a sweep resumes where it stopped.
* ``collect [ARTEFACT ...]`` - run records -> ``results/<artefact>.csv`` (smoke tier: ``runs/<artefact>.csv``).
* ``status [--stage prune] [--budget B]`` - expected / done / failed / missing runs and their measured cost.
* ``fill --budget smoke [--jobs N]`` - run the tier of every artefact whose data is missing (no finished run,
  data-free or trained, in the short or paper tier): what ``make book`` does before it renders.
"""

from __future__ import annotations

import argparse
import json
import sys


def _train(args: argparse.Namespace) -> int:
    from dpai_lib.config import load_config
    from dpai_lib.runs import execute

    config = load_config(args.config)
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
        print(f"only fashion_mnist can be prepared offline; got {args.name!r}", file=sys.stderr)
        return 2
    print(f"Fashion-MNIST ready in {prepare_fashion_mnist(args.data_dir)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from dpai_lib.pipeline import Paths, parse_only, plan, run_sweep

    i, _, n = args.shard.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        print(f"--shard must look like i/n (e.g. 0/4); got {args.shard!r}", file=sys.stderr)
        return 2
    runs = plan(args.params, args.budget, only=parse_only(args.only), shard=shard, stage=args.stage)
    slurm = {"timeout_min": args.timeout_min}
    if args.executor == "slurm":
        slurm |= {"gpus_per_node": args.gpus_per_job, "slurm_array_parallelism": args.array_parallelism}
        if args.partition:
            slurm["slurm_partition"] = args.partition
    print(f"{len(runs)} runs planned ({args.budget}, stage {args.stage}, shard {args.shard})")
    counts = run_sweep(runs, paths=Paths.at(), executor=args.executor, jobs=args.jobs, device=args.device,
                       threads=args.threads, slurm=slurm)
    print(json.dumps(counts))
    return 0 if not counts.get("failed") else 1


def _collect(args: argparse.Namespace) -> int:
    from dpai_lib.results import artefacts, collect

    known = artefacts()
    unknown = [a for a in args.artefacts if a not in known]
    if unknown:
        print(f"unknown artefacts {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    for name in args.artefacts or known:
        print(" ".join(str(p) for p in collect(name)))
    return 0


def _fill(args: argparse.Namespace) -> int:
    from dpai_lib.pipeline import Paths, plan, run_sweep
    from dpai_lib.results import artefacts, scoreboard

    board = scoreboard()
    paths, total = Paths.at(), {}
    for name in artefacts():
        rows = board[board.artefact == name]
        full = "all" if (rows.stage == "all").any() else "prune"
        have = rows[rows.budget.isin(["short", "paper"])].finished.max()
        if have:
            print(f"{name}: has {have} finished runs in the short/paper tiers; nothing to fill")
            continue
        runs = plan(paths.params / f"{name}.yaml", args.budget, stage=full)
        print(f"{name}: no short/paper data; running its {args.budget} tier ({len(runs)} runs)")
        for k, v in run_sweep(runs, paths=paths, jobs=args.jobs, device=args.device).items():
            total[k] = total.get(k, 0) + v
    print(json.dumps(total))
    return 0 if not total.get("failed") else 1


def _status(args: argparse.Namespace) -> int:
    import pandas as pd

    from dpai_lib.results import status

    table = status(stage=args.stage)
    if args.budget:
        table = table[table["budget"] == args.budget]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpai_lib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="prune and train one run configuration (YAML)")
    p.add_argument("config", help="run configuration file, e.g. params/smoke.yaml")
    p.add_argument("--records", default="runs/records", help="folder of run records (default: runs/records)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image-folder data sets")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
    p = sub.add_parser("data", help="prepare an offline data set")
    p.add_argument("name", help="fashion_mnist")
    p.add_argument("--data-dir", default=None, help="data root (default: $DPAI_DATA_DIR or ./data)")
    p.set_defaults(func=_data)
    p = sub.add_parser("run", help="execute every run of an artefact's params file")
    p.add_argument("params", help="params file, e.g. params/fig1_main.yaml")
    p.add_argument("--budget", required=True, choices=["smoke", "short", "paper"], help="budget tier")
    p.add_argument("--only", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="keep runs whose setting/method/sparsity/seed/model/dataset is one of the values")
    p.add_argument("--shard", default="0/1", help="run only share i of n (runs[i::n]), e.g. 0/4")
    p.add_argument("--stage", default="all", choices=["all", "prune"],
                   help="prune = prune and measure only (no training: the data-free part)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local"])
    p.add_argument("--jobs", type=int, default=1, help="local runs at a time (GPUs shared round-robin; on the "
                   "CPU each gets cores/jobs threads)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per local CPU run (default 0: cores/jobs; "
                   "use 1 when several runners share the machine)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs per job")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="submitit: time limit per job in minutes")
    p.add_argument("--array-parallelism", type=int, default=64, help="slurm: array tasks running at once")
    p.set_defaults(func=_run)
    p = sub.add_parser("collect", help="run records -> results/<artefact>.csv")
    p.add_argument("artefacts", nargs="*", help="artefact names (default: all params files)")
    p.set_defaults(func=_collect)
    p = sub.add_parser("status", help="expected / done / failed / missing runs per artefact")
    p.add_argument("--stage", default="all", choices=["all", "prune"])
    p.add_argument("--budget", default=None, choices=["smoke", "short", "paper"])
    p.set_defaults(func=_status)
    p = sub.add_parser("stale", help="list (or delete) records that no current grid plans: made with an older "
                       "pruner or model version, or from a grid that changed")
    p.add_argument("--delete", action="store_true", help="delete them")
    p.set_defaults(func=_stale)
    p = sub.add_parser("fill", help="run a tier of every artefact that has no short/paper data yet")
    p.add_argument("--budget", default="smoke", choices=["smoke", "short", "paper"], help="budget tier (default smoke)")
    p.add_argument("--jobs", type=int, default=1, help="local runs at a time")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_fill)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
