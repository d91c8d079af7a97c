"""The ``hwoptim`` command: ``hwoptim bench`` (benchmark report), ``hwoptim viz`` (the
lesson's pictures), ``hwoptim rules`` (the rules table)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "bench": "hwoptim.bench.cli",
    "viz": "hwoptim.lesson.viz",
    "rules": "hwoptim.docs",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="hwoptim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:   # a command whose module is not built yet
            if e.name != modname:
                raise
            continue
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                           description=mod.__doc__)
        mod.add_arguments(p)
        mods[name] = mod
    args = parser.parse_args(argv)
    return int(mods[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
