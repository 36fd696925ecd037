"""How many TCP handshakes a listener has half done, from the kernel's socket diagnostics.

A client whose SYN a listener answered is connected on its side once the SYN-ACK reaches it,
and may send its request at once; on the listener's side the connection exists only once the
client's ACK is in. Until then it is a request socket in SYN_RECV, which no accept() returns
and which closing the listener resets. A stopping server asks this module whether any are left
before it closes its listener (units.py).

The count comes from NETLINK_SOCK_DIAG (sock_diag(7)), asked for TCP sockets in SYN_RECV only:
one request and a reply as long as the half-done handshakes of the whole host, however many
established connections it has (/proc/net/tcp would list them all). The kernel still walks its
whole table for it: about 2 ms per address family on the development VM (262,144 buckets), so
a caller asks once for all its listeners.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x001
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_SYN_RECV = 3

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then an inet_diag_sockid of zeros.
_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg, as far as we read it: family, state, timer, retrans; then the sockid's ports
# (network order) and addresses (16 bytes each; IPv4 in the first 4).
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_PORTS = struct.Struct("!HH")
_ERRNO = struct.Struct("=i")


def half_done(listeners: Sequence[socket.socket]) -> list[int]:
    """For each TCP listener, how many handshakes it has in SYN_RECV: those on its port, and on
    its address unless it is a wildcard. One query per address family, for all of them.

    OSError when the kernel will not say (no sock_diag, or not allowed to ask)."""
    # An IPv6 listener that is not V6ONLY takes IPv4 clients too; their request sockets are IPv4.
    families = {socket.AF_INET} | {s.family for s in listeners}
    pending = {family: _syn_recv(family) for family in sorted(families)}
    counts = []
    for listener in listeners:
        host, port = listener.getsockname()[:2]
        wanted = socket.inet_pton(listener.family, host.split("%", 1)[0])  # fe80::1%eth0
        wildcard = not wanted.strip(b"\0")
        looked_in = [listener.family]
        if listener.family == socket.AF_INET6:
            looked_in.append(socket.AF_INET)
        counts.append(
            sum(
                1
                for family in looked_in
                for local_port, local in pending[family]
                if local_port == port and (wildcard or family != listener.family or local == wanted)
            )
        )
    return counts


def _syn_recv(family: int) -> list[tuple[int, bytes]]:
    """(local port, local address) of every TCP socket of `family` in SYN_RECV."""
    try:
        return _ask(family)
    except struct.error as exc:  # a reply shorter than its header says: not one we can read
        raise OSError(f"sock_diag: unreadable reply ({exc})") from exc


def _ask(family: int) -> list[tuple[int, bytes]]:
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_SYN_RECV)
    header = _NLMSG.pack(
        _NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.send(header + request)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, offset)[:2]
                body = offset + _NLMSG.size
                if kind == NLMSG_DONE or length < _NLMSG.size:
                    return found
                if kind == NLMSG_ERROR:
                    errno = -_ERRNO.unpack_from(data, body)[0]
                    raise OSError(errno, "sock_diag refused the request")
                local_port = _PORTS.unpack_from(data, body + _MSG_HEAD.size)[0]
                address = body + _MSG_HEAD.size + _PORTS.size
                width = 4 if family == socket.AF_INET else 16
                found.append((local_port, data[address : address + width]))
                offset += (length + 3) & ~3
            if not data:
                return found
