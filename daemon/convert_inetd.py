"""Read an inetd.conf (openbsd-inetd and netkit inetd) as selectd services.

    services = read_inetd(path)

One service a line, fields separated by blanks:

    [ADDRESS:]SERVICE  SOCKET_TYPE  PROTOCOL  wait|nowait[.MAX]  USER[.GROUP]  PROGRAM  ARGV...

USER.GROUP may also be written USER:GROUP. PROGRAM "internal" is one of inetd's built-in
services, named by SERVICE; otherwise ARGV starts with the program's argv[0]. PROTOCOL is tcp,
udp, tcp4, udp4, tcp6, udp6 (IPv6), tcp46 or udp46, or unix (SERVICE is then a socket path);
rpc/... lines are RPC services, which selectd does not serve. A line that is only "ADDRESS:" sets
the address of the lines after it ("*:" resets it). Blank lines and lines starting with '#' are
skipped. A line with too few fields is a ConvertError naming the file and line.
"""

from __future__ import annotations

import re

from .convert_service import (
    ConvertError,
    Service,
    bind_address,
    builtin_for,
    listen_string,
    parse_port,
    read_text,
    service_port,
    unwrap_command,
)

PROTOCOLS = {
    "tcp": ("stream", False),
    "tcp4": ("stream", False),
    "tcp6": ("stream", True),
    "tcp46": ("stream", True),
    "udp": ("dgram", False),
    "udp4": ("dgram", False),
    "udp6": ("dgram", True),
    "udp46": ("dgram", True),
}
WAIT = re.compile(r"(wait|nowait)(?:[.:/]([0-9]{1,9}))?")


def read_inetd(path: str) -> list[Service]:
    """The services of inetd config `path`, one per line, each with its notes."""
    services: list[Service] = []
    default_host: str | None = None
    for number, raw in enumerate(read_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) == 1 and fields[0].endswith(":"):
            host = fields[0][:-1]
            default_host = None if host in ("", "*") else host
            continue
        rpc = len(fields) >= 3 and fields[2].lower().startswith("rpc/")
        if len(fields) < 6 and not rpc:
            raise ConvertError(
                f"{path}:{number}: expected 'SERVICE SOCKET_TYPE PROTOCOL WAIT USER PROGRAM "
                f"ARGV...', got {line!r}"
            )
        services.append(_service(path, number, fields, default_host))
    return services


def _service(path: str, number: int, fields: list[str], default_host: str | None) -> Service:
    where, socket_type, protocol = fields[0], fields[1], fields[2].lower()
    host, name = _split_address(where, default_host)
    service = Service(name, path, number, protocol=protocol)
    if protocol.startswith("rpc/"):
        service.skip("RPC services are not supported")
        return service
    if name.startswith("tcpmux/"):
        service.skip("TCPMUX services are not supported")
        return service
    if socket_type not in ("stream", "dgram"):
        service.skip(f"socket type {socket_type} is not supported (stream and dgram are)")
        return service
    service.set("socket_type", socket_type, number)
    if not _listen(service, host, socket_type, protocol):
        return service
    wait = WAIT.fullmatch(fields[3])
    if wait is None:
        service.skip(f"{fields[3]!r} is not wait or nowait")
        return service
    user, _, group = _split_user(fields[4])
    program = fields[5]
    if program == "internal":
        builtin = builtin_for(name)
        if builtin is None:
            service.skip(f"the internal service {name!r} has no built-in equivalent in selectd")
            return service
        service.set("handler", builtin, number)
        if fields[6:]:
            service.note(f"arguments {' '.join(fields[6:])!r} of an internal service ignored")
    else:
        service.set("command", unwrap_command(service, program, fields[6:], number), number)
        if wait[1] == "wait" and socket_type == "stream":
            service.note(
                "wait on a stream service (the program accepts connections itself) has no "
                "equivalent; converted as nowait: selectd accepts, and runs it per connection"
            )
        elif wait[1] == "nowait" and socket_type == "dgram":
            service.note(
                "nowait on a datagram service: selectd runs a datagram program the wait way "
                "(it reads from the socket itself)"
            )
    if wait[2] is not None:
        per_minute = int(wait[2])
        cps = [max(1, per_minute // 60), 60]
        service.note(
            f".{per_minute} (at most {per_minute} starts a minute) has no exact equivalent; "
            f"converted as cps = [{cps[0]}, 60]"
        )
        service.set("cps", cps, number)
    service.set("user", user, number)
    if group:
        service.set("group", group, number)
    return service


def _split_address(where: str, default_host: str | None) -> tuple[str | None, str]:
    """ "[::1]:ftp", "127.0.0.1:ftp", "ftp" -> (host or None, service)."""
    bracketed = re.fullmatch(r"\[([^\]]*)\]:(.+)", where)
    if bracketed:
        return bracketed[1], bracketed[2]
    if where.startswith("/"):  # a unix socket path
        return default_host, where
    host, colon, name = where.rpartition(":")
    if not colon:
        return default_host, where
    return (None if host == "*" else host), name


def _split_user(text: str) -> tuple[str, str, str]:
    for separator in (":", "."):
        user, sep, group = text.partition(separator)
        if sep:
            return user, sep, group
    return text, "", ""


def _listen(service: Service, host: str | None, socket_type: str, protocol: str) -> bool:
    name = service.name
    if protocol == "unix":
        if not name.startswith("/"):
            service.skip(f"the unix socket {name!r} is not an absolute path")
            return False
        service.set("listen", f"unix:{name}", service.line)
        return True
    if protocol not in PROTOCOLS or PROTOCOLS[protocol][0] != socket_type:
        service.skip(f"protocol {protocol} with socket type {socket_type} is not supported")
        return False
    ipv6 = PROTOCOLS[protocol][1]
    if protocol.endswith("46"):
        service.note(
            f"{protocol}: listens on [::], which takes IPv4 too unless the system sets "
            "net.ipv6.bindv6only"
        )
    base = "tcp" if socket_type == "stream" else "udp"
    port = parse_port(name) or service_port(name, base)
    if port is None:
        service.skip(f"/etc/services has no {base} port for {name!r}")
        return False
    if host is not None:
        host = bind_address(service, host, ipv6, service.line)
        if host is None:
            return False
        ipv6 = ":" in host
    service.set("listen", listen_string(host, port, ipv6), service.line)
    return True
