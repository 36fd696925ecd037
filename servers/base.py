"""BaseServer: socketserver's hook chain, driven by readiness instead of polling.

The request path is the stdlib's, hook for hook:

    handle_ready -> get_request -> verify_request -> process_request -> finish_request
                 -> RequestHandlerClass(request, client_address, server)

What changes is how a request gets there. The listening socket is non-blocking, and `handle_ready()`
is the one step every driver uses: serve_forever(), handle_request(), and any foreign selectors loop
that holds many servers (selectd's supervisor) and calls it when fileno() is readable. The step
accepts (or receives) one request and dispatches it; a readiness that turns out to be spurious is a
silent no-op, and running out of descriptors backs the server off instead of spinning.
"""

from __future__ import annotations

import errno
import logging
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from .ratelimit import RateLimiter
from .wakeup import Wakeup

logger = logging.getLogger("servers")

# accept() and recvfrom() errors that mean "nothing to take this time": another process won the
# race for the connection, or the peer gave up before we got to it. Linux also reports pending
# network errors on the new socket through accept(); its man page says to treat them like EAGAIN.
SPURIOUS_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EWOULDBLOCK,
        errno.EINTR,
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)

# The process or the system is out of something. Retrying at once fails the same way and, since the
# connection stays in the backlog, the socket stays readable: a loop that ignored this would spin.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# How long a server stops taking requests after a capacity error: doubled on every failure in a row,
# reset by the first request taken.
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 0.5

if hasattr(selectors, "PollSelector"):
    _ServerSelector: type[selectors.BaseSelector] = selectors.PollSelector
else:  # pragma: no cover - every Unix has poll()
    _ServerSelector = selectors.SelectSelector


class RequestDropped(Exception):
    """Raised by get_request() when it consumed input that must not be served.

    An oversized datagram is one: it was read (so it cannot be read again) but handing a truncated
    copy to the handler would be wrong. get_request() logs why; handle_ready() then returns True
    without dispatching anything.
    """


class BaseServer:
    """Base class for server classes.

    Methods for the caller:

    - __init__(server_address, RequestHandlerClass)
    - serve_forever(poll_interval=0.5)
    - shutdown()
    - handle_request()  # if you do not use serve_forever()
    - handle_ready() -> bool  # when your own selector says fileno() is readable
    - accept_backoff() -> float  # seconds to leave fileno() out of your selector
    - fileno() -> int   # for selector

    Methods that may be overridden:

    - server_bind()
    - server_activate()
    - get_request() -> request, client_address
    - handle_timeout()
    - verify_request(request, client_address)
    - server_close()
    - process_request(request, client_address)
    - shutdown_request(request)
    - close_request(request)
    - service_actions()
    - handle_error(request, client_address)

    Methods for derived classes:

    - finish_request(request, client_address)

    Class variables that may be overridden by derived classes or instances:

    - timeout
    - address_family
    - socket_type
    - allow_reuse_address
    - allow_reuse_port

    Instance variables:

    - RequestHandlerClass
    - socket

    Unlike the stdlib, serve_forever() does not poll: it blocks in its selector until a request or
    a shutdown() arrives, so an idle server costs no CPU. poll_interval is accepted and ignored.
    service_actions() therefore runs after each event rather than every poll_interval.
    """

    timeout: float | None = None

    def __init__(self, server_address: Any, RequestHandlerClass: Callable[..., Any]) -> None:
        """Constructor.  May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__is_shut_down = threading.Event()
        self.__is_shut_down.set()
        self.__shutdown_request = False
        self.__wakeup: Wakeup | None = None
        self.__wakeup_lock = threading.Lock()
        # File descriptors a subclass wants the serve_forever() loop to watch (ForkingMixIn's
        # pidfds), with the callback to run when one is readable.
        self._watched: dict[int, Callable[[], None]] = {}
        self._serve_selector: selectors.BaseSelector | None = None
        self._backoff_until = 0.0
        self._backoff_delay = 0.0
        self._capacity_log = RateLimiter()

    def server_activate(self) -> None:
        """Called by constructor to activate the server.

        May be overridden.

        """

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle requests until shutdown().

        Blocks in a selector with no timeout while idle (poll_interval is accepted for
        compatibility and ignored): shutdown() wakes the loop at once through a wakeup socket.
        """
        self.__is_shut_down.clear()
        try:
            with _ServerSelector() as selector, Wakeup() as wakeup:
                with self.__wakeup_lock:
                    self.__wakeup = wakeup
                selector.register(wakeup, selectors.EVENT_READ, None)
                for fd, callback in self._watched.items():
                    selector.register(fd, selectors.EVENT_READ, callback)
                self._serve_selector = selector
                listening = False
                try:
                    while not self.__shutdown_request:
                        backoff = self.accept_backoff()
                        if backoff and listening:
                            selector.unregister(self)
                            listening = False
                        elif not backoff and not listening:
                            selector.register(self, selectors.EVENT_READ, self)
                            listening = True
                        ready = selector.select(backoff or None)
                        # bpo-35017: shutdown() called during select(), exit immediately.
                        if self.__shutdown_request:
                            break
                        for key, _events in ready:
                            if key.data is self:
                                self.handle_ready()
                            elif key.data is None:
                                wakeup.drain()
                            else:
                                key.data()
                        self.service_actions()
                finally:
                    self._serve_selector = None
                    with self.__wakeup_lock:
                        self.__wakeup = None
        finally:
            self.__shutdown_request = False
            self.__is_shut_down.set()

    def shutdown(self) -> None:
        """Stops the serve_forever loop.

        Blocks until the loop has finished. This must be called while
        serve_forever() is running in another thread, or it will
        deadlock.
        """
        self.__shutdown_request = True
        with self.__wakeup_lock:
            if self.__wakeup is not None:
                self.__wakeup.wake()
        self.__is_shut_down.wait()

    def service_actions(self) -> None:
        """Called by the serve_forever() loop after each event it handled.

        May be overridden by a subclass / Mixin to implement any code that
        needs to be run during the loop.
        """

    def _watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Have the serve_forever() loop call `callback` when `fd` is readable."""
        self._watched[fd] = callback
        if self._serve_selector is not None:
            self._serve_selector.register(fd, selectors.EVENT_READ, callback)

    def _unwatch_fd(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None and self._serve_selector is not None:
            self._serve_selector.unregister(fd)

    # The distinction between handling, getting, processing and finishing a
    # request is fairly arbitrary.  Remember:
    #
    # - handle_ready() takes one request from a ready socket and dispatches it; handle_request()
    #   and serve_forever() are built on it.
    # - get_request() is different for stream or datagram sockets
    # - process_request() is the place that may fork a new process or create a
    #   new thread to finish the request
    # - finish_request() instantiates the request handler class; this
    #   constructor will handle the request all by itself

    def handle_request(self) -> None:
        """Handle one request, possibly blocking.

        Respects self.timeout, and a timeout set with self.socket.settimeout() as the stdlib does.
        A readiness that yields no request (another process took the connection) does not count:
        the wait goes on until a request is handled or the timeout expires.
        """
        timeout = self.socket.gettimeout() or None  # the listener's own 0.0 means "not set"
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with _ServerSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining < 0:
                    return self.handle_timeout()
                backoff = self.accept_backoff()
                if backoff:
                    time.sleep(backoff if remaining is None else min(backoff, remaining))
                    continue
                if selector.select(remaining) and self.handle_ready():
                    return None

    def handle_ready(self) -> bool:
        """Take one request from the ready socket and dispatch it, without blocking.

        The step for a selectors loop: call it when fileno() is readable. Returns True when a
        request was taken (dispatched, refused by verify_request(), or dropped), False when there
        was nothing to take: a spurious readiness (EAGAIN, ECONNABORTED: another process won the
        accept) is a silent no-op. On a capacity error (EMFILE, ENFILE, ENOBUFS, ENOMEM) it logs,
        rate-limited, and backs off: accept_backoff() then says how long to leave fileno() out of
        the selector.
        """
        try:
            request, client_address = self.get_request()
        except RequestDropped:
            return True
        except OSError as exc:
            self._get_request_failed(exc)
            return False
        self._backoff_delay = 0.0
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)
        return True

    # socketserver's own name for the step, kept for code that calls it.
    def _handle_request_noblock(self) -> None:
        self.handle_ready()

    def accept_backoff(self) -> float:
        """Seconds left before this server should take requests again (0.0: now)."""
        if not self._backoff_until:
            return 0.0
        remaining = self._backoff_until - time.monotonic()
        if remaining <= 0:
            self._backoff_until = 0.0
            return 0.0
        return remaining

    def _get_request_failed(self, exc: OSError) -> None:
        if exc.errno in SPURIOUS_ERRNOS or isinstance(exc, TimeoutError):
            return
        if self.socket.fileno() == -1:
            return  # closed under a racing loop: there is nothing left to serve
        # Capacity errors are expected under load and back off; anything else is a bug or a broken
        # socket, reported with its traceback, and backs off too so that it cannot spin the loop.
        self._backoff_delay = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff_delay * 2))
        self._backoff_until = time.monotonic() + self._backoff_delay
        suppressed = self._capacity_log.allow()
        if suppressed is None:
            return
        capacity = exc.errno in ACCEPT_CAPACITY_ERRNOS
        logger.log(
            logging.WARNING if capacity else logging.ERROR,
            "%s on %r: %s; not taking requests for %.3fs (%d similar failures suppressed)",
            "get_request() out of capacity" if capacity else "get_request() failed",
            self.server_address,
            errno.errorcode.get(exc.errno or 0, exc.strerror),
            self._backoff_delay,
            suppressed,
            exc_info=not capacity,
            extra={"server_address": self.server_address, "errno": exc.errno},
        )

    def handle_timeout(self) -> None:
        """Called if no new request arrives within self.timeout.

        Overridden by ForkingMixIn.
        """

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Verify the request.  May be overridden.

        Return True if we should proceed with this request.

        """
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Call finish_request.

        Overridden by ForkingMixIn and ThreadingMixIn.

        """
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Called to clean-up the server.

        May be overridden.

        """

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating RequestHandlerClass."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """Called to shutdown and close an individual request."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Handle an error gracefully.  May be overridden.

        Called from inside an `except` block. The default logs the exception with its traceback
        and the client's address to the "servers" logger at ERROR level, and continues.
        """
        logger.error(
            "Exception occurred during processing of request from %s",
            client_address,
            exc_info=True,
            extra={"client_address": client_address, "server_address": self.server_address},
        )

    def __enter__(self) -> BaseServer:
        return self

    def __exit__(self, *args: object) -> None:
        self.server_close()
