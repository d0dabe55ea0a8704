"""One benchmark, several source trees, side by side on one machine: the same `python -m` command
run in each tree in turn (the order rotating every round, so drift falls on every tree alike),
--rounds times, each run writing its CSV; then each row's median per tree and its ratio to the
first tree's. For kernel changes whose effect only a GPU can tell, measured in one call.

A tree is a directory holding the packages, e.g. an earlier commit's Python files:

    git archive 1725d10 -- ':(glob)**/*.py' ':(glob)placement/*.json' | tar -x -C .device-data/trees/base
    python -m experiments.ab_trees --tree base=.device-data/trees/base --tree new=. --rounds 3 \\
        --key path,bits,tokens --value ms --csv-flag --csv \\
        --out experiments/results/ab_kernels_h200.csv -- placement.kernels --iters 200

Each run has its tree as working directory (so `python -m` imports the tree's packages, which is
checked first) and the tree first on PYTHONPATH; paths among the command's arguments must be
absolute. --out gets every run's rows, with their tree and tree_round.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd


def _env(tree: Path) -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(tree) + (os.pathsep + path if path else "")}


def check_imports(trees: dict[str, Path], module: str) -> None:
    """Each tree's run imports the module's package from that tree."""
    package = module.split(".")[0]
    for name, tree in trees.items():
        done = subprocess.run([sys.executable, "-c", f"import {package}; print({package}.__file__)"], cwd=tree,
                              env=_env(tree), capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
            raise SystemExit(f"tree {name} ({tree}): cannot import {package}: {last}")
        where = Path(done.stdout.strip()).resolve()
        if tree not in where.parents:
            raise SystemExit(f"tree {name} ({tree}) imports {package} from {where}, not from the tree")


def run_all(trees: dict[str, Path], command: list[str], csv_flag: str, rounds: int) -> pd.DataFrame:
    names = list(trees)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                csv = Path(tmp) / f"{name}-{rnd}.csv"
                print(f"== round {rnd}, tree {name}: python -m {' '.join(command)}", flush=True)
                done = subprocess.run([sys.executable, "-m", *command, csv_flag, str(csv)], cwd=trees[name],
                                      env=_env(trees[name]))
                if done.returncode != 0 or not csv.exists():
                    raise SystemExit(f"tree {name}, round {rnd}: the command exited {done.returncode}"
                                     + ("" if csv.exists() else f" without writing {csv_flag}"))
                rows = pd.read_csv(csv)
                if "tree" in rows.columns:
                    raise SystemExit("the command's CSV has a column tree, which ab_trees adds")
                frames.append(rows.assign(tree=name, tree_round=rnd))
    return pd.concat(frames, ignore_index=True)


def compare(runs: pd.DataFrame, trees: list[str], key: list[str], value: str) -> pd.DataFrame:
    """Median of `value` per key and tree, one column per tree, and each tree's ratio to the first.
    Rows without a key column's value (a part of the command's table that lacks it) keep "" there."""
    missing = [c for c in key + [value] if c not in runs.columns]
    if missing:
        raise SystemExit(f"the command's CSV has no column {', '.join(missing)} (it has {', '.join(runs.columns)})")
    runs = runs.assign(**{c: runs[c].fillna("") for c in key if runs[c].isna().any()})
    table = runs.pivot_table(index=key, columns="tree", values=value, aggfunc="median")[trees]
    for name in trees[1:]:
        table[f"{name}/{trees[0]}"] = table[name] / table[trees[0]]
    return table.reset_index()


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m experiments.ab_trees", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                        help="a source tree to run the command in (twice or more; the first is the reference)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--key", required=True, help="the CSV columns that name a row, comma-separated")
    parser.add_argument("--value", required=True, help="the CSV column compared (its median over rounds)")
    parser.add_argument("--csv-flag", default="--csv", help="the command's option for its CSV path (default --csv)")
    parser.add_argument("--out", help="CSV of every run's rows, with tree and tree_round")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the module and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --: a module to run with python -m, and its arguments")
    trees = {}
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--tree takes NAME=DIR, got {spec!r}")
        if name in trees:
            parser.error(f"--tree {name} is given twice")
        if not Path(path).is_dir():
            parser.error(f"--tree {name}: {path} is not a directory")
        trees[name] = Path(path).resolve()
    if len(trees) < 2:
        parser.error("compare at least two trees")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    check_imports(trees, command[0])
    runs = run_all(trees, command, args.csv_flag, args.rounds)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        runs.to_csv(args.out, index=False)
    table = compare(runs, list(trees), args.key.split(","), args.value)
    print(f"\nmedian {args.value} over {args.rounds} rounds, and the ratio to tree {next(iter(trees))}:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


if __name__ == "__main__":
    main()
