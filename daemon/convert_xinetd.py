"""xinetd's services (xinetd.conf(5)) in selectd's terms.

    services, notes = read_xinetd(path)

convert_xinetd_file reads the syntax; here each service's attributes, with what it takes from
defaults, become the keys of a Service (convert_service), attribute by attribute. An attribute
selectd has no equivalent for is a note with its file and line; one that makes the service
impossible to serve (an RPC service, a SENSOR) skips the service with a note. Attributes set in
defaults are noted once, at defaults, not again for each service that inherits them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Callable
from typing import Final

from .config_handler import ENV_NAME, MIB, format_bytes
from .config_schema import Invalid, format_time_ranges, time_ranges
from .convert_service import (
    Note,
    Service,
    bind_address,
    builtin_for,
    listen_string,
    networks_for,
    parse_port,
    service_port,
    unwrap_command,
)
from .convert_xinetd_file import INHERITED, Attr, Entry, effective, merge_defaults, read_entries

_Line = Callable[[str], int]  # an attribute's line number, or the service's

# Defaults that carry over (as the services' own keys, or by enabling and disabling them).
CONVERTED_DEFAULTS: Final = {
    "bind", "interface", "per_source", "only_from", "no_access", "passenv", "instances",
    "banner_fail", "cps", "disabled", "enabled",
}  # fmt: skip
NO_EQUIVALENT: Final = {
    "log_type": "selectd writes its own structured log",
    "log_on_success": "selectd logs every request in its own log",
    "log_on_failure": "selectd logs every refusal in its own log",
    "nice": "selectd does not change a program's priority",
    "umask": "selectd does not set a program's umask",
    "groups": "selectd does not set supplementary groups",
    "redirect": "selectd does not forward connections",
    "mdns": "selectd does not register services with mDNS",
    "deny_time": "selectd has no SENSOR services",
    "max_load": "selectd does not refuse by load average",
    "banner": "selectd sends no banner on connect (only banner_fail)",
    "banner_success": "selectd sends no banner on connect (only banner_fail)",
    "libwrap": "selectd does not use TCP wrappers",
    "v6only": "selectd leaves IPV6_V6ONLY at the system default",
    "rlimit_data": "only rlimit_as, rlimit_cpu and rlimit_files carry over",
    "rlimit_rss": "only rlimit_as, rlimit_cpu and rlimit_files carry over",
    "rlimit_stack": "only rlimit_as, rlimit_cpu and rlimit_files carry over",
}
# Flags selectd does the same as xinetd without being told.
SAME_FLAGS: Final = {"IPV4", "IPV6", "REUSE", "NOLIBWRAP", "NAMEINARGS", "DISABLE"}


def read_xinetd(path: str) -> tuple[list[Service], list[Note]]:
    """The services of xinetd config `path` (and the files it includes), and the notes that
    belong to no one service."""
    entries = read_entries(path)
    defaults = merge_defaults(entries)
    notes = [note for entry in entries if entry.kind == "defaults" for note in _defaults(entry)]
    services = [
        _service(entry, effective(entry, defaults), defaults)
        for entry in entries
        if entry.kind == "service"
    ]
    return services, notes


def _defaults(entry: Entry) -> list[Note]:
    """Notes on the defaults that carry over to no service."""
    notes = []
    for attr in entry.attrs:
        if attr.name in CONVERTED_DEFAULTS:
            continue
        if attr.name in NO_EQUIVALENT or attr.name not in INHERITED:
            reason = NO_EQUIVALENT.get(attr.name, "not an attribute defaults can set")
            text = f"{attr.name} {attr.op} {attr.raw} has no equivalent ({reason})"
            notes.append(Note(entry.source, attr.line, "defaults", text))
    return notes


# -- one service -----------------------------------------------------------------------------


def _service(entry: Entry, attrs: dict[str, Attr], defaults: dict[str, Attr]) -> Service:
    service = Service(entry.name, entry.source, entry.line)
    _convert(service, attrs, defaults)
    return service


def _words(attrs: dict[str, Attr], name: str) -> list[str]:
    attr = attrs.get(name)
    return [v for v in attr.values if v] if attr else []


def _convert(service: Service, attrs: dict[str, Attr], defaults: dict[str, Attr]) -> None:
    def line(name: str) -> int:
        return attrs[name].line if name in attrs else service.line

    ident = (_words(attrs, "id") or [service.name])[0]
    types = {v.upper() for v in _words(attrs, "type")}
    flags = {v.upper() for v in _words(attrs, "flags")}
    if "RPC" in types or "rpc_version" in attrs or "rpc_number" in attrs:
        service.skip("RPC services are not supported", line("type"))
        return
    if types & {"TCPMUX", "TCPMUXPLUS"}:
        service.skip("TCPMUX services are not supported", line("type"))
        return
    if "SENSOR" in flags:
        service.skip("the SENSOR flag has no equivalent", line("flags"))
        return
    for kind in sorted(types - {"INTERNAL", "UNLISTED"}):
        service.note(f"type {kind} is not an xinetd type; ignored", line("type"))

    if not _socket(service, attrs, flags, line):
        return
    if "INTERNAL" in types:
        builtin = builtin_for(ident, service.name)
        if builtin is None:
            service.skip(
                f"the internal service {ident!r} has no built-in equivalent in selectd",
                line("type"),
            )
            return
        service.set("handler", builtin, line("type"))
        for name in ("server", "server_args"):
            if name in attrs:
                service.note(f"{name} has no effect on an internal service; ignored", line(name))
    elif not _command(service, attrs, flags, line):
        return
    _wait(service, attrs, line)
    for name in ("user", "group"):
        if words := _words(attrs, name):
            service.set(name, words[0], line(name))

    disabled = _words(attrs, "disable")[:1] == ["yes"] or "DISABLE" in flags
    if ident in _words(defaults, "disabled"):
        disabled = True
    if _words(defaults, "enabled") and ident not in _words(defaults, "enabled"):
        disabled = True
    if disabled:
        service.set("enabled", False, line("disable"))
    _access(service, attrs)
    _limits(service, attrs, line)
    _environment(service, attrs, line)
    _rlimits(service, attrs, line)
    for flag in sorted(flags - SAME_FLAGS):
        service.note(f"flag {flag} has no equivalent; ignored", line("flags"))
    for name, attr in attrs.items():
        if name in HANDLED or attr.inherited:
            continue
        reason = NO_EQUIVALENT.get(name, "not an xinetd attribute selectd knows")
        service.note(f"{name} {attr.op} {attr.raw} has no equivalent ({reason})", attr.line)


HANDLED: Final = {
    "id", "type", "flags", "socket_type", "protocol", "port", "bind", "interface", "server",
    "server_args", "wait", "user", "group", "disable", "only_from", "no_access", "instances",
    "per_source", "cps", "banner_fail", "access_times", "env", "passenv", "rlimit_as",
    "rlimit_cpu", "rlimit_files", "rpc_version", "rpc_number",
}  # fmt: skip


def _socket(service: Service, attrs: dict[str, Attr], flags: set[str], line: _Line) -> bool:
    """socket_type, protocol, port, bind and the IPv6 flag -> socket_type and listen."""
    socket_type = (_words(attrs, "socket_type") or [""])[0]
    protocol = (_words(attrs, "protocol") or [""])[0].lower()
    if not socket_type:
        socket_type = {"tcp": "stream", "udp": "dgram"}.get(protocol, "")
    if socket_type not in ("stream", "dgram"):
        what = f"socket_type = {socket_type}" if socket_type else "no socket_type"
        service.skip(f"{what} is not supported (stream and dgram are)", line("socket_type"))
        return False
    expected = "tcp" if socket_type == "stream" else "udp"
    if protocol and protocol != expected:
        service.skip(
            f"protocol = {protocol} with socket_type = {socket_type} is not supported",
            line("protocol"),
        )
        return False
    ipv6 = "IPV6" in flags
    service.protocol = expected + ("6" if ipv6 else "")
    service.set("socket_type", socket_type, line("socket_type"))
    if "port" in attrs:
        port = parse_port((_words(attrs, "port") or [""])[0])
        if port is None:
            service.skip(f"port = {attrs['port'].raw} is not a port number", line("port"))
            return False
    else:
        port = service_port(service.name, expected)
        if port is None:
            service.skip(
                f"no port, and /etc/services has no {expected} port for {service.name!r}",
            )
            return False
    host = None
    key = "bind" if "bind" in attrs else "interface"
    if words := _words(attrs, key):
        host = bind_address(service, words[0], ipv6, line(key))
        if host is None:
            return False
        ipv6 = ":" in host
    service.set("listen", listen_string(host, port, ipv6), line(key))
    return True


def _command(service: Service, attrs: dict[str, Attr], flags: set[str], line: _Line) -> bool:
    server = _words(attrs, "server")
    if not server:
        if "redirect" in attrs:
            service.skip("redirect has no equivalent (selectd does not forward connections)")
        else:
            service.skip("it has no server (the program to run)")
        return False
    raw_args = attrs["server_args"].raw if "server_args" in attrs else ""
    try:
        args = shlex.split(raw_args)
    except ValueError as exc:
        service.note(f"server_args: {exc}; split at blanks instead", line("server_args"))
        args = raw_args.split()
    if "NAMEINARGS" in flags:
        command = unwrap_command(service, server[0], args, line("server_args"))
    else:
        command = [server[0], *args]
    service.set("command", command, line("server"))
    return True


def _wait(service: Service, attrs: dict[str, Attr], line: _Line) -> None:
    wait = (_words(attrs, "wait") or [""])[0].lower()
    stream = service.keys["socket_type"] == "stream"
    if wait not in ("", "yes", "no"):
        service.note(f"wait = {wait} is neither yes nor no; ignored", line("wait"))
    elif wait == "yes" and stream:
        service.note(
            "wait = yes on a stream service (the program accepts connections itself) has no "
            "equivalent; converted as wait = no: selectd accepts, and runs it per connection",
            line("wait"),
        )
    elif wait == "no" and not stream and service.runs_command:
        service.note(
            "wait = no on a datagram service: selectd runs a datagram program the wait = yes "
            "way (it reads from the socket itself)",
            line("wait"),
        )


def _access(service: Service, attrs: dict[str, Attr]) -> None:
    """only_from -> allow, no_access -> deny. What cannot be converted closes the service
    rather than open it: an allow list that lost entries admits fewer clients, never more."""
    for name, key in (("only_from", "allow"), ("no_access", "deny")):
        if name not in attrs:
            continue
        attr = attrs[name]
        networks: list[str] = []
        for token in [v for v in attr.values if v]:
            found = networks_for(token)
            if found is None:
                service.note(f"{name}: {token!r} is not an address or network; left out", attr.line)
            else:
                networks += [n for n in found if n not in networks]
        if name == "only_from" and not networks:
            why = "admits nobody" if not [v for v in attr.values if v] else "lost every entry"
            service.note(f"only_from {why}: converted with enabled = false", attr.line)
            service.set("enabled", False, attr.line)
        elif name == "no_access" and len(networks) < len([v for v in attr.values if v]):
            service.note(
                "no_access lost entries, which would be let in: converted with enabled = false",
                attr.line,
            )
            service.set("enabled", False, attr.line)
        if networks:
            service.set(key, networks, attr.line)
    _better_match(service, attrs)


def _better_match(service: Service, attrs: dict[str, Attr]) -> None:
    allow = [ipaddress.ip_network(n) for n in service.keys.get("allow", [])]
    deny = [ipaddress.ip_network(n) for n in service.keys.get("deny", [])]
    for a in allow:
        for d in deny:
            if a.version == d.version and a != d and a.subnet_of(d):  # type: ignore[arg-type]
                service.note(
                    f"xinetd admits {a} (the better match, in only_from) though no_access has {d}; "
                    "in selectd deny always wins: it is denied",
                    attrs["only_from"].line,
                )


def _count(service: Service, attr: Attr) -> int | None:
    word = (attr.values or [""])[0]
    if word.upper() == "UNLIMITED":
        return None
    if re.fullmatch(r"[0-9]{1,9}", word) and int(word) >= 1:
        return int(word)
    service.note(f"{attr.name} = {attr.raw} is not a number >= 1 or UNLIMITED; left out", attr.line)
    return None


def _limits(service: Service, attrs: dict[str, Attr], line: _Line) -> None:
    for name in ("instances", "per_source"):
        if name in attrs and (count := _count(service, attrs[name])) is not None:
            service.set(name, count, line(name))
    if "cps" in attrs:
        words = _words(attrs, "cps")
        numbers = [int(w) for w in words if re.fullmatch(r"[0-9]{1,9}", w)]
        if len(words) == 2 and len(numbers) == 2 and numbers[0] >= 1 and 1 <= numbers[1] <= 86400:
            service.set("cps", numbers, line("cps"))
        else:
            service.note(f"cps = {attrs['cps'].raw} is not 'COUNT SECONDS'; left out", line("cps"))
    if words := _words(attrs, "banner_fail"):
        _banner(service, words[0], line("banner_fail"))
    if "access_times" in attrs:
        ranges: list[str] = []
        for word in _words(attrs, "access_times"):
            # xinetd's own manual writes a range to midnight as "12:00-24:00".
            word = re.sub(r"-24:00$", "-23:59", word)
            try:
                ranges += format_time_ranges(time_ranges([word]))
            except Invalid:
                service.note(
                    f"access_times: {word!r} is not HH:MM-HH:MM; left out", line("access_times")
                )
        if ranges:
            service.set("access_times", ranges, line("access_times"))


def _banner(service: Service, path: str, line: int) -> None:
    full = os.path.join(os.path.dirname(service.source), path)
    try:
        with open(full, "rb") as f:
            data = f.read(4097)
    except OSError as exc:
        service.note(f"banner_fail: cannot read {full}: {exc.strerror}; left out", line)
        return
    if len(data) > 4096:
        service.note(f"banner_fail: {full} is longer than 4096 bytes; left out", line)
        return
    try:
        service.set("banner_fail", data.decode("utf-8"), line)
    except UnicodeDecodeError:
        service.note(f"banner_fail: {full} is not UTF-8 text; left out", line)


def _environment(service: Service, attrs: dict[str, Attr], line: _Line) -> None:
    env: dict[str, str] = {}
    for word in _words(attrs, "env"):
        name, equals, value = word.partition("=")
        if not equals or not name:
            service.note(f"env: {word!r} is not NAME=value; left out", line("env"))
        else:
            env[name] = value
    if env:
        service.set("env", env, line("env"))
    if "passenv" in attrs:
        names = _words(attrs, "passenv")
        for bad in [n for n in names if not ENV_NAME.fullmatch(n)]:
            service.note(f"passenv: {bad!r} is not a variable name; left out", line("passenv"))
        service.set("passenv", [n for n in names if ENV_NAME.fullmatch(n)], line("passenv"))


def _rlimits(service: Service, attrs: dict[str, Attr], line: _Line) -> None:
    for name, key, least in (("rlimit_cpu", "rlimit_cpu", 1), ("rlimit_files", "rlimit_nofile", 3)):
        if name not in attrs:
            continue
        word = (_words(attrs, name) or [""])[0]
        if word.upper() == "UNLIMITED":
            service.note(f"{name} = UNLIMITED: the program keeps the daemon's limit", line(name))
        elif re.fullmatch(r"[0-9]{1,9}", word) and int(word) >= least:
            service.set(key, int(word), line(name))
        else:
            service.note(
                f"{name} = {attrs[name].raw} is not a number >= {least}; left out", line(name)
            )
    if "rlimit_as" in attrs:
        word = (_words(attrs, "rlimit_as") or [""])[0]
        size = re.fullmatch(r"([0-9]{1,15})([KkMm]?)", word)
        if word.upper() == "UNLIMITED":
            service.note(
                "rlimit_as = UNLIMITED: the program keeps the daemon's limit", line("rlimit_as")
            )
        elif size is None:
            service.note(f"rlimit_as = {word} is not a size; left out", line("rlimit_as"))
        else:
            number = int(size[1]) << {"": 0, "K": 10, "M": 20}[size[2].upper()]
            if number < MIB:
                service.note(
                    f"rlimit_as = {word} is below selectd's least, 1 MiB; left out",
                    line("rlimit_as"),
                )
            else:
                service.set("rlimit_as", format_bytes(number), line("rlimit_as"))
