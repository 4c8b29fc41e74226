"""``python -m marketplace serve …``: the matcher without the `imago` dispatcher."""

from __future__ import annotations

import argparse
import sys

from marketplace.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marketplace")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["matcher", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
