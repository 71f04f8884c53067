"""Command line: `abdist train | config | report`.

A user error is one line on stderr and exit code 2 (3 for a diverged run); never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from abdist.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        prefix = "the following arguments are required: "
        if message.startswith(prefix):
            # argparse lists a nargs="*" positional without a default (the overrides) as
            # required: name only what is.
            optional = {
                a.metavar or a.dest
                for a in self._actions
                if not a.option_strings and a.nargs in (argparse.ZERO_OR_MORE, argparse.OPTIONAL)
            }
            names = [n for n in message[len(prefix) :].split(", ") if n not in optional]
            message = prefix + ", ".join(names or message[len(prefix) :].split(", "))
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="abdist", description="Train classifiers on imbalanced data.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.add_argument("--out", help="run directory (default: runs/<train.name>)")

    c = sub.add_parser("config", help="print the resolved config (--explain: what each key means)")
    c.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    c.add_argument("overrides", nargs="*", metavar="section.key=value")
    c.add_argument(
        "--explain",
        action="store_true",
        help="add each key's meaning and allowed values as a YAML comment",
    )

    r = sub.add_parser("report", help="compare finished runs: table + plots")
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument(
        "--out",
        help="where to write the plots (default: <first run>/../report-<run dir names>)",
    )
    r.add_argument(
        "--force", action="store_true", help="replace a report of other runs in the --out dir"
    )

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
        help="list file 'path label [group]' per line; labels are 0..C-1 with C = largest "
        "label + 1, so a label past the real classes leaves classes without training "
        "samples, which is refused",
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
    pr.add_argument(
        "--allow-empty-classes",
        action="store_true",
        help="keep classes with no train or val samples (a warning instead of an error; "
        "an empty <split>/<class>/ folder is a class too)",
    )

    v = sub.add_parser("verify", help="check prepared shards against their manifest")
    v.add_argument("dir", help="directory written by `abdist prepare`")

    la = sub.add_parser("launch", help="submit training to Slurm (or run it locally) via submitit")
    la.add_argument("cluster", choices=["slurm", "local"], help="slurm, or local (this machine)")
    la.add_argument("config", help="YAML config file")
    la.add_argument("overrides", nargs="*", metavar="section.key=value")
    la.add_argument("--out", help="run directory (default: runs/<train.name>)")
    la.add_argument("--nodes", type=int, default=1)
    la.add_argument("--gpus-per-node", type=int, default=0, help="also the tasks per node")
    la.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node, or 1 on CPU")
    la.add_argument("--cpus-per-task", type=int, default=1)
    la.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    la.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit (minutes)")
    la.add_argument("--mem-gb", type=float, help="memory per node")
    la.add_argument("--job-name", help="default: abdist-<train.name>")
    la.add_argument(
        "--array",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one job per value (seeds=0,1,2 or any config key); repeat for a grid",
    )
    la.add_argument("--wait", action="store_true", help="wait and print the results table")

    sw = sub.add_parser("sweep", help="write a W&B sweep definition from a sweep spec")
    sw.add_argument("config", help="YAML config file (the base of every trial)")
    sw.add_argument("spec", help="sweep spec YAML: method, metric, parameters by config key")
    sw.add_argument("--out", help="output directory (default: runs/sweeps/<spec name>)")

    ag = sub.add_parser("agent", help="run sweep trials (W&B agent, or --local without a server)")
    ag.add_argument("config", help="YAML config file (the base of every trial)")
    ag.add_argument("sweep_id", nargs="?", help="W&B sweep id (entity/project/id or id)")
    ag.add_argument("overrides", nargs="*", metavar="section.key=value")
    ag.add_argument("--local", metavar="SPEC", help="run the sweep spec here, no W&B server")
    ag.add_argument("--count", type=int, help="number of trials (default: all / spec's count)")
    ag.add_argument(
        "--trial", action="store_true", help="one trial in the current W&B run (`wandb agent`)"
    )
    ag.add_argument("--out", help="sweep directory (default: runs/sweeps/<name>)")
    return p


def _cmd_train(args) -> int:
    from abdist.config import load_config
    from abdist.engine.recipe import run
    from abdist.report import format_table

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.train.name
    metrics = run(cfg, run_dir)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(format_table([metrics]))
        print(f"wrote {run_dir}/metrics.json")
    return 0


def _cmd_config(args) -> int:
    from abdist.config import explain_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    print(explain_yaml(cfg) if args.explain else cfg.to_yaml(), end="")
    return 0


def _cmd_report(args) -> int:
    from abdist.report import report

    print(report(args.runs, out_dir=args.out, force=args.force))
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
        allow_empty_classes=args.allow_empty_classes,
    )
    print(summarize(manifest, args.out))
    return 0


def _cmd_verify(args) -> int:
    from abdist.data.manifest import read_manifest
    from abdist.data.shards import verify_shards

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


def _cmd_launch(args) -> int:
    try:
        from abdist.launcher import LaunchOptions, launch
    except ImportError as exc:
        raise UserError(f"abdist launch needs submitit ({exc}); pip install submitit") from None

    opts = LaunchOptions(
        cluster=args.cluster,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time_min=args.time,
        mem_gb=args.mem_gb,
        job_name=args.job_name,
        array=args.array,
    )
    return launch(args.config, args.overrides, args.out, opts, wait_for_results=args.wait)


def _cmd_sweep(args) -> int:
    from abdist.sweeps import write_sweep

    print(write_sweep(args.config, args.spec, args.out))
    return 0


def _cmd_agent(args) -> int:
    from abdist.sweeps import agent

    if args.sweep_id and "=" in args.sweep_id:  # `agent CONFIG --local S key=value`
        args.overrides, args.sweep_id = [args.sweep_id, *args.overrides], None
    return agent(
        args.config,
        sweep_id=args.sweep_id,
        local_spec=args.local,
        count=args.count,
        out=args.out,
        overrides=args.overrides,
        trial=args.trial,
    )


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
            "launch": _cmd_launch,
            "sweep": _cmd_sweep,
            "agent": _cmd_agent,
        }[args.command](args)
    except UserError as exc:
        print(f"abdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("abdist: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
