"""Command line: ``python -m dpai_lib <command>``.

* ``train CONFIG.yaml [--records DIR] [--device auto]`` - prune and train one run configuration, write its
  record (``DIR/<run_id>.json``) and print where it is; a finished run is not repeated.
* ``data fashion_mnist [--data-dir DIR]`` - unpack Debian's Fashion-MNIST into ``DIR/FashionMNIST/raw``.
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
