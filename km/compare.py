"""Comparison reports across runs (placeholder: being implemented)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> None:
    raise SystemExit("not implemented yet")
