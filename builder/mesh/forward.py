"""A TCP forward from the host's 127.0.0.1 into a network namespace, with bounded resources.

One thread per forward moves itself into the namespace (``setns``) before it makes any
socket, so its outgoing connections start there, while the listener it was handed stays
in the host's namespace: a socket keeps the namespace it was made in. Nothing in the
host's namespace changes but that one listener on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import UserError

#: Forward limits: connections at once per forward, and bytes buffered per direction.
MAX_CONNECTIONS = 64
BUFFER_BYTES = 64 * 1024
#: Seconds an outgoing connection inside the namespace may take to be established.
CONNECT_TIMEOUT = 10.0

_CLONE_NEWNET = 0x40000000


def enter_netns(path: Path) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Direction:
    """Bytes read from ``src`` and not yet written to ``dst``."""

    src: socket.socket
    dst: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False  # src said it sends no more
    shut: bool = False  # and dst was told so


@dataclass(eq=False)
class _Pair:
    """One forwarded connection: the client's socket (host) and the guest's (namespace)."""

    client: socket.socket
    upstream: socket.socket
    deadline: float  # until the upstream connection must be up
    connected: bool = False
    up: _Direction = field(init=False)
    down: _Direction = field(init=False)

    def __post_init__(self) -> None:
        self.up = _Direction(self.client, self.upstream)
        self.down = _Direction(self.upstream, self.client)

    def close(self) -> None:
        self.client.close()
        self.upstream.close()


class Forward:
    """A TCP forward from 127.0.0.1:``port`` (host) to ``target`` inside the namespace.

    One thread per forward: it moves itself into the namespace before it creates any
    socket, so its outgoing connections start there, while the listener it was handed
    stays in the host's namespace (a socket keeps the namespace it was made in). At most
    ``max_connections`` at once (one more is accepted and closed at once), and at most
    ``buffer_bytes`` held per direction.
    """

    def __init__(
        self,
        netns: Path,
        target: tuple[str, int],
        *,
        max_connections: int = MAX_CONNECTIONS,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        self.target = target
        self.max_connections = max_connections
        self.buffer_bytes = buffer_bytes
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._pairs: list[_Pair] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(netns,), name=f"forward-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._ready.wait()
        except BaseException:  # interrupted meanwhile: the thread must not outlive us
            self.stop()
            raise
        if self._error is not None:
            self.stop()
            raise UserError(f"cannot forward into {netns.name}: {self._error}")

    def stop(self) -> None:
        """End the forward and every connection through it (idempotent)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # The loop: everything below runs in the forward's own thread.

    def _run(self, netns: Path) -> None:
        try:
            enter_netns(netns)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            with selectors.DefaultSelector() as selector:
                self._loop(selector)
        finally:
            for pair in self._pairs:
                pair.close()
            self._pairs.clear()

    def _loop(self, selector: selectors.BaseSelector) -> None:
        while not self._stopping:
            now = time.monotonic()
            for pair in [p for p in self._pairs if not p.connected and now >= p.deadline]:
                self._drop(pair)
            wanted = self._interest()
            for key in list(selector.get_map().values()):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock not in wanted:
                    selector.unregister(sock)
                elif key.events != wanted[sock]:
                    selector.modify(sock, wanted[sock])
            registered = selector.get_map()
            for sock, events in wanted.items():
                if sock not in registered:
                    selector.register(sock, events)
            waits = [p.deadline - now for p in self._pairs if not p.connected]
            ready = selector.select(max(0.0, min(waits)) if waits else None)
            for key, events in ready:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    return
                if sock is self._listener:
                    self._accept()
                    continue
                self._service(sock, events)

    def _interest(self) -> dict[socket.socket, int]:
        wanted: dict[socket.socket, int] = {
            self._wake_r: selectors.EVENT_READ,
            self._listener: selectors.EVENT_READ,
        }
        for pair in self._pairs:
            if not pair.connected:
                wanted[pair.upstream] = selectors.EVENT_WRITE
                continue
            for direction in (pair.up, pair.down):
                events = 0
                if not direction.eof and len(direction.buf) < self.buffer_bytes:
                    wanted[direction.src] = wanted.get(direction.src, 0) | selectors.EVENT_READ
                if direction.buf:
                    events = selectors.EVENT_WRITE
                wanted[direction.dst] = wanted.get(direction.dst, 0) | events
        return {sock: events for sock, events in wanted.items() if events}

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._pairs) >= self.max_connections:
            client.close()  # at the limit: the client sees its connection end at once
            return
        client.setblocking(False)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # in the namespace
        upstream.setblocking(False)
        code = upstream.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS):
            client.close()
            upstream.close()
            return
        self._pairs.append(_Pair(client, upstream, time.monotonic() + CONNECT_TIMEOUT))

    def _service(self, sock: socket.socket, events: int) -> None:
        pair = next((p for p in self._pairs if sock in (p.client, p.upstream)), None)
        if pair is None:
            return
        try:
            if not pair.connected:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    self._drop(pair)
                else:
                    pair.connected = True
                return
            for direction in (pair.up, pair.down):
                if events & selectors.EVENT_READ and direction.src is sock and not direction.eof:
                    data = sock.recv(self.buffer_bytes - len(direction.buf))
                    if data:
                        direction.buf += data
                    else:
                        direction.eof = True
                if events & selectors.EVENT_WRITE and direction.dst is sock and direction.buf:
                    sent = sock.send(direction.buf)
                    del direction.buf[:sent]
                if direction.eof and not direction.buf and not direction.shut:
                    direction.dst.shutdown(socket.SHUT_WR)
                    direction.shut = True
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset, broken pipe: the connection is over
            self._drop(pair)
            return
        if pair.up.shut and pair.down.shut:
            self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        pair.close()
        self._pairs.remove(pair)
