"""How long-running work reports progress: a callable that takes one line.

Library code never prints on its own; it calls the ``Progress`` it was given. The
default, ``to_stderr``, keeps stdout free for results (``--json``).

>>> def collect(line: str) -> None: ...
>>> report: Progress = collect
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]


def to_stderr(message: str) -> None:
    """The default ``Progress``: one line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)
