"""Where the checkout is, for every test layer (one definition instead of one per file)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
