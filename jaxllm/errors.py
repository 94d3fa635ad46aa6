"""The failures a command reports as its own, and the exit status of each kind of ending.

Exit status: 0 success; 2 bad input (the command was refused before it did anything: a bad option,
a missing or foreign file, a run directory in use); 1 a run that failed on its own (``RunError``:
divergence, non-finite weights, a damaged checkpoint or metrics file; or an ``OSError`` such as a
full disk); 128 + N after signal N (130 on Ctrl-C).
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that failed on its own, not through bad input: exit status 1, one line."""
