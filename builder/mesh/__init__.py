"""The local mesh that ``meshbake up`` (and verify) run images in.

- ``localnet``: the private L2 network, a bridge in a network namespace of its own, with
  a tap device per VM, and the sweep for namespaces a killed meshbake left;
- ``forward``: TCP forwards from the host's 127.0.0.1 into that namespace.
"""
