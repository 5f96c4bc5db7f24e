"""The sha256 of a file, read in blocks: the one definition build, base and artifacts use.

>>> import tempfile
>>> with tempfile.NamedTemporaryFile() as f:
...     sha256_file(Path(f.name))[:12]
'e3b0c44298fc'
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of ``path``'s bytes, without reading it into memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
