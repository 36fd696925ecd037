"""daemon.config: the TOML schema, its messages, defaults, dump/parse round trips, handlers."""

from __future__ import annotations

import io
import ipaddress
import math
import os
import pickle
import re
import socket
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any
from unittest import mock

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servers
from daemon import config_handler
from daemon.config import (
    DAEMON_FIELDS,
    SERVER_FIELDS,
    Address,
    Config,
    ConfigError,
    ServerConfig,
    default_control_socket,
    dump_config,
    load_config,
    parse_config,
    resolve_handler,
)
from servers.services import BUILTIN_SERVICES

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "selectd.toml"

NR_OPEN = int(Path("/proc/sys/fs/nr_open").read_text())  # the ceiling of rlimit_nofile


def server(name: str = "s", **keys: str | None) -> str:
    """A [servers.NAME] table; keys are raw TOML values. listen and handler have defaults;
    pass None to leave one out."""
    keys = {"listen": '"127.0.0.1:7007"', "handler": '"echo"', **keys}
    lines = [f"[servers.{name}]"] + [f"{k} = {v}" for k, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_server(text: str) -> ServerConfig:
    config = parse_config(text)
    (only,) = config.servers.values()
    return only


# -- defaults ----------------------------------------------------------------------------------


def test_an_empty_config_is_valid_and_takes_every_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    config = parse_config("")
    assert dict(config.servers) == {}
    d = config.daemon
    assert d.control_socket == default_control_socket()
    assert (d.log_format, d.log_level, d.shutdown_timeout) == ("auto", "info", 10.0)
    assert (d.pidfile, d.user, d.group) == (None, None, None)
    assert config.source is None


def test_default_control_socket_follows_xdg_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_control_socket() == f"{tmp_path}/selectd/control.sock"
    for unusable in ("", "relative/dir"):
        monkeypatch.setenv("XDG_RUNTIME_DIR", unusable)
        assert default_control_socket() == f"/tmp/selectd-{os.getuid()}/control.sock"


def test_stream_server_defaults() -> None:
    s = one_server(server())
    assert s.name == "s"
    assert s.listen == Address("inet", socket.AF_INET, "127.0.0.1", 7007, None)
    assert (s.socket_type, s.handler, s.concurrency) == ("stream", "echo", "thread")
    assert (s.workers, s.max_queue, s.request_queue_size) == (16, 128, 128)
    assert (s.allow_reuse_address, s.allow_reuse_port) == (True, False)
    assert (s.timeout, s.allow, s.deny, s.enabled) == (60.0, (), (), True)
    assert isinstance(s.options, MappingProxyType) and dict(s.options) == {}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"concurrency": '"fork"'}, {"workers": 4, "allow_reuse_address": True}),
        ({"concurrency": '"inline"'}, {"workers": 1}),
        ({"socket_type": '"dgram"'}, {"concurrency": "inline", "allow_reuse_address": False}),
        ({"socket_type": '"dgram"', "concurrency": '"thread"'}, {"workers": 16}),
        ({"listen": '"unix:/tmp/s.sock"'}, {"allow_reuse_address": False, "concurrency": "thread"}),
    ],
)
def test_defaults_that_depend_on_other_keys(keys: dict[str, str], expected: dict[str, Any]) -> None:
    s = one_server(server(**keys))
    assert {k: getattr(s, k) for k in expected} == expected


# -- valid forms -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "canonical", "family", "sockaddr"),
    [
        ("127.0.0.1:7007", "127.0.0.1:7007", socket.AF_INET, ("127.0.0.1", 7007)),
        ("0.0.0.0:0", "0.0.0.0:0", socket.AF_INET, ("0.0.0.0", 0)),
        ("localhost:7", "127.0.0.1:7", socket.AF_INET, ("127.0.0.1", 7)),
        ("LocalHost:65535", "127.0.0.1:65535", socket.AF_INET, ("127.0.0.1", 65535)),
        ("10.1.2.3:007", "10.1.2.3:7", socket.AF_INET, ("10.1.2.3", 7)),
        ("[::1]:7007", "[::1]:7007", socket.AF_INET6, ("::1", 7007)),
        ("[0:0::0001]:7", "[::1]:7", socket.AF_INET6, ("::1", 7)),
        ("[::]:0", "[::]:0", socket.AF_INET6, ("::", 0)),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock", socket.AF_UNIX, "/tmp/x.sock"),
        ("unix:@selectd-test", "unix:@selectd-test", socket.AF_UNIX, "\0selectd-test"),
    ],
)
def test_listen_forms(listen: str, canonical: str, family: int, sockaddr: Any) -> None:
    address = one_server(server(listen=f'"{listen}"')).listen
    assert (str(address), address.family, address.sockaddr()) == (canonical, family, sockaddr)
    assert address.kind == ("unix" if family == socket.AF_UNIX else "inet")
    assert (address.path is None) == (address.kind == "inet")


def test_sockaddr_is_what_bind_takes(tmp_path: Path) -> None:
    forms = [("127.0.0.1:0", "stream"), ("127.0.0.1:0", "dgram")]
    forms += [(f"unix:{tmp_path}/a.sock", "stream"), ("unix:@selectd-test-bind", "dgram")]
    if socket.has_ipv6:
        forms.append(("[::1]:0", "stream"))
    for listen, kind in forms:
        address = one_server(server(listen=f'"{listen}"', socket_type=f'"{kind}"')).listen
        sock_type = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_DGRAM
        with socket.socket(address.family, sock_type) as sock:
            try:
                sock.bind(address.sockaddr())
            except OSError as exc:  # e.g. no IPv6 loopback in this container
                pytest.skip(f"cannot bind {address}: {exc}")


@pytest.mark.parametrize(
    ("key", "toml", "value"),
    [
        ("log_format", '"json"', "json"),
        ("log_format", '"console"', "console"),
        ("log_level", '"WARNING"', "warning"),
        ("log_level", '"Critical"', "critical"),
        ("shutdown_timeout", "0.5", 0.5),
        ("shutdown_timeout", "3600", 3600.0),
        ("pidfile", '"/run/selectd.pid"', "/run/selectd.pid"),
        ("user", '"nobody"', "nobody"),
        ("group", '"nogroup"', "nogroup"),
        ("control_socket", '"/run/selectd/c.sock"', "/run/selectd/c.sock"),
    ],
)
def test_daemon_keys(key: str, toml: str, value: Any) -> None:
    got = getattr(parse_config(f"[daemon]\n{key} = {toml}\n").daemon, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("keys", "attr", "value"),
    [
        ({"socket_type": '"dgram"'}, "socket_type", "dgram"),
        ({"concurrency": '"inline"'}, "concurrency", "inline"),
        ({"concurrency": '"fork"', "workers": "1"}, "workers", 1),
        ({"workers": "1024"}, "workers", 1024),
        ({"max_queue": "0"}, "max_queue", 0),
        ({"max_queue": "65536"}, "max_queue", 65536),
        ({"request_queue_size": "1"}, "request_queue_size", 1),
        ({"request_queue_size": "65535"}, "request_queue_size", 65535),
        ({"allow_reuse_address": "false"}, "allow_reuse_address", False),
        ({"allow_reuse_port": "true"}, "allow_reuse_port", True),
        ({"socket_type": '"dgram"', "allow_reuse_port": "true"}, "allow_reuse_port", True),
        ({"timeout": "0"}, "timeout", 0.0),
        ({"timeout": "1.5"}, "timeout", 1.5),
        ({"timeout": "86400"}, "timeout", 86400.0),
        ({"enabled": "false"}, "enabled", False),
        ({"listen": '"unix:/tmp/u"', "allow": "[]", "deny": "[]"}, "allow", ()),
        (
            {"handler": '"servers.services:EchoStreamHandler"'},
            "handler",
            "servers.services:EchoStreamHandler",
        ),
    ],
)
def test_server_keys(keys: dict[str, str], attr: str, value: Any) -> None:
    got = getattr(one_server(server(**keys)), attr)
    assert got == value and type(got) is type(value)


def test_allow_and_deny_take_networks_and_bare_addresses() -> None:
    s = one_server(
        server(allow='["10.0.0.0/8", "10.1.2.3", "::1", "2001:db8::/32"]', deny='["10.9.0.0/16"]')
    )
    assert s.allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert s.deny == (ipaddress.ip_network("10.9.0.0/16"),)


def test_options_are_a_read_only_deep_copy() -> None:
    s = one_server(
        server()
        + "[servers.s.options]\n"
        + 'delay = 1.5\nnames = ["a", "b"]\nwhen = 2024-01-02T03:04:05Z\n'
        + "nested = { x = { y = 1 } }\n"
    )
    assert dict(s.options) == {
        "delay": 1.5,
        "names": ["a", "b"],
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "nested": {"x": {"y": 1}},
    }
    with pytest.raises(TypeError):
        s.options["delay"] = 2  # type: ignore[index]
    assert one_server(server()).options == {}


def test_servers_keep_file_order_and_are_read_only() -> None:
    text = "".join(server(n, listen=f'"127.0.0.1:{p}"') for n, p in (("z", 1), ("a", 2), ("m", 3)))
    config = parse_config(text, "x.toml")
    assert list(config.servers) == ["z", "a", "m"]
    assert config.source == "x.toml"
    with pytest.raises(TypeError):
        config.servers["q"] = config.servers["z"]  # type: ignore[index]


def test_two_parses_of_one_text_are_equal_and_one_change_is_seen() -> None:
    text = server(allow='["10.0.0.0/8"]') + "[servers.s.options]\nx = [1, {y = 2}]\n"
    a, b = parse_config(text, "a.toml"), parse_config(text, "b.toml")
    assert a == b and a.servers["s"] == b.servers["s"]
    c = parse_config(text.replace("x = [1,", "x = [2,"))
    assert c.servers["s"] != a.servers["s"]
    assert c.servers["s"].listen == a.servers["s"].listen
    assert one_server(server(listen='"localhost:7"')) == one_server(server(listen='"127.0.0.1:7"'))


# -- errors ------------------------------------------------------------------------------------

LISTEN_EXPECTED = '"HOST:PORT"'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[daemon]\ncontrol_socket = "run/c.sock"',
            "daemon.control_socket: must be an absolute path, got 'run/c.sock'",
        ),
        ("[daemon]\ncontrol_socket = 3", "daemon.control_socket: must be an absolute path, got 3"),
        (
            f'[daemon]\ncontrol_socket = "/{"x" * 200}"',
            "daemon.control_socket: is 201 bytes, longer",
        ),
        (
            '[daemon]\nlog_format = "xml"',
            'daemon.log_format: must be one of "auto", "json", "console", got \'xml\'',
        ),
        ('[daemon]\nlog_level = "verbose"', 'daemon.log_level: must be one of "debug", '),
        ("[daemon]\nlog_level = 1", "daemon.log_level: must be one of "),
        ("[daemon]\nshutdown_timeout = 0", "daemon.shutdown_timeout: must be a number > 0, got 0"),
        (
            "[daemon]\nshutdown_timeout = -1.5",
            "daemon.shutdown_timeout: must be a number > 0, got -1.5",
        ),
        (
            "[daemon]\nshutdown_timeout = 3601",
            "daemon.shutdown_timeout: must be a number <= 3600, got 3601",
        ),
        (
            "[daemon]\nshutdown_timeout = inf",
            "daemon.shutdown_timeout: must be a number <= 3600, got inf",
        ),
        (
            "[daemon]\nshutdown_timeout = nan",
            "daemon.shutdown_timeout: must be a number > 0, got nan",
        ),
        (
            '[daemon]\nshutdown_timeout = "soon"',
            "daemon.shutdown_timeout: must be a number > 0, got 'soon'",
        ),
        (
            "[daemon]\nshutdown_timeout = true",
            "daemon.shutdown_timeout: must be a number > 0, got True",
        ),
        (
            '[daemon]\npidfile = "selectd.pid"',
            "daemon.pidfile: must be an absolute path, got 'selectd.pid'",
        ),
        ('[daemon]\npidfile = ""', "daemon.pidfile: must be an absolute path, got ''"),
        ('[daemon]\nuser = ""', "daemon.user: must be a non-empty string, got ''"),
        ("[daemon]\ngroup = 0", "daemon.group: must be a non-empty string, got 0"),
        ("[daemon]\nport = 1", "daemon.port: unknown key"),
        ('[daemon]\nlog_levl = "info"', "daemon.log_levl: unknown key (did you mean 'log_level'?)"),
        ("daemon = 3", "daemon: must be a table, got 3"),
        ("servers = 3", "servers: must be a table of [servers.NAME] tables, got 3"),
        ("[servers]\necho = 3", "servers.echo: must be a table, got 3"),
        ("extra = 1", "extra: unknown key"),
        (server('"a b"'), 'servers."a b": a server name must match [A-Za-z0-9_.-]+'),
        (server('"é"'), 'servers."é": a server name must match'),
        (server('""'), 'servers."": a server name must match'),
    ],
)
def test_daemon_and_top_level_errors(text: str, expected: str) -> None:
    found = problems(text + "\n")
    assert any(p == expected or p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"listen": None}, f"servers.s.listen: missing (required); expected {LISTEN_EXPECTED}"),
        ({"listen": "7007"}, "servers.s.listen: must be a string; expected"),
        ({"listen": '"nowhere"'}, "servers.s.listen: 'nowhere' has no port; expected"),
        ({"listen": '"127.0.0.1"'}, "servers.s.listen: '127.0.0.1' has no port"),
        (
            {"listen": '"*:7"'},
            "servers.s.listen: '*:7': the host must be an IP address or localhost",
        ),
        ({"listen": '":7"'}, "servers.s.listen: ':7': the host must be an IP address"),
        ({"listen": '"example.com:7"'}, "servers.s.listen: 'example.com:7': the host must be"),
        ({"listen": '"::1:7"'}, "servers.s.listen: '::1:7': an IPv6 address needs brackets"),
        ({"listen": '"[127.0.0.1]:7"'}, "servers.s.listen: '[127.0.0.1]:7': brackets are for IPv6"),
        ({"listen": '"[::1]7"'}, "servers.s.listen: '[::1]7' is not of the form \"[IPv6]:PORT\""),
        ({"listen": '"[nope]:7"'}, "servers.s.listen: '[nope]:7': the host must be an IP address"),
        (
            {"listen": '"127.0.0.1:65536"'},
            "servers.s.listen: '127.0.0.1:65536': the port must be a number from 0 to 65535",
        ),
        ({"listen": '"127.0.0.1:-1"'}, "servers.s.listen: '127.0.0.1:-1': the port must be"),
        ({"listen": '"127.0.0.1:+7"'}, "servers.s.listen: '127.0.0.1:+7': the port must be"),
        (
            {"listen": '"127.0.0.1:\u0667"'},
            "servers.s.listen: '127.0.0.1:\u0667': the port must be",
        ),
        ({"listen": '"127.0.0.1:"'}, "servers.s.listen: '127.0.0.1:': the port must be"),
        (
            {"listen": '"unix:sock"'},
            "servers.s.listen: 'unix:sock': a unix socket path must be absolute",
        ),
        ({"listen": '"unix:"'}, "servers.s.listen: 'unix:': a unix socket path must be absolute"),
        ({"listen": '"unix:@"'}, "servers.s.listen: 'unix:@': the abstract socket name is empty"),
        (
            {"listen": '"unix:/a\\u0000b"'},
            "servers.s.listen: 'unix:/a\\x00b': the path must not contain a NUL",
        ),
        ({"listen": f'"unix:/{"x" * 107}"'}, "servers.s.listen: 'unix:/xxx"),
        (
            {"socket_type": '"tcp"'},
            'servers.s.socket_type: must be one of "stream", "dgram", got \'tcp\'',
        ),
        (
            {"handler": None},
            "servers.s.handler: missing (required); "
            "expected a built-in service (echo, discard, chargen, daytime, time)",
        ),
        ({"handler": '""'}, "servers.s.handler: must be a non-empty string, got ''"),
        ({"handler": "3"}, "servers.s.handler: must be a non-empty string, got 3"),
        (
            {"handler": '"nope"'},
            "servers.s.handler: unknown handler 'nope': expected a built-in service",
        ),
        (
            {"handler": '"a:b:c"'},
            "servers.s.handler: 'a:b:c' is not of the form \"package.module:Class\"",
        ),
        ({"handler": '".rel:X"'}, "servers.s.handler: '.rel:X' is not of the form"),
        ({"handler": '"os:path"'}, "servers.s.handler: 'os:path' is not a class, it is a module"),
        (
            {"handler": '"servers:TCPServer"'},
            "servers.s.handler: 'servers:TCPServer' is not a request handler",
        ),
        (
            {"concurrency": '"process"'},
            'servers.s.concurrency: must be one of "inline", "thread", "fork", got \'process\'',
        ),
        (
            {"socket_type": '"dgram"', "concurrency": '"fork"'},
            'servers.s.concurrency: concurrency = "fork" needs socket_type = "stream"',
        ),
        ({"workers": '"eight"'}, "servers.s.workers: must be an integer >= 1, got 'eight'"),
        ({"workers": "0"}, "servers.s.workers: must be an integer >= 1, got 0"),
        ({"workers": "1025"}, "servers.s.workers: must be an integer <= 1024, got 1025"),
        ({"workers": "true"}, "servers.s.workers: must be an integer >= 1, got True"),
        ({"workers": "1.5"}, "servers.s.workers: must be an integer >= 1, got 1.5"),
        (
            {"concurrency": '"inline"', "workers": "1"},
            'servers.s.workers: workers has no effect with concurrency = "inline"',
        ),
        ({"max_queue": "-1"}, "servers.s.max_queue: must be an integer >= 0, got -1"),
        ({"max_queue": "65537"}, "servers.s.max_queue: must be an integer <= 65536, got 65537"),
        (
            {"socket_type": '"dgram"', "max_queue": "4"},
            'servers.s.max_queue: max_queue has no effect with concurrency = "inline"',
        ),
        (
            {"request_queue_size": "0"},
            "servers.s.request_queue_size: must be an integer >= 1, got 0",
        ),
        (
            {"request_queue_size": "65536"},
            "servers.s.request_queue_size: must be an integer <= 65535",
        ),
        (
            {"socket_type": '"dgram"', "request_queue_size": "5"},
            "servers.s.request_queue_size: "
            'request_queue_size has no effect with socket_type = "dgram"',
        ),
        (
            {"allow_reuse_address": '"yes"'},
            "servers.s.allow_reuse_address: must be true or false, got 'yes'",
        ),
        ({"allow_reuse_port": "1"}, "servers.s.allow_reuse_port: must be true or false, got 1"),
        (
            {"listen": '"unix:/tmp/u"', "allow_reuse_address": "true"},
            "servers.s.allow_reuse_address: allow_reuse_address has no effect on a unix socket",
        ),
        (
            {"listen": '"unix:@u"', "allow_reuse_port": "false"},
            "servers.s.allow_reuse_port: allow_reuse_port has no effect on a unix socket",
        ),
        ({"timeout": "-1"}, "servers.s.timeout: must be a number >= 0, got -1"),
        ({"timeout": "86401"}, "servers.s.timeout: must be a number <= 86400, got 86401"),
        ({"timeout": '"60"'}, "servers.s.timeout: must be a number >= 0, got '60'"),
        ({"timeout": "nan"}, "servers.s.timeout: must be a number >= 0, got nan"),
        (
            {"socket_type": '"dgram"', "timeout": "5"},
            'servers.s.timeout: timeout has no effect with socket_type = "dgram" '
            "(it is a per-connection timeout)",
        ),
        ({"allow": '"10.0.0.0/8"'}, "servers.s.allow: must be a list of networks"),
        (
            {"allow": '["10.0.0.0/8", 3]'},
            "servers.s.allow[1]: must be a network string like '10.0.0.0/8', got 3",
        ),
        (
            {"allow": '["::1", "10.0.0.0/8", "10.0.0.1/8"]'},
            "servers.s.allow[2]: '10.0.0.1/8' has host bits set",
        ),
        ({"deny": '["nope"]'}, "servers.s.deny[0]: 'nope' is not an IP address or network"),
        (
            {"deny": '["10.0.0.0/33"]'},
            "servers.s.deny[0]: '10.0.0.0/33' is not an IP address or network",
        ),
        (
            {"listen": '"unix:/tmp/u"', "allow": '["10.0.0.0/8"]'},
            "servers.s.allow: allow has no effect on a unix socket",
        ),
        (
            {"listen": '"unix:/tmp/u"', "deny": '["10.0.0.0/8"]'},
            "servers.s.deny: deny has no effect on a unix socket",
        ),
        ({"enabled": '"yes"'}, "servers.s.enabled: must be true or false, got 'yes'"),
        ({"options": "3"}, "servers.s.options: must be a table, got 3"),
        ({"options": "{ a = [1, nan] }"}, "servers.s.options.a[1]: nan is not allowed"),
        ({"options": '{ "x y" = { z = nan } }'}, 'servers.s.options."x y".z: nan is not allowed'),
        (
            {"options": "{ big = 0x10000000000000000 }"},
            "servers.s.options.big: integer out of TOML's 64-bit range",
        ),
        ({"workerz": "4"}, "servers.s.workerz: unknown key (did you mean 'workers'?)"),
        ({"port": "4"}, "servers.s.port: unknown key"),
    ],
)
def test_server_errors(keys: dict[str, str | None], expected: str) -> None:
    found = problems(server(**keys))
    assert any(p == expected or p.startswith(expected) for p in found), found


def test_every_problem_is_reported_in_file_order() -> None:
    text = (
        '[daemon]\nlog_level = "loud"\n'
        + server("b", workers='"eight"', listen='"nowhere"', typo="1")
        + server("a", listen=None, timeout="-1")
    )
    found = problems(text)
    assert [p.split(":")[0] for p in found] == [
        "daemon.log_level",
        "servers.b.listen",
        "servers.b.workers",
        "servers.b.typo",
        "servers.a.timeout",
        "servers.a.listen",  # missing: after the keys that are there
    ]


def test_an_invalid_socket_type_does_not_cause_follow_on_errors() -> None:
    # With socket_type unknown, nothing that depends on it is judged.
    assert problems(server(socket_type='"udp"', timeout="5", handler='"echo"')) == [
        'servers.s.socket_type: must be one of "stream", "dgram", got \'udp\''
    ]


def test_duplicate_listen_addresses_name_both_servers() -> None:
    text = server("a") + server("b") + server("c", socket_type='"dgram"')
    assert problems(text) == [
        'servers.b.listen: "127.0.0.1:7007" (stream) is already used by servers.a'
    ]
    # Two spellings of one address are one address.
    found = problems(server("a", listen='"localhost:9"') + server("b", listen='"127.0.0.1:9"'))
    assert found == ['servers.b.listen: "127.0.0.1:9" (stream) is already used by servers.a']


def test_one_unix_path_cannot_serve_stream_and_dgram() -> None:
    text = server("a", listen='"unix:/tmp/one"') + server(
        "b", listen='"unix:/tmp/one"', socket_type='"dgram"'
    )
    (found,) = problems(text)
    assert found.startswith(
        'servers.b.listen: "unix:/tmp/one" (dgram) is already used by servers.a'
    )


def test_port_zero_never_conflicts() -> None:
    text = server("a", listen='"127.0.0.1:0"') + server("b", listen='"127.0.0.1:0"')
    assert len(parse_config(text).servers) == 2


def test_toml_syntax_errors_name_line_and_column() -> None:
    found = problems('[daemon]\nlog_level = "info"\nshutdown_timeout = = 3\n')
    assert found == ["<string>: TOML syntax error at line 3, column 20: invalid value"]
    with pytest.raises(ConfigError) as info:
        parse_config("a = [1", "f.toml")
    assert info.value.problems == [
        "f.toml: TOML syntax error at the end of the document: unclosed array"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 5000,  # deeper than the parser's recursion
        "a = " + "1" * 5000,  # more digits than int() converts
        "\x00\xff binary",
        "[servers.a]\n[servers.a]\n",  # a table defined twice
    ],
)
def test_pathological_text_is_a_config_error(text: str) -> None:
    (found,) = problems(text)
    assert found.startswith("<string>: TOML syntax error")


def test_config_error_carries_its_problems() -> None:
    exc = ConfigError(["a: one", "b: two"])
    assert str(exc) == "a: one\nb: two"
    again = pickle.loads(pickle.dumps(exc))
    assert again.problems == exc.problems
    assert ConfigError("x: only").problems == ["x: only"]
    # A lone surrogate (from a file name) is shown escaped, so printing cannot fail.
    assert ConfigError("bad\udcff").problems == ["bad\\udcff"]


# -- handlers ----------------------------------------------------------------------------------

HANDLER_MODULE = """
import socketserver
import servers


class Stdlib(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


class StdlibDgram(socketserver.DatagramRequestHandler):
    pass


class Plain(socketserver.BaseRequestHandler):
    pass


class Ours(servers.StreamRequestHandler):
    pass


class Outer:
    class Inner(socketserver.BaseRequestHandler):
        pass


class NotAHandler:
    pass


not_a_class = 42
"""


@pytest.fixture
def handler_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package prefix whose modules (written to tmp_path) are importable for one test."""
    prefix = f"cfg_handlers_{uuid.uuid4().hex[:12]}"  # fresh names: nothing cached in sys.modules
    files = {
        "good": HANDLER_MODULE,
        "raises": "raise RuntimeError('boom at import')\n",
        "exits": "import sys\nsys.exit(3)\n",
        "syntax": "def broken(:\n",
        "imports_missing": "import selectd_no_such_dependency\n",
    }
    for name, source in files.items():
        (tmp_path / f"{prefix}_{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield prefix
    for name in files:
        sys.modules.pop(f"{prefix}_{name}", None)


@pytest.mark.parametrize(
    ("attr", "socket_type", "base"),
    [
        ("Stdlib", "stream", "socketserver.StreamRequestHandler"),
        ("StdlibDgram", "dgram", "socketserver.DatagramRequestHandler"),
        ("Plain", "stream", "socketserver.BaseRequestHandler"),
        ("Plain", "dgram", "socketserver.BaseRequestHandler"),
        ("Ours", "stream", "servers.StreamRequestHandler"),
        ("Outer.Inner", "stream", "socketserver.BaseRequestHandler"),
    ],
)
def test_handler_classes_resolve(
    handler_modules: str, attr: str, socket_type: str, base: str
) -> None:
    spec = f"{handler_modules}_good:{attr}"
    s = one_server(server(handler=f'"{spec}"', socket_type=f'"{socket_type}"'))
    cls = s.handler_class()
    assert cls.__qualname__ == attr and cls.__module__ == f"{handler_modules}_good"
    assert resolve_handler(spec, socket_type) is cls


@pytest.mark.parametrize("name", sorted(BUILTIN_SERVICES))
def test_builtin_handlers_follow_socket_type(name: str) -> None:
    for socket_type in ("stream", "dgram"):
        s = one_server(server(handler=f'"{name}"', socket_type=f'"{socket_type}"'))
        expected = getattr(BUILTIN_SERVICES[name], socket_type)
        assert s.handler_class() is expected
        assert issubclass(expected, servers.BaseRequestHandler)


@pytest.mark.parametrize(
    ("handler", "socket_type", "message"),
    [
        ("{m}_good:not_a_class", "stream", "'{m}_good:not_a_class' is not a class, it is an int"),
        ("{m}_good:NotAHandler", "stream", "'{m}_good:NotAHandler' is not a request handler"),
        (
            "{m}_good:Missing",
            "stream",
            "cannot find '{m}_good:Missing': module '{m}_good' has no attribute 'Missing'",
        ),
        (
            "{m}_good:Outer.Nope",
            "stream",
            "cannot find '{m}_good:Outer.Nope': module '{m}_good' has no attribute 'Outer.Nope'",
        ),
        (
            "{m}_absent:X",
            "stream",
            "cannot import module '{m}_absent': ModuleNotFoundError: No module named '{m}_absent'",
        ),
        (
            "{m}_raises:X",
            "stream",
            "cannot import module '{m}_raises': RuntimeError: boom at import",
        ),
        ("{m}_exits:X", "stream", "cannot import module '{m}_exits': SystemExit: 3"),
        ("{m}_syntax:X", "stream", "cannot import module '{m}_syntax': SyntaxError: "),
        (
            "{m}_imports_missing:X",
            "stream",
            "cannot import module '{m}_imports_missing': "
            "ModuleNotFoundError: No module named 'selectd_no_such_dependency'",
        ),
        (
            "{m}_good:StdlibDgram",
            "stream",
            "'{m}_good:StdlibDgram' is a DatagramRequestHandler: it needs socket_type = \"dgram\"",
        ),
        (
            "{m}_good:Stdlib",
            "dgram",
            "'{m}_good:Stdlib' is a StreamRequestHandler: it needs socket_type = \"stream\"",
        ),
        ("{m}_good:Ours", "dgram", "'{m}_good:Ours' is a StreamRequestHandler"),
        (
            "servers:DatagramRequestHandler",
            "stream",
            "'servers:DatagramRequestHandler' is a DatagramRequestHandler",
        ),
    ],
)
def test_handler_errors_name_the_key_and_carry_no_traceback(
    handler_modules: str, handler: str, socket_type: str, message: str
) -> None:
    spec, message = handler.format(m=handler_modules), message.format(m=handler_modules)
    (found,) = problems(server(handler=f'"{spec}"', socket_type=f'"{socket_type}"'))
    assert found.startswith(f"servers.s.handler: {message}"), found
    assert "Traceback" not in found and 'File "' not in found and "\n" not in found
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_handler(spec, socket_type)


def test_handler_class_resolves_again_at_runtime(handler_modules: str) -> None:
    s = one_server(server(handler=f'"{handler_modules}_good:Stdlib"'))
    del sys.modules[f"{handler_modules}_good"]
    assert s.handler_class().__name__ == "Stdlib"
    assert s.handler_class() is s.handler_class()  # the module is imported once, then reused


# -- command servers ---------------------------------------------------------------------------

COMMAND_ONLY = {
    "env",
    "passenv",
    "cwd",
    "user",
    "group",
    "rlimit_cpu",
    "rlimit_nofile",
    "rlimit_as",
}
FORK_ONLY = {"worker_timeout", "max_requests", "max_rss"}


def command_server(name: str = "s", **keys: str | None) -> str:
    """A [servers.NAME] table with a command instead of a handler."""
    return server(name, **{"handler": None, "command": '["/bin/cat", "-u"]', **keys})


def test_new_keys_default_to_off() -> None:
    s = one_server(server())
    assert s.command is None and s.handler == "echo"
    assert (dict(s.env), s.passenv, s.cwd, s.user, s.group) == ({}, (), None, None, None)
    assert isinstance(s.env, MappingProxyType)
    assert (s.rlimit_cpu, s.rlimit_nofile, s.rlimit_as) == (None, None, None)
    assert (s.instances, s.per_source, s.cps, s.banner_fail, s.access_times) == (
        None,
        None,
        None,
        None,
        (),
    )
    assert (s.worker_timeout, s.max_requests, s.max_requests_jitter, s.max_rss) == (
        None,
        None,
        0,
        None,
    )
    assert s.scheduling_policy is None, "unset: the daemon's own policy, inherited"


def test_a_command_server_runs_exec_and_has_no_handler_class() -> None:
    s = one_server(command_server())
    assert (s.command, s.handler, s.concurrency) == (("/bin/cat", "-u"), None, "exec")
    assert (s.socket_type, s.workers, s.max_queue) == ("stream", 1, 128)
    with pytest.raises(ValueError, match=r"^servers\.s runs a command, it has no handler class$"):
        s.handler_class()
    dgram = one_server(command_server(socket_type='"dgram"'))
    assert (dgram.socket_type, dgram.concurrency) == ("dgram", "exec")


def test_a_command_server_takes_every_exec_key() -> None:
    s = one_server(
        command_server(
            env='{ TZ = "UTC", "weird name" = "", EMPTY = "" }',
            passenv='["PATH", "_X1"]',
            cwd='"/srv/ftp"',
            user='"nobody"',
            group='"65534"',
            rlimit_cpu="1",
            rlimit_nofile="3",
            rlimit_as='"200MiB"',
        )
    )
    assert dict(s.env) == {"TZ": "UTC", "weird name": "", "EMPTY": ""}
    assert (s.passenv, s.cwd, s.user, s.group) == (("PATH", "_X1"), "/srv/ftp", "nobody", "65534")
    assert (s.rlimit_cpu, s.rlimit_nofile, s.rlimit_as) == (1, 3, 200 << 20)
    with pytest.raises(TypeError):
        s.env["TZ"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1048576", 1 << 20),
        ('"1MiB"', 1 << 20),
        ('"200MiB"', 200 << 20),
        ('"512M"', 512 << 20),
        ('"512m"', 512 << 20),
        ('"512MB"', 512 << 20),
        ('"1GiB"', 1 << 30),
        ('"1G"', 1 << 30),
        ('"2 GiB"', 2 << 30),
        ('"1T"', 1 << 40),
        ('"4096KiB"', 4 << 20),
        ('"1536k"', 1536 << 10),
        ('"1048577B"', (1 << 20) + 1),
        ("9223372036854775807", 2**63 - 1),
    ],
)
def test_byte_sizes(value: str, size: int) -> None:
    s = one_server(command_server(rlimit_as=value))
    assert s.rlimit_as == size and type(s.rlimit_as) is int
    fork = one_server(server(concurrency='"fork"', max_rss=value))
    assert fork.max_rss == size
    assert parse_config(dump_config(parse_config(command_server(rlimit_as=value)))).servers[
        "s"
    ] == (s)


@pytest.mark.parametrize(
    ("size", "dumped"),
    [
        (1 << 20, "1MiB"),
        (1536 << 10, "1536KiB"),
        (3 << 30, "3GiB"),
        (1 << 40, "1TiB"),
        ((1 << 20) + 1, (1 << 20) + 1),
    ],
)
def test_byte_sizes_dump_in_the_largest_unit_that_divides_them(size: int, dumped: Any) -> None:
    text = dump_config(parse_config(command_server(rlimit_as=str(size))))
    assert tomllib.loads(text)["servers"]["s"]["rlimit_as"] == dumped


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1048575", "must be at least 1 MiB (1048576 bytes), got 1048575"),
        ('"1K"', "must be at least 1 MiB (1048576 bytes), got '1K'"),
        ('"0GiB"', "must be at least 1 MiB"),
        ("-1", "must be at least 1 MiB"),
        ('"1.5G"', 'must be an integer number of bytes, or a string like "512MiB"'),
        ('"1048576"', "must be an integer number of bytes, or a string like"),
        ('"12iB"', "must be an integer number of bytes, or a string like"),
        ('"G"', "must be an integer number of bytes, or a string like"),
        ('"1P"', "must be an integer number of bytes, or a string like"),
        ('""', "must be an integer number of bytes, or a string like"),
        ("true", "must be an integer number of bytes, or a string like"),
        ("1.5e9", "must be an integer number of bytes, or a string like"),
        ('"99999999999999999999T"', "must be at most 9223372036854775807 bytes"),
    ],
)
def test_byte_size_errors(value: str, expected: str) -> None:
    found = problems(command_server(rlimit_as=value))
    assert found == [f"servers.s.rlimit_as: {expected}"] or found[0].startswith(
        f"servers.s.rlimit_as: {expected}"
    ), found
    (fork,) = problems(server(concurrency='"fork"', max_rss=value))
    assert fork.startswith(f"servers.s.max_rss: {expected}"), fork


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"handler": None},
            "servers.s.handler: missing (required); expected a built-in service "
            '(echo, discard, chargen, daytime, time) or "package.module:Class"; or set command',
        ),
        (
            {"command": '["/bin/cat"]'},
            "servers.s.handler: set handler or command, not both",
        ),
        ({"command": "[]"}, "servers.s.command: must be a list: the program and its arguments"),
        ({"command": '"/bin/cat"'}, "servers.s.command: must be a list: the program"),
        (
            {"command": '["/bin/cat", ""]'},
            "servers.s.command[1]: must be a non-empty string, got ''",
        ),
        ({"command": '["/bin/cat", 3]'}, "servers.s.command[1]: must be a non-empty string, got 3"),
        (
            {"command": '["/bin/c\\u0000at"]'},
            "servers.s.command[0]: must not contain a NUL character",
        ),
        (
            {"concurrency": '"exec"'},
            'servers.s.concurrency: concurrency = "exec" is what a server with a command gets',
        ),
        (
            {"concurrency": '"process"'},
            'servers.s.concurrency: must be one of "inline", "thread", "fork", got \'process\'',
        ),
    ],
)
def test_handler_or_command_errors(keys: dict[str, str | None], expected: str) -> None:
    found = problems(server(**keys))
    assert any(p == expected or p.startswith(expected) for p in found), found


def test_an_invalid_command_causes_no_follow_on_errors() -> None:
    # Neither "handler missing" nor "env has no effect without command".
    assert problems(server(handler=None, command="[]", env='{ A = "b" }')) == [
        "servers.s.command: must be a list: the program and its arguments, "
        'like ["/usr/sbin/in.tftpd", "-s"], got []'
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("concurrency", '"thread"'),
        ("concurrency", '"exec"'),
        ("workers", "4"),
        ("max_queue", "16"),
        ("options", "{ a = 1 }"),
        ("options", "{}"),
    ],
)
def test_pool_keys_have_no_effect_with_a_command(key: str, value: str) -> None:
    (found,) = problems(command_server(**{key: value}))
    assert found == (
        f"servers.s.{key}: {key} has no effect with command "
        "(each request runs the program in a process of its own)"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("env", '{ A = "b" }'),
        ("env", "{}"),
        ("passenv", '["PATH"]'),
        ("passenv", "[]"),
        ("cwd", '"/"'),
        ("user", '"nobody"'),
        ("group", '"nogroup"'),
        ("rlimit_cpu", "5"),
        ("rlimit_nofile", "64"),
        ("rlimit_as", '"1GiB"'),
    ],
)
def test_exec_keys_have_no_effect_with_a_handler(key: str, value: str) -> None:
    (found,) = problems(server(**{key: value}))
    assert found == (
        f"servers.s.{key}: {key} has no effect without command "
        "(it applies to the program a command server runs)"
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"env": "3"}, 'servers.s.env: must be a table of strings like { TZ = "UTC" }, got 3'),
        ({"env": "{ A = 1 }"}, "servers.s.env.A: must be a string, got 1"),
        (
            {"env": '{ "A=B" = "c" }'},
            "servers.s.env.\"A=B\": a variable name must be non-empty, without '=' or NUL",
        ),
        ({"env": '{ "" = "c" }'}, 'servers.s.env."": a variable name must be non-empty'),
        (
            {"env": '{ A = "x\\u0000y" }'},
            "servers.s.env.A: must not contain a NUL character, got 'x\\x00y'",
        ),
        ({"passenv": '"PATH"'}, 'servers.s.passenv: must be a list of variable names like ["LANG"'),
        (
            {"passenv": '["PATH", "1X"]'},
            "servers.s.passenv[1]: must be a variable name ([A-Za-z_][A-Za-z0-9_]*), got '1X'",
        ),
        ({"passenv": '["A-B"]'}, "servers.s.passenv[0]: must be a variable name"),
        ({"passenv": "[1]"}, "servers.s.passenv[0]: must be a variable name"),
        ({"cwd": '"srv"'}, "servers.s.cwd: must be an absolute path, got 'srv'"),
        ({"cwd": "1"}, "servers.s.cwd: must be an absolute path, got 1"),
        ({"user": '""'}, "servers.s.user: must be a non-empty string, got ''"),
        ({"user": "0"}, "servers.s.user: must be a non-empty string, got 0"),
        ({"group": '"a\\u0000"'}, "servers.s.group: must not contain a NUL character"),
        ({"rlimit_cpu": "0"}, "servers.s.rlimit_cpu: must be an integer >= 1, got 0"),
        ({"rlimit_cpu": "1.5"}, "servers.s.rlimit_cpu: must be an integer >= 1, got 1.5"),
        (
            {"rlimit_cpu": "2147483648"},
            "servers.s.rlimit_cpu: must be an integer <= 2147483647, got 2147483648",
        ),
        ({"rlimit_nofile": "2"}, "servers.s.rlimit_nofile: must be an integer >= 3, got 2"),
        ({"rlimit_nofile": '"64"'}, "servers.s.rlimit_nofile: must be an integer >= 3, got '64'"),
        # Above fs.nr_open no process may have it: the program's setrlimit would fail.
        (
            {"rlimit_nofile": str(NR_OPEN + 1)},
            f"servers.s.rlimit_nofile: must be an integer <= {NR_OPEN}, got {NR_OPEN + 1}",
        ),
    ],
)
def test_exec_key_errors(keys: dict[str, str], expected: str) -> None:
    found = problems(command_server(**keys))
    assert any(p == expected or p.startswith(expected) for p in found), found


def test_command_servers_dump_and_parse_back_equal() -> None:
    text = command_server(
        "date",
        socket_type='"dgram"',
        command='["/bin/date", "-u", "+%s"]',
        env='{ TZ = "UTC", "with space" = "v" }',
        passenv='["PATH"]',
        cwd='"/tmp"',
        user='"nobody"',
        group='"nogroup"',
        rlimit_cpu="10",
        rlimit_nofile="64",
        rlimit_as="314572800",
        instances="3",
        cps="[5, 60]",
        access_times='["8:00-9:30", "22:00-06:00"]',
    )
    config = parse_config(text)
    dumped = dump_config(config)
    assert parse_config(dumped) == config
    doc = tomllib.loads(dumped)["servers"]["date"]
    assert doc["command"] == ["/bin/date", "-u", "+%s"]
    assert doc["env"] == {"TZ": "UTC", "with space": "v"}
    assert (doc["rlimit_as"], doc["cps"]) == ("300MiB", [5, 60])
    assert doc["access_times"] == ["08:00-09:30", "22:00-06:00"]
    assert "handler" not in doc and "concurrency" not in doc and "options" not in doc
    assert {"workers", "max_queue"}.isdisjoint(doc)
    # Equality sees every new key.
    for key, value in [("env", '{ TZ = "GMT" }'), ("cwd", '"/"'), ("rlimit_cpu", "11")]:
        changed = parse_config(command_server("date", **{key: value}))
        assert changed.servers["date"] != config.servers["date"]


def test_a_command_server_and_a_handler_server_differ() -> None:
    a = one_server(server())
    b = one_server(command_server())
    assert a != b and a.listen == b.listen


# -- limits and worker health ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "attr", "value"),
    [
        ({"instances": "1"}, "instances", 1),
        ({"instances": "2147483647"}, "instances", 2147483647),
        ({"per_source": "1"}, "per_source", 1),
        ({"socket_type": '"dgram"', "per_source": "4"}, "per_source", 4),
        ({"cps": "[1, 1]"}, "cps", (1, 1)),
        ({"cps": "[50, 86400]"}, "cps", (50, 86400)),
        ({"banner_fail": '""'}, "banner_fail", ""),
        ({"banner_fail": '"go away\\r\\n"'}, "banner_fail", "go away\r\n"),
        ({"banner_fail": f'"{"é" * 2048}"'}, "banner_fail", "é" * 2048),
        ({"listen": '"unix:/tmp/u"', "banner_fail": '"no"'}, "banner_fail", "no"),
        ({"access_times": "[]"}, "access_times", ()),
        ({"access_times": '["00:00-23:59"]'}, "access_times", ((0, 1439),)),
        (
            {"access_times": '["8:05-9:30", "22:00-06:00"]'},
            "access_times",
            ((485, 570), (1320, 360)),
        ),
        ({"access_times": '["12:00-12:00"]'}, "access_times", ((720, 720),)),
        ({"concurrency": '"fork"', "worker_timeout": "0.5"}, "worker_timeout", 0.5),
        ({"concurrency": '"fork"', "worker_timeout": "86400"}, "worker_timeout", 86400.0),
        ({"concurrency": '"fork"', "max_requests": "1"}, "max_requests", 1),
        (
            {"concurrency": '"fork"', "max_requests": "100", "max_requests_jitter": "0"},
            "max_requests_jitter",
            0,
        ),
        (
            {"concurrency": '"fork"', "max_requests": "100", "max_requests_jitter": "500"},
            "max_requests_jitter",
            500,
        ),
        ({"concurrency": '"fork"', "max_rss": '"64MiB"'}, "max_rss", 64 << 20),
        ({"concurrency": '"fork"', "scheduling_policy": '"batch"'}, "scheduling_policy", "batch"),
        ({"scheduling_policy": '"idle"'}, "scheduling_policy", "idle"),
        (
            {"handler": None, "command": '["/bin/cat"]', "scheduling_policy": '"other"'},
            "scheduling_policy",
            "other",
        ),
    ],
)
def test_limit_and_worker_keys(keys: dict[str, str], attr: str, value: Any) -> None:
    got = getattr(one_server(server(**keys)), attr)
    assert got == value and type(got) is type(value)
    config = parse_config(server(**keys))
    assert parse_config(dump_config(config)) == config


def test_limits_apply_to_command_servers_too() -> None:
    s = one_server(command_server(instances="2", per_source="1", cps="[3, 4]", banner_fail='"x"'))
    assert (s.instances, s.per_source, s.cps, s.banner_fail) == (2, 1, (3, 4), "x")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"instances": "0"}, "servers.s.instances: must be an integer >= 1, got 0"),
        ({"instances": '"UNLIMITED"'}, "servers.s.instances: must be an integer >= 1"),
        ({"instances": "true"}, "servers.s.instances: must be an integer >= 1, got True"),
        ({"per_source": "0"}, "servers.s.per_source: must be an integer >= 1, got 0"),
        (
            {"listen": '"unix:/tmp/u"', "per_source": "2"},
            "servers.s.per_source: per_source has no effect on a unix socket "
            "(its clients have no IP address)",
        ),
        ({"cps": "50"}, "servers.s.cps: must be a list of two integers [COUNT, SECONDS]"),
        ({"cps": "[50]"}, "servers.s.cps: must be a list of two integers"),
        ({"cps": "[1, 2, 3]"}, "servers.s.cps: must be a list of two integers"),
        ({"cps": "[0, 10]"}, "servers.s.cps[0]: must be an integer >= 1, got 0"),
        ({"cps": "[5, 0]"}, "servers.s.cps[1]: must be an integer >= 1, got 0"),
        ({"cps": "[5, 86401]"}, "servers.s.cps[1]: must be an integer <= 86400, got 86401"),
        ({"cps": '[5, "10"]'}, "servers.s.cps[1]: must be an integer >= 1, got '10'"),
        ({"banner_fail": "1"}, "servers.s.banner_fail: must be a string, got 1"),
        (
            {"banner_fail": f'"{"é" * 2049}"'},
            "servers.s.banner_fail: is 4098 bytes in UTF-8, more than 4096",
        ),
        (
            {"socket_type": '"dgram"', "banner_fail": '"x"'},
            'servers.s.banner_fail: banner_fail has no effect with socket_type = "dgram"',
        ),
        ({"access_times": '"08:00-17:00"'}, "servers.s.access_times: must be a list of"),
        (
            {"access_times": '["08:00-17:00", "8-17"]'},
            'servers.s.access_times[1]: must be "HH:MM-HH:MM" (00:00 to 23:59), like',
        ),
        ({"access_times": "[800]"}, 'servers.s.access_times[0]: must be "HH:MM-HH:MM"'),
        ({"access_times": '["08:00 - 17:00"]'}, "servers.s.access_times[0]: must be"),
        ({"access_times": '["8:0-9:00"]'}, "servers.s.access_times[0]: must be"),
        (
            {"access_times": '["12:00-24:00"]'},
            "servers.s.access_times[0]: '12:00-24:00': a time must be from 00:00 to 23:59",
        ),
        (
            {"access_times": '["08:60-09:00"]'},
            "servers.s.access_times[0]: '08:60-09:00': a time must be",
        ),
        (
            {"concurrency": '"fork"', "worker_timeout": "0"},
            "servers.s.worker_timeout: must be a number > 0, got 0",
        ),
        (
            {"concurrency": '"fork"', "worker_timeout": "86401"},
            "servers.s.worker_timeout: must be a number <= 86400",
        ),
        (
            {"concurrency": '"fork"', "max_requests": "0"},
            "servers.s.max_requests: must be an integer >= 1, got 0",
        ),
        (
            {"concurrency": '"fork"', "max_requests": "9", "max_requests_jitter": "-1"},
            "servers.s.max_requests_jitter: must be an integer >= 0, got -1",
        ),
        (
            {"concurrency": '"fork"', "max_requests_jitter": "5"},
            "servers.s.max_requests_jitter: max_requests_jitter has no effect without max_requests",
        ),
        (
            {"concurrency": '"fork"', "max_requests_jitter": "0"},
            "servers.s.max_requests_jitter: max_requests_jitter has no effect without",
        ),
        (
            {"concurrency": '"fork"', "scheduling_policy": '"fifo"'},
            'servers.s.scheduling_policy: must be one of "other", "batch", "idle", got \'fifo\'',
        ),
        (
            {"scheduling_policy": '"BATCH"'},
            "servers.s.scheduling_policy: must be one of",
        ),
        (
            {"concurrency": '"inline"', "scheduling_policy": '"batch"'},
            "servers.s.scheduling_policy: scheduling_policy has no effect with concurrency = "
            '"inline" (its handler runs in the loop, whose policy is the daemon\'s)',
        ),
        (
            {"socket_type": '"dgram"', "scheduling_policy": '"other"'},
            "servers.s.scheduling_policy: scheduling_policy has no effect with concurrency = ",
        ),
    ],
)
def test_limit_and_worker_errors(keys: dict[str, str], expected: str) -> None:
    found = problems(server(**keys))
    assert any(p == expected or p.startswith(expected) for p in found), found


@pytest.mark.parametrize("key", [*sorted(FORK_ONLY), "max_requests_jitter"])
@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"concurrency": '"inline"'},
        {"socket_type": '"dgram"'},
        {"handler": None, "command": '["/bin/true"]'},
    ],
)
def test_worker_health_keys_need_a_fork_pool(key: str, keys: dict[str, str | None]) -> None:
    value = {"worker_timeout": "5", "max_rss": '"1GiB"'}.get(key, "10")
    found = problems(server(**keys, **{key: value}))
    assert found == [
        f'servers.s.{key}: {key} has no effect without concurrency = "fork" '
        "(it is about the fork pool's workers)"
    ]


def test_a_fork_pool_dumps_its_worker_keys() -> None:
    text = server(
        concurrency='"fork"',
        worker_timeout="2.5",
        max_requests="1000",
        max_requests_jitter="50",
        max_rss="268435456",
    )
    config = parse_config(text)
    doc = tomllib.loads(dump_config(config))["servers"]["s"]
    assert (doc["worker_timeout"], doc["max_requests"], doc["max_requests_jitter"]) == (
        2.5,
        1000,
        50,
    )
    assert doc["max_rss"] == "256MiB"
    assert parse_config(dump_config(config)) == config
    # Without max_requests, the jitter's default is not written (it would be an error).
    plain_fork = tomllib.loads(dump_config(parse_config(server(concurrency='"fork"'))))
    assert "max_requests_jitter" not in plain_fork["servers"]["s"]


# -- load --------------------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf" + server("only").encode())  # a BOM is forgiven
    monkeypatch.setenv("SELECTD_CONFIG", "/nonexistent/ignored.toml")
    config = load_config(str(path))
    assert (list(config.servers), config.source) == (["only"], str(path))


def test_load_config_uses_selectd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text(server("from-env"))
    monkeypatch.setenv("SELECTD_CONFIG", str(path))
    config = load_config(None)
    assert (list(config.servers), config.source) == (["from-env"], str(path))


def test_load_config_none_is_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELECTD_CONFIG", raising=False)
    config = load_config(None)
    assert config.source == "<default>"
    assert config.daemon.control_socket == default_control_socket()
    got = {n: (str(s.listen), s.socket_type, s.handler) for n, s in config.servers.items()}
    assert got == {
        "echo": ("127.0.0.1:7007", "stream", "echo"),
        "echo-udp": ("127.0.0.1:7007", "dgram", "echo"),
        "discard": ("127.0.0.1:7009", "stream", "discard"),
        "chargen": ("127.0.0.1:7019", "stream", "chargen"),
        "daytime": ("127.0.0.1:7013", "stream", "daytime"),
        "time": ("127.0.0.1:7037", "stream", "time"),
    }
    assert config.servers["echo"].concurrency == "thread"
    assert "control_socket" not in (REPO / "daemon" / "default.toml").read_text()
    monkeypatch.setenv("SELECTD_CONFIG", "")  # empty is unset
    assert load_config(None) == config


def test_load_config_dash_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(server("piped").encode())))
    config = load_config("-")
    assert (list(config.servers), config.source) == (["piped"], "<stdin>")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff")))
    with pytest.raises(ConfigError, match=r"^<stdin>: cannot read: not UTF-8 text"):
        load_config("-")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.toml", "No such file or directory"),
        (lambda d: d, "Is a directory"),
        (
            lambda d: _write(d / "bin.toml", b"a = 1\n\xff\xfe"),
            "not UTF-8 text (byte 0xff at offset 6)",
        ),
    ],
)
def test_unreadable_files(tmp_path: Path, make: Callable[[Path], Path], reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}: cannot read: {reason}"]


def test_a_nul_in_the_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/tmp/a\0b.toml")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- dump --------------------------------------------------------------------------------------


def test_dump_of_the_default_parses_back_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELECTD_CONFIG", raising=False)
    config = load_config(None)
    text = dump_config(config)
    assert parse_config(text) == config
    assert "[servers.echo]" in text and "[servers.echo-udp]" in text


def test_dump_fills_in_every_default_that_applies() -> None:
    config = parse_config(
        server("tcp")
        + server("udp", listen='"127.0.0.1:9"', socket_type='"dgram"')
        + server("unix", listen='"unix:/tmp/x"', concurrency='"inline"')
    )
    doc = tomllib.loads(dump_config(config))
    assert set(doc["daemon"]) == {"control_socket", "log_format", "log_level", "shutdown_timeout"}
    # Unset optional keys (None) are left out, and so are the keys that only apply to command
    # servers or fork pools.
    unset = {"command", "instances", "per_source", "cps", "banner_fail"}
    unset |= {"worker_timeout", "max_requests", "max_requests_jitter", "max_rss"}
    unset |= {"scheduling_policy"} | COMMAND_ONLY
    assert set(SERVER_FIELDS) - set(doc["servers"]["tcp"]) == unset
    assert set(SERVER_FIELDS) - set(doc["servers"]["udp"]) == unset | {
        "workers",
        "max_queue",
        "request_queue_size",
        "timeout",
    }
    assert set(SERVER_FIELDS) - set(doc["servers"]["unix"]) == unset | {
        "workers",
        "max_queue",
        "allow_reuse_address",
        "allow_reuse_port",
    }
    assert doc["servers"]["tcp"]["workers"] == 16
    assert doc["servers"]["tcp"]["access_times"] == []


def test_dump_writes_optional_daemon_keys_when_set() -> None:
    text = '[daemon]\npidfile = "/run/s.pid"\nuser = "nobody"\ngroup = "nogroup"\n'
    config = parse_config(text)
    assert tomllib.loads(dump_config(config))["daemon"]["user"] == "nobody"
    assert parse_config(dump_config(config)) == config


def test_dump_of_the_example_parses_back_equal() -> None:
    config = load_config(str(EXAMPLE))
    assert len(config.servers) >= 4
    assert parse_config(dump_config(config)) == config


def test_the_example_shows_every_key_with_a_comment() -> None:
    text = EXAMPLE.read_text()
    for key in [*DAEMON_FIELDS, *SERVER_FIELDS]:
        if key == "options":
            assert re.search(r"^\[servers\.[\w-]+\.options\]", text, re.M)
            continue
        match = re.search(rf"^(# )?{key} = ", text, re.M)
        assert match, f"etc/selectd.toml does not show {key}"
        before = text[: match.start()].rstrip("\n").splitlines()
        assert before and before[-1].startswith("#"), f"{key} has no comment above it"


def test_dump_round_trips_every_kind_of_value() -> None:
    text = server(
        "rich",
        listen='"[::1]:0"',
        allow='["10.0.0.0/8", "10.1.2.3", "::1"]',
        deny='["192.168.0.0/16"]',
        timeout="0",
    ) + (
        "[servers.rich.options]\n"
        'a = "text with \\"quotes\\" and \\u00e9"\nb = [1, 2.5, true, 1979-05-27, 07:32:00]\n'
        "c = { d = 1979-05-27T07:32:00-08:00, e = [] }\nf = inf\n"
        '[[servers.rich.options.tables]]\nname = "x"\n'
    )
    config = parse_config(text)
    assert parse_config(dump_config(config)) == config
    options = config.servers["rich"].options
    assert options["b"][3:] == [date(1979, 5, 27), time(7, 32)] and math.isinf(options["f"])


# -- fuzz --------------------------------------------------------------------------------------

_IMPORTABLE = {"servers", "servers.services", "socketserver"}


def _guarded_import(name: str) -> Any:
    # Random handler strings must not import random modules (`antigravity` opens a browser).
    if name not in _IMPORTABLE:
        raise ModuleNotFoundError(f"No module named {name!r}")
    return sys.modules[name] if name in sys.modules else __import__(name)


def _config_or_error(text: str) -> None:
    with mock.patch.object(config_handler, "import_module", _guarded_import):
        try:
            config = parse_config(text)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            return
        assert isinstance(config, Config)
        assert parse_config(dump_config(config)) == config


_PLAUSIBLE: dict[str, list[Any]] = {
    "listen": ["127.0.0.1:0", "127.0.0.1:7", "[::1]:7", "localhost:7", "unix:/tmp/f", "unix:@f"],
    "socket_type": ["stream", "dgram"],
    "handler": [*BUILTIN_SERVICES, "servers.services:EchoStreamHandler", "socketserver:X", "x:y"],
    "concurrency": ["inline", "thread", "fork", "exec"],
    "command": [["/bin/true"], ["/bin/echo", "-n", "x"], [], ["a", ""]],
    "workers": [1, 4, 1024, 1025, 0],
    "max_queue": [0, 128, 65537],
    "request_queue_size": [1, 128, 0],
    "timeout": [0, 0.5, 60, 86401, -1],
    "allow": [[], ["10.0.0.0/8"], ["::1"], ["10.0.0.1/8"]],
    "deny": [[], ["127.0.0.1"]],
    "options": [{}, {"a": 1}],
    "control_socket": ["/tmp/c.sock", "rel"],
    "log_format": ["auto", "json", "xml"],
    "log_level": ["INFO", "debug", "loud"],
    "shutdown_timeout": [0.1, 10, 0, 4000],
    "pidfile": ["/tmp/p", "p"],
    "env": [{}, {"A": "b"}, {"A": 1}, {"A=B": "c"}],
    "passenv": [[], ["PATH"], ["1x"]],
    "cwd": ["/", "rel"],
    "user": ["nobody", ""],
    "group": ["nogroup", ""],
    "rlimit_cpu": [1, 0],
    "rlimit_nofile": [3, 64, 2],
    "rlimit_as": ["1GiB", 1 << 20, "1K", "12"],
    "instances": [1, 64, 0],
    "per_source": [1, 0],
    "cps": [[50, 10], [0, 1], [1], [1, 86401]],
    "banner_fail": ["no\r\n", "", 1],
    "access_times": [[], ["08:00-17:00"], ["22:00-06:00", "12:00-12:30"], ["25:00-01:00"]],
    "worker_timeout": [0.5, 30, 0],
    "max_requests": [1, 1000, 0],
    "max_requests_jitter": [0, 50, -1],
    "max_rss": ["256MiB", 1 << 30, 5],
    "scheduling_policy": ["batch", "idle", "other", "fifo"],
}

_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.datetimes(timezones=st.sampled_from([None, UTC])),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _key_value(key: str) -> st.SearchStrategy[Any]:
    plausible = st.sampled_from(_PLAUSIBLE.get(key, [True, False]))
    return st.one_of(plausible, plausible, plausible, _values)  # mostly plausible


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    optional = {k: _key_value(k) for k in keys}
    optional["typo"] = _values
    return st.fixed_dictionaries({}, optional=optional)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


_documents = st.fixed_dictionaries(
    {},
    optional={
        "daemon": _table(list(DAEMON_FIELDS)) | _values,
        "servers": st.dictionaries(
            st.sampled_from(["echo", "udp", "a.b", "x y", ""]) | st.text(max_size=5),
            _table(list(SERVER_FIELDS)) | _values,
            max_size=3,
        ),
        "extra": _values,
    },
)


@FUZZ
@given(_documents)
def test_fuzz_documents_give_a_config_or_a_config_error(doc: dict[str, Any]) -> None:
    _config_or_error(tomli_w.dumps(doc))


_clean_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.datetimes(timezones=st.sampled_from([None, UTC])),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def _valid_server(draw: st.DrawFn, port: int) -> dict[str, Any]:
    """A [servers.NAME] table that must parse: each key, if present, valid where it is."""
    socket_type = draw(st.sampled_from(["stream", "dgram"]))
    unix = draw(st.booleans())
    listen = (
        f"unix:@selectd-fuzz-{port}"
        if unix
        else draw(
            st.sampled_from(
                [f"127.0.0.1:{port}", f"[::1]:{port}", f"localhost:{port}", "0.0.0.0:0"]
            )
        )
    )
    runs_command = draw(st.booleans())
    modes = ["inline", "thread"] + (["fork"] if socket_type == "stream" else [])
    concurrency = "exec" if runs_command else draw(st.sampled_from(modes))
    table: dict[str, Any] = {"listen": listen}
    if runs_command:
        argument = st.text(min_size=1, max_size=8).filter(lambda a: "\0" not in a)
        table["command"] = draw(st.lists(argument, min_size=1, max_size=3))
    else:
        table["handler"] = draw(st.sampled_from(sorted(BUILTIN_SERVICES)))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "socket_type": st.just(socket_type),
        "enabled": st.booleans(),
        "instances": st.integers(1, 2**31 - 1),
        "cps": st.tuples(st.integers(1, 1000), st.integers(1, 86400)).map(list),
        "access_times": st.lists(
            st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 23)).map(
                lambda t: f"{t[0]}:{t[1]:02d}-{t[2]:02d}:00"
            ),
            max_size=3,
        ),
    }
    if runs_command:
        names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
        optional["env"] = st.dictionaries(
            st.text(min_size=1, max_size=6).filter(lambda k: "=" not in k and "\0" not in k),
            st.text(max_size=6).filter(lambda v: "\0" not in v),
            max_size=3,
        )
        optional["passenv"] = st.lists(names, max_size=3)
        optional["cwd"] = st.sampled_from(["/", "/srv/x y"])
        optional["user"] = st.sampled_from(["nobody", "0"])
        optional["group"] = st.sampled_from(["nogroup", "0"])
        optional["rlimit_cpu"] = st.integers(1, 2**31 - 1)
        optional["rlimit_nofile"] = st.integers(3, NR_OPEN)
        optional["rlimit_as"] = st.integers(1 << 20, 2**63 - 1) | st.sampled_from(
            ["1MiB", "200M", "3 GiB", "1T", "1048577B"]
        )
    else:
        optional["concurrency"] = st.just(concurrency)
        optional["options"] = st.dictionaries(st.text(max_size=6), _clean_values, max_size=3)
    if concurrency in ("thread", "fork"):
        optional["workers"] = st.integers(1, 1024)
        optional["max_queue"] = st.integers(0, 65536)
    if concurrency == "fork":
        optional["worker_timeout"] = st.floats(0.001, 86400) | st.integers(1, 86400)
        optional["max_rss"] = st.integers(1 << 20, 2**40) | st.just("1GiB")
        if draw(st.booleans()):
            table["max_requests"] = draw(st.integers(1, 2**31 - 1))
            optional["max_requests_jitter"] = st.integers(0, 2**31 - 1)
    if socket_type == "stream":
        optional["request_queue_size"] = st.integers(1, 65535)
        optional["timeout"] = st.integers(0, 86400) | st.floats(0, 86400)
        optional["banner_fail"] = st.text(max_size=20)
    if not unix:
        optional["allow_reuse_address"] = st.booleans()
        optional["allow_reuse_port"] = st.booleans()
        nets = st.lists(st.sampled_from(["10.0.0.0/8", "10.1.2.3", "::1", "2001:db8::/32"]))
        optional["allow"] = nets
        optional["deny"] = nets
        optional["per_source"] = st.integers(1, 2**31 - 1)
    table.update(draw(st.fixed_dictionaries({}, optional=optional)))
    # Keys that others depend on are written whenever they differ from their defaults.
    if socket_type == "dgram":
        table["socket_type"] = "dgram"
    if not runs_command and concurrency != ("thread" if socket_type == "stream" else "inline"):
        table["concurrency"] = concurrency
    return table


@st.composite
def _valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True), max_size=4, unique=True)
    )
    daemon = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "control_socket": st.just("/tmp/selectd-fuzz/c.sock"),
                "log_format": st.sampled_from(["auto", "json", "console"]),
                "log_level": st.sampled_from(["debug", "INFO", "Warning", "error", "critical"]),
                "shutdown_timeout": st.floats(0.001, 3600) | st.integers(1, 3600),
                "pidfile": st.just("/tmp/selectd-fuzz.pid"),
                "user": st.text(min_size=1, max_size=8),
                "group": st.text(min_size=1, max_size=8),
            },
        )
    )
    servers_ = {name: draw(_valid_server(40000 + i)) for i, name in enumerate(names)}
    return {"daemon": daemon, "servers": servers_}


@FUZZ
@given(_valid_documents())
def test_fuzz_valid_documents_parse_and_round_trip(doc: dict[str, Any]) -> None:
    config = parse_config(tomli_w.dumps(doc))
    text = dump_config(config)
    assert parse_config(text) == config
    assert dump_config(parse_config(text)) == text


_TOKENS = [*"[]{}=\".,:#\n \t-_@/'\\01789abeflnrstuxy", "servers", "daemon", "listen", "handler"]
_TOMLISH = st.lists(st.sampled_from([*_TOKENS, "unix:", "echo", "127.0.0.1:0"]), max_size=40).map(
    "".join
)


@FUZZ
@given(st.one_of(_TOMLISH, st.text(max_size=40)))
def test_fuzz_text_gives_a_config_or_a_config_error(text: str) -> None:
    _config_or_error(text)
