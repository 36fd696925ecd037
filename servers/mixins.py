"""ThreadingMixIn and ForkingMixIn: a thread or a process per request, as in the stdlib.

Mixins override only process_request and server_close (and, for forking, the child bookkeeping).
They are the stdlib's models kept for compatibility; selectd's own pools are bounded and live in the
daemon.

ForkingMixIn differs from the stdlib in how it reaps: each child gets a pidfd (Linux >= 5.3)
that the serve_forever() loop watches, so a child is reaped the moment it exits, by its own pid.
The stdlib's waitpid(-1) could reap children that belong to other code in the process, and with
its 0.5 s poll gone nothing else would reap them promptly.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from typing import Any


class _Threads(list[threading.Thread]):
    """Joinable list of all non-daemon threads."""

    def append(self, thread: threading.Thread) -> None:
        self.reap()
        if thread.daemon:
            return
        super().append(thread)

    def pop_all(self) -> list[threading.Thread]:
        self[:], result = [], self[:]
        return result

    def join(self) -> None:
        for thread in self.pop_all():
            thread.join()

    def reap(self) -> None:
        self[:] = (thread for thread in self if thread.is_alive())


class _NoThreads:
    """Degenerate version of _Threads."""

    def append(self, thread: threading.Thread) -> None:
        pass

    def join(self) -> None:
        pass


class ThreadingMixIn:
    """Mix-in class to handle each request in a new thread.

    Class variables that may be overridden:

    - daemon_threads: threads do not keep the process alive (default False)
    - block_on_close: server_close() joins the request threads (default True)
    """

    daemon_threads = False
    block_on_close = True
    _threads: Any = _NoThreads()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Same as in BaseServer but as a thread.

        In addition, exception handling is done here.

        """
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a new thread to process the request."""
        if self.block_on_close:
            vars(self).setdefault("_threads", _Threads())
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address))
        t.daemon = self.daemon_threads
        self._threads.append(t)
        t.start()

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self._threads.join()


class ForkingMixIn:
    """Mix-in class to handle each request in a new process.

    Class variables that may be overridden:

    - timeout: handle_request() reaps after this many idle seconds (default 300)
    - max_children: at most this many children at once; process_request() waits for one of its
      own children to exit before forking another (default 40)
    - block_on_close: server_close() waits for every child (default True)

    Instance variables:

    - active_children: set of the pids of running children (None before the first fork)
    """

    timeout: float | None = 300
    active_children: set[int] | None = None
    max_children = 40
    block_on_close = True

    def _pidfds(self) -> dict[int, int]:
        return vars(self).setdefault("_child_pidfds", {})

    def _forget_child(self, pid: int) -> None:
        if self.active_children is not None:
            self.active_children.discard(pid)
        self._release_pidfd(pid)

    def _release_pidfd(self, pid: int) -> None:
        pidfd = self._pidfds().pop(pid, None)
        if pidfd is not None:
            self._unwatch_fd(pidfd)  # type: ignore[attr-defined]
            os.close(pidfd)

    def _reap(self, pid: int, blocking: bool) -> bool:
        """Reap one child of ours; True when it is gone."""
        try:
            done, _status = os.waitpid(pid, 0 if blocking else os.WNOHANG)
        except ChildProcessError:
            done = pid  # reaped by someone else already
        except InterruptedError:
            return False
        if done:
            self._forget_child(pid)
            return True
        return False

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap the children of this server that have exited (all of them when blocking).

        Above max_children, wait, in a selector over the children's pidfds, until enough of them
        have exited: only this server's children are ever waited for.
        """
        if self.active_children is None:
            return
        while len(self.active_children) >= self.max_children:
            self._wait_for_any_child()
        for pid in list(self.active_children):
            self._reap(pid, blocking)

    def _wait_for_any_child(self) -> None:
        pidfds = self._pidfds()
        if not pidfds:  # pragma: no cover - only without pidfd support
            pid = next(iter(self.active_children or ()))
            self._reap(pid, blocking=True)
            return
        with selectors.DefaultSelector() as selector:
            for pid, pidfd in pidfds.items():
                selector.register(pidfd, selectors.EVENT_READ, pid)
            ready = selector.select()
        for key, _events in ready:
            self._reap(key.data, blocking=False)

    def handle_timeout(self) -> None:
        """Wait for zombies after self.timeout seconds of inactivity.

        May be extended, do not override.
        """
        self.collect_children()

    def service_actions(self) -> None:
        """Collect the zombie child processes in the ForkingMixIn.

        service_actions is called in the BaseServer's serve_forever loop; the pidfds registered
        there reap promptly, this catches up for handle_request() users.
        """
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork a new subprocess to process the request."""
        self.collect_children()
        pid = os.fork()
        if pid:
            # Parent process
            if self.active_children is None:
                self.active_children = set()
            self.active_children.add(pid)
            try:
                pidfd = os.pidfd_open(pid)
            except (AttributeError, OSError):  # pragma: no cover - kernel < 5.3
                pass
            else:
                self._pidfds()[pid] = pidfd
                self._watch_fd(pidfd, lambda: self._reap(pid, blocking=False))  # type: ignore[attr-defined]
            self.close_request(request)  # type: ignore[attr-defined]
            return
        # Child process.
        # This must never return, hence os._exit()!
        status = 1
        try:
            self._close_in_child()
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
            status = 0
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            try:
                self.shutdown_request(request)  # type: ignore[attr-defined]
            finally:
                os._exit(status)

    def _close_in_child(self) -> None:
        # A stream child serves one connection and must not keep the listening socket open:
        # otherwise, after the parent closes it, new connects still queue up on the child's copy
        # instead of being refused. A datagram child replies through the server's socket.
        sock: socket.socket = self.socket  # type: ignore[attr-defined]
        if sock.type == socket.SOCK_STREAM:
            sock.close()
        for pidfd in self._pidfds().values():
            os.close(pidfd)
        self._pidfds().clear()

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self.collect_children(blocking=self.block_on_close)
        # Children left running (block_on_close false) can still be reaped by a later
        # collect_children(), which waits by pid; their pidfds go with the server.
        for pid in list(self._pidfds()):
            self._release_pidfd(pid)
