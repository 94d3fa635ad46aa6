"""The failures a command reports as its own, the exit status of each kind of ending, and the
checks of an integer's bounds, of a file's or a directory's path and of text's encoding.

Exit status: 0 success; 2 bad input (``InputError``: the command was refused before it did anything —
a bad option, a missing or foreign file, a run directory in use); 1 a run that failed on its own
(``RunError``: divergence, non-finite weights, a damaged checkpoint or metrics file; or an ``OSError``
such as a full disk); 128 + N after signal N (130 on Ctrl-C). Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import numbers
import os
from pathlib import Path


class InputError(ValueError):
    """Bad input, refused before anything ran: exit status 2, one line naming the value and what is
    allowed. A ``ValueError``, so library callers may catch it as one."""


class RunError(RuntimeError):
    """A run that failed on its own, not through bad input: exit status 1, one line."""


def positive_int(name: str, value: object, most: int | None = None, least: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer (Python's or NumPy's, not a ``bool``) in
    [``least``, ``most``]; InputError naming ``name`` and the bounds otherwise."""
    number = None if isinstance(value, bool) else _integer(value)
    if number is None or number < least or (most is not None and number > most):
        low = "a positive integer" if least == 1 else f"an integer >= {least}"
        bound = "" if most is None else f" <= {most}"
        raise InputError(f"{name} must be {low}{bound}, got {value!r}")
    return number


def positive_arg(text: str) -> int:
    """argparse type: a positive integer (else one readable line naming the value)."""
    try:
        return positive_int("the value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def check_directory(name: str, path: str | Path) -> None:
    """InputError naming ``name`` unless ``path`` is, or could be made, a directory
    (``_not_a_directory``)."""
    problem = _not_a_directory(path)
    if problem:
        raise InputError(f"{name} {problem}")


def directory_arg(text: str) -> str:
    """argparse type: ``check_directory``'s path (else one readable line naming the value)."""
    problem = _not_a_directory(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _not_a_directory(path: str | Path) -> str | None:
    """Why ``path`` cannot be a directory (empty, an existing file, or below one: its first
    existing ancestor must be a directory), naming it; None if it can."""
    if not str(path).strip():
        return "expected a directory, got an empty path"
    full = Path(path).absolute()
    existing = next(p for p in (full, *full.parents) if p.exists())
    if existing.is_dir():
        return None
    reason = "it is a file" if existing == full else f"{existing} is a file"
    return f"{str(path)!r} cannot be a directory: {reason}"


def file_arg(text: str) -> str:
    """argparse type: the path of an existing, readable file (else one line naming the path)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no file at {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not readable")
    return text


def output_file_arg(text: str) -> str:
    """argparse type: a path a file can be written at: not a directory, and in a directory that is,
    or could be made, one (``check_directory``)."""
    path = Path(text)
    if not text.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name")
    problem = _not_a_directory(path.absolute().parent)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: its folder {problem}")
    return text


def utf8_text(name: str, text: str | bytes) -> str:
    """``text`` as valid text: bytes (a file's) decoded as UTF-8, or a command-line argument checked
    (Python holds each byte of an argument it cannot decode as a surrogate U+DC80..U+DCFF, which
    "surrogateescape" turns back into that byte). InputError naming ``name`` and the first bad byte
    (or lone surrogate) otherwise."""
    try:
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise InputError(
            f"{name} is not UTF-8 text: byte 0x{byte:02x} at offset {err.start}"
        ) from None
    except UnicodeEncodeError as err:  # a surrogate no byte gives: a str from Python, not argv
        char, at = ord(err.object[err.start]), err.start
        raise InputError(
            f"{name} is not text: lone surrogate U+{char:04X} at character {at}"
        ) from None


def _integer(value: object) -> int | None:
    return int(value) if isinstance(value, numbers.Integral) else None
