"""Argument types shared by the benchmark scripts (stdlib only: a script's ``--help`` and its parent
process stay free of torch, which graphprune.cli's own types would import)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count, a length, a number of repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
