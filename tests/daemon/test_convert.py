"""`selectd convert`: xinetd and inetd configs to selectd TOML, every note kept, output checked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import parse_config
from daemon.convert import Conversion, convert
from daemon.convert_service import ConvertError, networks_for, printable
from tests.conftest import REPO, daemon_section, echo_roundtrip, free_port

CORPUS = Path(__file__).resolve().parent / "corpus"
XINETD_CONF = CORPUS / "xinetd" / "xinetd.conf"
INETD_CONF = CORPUS / "inetd" / "inetd.conf"

REAL_GETSERVBYNAME = socket.getservbyname
# What /etc/services says, for the names the tests use: conversions do not depend on the machine.
SERVICES = {
    "echo": 7,
    "discard": 9,
    "daytime": 13,
    "chargen": 19,
    "ftp": 21,
    "telnet": 23,
    "time": 37,
    "tftp": 69,
    "finger": 79,
    "ident": 113,
    "tcpmux": 1,
}


@pytest.fixture(autouse=True)
def fixed_services(monkeypatch: pytest.MonkeyPatch) -> None:
    def getservbyname(name: str, protocol: str = "tcp") -> int:
        if name in SERVICES:
            return SERVICES[name]
        raise OSError("service/proto not found")

    monkeypatch.setattr(socket, "getservbyname", getservbyname)


def xinetd(tmp_path: Path, text: str, **files: str) -> Conversion:
    """Convert an xinetd.conf of `text`, with `files` (name -> text) beside it."""
    for name, body in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    conf = tmp_path / "xinetd.conf"
    conf.write_text(text)
    return convert("xinetd", [str(conf)])


def service(body: str, name: str = "svc") -> str:
    """An xinetd service entry: `body` is its attribute lines."""
    return f"service {name}\n{{\n{body}\n}}\n"


EXEC = "socket_type = stream\nwait = no\nserver = /usr/bin/prog\nport = 4000\n"


def inetd(tmp_path: Path, text: str) -> Conversion:
    conf = tmp_path / "inetd.conf"
    conf.write_text(text)
    return convert("inetd", [str(conf)])


def servers(conversion: Conversion) -> dict[str, dict[str, Any]]:
    return tomllib.loads(conversion.text).get("servers", {})


def only(conversion: Conversion) -> dict[str, Any]:
    (table,) = servers(conversion).values()
    return table


def texts(conversion: Conversion) -> list[str]:
    return [note.text for note in conversion.notes]


def has_note(conversion: Conversion, fragment: str) -> bool:
    return any(fragment in text for text in texts(conversion))


# -- xinetd: the file format -------------------------------------------------------------------


def test_includedir_reads_files_in_byte_order_and_skips_dots_and_tildes(tmp_path: Path) -> None:
    entry = "type = INTERNAL\nsocket_type = stream\nport = {}\n"
    result = xinetd(
        tmp_path,
        "includedir conf.d\n",
        **{
            "conf.d/time": service(entry.format(37), "time"),
            "conf.d/Echo": service(entry.format(7), "echo"),
            "conf.d/daytime": service(entry.format(13), "daytime"),
            "conf.d/broken.dpkg-old": "garbage {",
            "conf.d/broken~": "garbage {",
            "conf.d/sub/chargen": service(entry.format(19), "chargen"),  # a directory: skipped
        },
    )
    assert list(servers(result)) == ["echo", "daytime", "time"]  # "E" sorts before "d"
    parse_config(result.text)


def test_include_is_relative_to_the_including_file(tmp_path: Path) -> None:
    result = xinetd(
        tmp_path,
        "include sub/more.conf\n",
        **{
            "sub/more.conf": "include deeper\n" + service(EXEC, "a"),
            "sub/deeper": service(EXEC.replace("4000", "4001"), "b"),
        },
    )
    assert list(servers(result)) == ["b", "a"]


def test_an_include_cycle_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"includes itself"):
        xinetd(tmp_path, "include other\n", other="include ../" + tmp_path.name + "/xinetd.conf\n")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (service("socket_type = stream").rstrip("}\n"), 1, "service svc: no closing '}'"),
        ("defaults\n{\ninstances = 1\n", 1, "defaults: no closing '}'"),
        ("}\n", 1, "expected 'service NAME', 'defaults', 'include FILE' or 'includedir DIR'"),
        ("service a\nsocket_type = stream\n}\n", 2, "expected '{' to open service a"),
        ("service a\n{\nsocket_type stream\n}\n", 3, "service a: expected 'attribute = value'"),
        ("service a\n{\n{\n}\n", 3, "service a: expected 'attribute = value' or '}'"),
        ("service a b c\n{\n}\n", 1, "expected 'service NAME'"),
        ("\x00\x01 binary junk\n", 1, "expected 'service NAME'"),
        ("includedir nowhere\n", 1, "includedir"),
    ],
)
def test_xinetd_syntax_errors_name_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    with pytest.raises(ConvertError) as info:
        xinetd(tmp_path, text)
    assert str(info.value).startswith(f"{tmp_path}/xinetd.conf:{line}: "), info.value
    assert message in str(info.value)


def test_unreadable_and_undecodable_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"missing\.conf: cannot read: No such file"):
        convert("xinetd", [str(tmp_path / "missing.conf")])
    with pytest.raises(ConvertError, match=r"cannot read: Is a directory"):
        convert("inetd", [str(tmp_path)])
    (tmp_path / "latin1").write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(ConvertError, match=r"latin1:2: cannot read: not UTF-8 text"):
        convert("xinetd", [str(tmp_path / "latin1")])
    with pytest.raises(ConvertError, match=r"other: cannot read"):
        xinetd(tmp_path, "include other\n")


def test_braces_on_the_header_line_and_trailing_blanks_are_accepted(tmp_path: Path) -> None:
    text = "defaults {\n  instances = 4\n}   \nservice a {\n" + EXEC + "}\t\n"
    assert only(xinetd(tmp_path, text))["instances"] == 4


# -- xinetd: defaults and operators ------------------------------------------------------------


def test_defaults_are_inherited_unless_the_service_sets_them(tmp_path: Path) -> None:
    defaults = (
        "defaults\n{\ninstances = 50\nper_source = 5\ncps = 10 20\nbind = 127.0.0.1\n"
        "only_from = 10.0.0.0\nonly_from = 192.168.0.0/16\n}\n"
    )
    result = xinetd(
        tmp_path,
        defaults
        + service(EXEC, "plain")
        + service(EXEC.replace("4000", "4001") + "instances = 3\nper_source = UNLIMITED", "own"),
    )
    plain, own = servers(result)["plain"], servers(result)["own"]
    assert (plain["instances"], plain["per_source"], plain["cps"]) == (50, 5, [10, 20])
    assert plain["listen"] == "127.0.0.1:4000"
    assert plain["allow"] == ["10.0.0.0/8", "192.168.0.0/16"]  # '=' in defaults accumulates
    assert (own["instances"], "per_source" in own) == (3, False)


def test_set_operators_add_to_and_remove_from_the_defaults(tmp_path: Path) -> None:
    defaults = "defaults\n{\nonly_from = 10.0.0.0 172.16.0.0\n}\n"
    result = xinetd(
        tmp_path,
        defaults
        + service(EXEC + "only_from += 192.168.1.0", "add")
        + service(EXEC.replace("4000", "4001") + "only_from -= 10.0.0.0", "remove")
        + service(EXEC.replace("4000", "4002") + "only_from = 127.0.0.1", "replace"),
    )
    got = {name: table["allow"] for name, table in servers(result).items()}
    assert got == {
        "add": ["10.0.0.0/8", "172.16.0.0/16", "192.168.1.0/24"],
        "remove": ["172.16.0.0/16"],
        "replace": ["127.0.0.1/32"],
    }
    # The general notes only (environment, cps, TCP wrappers, stream timeouts): none per service.
    assert all(note.line == 1 for note in result.notes), result.notes


def test_disable_and_the_defaults_enabled_and_disabled_lists(tmp_path: Path) -> None:
    entry = "type = INTERNAL\nsocket_type = stream\nid = {id}\nport = {port}\n"
    result = xinetd(
        tmp_path,
        "defaults\n{\ndisabled = time-stream\nenabled = echo-stream time-stream\n}\n"
        + service(entry.format(id="echo-stream", port=7), "echo")
        + service(entry.format(id="time-stream", port=37), "time")
        + service(entry.format(id="daytime-stream", port=13), "daytime")
        + service(entry.format(id="chargen", port=19) + "disable = yes", "chargen")
        + service(entry.format(id="discard", port=9) + "flags = DISABLE", "discard"),
    )
    enabled = {name: table.get("enabled", True) for name, table in servers(result).items()}
    assert enabled == {
        "echo": True,
        "time": False,  # in disabled
        "daytime": False,  # not in enabled
        "chargen": False,
        "discard": False,
    }


def test_defaults_without_an_equivalent_are_noted_once(tmp_path: Path) -> None:
    result = xinetd(
        tmp_path,
        "defaults\n{\nlog_type = SYSLOG daemon info\numask = 002\ngroups = yes\n}\n"
        + service(EXEC, "a")
        + service(EXEC.replace("4000", "4001"), "b"),
    )
    defaults = [str(n) for n in result.notes if n.service == "defaults"]
    assert defaults == [
        f"{tmp_path}/xinetd.conf:3: defaults: log_type = SYSLOG daemon info has no equivalent "
        "(selectd writes its own structured log)",
        f"{tmp_path}/xinetd.conf:4: defaults: umask = 002 has no equivalent "
        "(selectd does not set a program's umask)",
        f"{tmp_path}/xinetd.conf:5: defaults: groups = yes has no equivalent "
        "(selectd does not set supplementary groups)",
    ]
    assert not [n for n in result.notes if n.service.startswith("service")]


# -- xinetd: what a service runs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ident", "socket_type", "builtin"),
    [
        ("echo", "echo-stream", "stream", "echo"),
        ("echo", "echo-dgram", "dgram", "echo"),
        ("discard", None, "stream", "discard"),
        ("chargen", "chargen-dgram", "dgram", "chargen"),
        ("daytime", "daytime-stream", "stream", "daytime"),
        ("my-time", "time-dgram", "dgram", "time"),
    ],
)
def test_internal_services_become_built_ins(
    tmp_path: Path, name: str, ident: str | None, socket_type: str, builtin: str
) -> None:
    body = f"type = INTERNAL\nsocket_type = {socket_type}\nwait = no\nport = 7000"
    if ident:
        body += f"\nid = {ident}"
    table = only(xinetd(tmp_path, service(body, name)))
    assert (table["handler"], table["socket_type"]) == (builtin, socket_type)
    assert "command" not in table


def test_an_internal_service_selectd_lacks_is_skipped(tmp_path: Path) -> None:
    body = "type = INTERNAL UNLISTED\nsocket_type = stream\nport = 9099\nonly_from = 127.0.0.1"
    result = xinetd(tmp_path, service(body, "servers"))
    assert servers(result) == {}
    assert has_note(result, "the internal service 'servers' has no built-in equivalent")


def test_server_and_server_args_become_the_command(tmp_path: Path) -> None:
    body = EXEC + "server_args = -s /srv/tftp --label 'two words' \"x y\""
    assert only(xinetd(tmp_path, service(body)))["command"] == [
        "/usr/bin/prog",
        "-s",
        "/srv/tftp",
        "--label",
        "two words",
        "x y",
    ]
    unbalanced = only(xinetd(tmp_path, service(EXEC + "server_args = -a 'open")))
    assert unbalanced["command"] == ["/usr/bin/prog", "-a", "'open"]


def test_server_args_that_do_not_split_are_noted(tmp_path: Path) -> None:
    result = xinetd(tmp_path, service(EXEC + "server_args = -a 'open"))
    assert has_note(result, "server_args: No closing quotation; split at blanks instead")


def test_nameinargs_takes_argv0_from_server_args_and_unwraps_tcpd(tmp_path: Path) -> None:
    tcpd = EXEC.replace("/usr/bin/prog", "/usr/sbin/tcpd") + "flags = NAMEINARGS\n"
    result = xinetd(tmp_path, service(tcpd + "server_args = in.ftpd -l"))
    assert only(result)["command"] == ["/usr/sbin/in.ftpd", "-l"]
    assert has_note(result, "tcpd (TCP wrappers) is left out: /usr/sbin/in.ftpd runs directly")
    renamed = xinetd(tmp_path, service(EXEC + "flags = NAMEINARGS\nserver_args = other -v"))
    assert only(renamed)["command"] == ["/usr/bin/prog", "-v"]
    assert has_note(renamed, "argv[0] 'other' is not kept")


def test_internal_services_ignore_server_and_drop_user(tmp_path: Path) -> None:
    body = "type = INTERNAL\nid = echo-stream\nsocket_type = stream\nuser = root\n"
    body += "server = /bin/x\nrlimit_cpu = 5\nenv = A=b\nport = 7"
    result = xinetd(tmp_path, service(body, "echo"))
    table = only(result)
    assert table["handler"] == "echo"
    assert {"user", "rlimit_cpu", "env", "command"}.isdisjoint(table)
    for fragment in (
        "server has no effect on an internal service",
        'user = "root" dropped: a built-in service runs inside selectd',
        "rlimit_cpu = 5 dropped",
        'env = {"A": "b"} dropped',
    ):
        assert has_note(result, fragment), texts(result)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("socket_type = stream\nprotocol = tcp", ("stream", "0.0.0.0:4000")),
        ("socket_type = dgram\nprotocol = udp", ("dgram", "0.0.0.0:4000")),
        ("protocol = udp", ("dgram", "0.0.0.0:4000")),
        ("protocol = TCP", ("stream", "0.0.0.0:4000")),
        ("socket_type = stream\nflags = IPv6", ("stream", "[::]:4000")),
        ("socket_type = stream\nflags = IPv4 REUSE NOLIBWRAP", ("stream", "0.0.0.0:4000")),
        ("socket_type = stream\nbind = 10.1.2.3", ("stream", "10.1.2.3:4000")),
        ("socket_type = stream\ninterface = 10.1.2.3", ("stream", "10.1.2.3:4000")),
        ("socket_type = stream\nbind = ::1", ("stream", "[::1]:4000")),
        ("socket_type = stream\nbind = localhost", ("stream", "127.0.0.1:4000")),
        ("socket_type = stream\nbind = localhost\nflags = IPv6", ("stream", "[::1]:4000")),
    ],
)
def test_socket_type_protocol_bind_and_flags_give_the_listen(
    tmp_path: Path, body: str, expected: tuple[str, str]
) -> None:
    result = xinetd(tmp_path, service(body + "\nserver = /bin/x\nport = 4000"))
    table = only(result)
    assert (table["socket_type"], table["listen"]) == expected
    assert not [n for n in result.notes if n.service.startswith("service")], texts(result)


def test_the_port_comes_from_services_when_not_given(tmp_path: Path) -> None:
    body = "type = INTERNAL\nsocket_type = {}\nid = {}"
    result = xinetd(
        tmp_path,
        service(body.format("stream", "echo-stream"), "echo")
        + service(body.format("dgram", "daytime-dgram"), "daytime"),
    )
    assert [t["listen"] for t in servers(result).values()] == ["0.0.0.0:7", "0.0.0.0:13"]


@pytest.mark.parametrize(
    ("body", "note"),
    [
        ("socket_type = stream\nserver = /bin/x", "no port, and /etc/services has no tcp port"),
        ("socket_type = stream\nserver = /bin/x\nport = 70000", "port = 70000 is not a port"),
        ("socket_type = stream\nserver = /bin/x\nport = http", "port = http is not a port"),
        ("socket_type = raw\nserver = /bin/x\nport = 1", "socket_type = raw is not supported"),
        ("socket_type = seqpacket\nport = 1", "socket_type = seqpacket is not supported"),
        ("server = /bin/x\nport = 1", "no socket_type is not supported"),
        ("socket_type = stream\nprotocol = udp\nport = 1", "protocol = udp with socket_type"),
        ("socket_type = stream\nprotocol = sctp\nport = 1", "protocol = sctp with socket_type"),
        ("socket_type = stream\nport = 1", "it has no server (the program to run)"),
        ("socket_type = stream\nport = 1\nredirect = 10.0.0.1 23", "redirect has no equivalent"),
        ("type = RPC\nsocket_type = dgram\nrpc_version = 2-4", "RPC services are not supported"),
        ("socket_type = dgram\nrpc_number = 100001", "RPC services are not supported"),
        ("type = TCPMUX\nsocket_type = stream", "TCPMUX services are not supported"),
        ("flags = SENSOR\nsocket_type = stream\nport = 1", "the SENSOR flag has no equivalent"),
    ],
)
def test_services_that_cannot_be_converted_are_skipped_with_a_note(
    tmp_path: Path, body: str, note: str
) -> None:
    result = xinetd(tmp_path, service(body, "unknown-name"))
    assert servers(result) == {}
    (mine,) = [n for n in result.notes if n.service == "service unknown-name"]
    assert note in mine.text and mine.text.endswith("; not converted"), mine


def test_a_bind_host_name_is_resolved_with_a_note_or_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def getaddrinfo(host: str, *args: Any) -> list[Any]:
        if host == "db.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", 0))]
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    result = xinetd(tmp_path, service(EXEC + "bind = db.example"))
    assert only(result)["listen"] == "10.9.8.7:4000"
    assert has_note(result, "'db.example' resolved to 10.9.8.7 now")
    gone = xinetd(tmp_path, service(EXEC + "bind = nowhere.example"))
    assert servers(gone) == {} and has_note(gone, "the address 'nowhere.example' does not resolve")


@pytest.mark.parametrize(
    ("body", "note"),
    [
        ("socket_type = stream\nwait = yes", "wait = yes on a stream service"),
        ("socket_type = dgram\nwait = no", "wait = no on a datagram service"),
        ("socket_type = stream\nwait = maybe", "wait = maybe is neither yes nor no"),
    ],
)
def test_wait_modes_selectd_does_otherwise_are_noted(tmp_path: Path, body: str, note: str) -> None:
    result = xinetd(tmp_path, service(body + "\nserver = /bin/x\nport = 4000"))
    assert only(result)["command"] == ["/bin/x"]
    assert has_note(result, note), texts(result)


def test_wait_modes_selectd_does_the_same_are_not_noted(tmp_path: Path) -> None:
    result = xinetd(
        tmp_path,
        service("socket_type = dgram\nwait = yes\nserver = /bin/x\nport = 69", "a")
        + service("socket_type = stream\nwait = no\nserver = /bin/x\nport = 70", "b"),
    )
    assert len(servers(result)) == 2
    assert not [n for n in result.notes if n.service.startswith("service")]


def test_user_group_and_the_exec_keys_of_a_program(tmp_path: Path) -> None:
    body = EXEC + (
        "user = ftp\ngroup = ftp\nenv = TZ=UTC EMPTY= A=b=c\nenv += LANG=C\npassenv = PATH HOME\n"
        "rlimit_as = 8M\nrlimit_cpu = 20\nrlimit_files = 64"
    )
    result = xinetd(tmp_path, service(body))
    table = only(result)
    assert (table["user"], table["group"]) == ("ftp", "ftp")
    assert table["env"] == {"TZ": "UTC", "EMPTY": "", "A": "b=c", "LANG": "C"}
    assert table["passenv"] == ["PATH", "HOME"]
    assert (table["rlimit_as"], table["rlimit_cpu"], table["rlimit_nofile"]) == ("8MiB", 20, 64)
    assert not [n for n in result.notes if n.service.startswith("service")], texts(result)


@pytest.mark.parametrize(
    ("line", "note"),
    [
        ("env = NOVALUE", "env: 'NOVALUE' is not NAME=value"),
        ("env = =x", "env: '=x' is not NAME=value"),
        ("passenv = PATH 1BAD", "passenv: '1BAD' is not a variable name"),
        ("rlimit_as = 512K", "rlimit_as = 512K is below selectd's least, 1 MiB"),
        ("rlimit_as = lots", "rlimit_as = lots is not a size"),
        ("rlimit_as = UNLIMITED", "rlimit_as = UNLIMITED: the program keeps the daemon's limit"),
        ("rlimit_cpu = UNLIMITED", "rlimit_cpu = UNLIMITED: the program keeps"),
        ("rlimit_cpu = 0", "rlimit_cpu = 0 is not a number >= 1"),
        ("rlimit_files = 2", "rlimit_files = 2 is not a number >= 3"),
        ("rlimit_stack = 8M", "rlimit_stack = 8M has no equivalent (only rlimit_as, rlimit_cpu"),
        ("rlimit_data = 8M", "rlimit_data = 8M has no equivalent"),
        ("rlimit_rss = 8M", "rlimit_rss = 8M has no equivalent"),
        ("instances = -1", "instances = -1 is not a number >= 1 or UNLIMITED"),
        ("per_source = many", "per_source = many is not a number >= 1 or UNLIMITED"),
        ("cps = 10", "cps = 10 is not 'COUNT SECONDS'"),
        ("cps = 0 10", "cps = 0 10 is not 'COUNT SECONDS'"),
        ("cps = 10 86401", "cps = 10 86401 is not 'COUNT SECONDS'"),
        ("access_times = 8-17", "access_times: '8-17' is not HH:MM-HH:MM"),
        ("access_times = 25:00-26:00", "access_times: '25:00-26:00' is not HH:MM-HH:MM"),
        ("nice = 10", "nice = 10 has no equivalent (selectd does not change a program's priority)"),
        ("log_type = FILE /var/log/x", "log_type = FILE /var/log/x has no equivalent"),
        ("log_on_success += DURATION", "log_on_success += DURATION has no equivalent"),
        ("log_on_failure = HOST", "log_on_failure = HOST has no equivalent"),
        ("umask = 022", "umask = 022 has no equivalent"),
        ("groups = yes", "groups = yes has no equivalent"),
        ("mdns = yes", "mdns = yes has no equivalent"),
        ("deny_time = 60", "deny_time = 60 has no equivalent"),
        ("max_load = 2.5", "max_load = 2.5 has no equivalent"),
        ("banner = /etc/issue", "banner = /etc/issue has no equivalent"),
        ("banner_success = /etc/motd", "banner_success = /etc/motd has no equivalent"),
        ("libwrap = in.x", "libwrap = in.x has no equivalent"),
        ("v6only = yes", "v6only = yes has no equivalent"),
        ("redirect = 10.0.0.1 23", "redirect = 10.0.0.1 23 has no equivalent"),
        ("frobnicate = 1", "frobnicate = 1 has no equivalent (not an xinetd attribute"),
        ("flags = KEEPALIVE NODELAY", "flag KEEPALIVE has no equivalent"),
        ("flags = INTERCEPT", "flag INTERCEPT has no equivalent"),
        ("type = UNLISTED SPECIAL", "type SPECIAL is not an xinetd type"),
    ],
)
def test_attributes_without_an_equivalent_are_noted_and_the_rest_converted(
    tmp_path: Path, line: str, note: str
) -> None:
    result = xinetd(tmp_path, service(EXEC + line))
    assert only(result)["command"] == ["/usr/bin/prog"]
    mine = [n for n in result.notes if n.service == "service svc"]
    assert any(note in n.text for n in mine), [n.text for n in mine]
    assert all(n.line == 7 for n in mine), mine  # the attribute's own line
    parse_config(result.text)


def test_limits_carry_over(tmp_path: Path) -> None:
    body = EXEC + (
        "instances = 10\nper_source = 3\ncps = 25 30\n"
        "access_times = 2:00-9:00 12:00-24:00 22:00-06:00"
    )
    table = only(xinetd(tmp_path, service(body)))
    assert (table["instances"], table["per_source"], table["cps"]) == (10, 3, [25, 30])
    assert table["access_times"] == ["02:00-09:00", "12:00-23:59", "22:00-06:00"]
    unlimited = only(xinetd(tmp_path, service(EXEC + "instances = UNLIMITED\nper_source = 0")))
    assert "instances" not in unlimited and "per_source" not in unlimited


def test_banner_fail_is_the_text_of_the_file_it_names(tmp_path: Path) -> None:
    (tmp_path / "deny.txt").write_bytes(b"go away\r\n")
    table = only(xinetd(tmp_path, service(EXEC + f"banner_fail = {tmp_path}/deny.txt")))
    assert table["banner_fail"] == "go away\r\n"
    relative = only(xinetd(tmp_path, service(EXEC + "banner_fail = deny.txt")))
    assert relative["banner_fail"] == "go away\r\n"
    (tmp_path / "big").write_bytes(b"x" * 4097)
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    for value, note in [
        ("missing.txt", "banner_fail: cannot read"),
        ("big", "is longer than 4096 bytes"),
        ("binary", "is not UTF-8 text"),
    ]:
        result = xinetd(tmp_path, service(EXEC + f"banner_fail = {value}"))
        assert "banner_fail" not in only(result) and has_note(result, note), texts(result)
    dgram = xinetd(tmp_path, service(EXEC.replace("stream", "dgram") + "banner_fail = deny.txt"))
    assert "banner_fail" not in only(dgram)
    assert has_note(dgram, 'banner_fail = "go away\\r\\n" dropped: a datagram service has no')


# -- access control ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "networks"),
    [
        ("10.1.2.3", ["10.1.2.3/32"]),
        ("10.0.0.*", ["10.0.0.0/24"]),
        ("10.*", ["10.0.0.0/8"]),
        ("*.*.*.*", ["0.0.0.0/0"]),
        ("128.138.12.0", ["128.138.12.0/24"]),  # trailing zeros are wildcards
        ("10.0.0.0", ["10.0.0.0/8"]),
        ("0.0.0.0", ["0.0.0.0/0"]),
        ("10.1", ["10.1.0.0/16"]),
        ("128.138.{10,11}", ["128.138.10.0/24", "128.138.11.0/24"]),
        ("1.2.3.{4,5}", ["1.2.3.4/32", "1.2.3.5/32"]),
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("10.0.0.1/8", ["10.0.0.0/8"]),
        ("::1", ["::1/128"]),
        ("2001:db8::/32", ["2001:db8::/32"]),
        ("localhost", ["127.0.0.1/32", "::1/128"]),
        ("host.example.com", None),
        (".example.com", None),
        ("300.1.1.1", None),
        ("10.*.0.1", None),
        ("1.2.{3,x}", None),
        ("::zz", None),
    ],
)
def test_xinetd_address_forms(token: str, networks: list[str] | None) -> None:
    assert networks_for(token) == networks


def test_only_from_and_no_access_become_allow_and_deny(tmp_path: Path) -> None:
    body = EXEC + "only_from = 10.0.0.* 127.0.0.1 ::1 .example.com\nno_access = 10.0.0.13"
    result = xinetd(tmp_path, service(body))
    table = only(result)
    assert table["allow"] == ["10.0.0.0/24", "127.0.0.1/32", "::1/128"]
    assert table["deny"] == ["10.0.0.13/32"]
    assert table.get("enabled", True) is True
    assert has_note(result, "only_from: '.example.com' is not an address or network; left out")


@pytest.mark.parametrize(
    ("line", "note"),
    [
        ("only_from =", "only_from admits nobody: converted with enabled = false"),
        ("only_from = gateway.example", "only_from lost every entry: converted with enabled"),
        ("no_access = evil.example 10.0.0.1", "no_access lost entries, which would be let in"),
    ],
)
def test_access_rules_that_do_not_convert_disable_the_service(
    tmp_path: Path, line: str, note: str
) -> None:
    result = xinetd(tmp_path, service(EXEC + line))
    assert only(result)["enabled"] is False
    assert has_note(result, note), texts(result)


def test_a_more_specific_only_from_entry_is_noted(tmp_path: Path) -> None:
    result = xinetd(tmp_path, service(EXEC + "only_from = 10.1.1.1\nno_access = 10.1.0.0"))
    table = only(result)
    assert (table["allow"], table["deny"]) == (["10.1.1.1/32"], ["10.1.0.0/16"])
    assert has_note(result, "xinetd admits 10.1.1.1/32 (the better match, in only_from)")


# -- names and addresses -----------------------------------------------------------------------


def test_services_sharing_a_name_get_the_protocol_added(tmp_path: Path) -> None:
    body = "type = INTERNAL\nsocket_type = {}\nid = echo-{}\nport = 7{}"
    result = xinetd(
        tmp_path,
        service(body.format("stream", "stream", ""), "echo")
        + service(body.format("dgram", "dgram", ""), "echo")
        + service(body.format("stream", "stream", "\nflags = IPv6"), "echo")
        + service(EXEC.replace("4000", "4001"), "svc")
        + service(EXEC.replace("4000", "4002"), "svc"),
    )
    assert list(servers(result)) == ["echo-tcp", "echo-udp", "echo-tcp6", "svc-tcp", "svc-tcp-2"]


def test_unsafe_names_are_made_safe(tmp_path: Path) -> None:
    result = xinetd(tmp_path, service(EXEC, "my/odd+name:1"))
    assert list(servers(result)) == ["my-odd-name-1"]


def test_a_second_service_on_one_address_is_skipped(tmp_path: Path) -> None:
    echo = "type = INTERNAL\nsocket_type = dgram\nid = echo-dgram\nport = 7"
    result = xinetd(tmp_path, service(echo, "echo") + service(echo, "echo"))
    assert list(servers(result)) == ["echo"]
    assert has_note(result, "0.0.0.0:7 (dgram) is taken already by service echo")


# -- inetd -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("echo stream tcp nowait root internal", {"handler": "echo", "listen": "0.0.0.0:7"}),
        (
            "echo dgram udp wait root internal",
            {"handler": "echo", "socket_type": "dgram", "listen": "0.0.0.0:7"},
        ),
        ("daytime stream tcp6 nowait root internal", {"listen": "[::]:13"}),
        ("daytime stream tcp4 nowait root internal", {"listen": "0.0.0.0:13"}),
        ("time dgram udp6 wait root internal", {"listen": "[::]:37", "handler": "time"}),
        ("127.0.0.1:echo stream tcp nowait root internal", {"listen": "127.0.0.1:7"}),
        ("[::1]:echo stream tcp6 nowait root internal", {"listen": "[::1]:7"}),
        ("*:echo stream tcp nowait root internal", {"listen": "0.0.0.0:7"}),
        (
            "4000 stream tcp nowait nobody /usr/bin/prog prog -v",
            {"command": ["/usr/bin/prog", "-v"], "user": "nobody", "listen": "0.0.0.0:4000"},
        ),
        (
            "4000 stream tcp nowait nobody.nogroup /usr/bin/prog prog",
            {"user": "nobody", "group": "nogroup"},
        ),
        ("4000 stream tcp nowait nobody:nogroup /usr/bin/prog prog", {"group": "nogroup"}),
        ("4000 stream tcp nowait nobody /usr/bin/prog", {"command": ["/usr/bin/prog"]}),
        (
            "/run/prog.sock stream unix nowait nobody /usr/bin/prog prog",
            {"listen": "unix:/run/prog.sock"},
        ),
        (
            "tftp dgram udp wait nobody /usr/sbin/in.tftpd in.tftpd -s /srv/tftp",
            {"command": ["/usr/sbin/in.tftpd", "-s", "/srv/tftp"], "listen": "0.0.0.0:69"},
        ),
    ],
)
def test_inetd_lines(tmp_path: Path, line: str, expected: dict[str, Any]) -> None:
    result = inetd(tmp_path, f"# a comment\n\n{line}\n")
    table = only(result)
    assert {key: table.get(key) for key in expected} == expected
    assert "user" not in table or "command" in table


def test_inetd_address_lines_set_the_address_of_the_lines_after_them(tmp_path: Path) -> None:
    result = inetd(
        tmp_path,
        "127.0.0.1:\necho stream tcp nowait root internal\n"
        "*:\ndaytime stream tcp nowait root internal\n",
    )
    assert [t["listen"] for t in servers(result).values()] == ["127.0.0.1:7", "0.0.0.0:13"]


@pytest.mark.parametrize(
    ("line", "command", "note"),
    [
        (
            "telnet stream tcp nowait telnetd /usr/sbin/tcpd /usr/sbin/in.telnetd",
            ["/usr/sbin/in.telnetd"],
            "tcpd (TCP wrappers) is left out: /usr/sbin/in.telnetd runs directly",
        ),
        (
            "ftp stream tcp nowait root /usr/sbin/tcpd in.ftpd -l",
            ["/usr/sbin/in.ftpd", "-l"],
            "/etc/hosts.allow and /etc/hosts.deny no longer apply",
        ),
        (
            "4000 stream tcp nowait root /usr/bin/rsync rsyncd --daemon",
            ["/usr/bin/rsync", "--daemon"],
            "argv[0] 'rsyncd' is not kept: selectd runs /usr/bin/rsync",
        ),
        (
            "ident stream tcp wait identd /usr/sbin/identd identd",
            ["/usr/sbin/identd"],
            "wait on a stream service (the program accepts connections itself) has no equivalent",
        ),
        (
            "4000 dgram udp nowait root /usr/bin/prog prog",
            ["/usr/bin/prog"],
            "nowait on a datagram service",
        ),
        (
            "finger stream tcp nowait.120 nobody /usr/sbin/in.fingerd in.fingerd",
            ["/usr/sbin/in.fingerd"],
            ".120 (at most 120 starts a minute) has no exact equivalent; converted as cps = [2,",
        ),
        (
            "4000 stream tcp46 nowait root /usr/bin/prog prog",
            ["/usr/bin/prog"],
            "tcp46: listens on [::], which takes IPv4 too",
        ),
    ],
)
def test_inetd_notes(tmp_path: Path, line: str, command: list[str], note: str) -> None:
    result = inetd(tmp_path, line + "\n")
    assert only(result)["command"] == command
    assert has_note(result, note), texts(result)
    assert all(n.line == 1 for n in result.notes if n.service != "inetd")


@pytest.mark.parametrize(
    ("wait", "cps"),
    [("wait.30", [1, 60]), ("nowait.59", [1, 60]), ("nowait.60", [1, 60]), ("wait.600", [10, 60])],
)
def test_inetd_wait_max_becomes_cps(tmp_path: Path, wait: str, cps: list[int]) -> None:
    table = only(inetd(tmp_path, f"tftp dgram udp {wait} nobody /usr/sbin/in.tftpd in.tftpd\n"))
    assert table["cps"] == cps


@pytest.mark.parametrize(
    ("line", "note"),
    [
        ("rstatd/1-3 dgram rpc/udp wait root /usr/sbin/rpc.rstatd rpc.rstatd", "RPC services"),
        ("rstatd/1-3 dgram rpc/udp", "RPC services are not supported"),
        ("tcpmux/+hello stream tcp nowait root /bin/hello hello", "TCPMUX services"),
        ("echo raw tcp nowait root internal", "socket type raw is not supported"),
        ("echo stream udp nowait root internal", "protocol udp with socket type stream"),
        ("echo stream ddp nowait root internal", "protocol ddp with socket type stream"),
        ("nosuchservice stream tcp nowait root /bin/x x", "/etc/services has no tcp port"),
        ("tcpmux stream tcp nowait root internal", "the internal service 'tcpmux' has no built-in"),
        ("4000 stream tcp sometimes root /bin/x x", "'sometimes' is not wait or nowait"),
        ("relative.sock stream unix nowait root /bin/x x", "is not an absolute path"),
    ],
)
def test_inetd_lines_that_cannot_be_converted(tmp_path: Path, line: str, note: str) -> None:
    result = inetd(tmp_path, line + "\n")
    assert servers(result) == {}
    assert has_note(result, note), texts(result)
    assert has_note(result, "; not converted")


@pytest.mark.parametrize(
    "text",
    ["echo stream tcp nowait root\n", "garbage\n", "echo\n", "\x00\xff\n"],
)
def test_inetd_lines_with_too_few_fields_are_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConvertError, match=rf"^{tmp_path}/inetd.conf:1: expected 'SERVICE"):
        inetd(tmp_path, text)


# -- the corpus --------------------------------------------------------------------------------

XINETD_FILES = sorted(
    p
    for p in (CORPUS / "xinetd" / "xinetd.d").iterdir()
    if "." not in p.name and not p.name.endswith("~")
)


@pytest.mark.parametrize(
    ("source_format", "path"),
    [("xinetd", XINETD_CONF), ("inetd", INETD_CONF)] + [("xinetd", p) for p in XINETD_FILES],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_every_corpus_file_converts_to_a_config_that_passes_check(
    source_format: str, path: Path
) -> None:
    result = convert(source_format, [str(path)])
    config = parse_config(result.text)
    assert result.text.startswith(f"# selectd config converted from {source_format}")
    skipped = [n for n in result.notes if n.text.endswith("; not converted")]
    assert len(config.servers) + len(skipped) >= 1
    # Every note is in the text, as a comment.
    for note in result.notes:
        assert f"# NOTE {note}\n" in result.text


def test_the_xinetd_corpus_converts_as_expected() -> None:
    result = convert("xinetd", [str(XINETD_CONF)])
    got = servers(result)
    assert list(got) == [
        "chargen-tcp",
        "chargen-udp",
        "cvspserver",
        "daytime-tcp",
        "daytime-udp",
        "discard-tcp",
        "discard-udp",
        "echo-tcp",
        "echo-udp",
        "rsync",
        "telnet",
        "tftp",
        "time-tcp",
        "time-udp",
    ]
    assert got["echo-tcp"] == {
        "listen": "0.0.0.0:7",
        "socket_type": "stream",
        "handler": "echo",
        "enabled": False,
        "instances": 60,
        "per_source": 10,
    }
    assert got["tftp"] == {
        "listen": "0.0.0.0:69",
        "socket_type": "dgram",
        "command": ["/usr/sbin/in.tftpd", "-s", "/srv/tftp"],
        "instances": 60,
        "per_source": 11,
        "cps": [100, 2],
        "user": "root",
    }
    assert got["rsync"]["listen"] == "[::]:873"
    assert got["rsync"]["command"] == ["/usr/bin/rsync", "--daemon"]
    assert got["cvspserver"]["env"] == {"HOME": "/var/lib/cvs"}
    assert got["cvspserver"]["listen"] == "127.0.0.1:2401"
    telnet = got["telnet"]
    assert telnet["command"] == ["/usr/sbin/in.telnetd", "-h", "-L", "/usr/local/bin/login wrapper"]
    assert telnet["allow"] == [
        "10.0.0.0/24",
        "192.168.1.0/24",
        "127.0.0.1/32",
        "172.16.4.0/24",
        "172.16.5.0/24",
    ]
    assert telnet["deny"] == ["10.0.0.13/32"]
    assert (telnet["instances"], "per_source" in telnet, telnet["cps"]) == (10, False, [25, 30])
    assert telnet["env"] == {"TERM": "vt100", "LANG": "C"}
    assert telnet["passenv"] == ["PATH", "TZ"]
    assert telnet["access_times"] == ["08:00-18:00", "22:00-06:00"]
    assert (
        telnet["banner_fail"].startswith("Access denied: telnet")
        and "\r\n" in telnet["banner_fail"]
    )
    assert (telnet["rlimit_as"], telnet["rlimit_cpu"], telnet["rlimit_nofile"]) == (
        "64MiB",
        60,
        256,
    )
    assert (telnet["user"], telnet["group"]) == ("telnetd", "telnetd")
    rstatd = [str(n) for n in result.notes if n.service == "service rstatd"]
    assert rstatd == [
        f"{CORPUS}/xinetd/xinetd.d/rstatd:7: service rstatd: RPC services are not supported; "
        "not converted"
    ]
    for fragment in (
        "umask = 002 has no equivalent",
        "nice = 10 has no equivalent",
        "only_from: '.example.com' is not an address or network",
        "xinetd gives a service without cps the limit cps = 50 10",
        "checks /etc/hosts.allow and /etc/hosts.deny",
    ):
        assert has_note(result, fragment), fragment


def test_the_inetd_corpus_converts_as_expected() -> None:
    result = convert("inetd", [str(INETD_CONF)])
    got = servers(result)
    assert list(got) == [
        "echo-tcp",
        "echo-udp",
        "daytime-tcp",
        "daytime-tcp6",
        "chargen",
        "time",
        "telnet",
        "ftp",
        "ident",
        "finger",
        "tftp",
        "8873",
    ]
    assert got["daytime-tcp6"]["listen"] == "[::]:13"
    assert got["ftp"]["command"] == ["/usr/sbin/in.ftpd", "-l", "-a"]
    assert got["tftp"]["cps"] == [5, 60] and got["tftp"]["listen"] == "0.0.0.0:69"
    assert got["8873"]["listen"] == "127.0.0.1:8873"
    assert has_note(result, "RPC services are not supported")


# -- the command -------------------------------------------------------------------------------


def selectd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SELECTD_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_the_command_prints_toml_and_the_notes_on_both_streams() -> None:
    result = selectd("convert", "--from", "xinetd", str(XINETD_CONF))
    assert result.returncode == 0, result.stderr
    notes = result.stderr.splitlines()
    assert notes and all(line.startswith(f"{CORPUS}/") for line in notes), notes
    for line in notes:
        assert f"# NOTE {line}\n" in result.stdout
    assert "Traceback" not in result.stderr
    check = subprocess.run(
        [sys.executable, "-m", "daemon", "check", "-c", "-"],
        input=result.stdout,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert (check.returncode, check.stdout.strip()) == (0, "ok"), check.stderr


def test_the_command_converts_inetd_and_several_xinetd_files() -> None:
    result = selectd("convert", "--from", "inetd", str(INETD_CONF))
    assert result.returncode == 0 and "[servers.echo-tcp]" in result.stdout
    two = [str(CORPUS / "xinetd" / "xinetd.d" / n) for n in ("tftp", "rsync")]
    result = selectd("convert", "--from", "xinetd", *two)
    assert result.returncode == 0, result.stderr
    assert list(tomllib.loads(result.stdout)["servers"]) == ["tftp", "rsync"]


def test_the_port_of_a_named_service_comes_from_etc_services(tmp_path: Path) -> None:
    # The real lookup, in a process of its own (this module's fixture replaces it here).
    try:
        assert REAL_GETSERVBYNAME("echo", "tcp") == 7
        assert REAL_GETSERVBYNAME("daytime", "tcp") == 13
    except OSError:
        pytest.skip("this machine's /etc/services lacks echo or daytime")
    conf = tmp_path / "xinetd.conf"
    body = "type = INTERNAL\nsocket_type = stream\nid = {}-stream"
    conf.write_text(
        service(body.format("echo"), "echo") + service(body.format("daytime"), "daytime")
    )
    result = selectd("convert", "--from", "xinetd", str(conf))
    listens = [t["listen"] for t in tomllib.loads(result.stdout)["servers"].values()]
    assert listens == ["0.0.0.0:7", "0.0.0.0:13"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "xinetd", "/nonexistent/xinetd.conf"), "/nonexistent/xinetd.conf: cannot read"),
        (("--from", "inetd", "GARBAGE"), "GARBAGE:1: expected 'SERVICE"),
        (("--from", "xinetd", "UNBALANCED"), "UNBALANCED:2: service a: no closing '}'"),
        (("--from", "xinetd", "STRAY"), "STRAY:1: expected 'service NAME'"),
        (("--from", "xinetd", "BINARY"), "BINARY:1: cannot read: not UTF-8 text"),
        (("--from", "xinetd", "."), ".: cannot read: Is a directory"),
    ],
)
def test_the_command_exits_2_on_a_file_it_cannot_convert(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "GARBAGE").write_text("this is not an inetd.conf\n")
    (tmp_path / "UNBALANCED").write_text("# x\nservice a\n{\nsocket_type = stream\n")
    (tmp_path / "STRAY").write_text("}\n")
    (tmp_path / "BINARY").write_bytes(b"\xff\xfe\x00garbage")
    result = selectd("convert", *args, cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == f"selectd convert: {message}" + result.stderr.split(message, 1)[1]
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("convert",),
        ("convert", "FILE"),
        ("convert", "--from", "systemd", "FILE"),
        ("convert", "--from", "inetd"),
    ],
)
def test_the_command_exits_2_on_a_usage_error(args: tuple[str, ...]) -> None:
    result = selectd(*args)
    assert result.returncode == 2 and "usage: selectd" in result.stderr
    assert "Traceback" not in result.stderr


def test_notes_are_one_line_whatever_the_source_holds(tmp_path: Path) -> None:
    assert printable("a\nb\x1b[31m\x7f\tc") == "a\\x0ab\\x1b[31m\\x7f\tc"
    assert printable("bad\udcff name") == "bad\\udcff name"
    result = xinetd(tmp_path, service(EXEC + "nice = 10\x1b[2J\x0b"))
    assert has_note(result, "nice = 10\x1b[2J")
    comment = [line for line in result.text.splitlines() if "nice" in line]
    assert comment == ["# NOTE " + str(n) for n in result.notes if "nice" in n.text]
    assert "\\x1b[2J" in comment[0]
    parse_config(result.text)


# -- fuzz ------------------------------------------------------------------------------------

_XINETD_WORDS = [
    *"{}=#'\"\t\n ",
    "\n",
    "\n",
    "+=",
    "-=",
    "service",
    "defaults",
    "include",
    "echo",
    "socket_type",
    "stream",
    "dgram",
    "raw",
    "protocol",
    "tcp",
    "udp",
    "type",
    "INTERNAL",
    "RPC",
    "UNLISTED",
    "id",
    "echo-stream",
    "server",
    "/usr/sbin/tcpd",
    "server_args",
    "port",
    "7",
    "0",
    "70000",
    "only_from",
    "no_access",
    "10.0.0.*",
    "1.2.{3,4}",
    "localhost",
    "::1",
    "instances",
    "UNLIMITED",
    "cps",
    "env",
    "A=b",
    "passenv",
    "PATH",
    "access_times",
    "08:00-17:00",
    "rlimit_as",
    "8M",
    "rlimit_files",
    "flags",
    "IPv6",
    "NAMEINARGS",
    "bind",
    "wait",
    "yes",
    "no",
    "disable",
    "user",
    "banner_fail",
    "nice",
    "x",
]
_INETD_WORDS = [
    *"#:.\t ",
    "\n",
    "\n",
    "echo",
    "stream",
    "dgram",
    "tcp",
    "udp",
    "tcp6",
    "udp46",
    "rpc/udp",
    "unix",
    "wait",
    "nowait.60",
    "wait.x",
    "root",
    "nobody.nogroup",
    "internal",
    "/usr/sbin/tcpd",
    "in.x",
    "/bin/x",
    "127.0.0.1:",
    "*:",
    "[::1]:echo",
    "4000",
    "/run/x.sock",
    "tcpmux/+x",
]


_ATTRIBUTES = [
    "id", "type", "flags", "socket_type", "protocol", "wait", "user", "group", "server",
    "server_args", "port", "bind", "interface", "only_from", "no_access", "instances",
    "per_source", "cps", "env", "passenv", "access_times", "banner_fail", "rlimit_as",
    "rlimit_cpu", "rlimit_files", "rlimit_stack", "disable", "nice", "log_type", "redirect",
    "rpc_version", "disabled", "enabled",
]  # fmt: skip
_VALUES = [w for w in _XINETD_WORDS if w.strip() and w not in "{}="] + ["24", "-1", "yes"]


@st.composite
def _xinetd_entries(draw: st.DrawFn) -> str:
    """Well-formed entries with random attributes: the mapping, not the syntax, is fuzzed."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        header = draw(st.sampled_from(["defaults", "service echo", "service svc", "service t"]))
        lines = [header, "{"]
        if header != "defaults":  # mostly a service that converts, before the random lines
            lines += draw(
                st.sampled_from(["stream", "dgram"]).map(lambda t: [f"socket_type = {t}"])
            )
            lines += draw(st.sampled_from([["port = 4000"], ["port = 4001"], []]))
            lines += draw(st.sampled_from([["server = /bin/x"], ["type = INTERNAL"], []]))
        for _ in range(draw(st.integers(0, 8))):
            name = draw(st.sampled_from(_ATTRIBUTES))
            op = draw(st.sampled_from(["=", "=", "+=", "-="]))
            values = draw(st.lists(st.sampled_from(_VALUES), max_size=3))
            lines.append(f"{name} {op} {' '.join(values)}")
        out.append("\n".join([*lines, "}"]))
    return "\n".join(out) + "\n"


def _text(words: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(words), max_size=60).map(" ".join) | st.text(max_size=40)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.sampled_from(["xinetd", "inetd"]), st.data())
def test_fuzz_any_text_converts_or_is_a_convert_error(source_format: str, data: Any) -> None:
    if source_format == "xinetd":
        text = data.draw(_text(_XINETD_WORDS) | _xinetd_entries())
    else:
        text = data.draw(_text(_INETD_WORDS))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "conf"
        path.write_text(text)
        try:
            result = convert(source_format, [str(path)])
        except ConvertError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            return
    parse_config(result.text)
    for note in result.notes:
        assert "\n" not in str(note) and f"# NOTE {note}\n" in result.text


@pytest.fixture(autouse=True)
def no_name_lookups(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Host names in random text must not reach DNS."""
    if request.node.name.startswith("test_fuzz"):

        def getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
            raise socket.gaierror("no lookups in this test")

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# -- end to end --------------------------------------------------------------------------------


def _on_loopback(conversion: Conversion, keep: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The converted servers that `keep` accepts, on free loopback ports and enabled."""
    out: dict[str, Any] = {}
    for name, table in servers(conversion).items():
        if not keep(table):
            continue
        kind = socket.SOCK_DGRAM if table["socket_type"] == "dgram" else socket.SOCK_STREAM
        out[name] = {**table, "listen": f"127.0.0.1:{free_port(kind)}", "enabled": True}
    return out


def _config(tmp_path: Path, tables: dict[str, Any]) -> str:
    return daemon_section(tmp_path) + tomli_w.dumps({"servers": tables})


@pytest.fixture
def converted_daemon(
    tmp_path: Path, start_daemon: Callable[..., Any]
) -> Iterator[Callable[[dict[str, Any]], Any]]:
    def start(tables: dict[str, Any]) -> Any:
        text = _config(tmp_path, tables)
        parse_config(text)
        return start_daemon(text)

    yield start


def _port(table: dict[str, Any]) -> int:
    return int(table["listen"].rsplit(":", 1)[1])


def test_converted_internal_services_answer(converted_daemon: Callable[..., Any]) -> None:
    tables = _on_loopback(
        convert("xinetd", [str(XINETD_CONF)]),
        lambda t: t.get("handler") in ("echo", "daytime"),
    )
    assert set(tables) == {"echo-tcp", "echo-udp", "daytime-tcp", "daytime-udp"}
    daemon = converted_daemon(tables)
    assert echo_roundtrip(_port(tables["echo-tcp"]), b"converted\n") == b"converted\n"
    with socket.create_connection(("127.0.0.1", _port(tables["daytime-tcp"])), timeout=5) as s:
        daytime = s.makefile("rb").read()
    assert daytime.endswith(b"\r\n") and len(daytime) > 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"ping", ("127.0.0.1", _port(tables["echo-udp"])))
        assert s.recv(100) == b"ping"
    assert daemon.stop() == 0


def test_converted_exec_services_answer(
    tmp_path: Path, converted_daemon: Callable[..., Any]
) -> None:
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/sh\nread line\necho "hello $line"\n')
    script.chmod(0o755)
    conversion = inetd(
        tmp_path,
        f"4000 stream tcp nowait nobody {script} hello.sh\n"
        "4001 stream tcp nowait nobody /bin/echo echo converted\n",
    )
    tables = _on_loopback(conversion, lambda t: "command" in t)
    for table in tables.values():
        table.pop("user", None)  # run as whoever runs the test
    daemon = converted_daemon(tables)
    with socket.create_connection(("127.0.0.1", _port(tables["4001"])), timeout=5) as s:
        assert s.makefile("rb").read() == b"converted\n"
    assert echo_roundtrip(_port(tables["4000"]), b"there\n") == b"hello there\n"
    assert daemon.stop() == 0


def test_limits_a_wait_service_cannot_have_are_said(tmp_path: Path) -> None:
    # A limit that the converted config would not enforce must not pass in silence.
    entry = (
        "socket_type = dgram\nprotocol = udp\nwait = yes\nuser = root\n"
        "server = /usr/sbin/in.tftpd\nport = 69\nonly_from = 10.0.0.0\ninstances = 5\n"
    )
    result = xinetd(tmp_path, service(entry, "tftp"))
    table = servers(result)["tftp"]
    assert (table["socket_type"], table["allow"], table["instances"]) == (
        "dgram",
        ["10.0.0.0/8"],
        5,
    )
    said = [n.text for n in result.notes if "datagram (wait) service" in n.text]
    assert said and said[0].startswith("instances mean nothing"), result.notes
    assert said[0] in result.text  # in the output too, as a comment
