"""Command line: `abdist train | config | report`.

A user error is one line on stderr and exit code 2 (3 for a diverged run); never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abdist.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="abdist", description="Train classifiers on imbalanced data.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.add_argument("--out", help="run directory (default: runs/<train.name>)")

    c = sub.add_parser("config", help="print the resolved config")
    c.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    c.add_argument("overrides", nargs="*", metavar="section.key=value")

    r = sub.add_parser("report", help="compare finished runs: table + plots")
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--out", help="where to write the plots (default: <first run>/../report)")

    from abdist.data.prepare import DEFAULT_SHARD_SIZE, WRITERS, parse_split_file, parse_val

    pr = sub.add_parser("prepare", help="convert raw data into long-tailed shards + manifest")
    pr.add_argument(
        "source",
        help="digits | list | inat | a CIFAR-10/100 directory | an image folder "
        "<root>/<split>/<class>/<file> | a .tar/.tar.gz of one",
    )
    pr.add_argument("out", help="output directory (must not exist unless --force)")
    pr.add_argument(
        "--list",
        dest="lists",
        action="append",
        type=parse_split_file,
        metavar="SPLIT=FILE",
        help="list file 'path label [group]' per line",
    )
    pr.add_argument(
        "--json",
        dest="jsons",
        action="append",
        type=parse_split_file,
        metavar="SPLIT=FILE",
        help="iNaturalist-style JSON for a split",
    )
    pr.add_argument("--root", help="directory the --list/--json image paths are relative to")
    pr.add_argument("--profile", default="exp", choices=["exp", "step"])
    pr.add_argument(
        "--imbalance-ratio",
        type=float,
        metavar="RHO",
        help="head/tail ratio of the training pool (default: keep as given)",
    )
    pr.add_argument(
        "--minority-fraction",
        type=float,
        default=0.5,
        help="fraction of tail classes for --profile step (default 0.5)",
    )
    pr.add_argument("--n-max", type=int, help="head-class count (default: smallest class)")
    pr.add_argument(
        "--val",
        type=parse_val,
        help="validation carved from the training pool: fraction <1 or per-class "
        "count (default 0.2)",
    )
    pr.add_argument(
        "--val-balanced", action="store_true", help="equal validation count for every class"
    )
    pr.add_argument("--test-per-class", type=int, default=50, help="digits only (default 50)")
    pr.add_argument("--groups", metavar="CSV", help="CSV 'key,group' giving a group per sample")
    pr.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"at most this many samples per shard (default {DEFAULT_SHARD_SIZE})",
    )
    pr.add_argument("--format", default="wds", choices=sorted(WRITERS))
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--force", action="store_true", help="replace an existing OUT")

    v = sub.add_parser("verify", help="check prepared shards against their manifest")
    v.add_argument("dir", help="directory written by `abdist prepare`")
    return p


def _cmd_train(args) -> int:
    from abdist.config import load_config
    from abdist.engine.recipe import run
    from abdist.report import format_table

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.train.name
    metrics = run(cfg, run_dir)
    print(format_table([metrics]))
    print(f"wrote {run_dir}/metrics.json")
    return 0


def _cmd_config(args) -> int:
    from abdist.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_report(args) -> int:
    from abdist.report import report

    print(report(args.runs, out_dir=args.out))
    return 0


def _cmd_prepare(args) -> int:
    from abdist.data.prepare import PrepareOptions, prepare, summarize

    def split_files(pairs, flag):
        files = dict(pairs or [])
        if pairs and len(files) != len(pairs):
            raise UserError(f"{flag}: a split is given twice")
        return files or None

    opts = PrepareOptions(
        profile=args.profile,
        imbalance_ratio=args.imbalance_ratio,
        minority_fraction=args.minority_fraction,
        n_max=args.n_max,
        val=args.val,
        val_balanced=args.val_balanced,
        test_per_class=args.test_per_class,
        groups=args.groups,
        shard_size=args.shard_size,
        format=args.format,
        seed=args.seed,
    )
    manifest = prepare(
        args.source,
        args.out,
        opts,
        lists=split_files(args.lists, "--list"),
        jsons=split_files(args.jsons, "--json"),
        root=args.root,
        force=args.force,
    )
    print(summarize(manifest, args.out))
    return 0


def _cmd_verify(args) -> int:
    from abdist.data.shards import read_manifest, verify_shards

    problems = verify_shards(args.dir)
    if problems:
        print(f"abdist verify: {args.dir}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    splits = read_manifest(args.dir)["splits"].values()
    n_shards = sum(len(s["shards"]) for s in splits)
    print(f"ok: {n_shards} shards, {sum(s['num_samples'] for s in splits)} samples")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        # Overrides may come before or after options (`train c.yaml --out d optim.lr=1`), which
        # argparse's positional nargs="*" cannot collect: gather the leftovers ourselves.
        args, rest = _build_parser().parse_known_args(argv)
        stray = [a for a in rest if "=" not in a or a.startswith("-")]
        if stray or (rest and not hasattr(args, "overrides")):
            raise UserError(
                f"unrecognized arguments: {' '.join(stray or rest)} (see `abdist --help`)"
            )
        if rest:
            args.overrides = [*args.overrides, *rest]
        return {
            "train": _cmd_train,
            "config": _cmd_config,
            "report": _cmd_report,
            "prepare": _cmd_prepare,
            "verify": _cmd_verify,
        }[args.command](args)
    except UserError as exc:
        print(f"abdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("abdist: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
