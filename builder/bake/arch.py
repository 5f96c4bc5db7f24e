"""The architectures a spec builds for, per target, in Debian's names (``amd64``, ``arm64``).

The spec names them in ``targets.qemu.arch`` and ``targets.aws.arch`` (or
``targets.aws.source_ami.architecture``), each a name or a list; unset, ``amd64``. The
model normalises and checks them; this only picks the target's. The answer is always a
tuple, so callers (``plan``, the manifests) are ready for several.

>>> from builder.spec.model import load_spec
>>> target_arches(load_spec("images/web.yaml").spec, "qemu")
('amd64',)
"""

from __future__ import annotations

from builder.spec.model import Arch, ImageSpec

DEFAULT = Arch.AMD64.value


def target_arches(spec: ImageSpec, target: str) -> tuple[str, ...]:
    """The architectures ``spec`` builds for ``target`` (``qemu`` or ``aws``)."""
    if target == "aws" and spec.targets.aws is not None:
        return tuple(a.value for a in spec.targets.aws.arches)
    if target == "qemu" and spec.targets.qemu is not None:
        return tuple(a.value for a in spec.targets.qemu.arch)
    return ()
