"""CLI subcommands of this party (filled in by its owner)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this party's subcommands to the `imago` parser."""
