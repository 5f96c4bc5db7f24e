"""``python -m builder`` and the ``meshbake`` command: the CLI, Ctrl-C-safe from the start.

The CLI's imports (pydantic, Jinja, paramiko...) take a moment; a Ctrl-C then exits
130 quietly instead of printing a traceback from deep inside an import.
"""

from __future__ import annotations

import sys


def run() -> int:
    try:
        from builder.cli.main import main
    except KeyboardInterrupt:
        print("meshbake: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
