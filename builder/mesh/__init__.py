"""The local mesh that ``meshbake up`` (and verify) run images in.

``localnet``: the private L2 network, a bridge in a network namespace of its own, with
a tap device per VM and forwards from the host's 127.0.0.1.
"""
