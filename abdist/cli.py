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
        return {"train": _cmd_train, "config": _cmd_config, "report": _cmd_report}[args.command](
            args
        )
    except UserError as exc:
        print(f"abdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("abdist: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
