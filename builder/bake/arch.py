"""The architectures a spec builds for, per target, in Debian's names (``amd64``, ``arm64``).

The spec names them where it can: ``targets.aws.source_ami.architecture`` (EC2's
``x86_64``/``arm64``) and, once the spec has them, ``targets.qemu.arch`` and
``targets.aws.arch``, each a name or a list. Everything else is ``amd64``. The answer
is always a tuple, so callers (``plan``, the manifests) are ready for several.

>>> from builder.spec.model import load_spec
>>> target_arches(load_spec("images/web.yaml").spec, "qemu")
('amd64',)
"""

from __future__ import annotations

from builder.spec.model import ImageSpec

#: EC2's and other common spellings -> Debian's.
_DEBIAN = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

DEFAULT = "amd64"


def _names(raw: object) -> tuple[str, ...]:
    values = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list | tuple) else []
    return tuple(dict.fromkeys(_DEBIAN.get(str(v), str(v)) for v in values))


def target_arches(spec: ImageSpec, target: str) -> tuple[str, ...]:
    """The architectures ``spec`` builds for ``target`` (``qemu`` or ``aws``)."""
    if target == "aws" and spec.targets.aws is not None:
        aws = spec.targets.aws
        named = _names(getattr(aws, "arch", None)) or _names(aws.source_ami.architecture)
        return named or (DEFAULT,)
    if target == "qemu" and spec.targets.qemu is not None:
        return _names(getattr(spec.targets.qemu, "arch", None)) or (DEFAULT,)
    return ()
