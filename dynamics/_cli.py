"""Shared command-line plumbing for the entry points (experiments/, figures/): one-line usage errors, checked
flag types, output folders and atomic JSON writes. [ours] No math here; nothing in the library imports it."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    """argparse type: a finite float (rejects nan and ±inf with a message saying so)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def output_dir(parser: argparse.ArgumentParser, path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents); a usage error (exit 2) if it is a file, cannot be
    created or is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        parser.error(f"{flag}: expected a folder, got the file {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"{flag}: cannot create the folder {path}: {err.strerror or err}")
    if not os.access(path, os.W_OK | os.X_OK):
        parser.error(f"{flag}: expected a writable folder, got {path}")
    return path


def output_file(parser: argparse.ArgumentParser, path: str | Path, flag: str = "--out") -> Path:
    """Check an output file path: not a folder, and its folder can be created and written (exit 2 if not)."""
    path = Path(path)
    if path.is_dir():
        parser.error(f"{flag}: expected a file path, got the folder {path}")
    output_dir(parser, path.parent, flag)
    return path


def write_json(path: str | Path, doc: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """Write ``doc`` as JSON (plus a newline) atomically: to ``path.tmp`` first, then renamed over ``path``, so
    a reader or an interrupted run never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent, **dumps_kwargs) + "\n")
    tmp.replace(path)
    return path
