"""The `radregion` command: one subcommand per module in `radregion.commands`."""

import argparse
import importlib
import sys

from radregion import __version__
from radregion.errors import RadiographError

COMMANDS = (
    "inspect",
    "split",
    "pretrain",
    "fit_head",
    "soup",
    "evaluate",
    "predict",
    "pseudo_label",
    "audit",
    "apply_corrections",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radregion", description="Anatomical-region labels for radiographs in a hospital archive."
    )
    parser.add_argument("--version", action="version", version=f"radregion {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"radregion.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"radregion.commands.{name}":
                raise
            continue
        sub = module.register(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def print_problems(command: str, problems, limit: int = 5, where_all: str = "") -> None:
    """On stderr, for a person: the first `limit` problems ("path: reason") and how many more; `where_all` says
    where the full list is (e.g. " (all in the error column of out.csv)")."""
    problems = [str(problem) for problem in problems]
    for problem in problems[:limit]:
        print(f"radregion {command}: {problem}", file=sys.stderr)
    if len(problems) > limit:
        print(f"radregion {command}: ... and {len(problems) - limit} more{where_all}", file=sys.stderr)


def main(argv=None, fresh_process=False) -> int:
    """`fresh_process`: this run is the whole process (the console command), so commands may trade away what
    a longer-lived caller would still need (see radregion.startup)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.fresh_process = fresh_process
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (RadiographError, FileNotFoundError, ValueError) as error:
        print(f"radregion {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"radregion {args.command}: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    sys.exit(main(fresh_process=True))


if __name__ == "__main__":
    console()
