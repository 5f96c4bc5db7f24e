"""The names of meshbake's own AMI tags: the template writes them, the AWS client reads them.

>>> IMAGE, SPEC_HASH
('meshbake:image', 'meshbake:spec-hash')
"""

from __future__ import annotations

#: The image's name; ``images``, ``launch`` and ``prune`` only touch AMIs carrying it.
IMAGE = "meshbake:image"
#: The hash of the spec the AMI was built from.
SPEC_HASH = "meshbake:spec-hash"
CONSUL = "meshbake:consul"
ENVOY = "meshbake:envoy"
#: The meshbake version that built it.
VERSION = "meshbake:version"
#: When Packer built it (a template expression, so not part of the rendered text).
BUILD_TIME = "meshbake:build-time"
#: ``meshbake revoke``: the reason; a revoked AMI is never launched.
REVOKED = "meshbake:revoked"
REVOKED_AT = "meshbake:revoked-at"
REVOKED_BY = "meshbake:revoked-by"
#: ``meshbake promote``: ``meshbake:channel:<name>`` is on the AMI a channel points to now.
CHANNEL_PREFIX = "meshbake:channel:"
