"""Stream transports: TCPServer (IPv4 and IPv6) and UnixStreamServer.

A transport overrides only server_bind / server_activate / get_request / close hooks; everything
about dispatch lives in BaseServer.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from .base import BaseServer


def family_for_address(server_address: Any, default: int) -> int:
    """The address family that `server_address` names, or `default` when it names none.

    A host that is an IPv6 literal ("::1", "fe80::1%eth0") means AF_INET6; a str, bytes or
    path-like address means AF_UNIX. Host names and IPv4 literals keep the class's family.
    """
    if isinstance(server_address, (str, bytes, os.PathLike)):
        return socket.AF_UNIX
    if isinstance(server_address, tuple) and server_address and default != socket.AF_UNIX:
        host = server_address[0]
        if isinstance(host, str) and ":" in host:
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                return default
            return socket.AF_INET6
    return default


class TCPServer(BaseServer):
    """Base class for various socket-based server classes.

    Defaults to synchronous IP stream (i.e., TCP).

    Methods for the caller:

    - __init__(server_address, RequestHandlerClass, bind_and_activate=True)
    - serve_forever(poll_interval=0.5)
    - shutdown()
    - handle_request()  # if you don't use serve_forever()
    - handle_ready() -> bool  # from your own selector loop
    - fileno() -> int   # for selector

    Methods that may be overridden:

    - server_bind()
    - server_activate()
    - get_request() -> request, client_address
    - handle_timeout()
    - verify_request(request, client_address)
    - process_request(request, client_address)
    - shutdown_request(request)
    - close_request(request)
    - handle_error()

    Methods for derived classes:

    - finish_request(request, client_address)

    Class variables that may be overridden by derived classes or instances:

    - timeout
    - address_family  # follows the address: ("::1", 0) gives AF_INET6 without subclassing
    - socket_type
    - request_queue_size (only for stream sockets)
    - allow_reuse_address
    - allow_reuse_port

    Instance variables:

    - server_address
    - RequestHandlerClass
    - socket  # non-blocking; accepted connections are blocking

    A filesystem Unix socket that this server bound is unlinked by server_close(), unless another
    socket has replaced it at that path since.
    """

    address_family = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    request_queue_size = 5
    allow_reuse_address = False
    allow_reuse_port = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
        bind_and_activate: bool = True,
    ) -> None:
        """Constructor.  May be extended, do not override."""
        if isinstance(server_address, os.PathLike):
            server_address = os.fspath(server_address)
        family = family_for_address(server_address, self.address_family)
        if family != self.address_family:
            self.address_family = family
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self._bound_path: tuple[str | bytes, int, int] | None = None
        self.socket = socket.socket(self.address_family, self.socket_type)
        self.socket.setblocking(False)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Called by constructor to bind the socket.

        May be overridden.

        """
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self._remember_path()

    def _remember_path(self) -> None:
        path = self.server_address
        if self.address_family != socket.AF_UNIX or not isinstance(path, (str, bytes)):
            return
        if not path or path[:1] in ("\0", b"\0"):
            return  # unnamed or abstract: nothing on the filesystem
        try:
            st = os.stat(path)
        except OSError:
            return
        self._bound_path = (path, st.st_dev, st.st_ino)

    def adopt_socket(self, sock: socket.socket, owns_path: bool = True) -> None:
        """Serve `sock`, bound (and listening, for a stream) by someone else.

        For systemd socket activation, or a process taking over from its predecessor: construct
        with bind_and_activate=False, then adopt. With owns_path, server_close() removes the
        Unix socket file as if this server had bound it.
        """
        self.socket.close()
        sock.setblocking(False)
        self.socket = sock
        if self.address_family != sock.family:
            self.address_family = sock.family
        self.server_address = sock.getsockname()
        if owns_path:
            self._remember_path()

    def disown_path(self) -> None:
        """Leave the Unix socket file in place on server_close(): another process serves it."""
        self._bound_path = None

    def server_activate(self) -> None:
        """Called by constructor to activate the server.

        May be overridden.

        """
        self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Called to clean-up the server.

        May be overridden.

        """
        self.socket.close()
        self._unlink_path()

    def _unlink_path(self) -> None:
        if self._bound_path is None:
            return
        path, dev, ino = self._bound_path
        self._bound_path = None
        try:
            st = os.stat(path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass  # gone already, or not ours to remove

    def fileno(self) -> int:
        """Return socket file number.

        Interface required by selector.

        """
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Get the request and client address from the socket.

        May be overridden.

        """
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> None:
        """Called to shutdown and close an individual request."""
        try:
            # explicitly shutdown.  socket.close() merely releases
            # the socket and waits for GC to perform the actual close.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # some platforms may raise ENOTCONN here
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""
        request.close()


class UnixStreamServer(TCPServer):
    """A stream server on a Unix socket; server_address is its path (str, bytes or path-like)."""

    address_family = socket.AF_UNIX
