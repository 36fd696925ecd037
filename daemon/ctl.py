"""`selectctl`: inspect and steer a running selectd through its control socket.

    selectctl [-s SOCKET | -c CONFIG] [--json] COMMAND [SERVER]

COMMAND is one of: ping, status [SERVER], reload, start|stop|pause|resume SERVER, upgrade,
shutdown [TIMEOUT], config, metrics. The socket is found as the daemon finds it: -s, else the
control_socket of -c CONFIG, else of $SELECTD_CONFIG or the default config.

Exit status: 0 on success, 1 when the daemon answered with an error (the message on stderr),
2 when it cannot be reached (the message names the socket path) or on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import tomllib
from typing import Any

from .config import ConfigError, default_control_socket

UNREACHABLE = 2
COMMANDS = (
    "ping",
    "status",
    "reload",
    "start",
    "stop",
    "pause",
    "resume",
    "shutdown",
    "upgrade",
    "config",
    "metrics",
)
NEEDS_SERVER = {"start", "stop", "pause", "resume"}
STATUS_COLUMNS = ("state", "listen", "concurrency", "workers", "requests", "errors", "active")


class Unreachable(Exception):
    pass


def request(path: str, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request, return the reply object; Unreachable when there is no daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise Unreachable(f"cannot reach selectd at {path}: {exc.strerror or exc}") from exc
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    except OSError as exc:
        raise Unreachable(f"selectd at {path} did not answer: {exc}") from exc
    finally:
        sock.close()
    if not reply:
        raise Unreachable(f"selectd at {path} closed the connection without answering")
    result = json.loads(reply)
    if not isinstance(result, dict):
        raise Unreachable(f"selectd at {path} answered something that is not a reply")
    return result


def socket_path(args: argparse.Namespace) -> str:
    """-s, else [daemon] control_socket of the config the daemon would read, else the default.

    Only that one key is read: validating the whole file would import every handler module,
    which selectctl has no business doing (and may not be able to).
    """
    if args.socket:
        return str(args.socket)
    path = args.config or os.environ.get("SELECTD_CONFIG") or None
    if path is None:
        return default_control_socket()
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("daemon", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    value = table.get("control_socket") if isinstance(table, dict) else None
    if value is None:
        return default_control_socket()
    if not isinstance(value, str):
        raise ConfigError(f"{path}: daemon.control_socket must be a string")
    return value


def format_status(result: dict[str, Any]) -> str:
    d = result["daemon"]
    lines = [
        f"selectd {d['version']} pid {d['pid']} up {d['uptime']:.0f}s  rss {d['rss'] // 1024} KiB"
        f"  cpu {d['cpu_percent']:.1f}%  fds {d['fds']}  threads {d['threads']}"
        f"  config {d['config']}"
    ]
    rows = [("server", *STATUS_COLUMNS, "queued")]
    for name, s in result["servers"].items():
        rows.append((name, *(str(s[c]) for c in STATUS_COLUMNS), str(s["queued"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for name, s in result["servers"].items():
        for w in s.get("worker_processes", []):
            lines.append(
                f"  {name} worker {w['pid']}: {'busy' if w['busy'] else 'idle'}, "
                f"{w['requests']} requests, rss {w['rss'] // 1024} KiB, cpu {w['cpu_percent']}%"
            )
    return "\n".join(lines)


def render(command: str, result: Any) -> str:
    if command == "status":
        return format_status(result)
    if isinstance(result, str):
        return result.rstrip("\n")
    if command == "reload":
        parts = [f"{k}: {', '.join(v)}" for k, v in result.items() if v]
        return "\n".join(parts) or "nothing changed"
    return json.dumps(result, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selectctl", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", help="the daemon's control socket")
    where.add_argument("-c", "--config", help="read control_socket from this config")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="with status: refresh every SECONDS (default 2) until Ctrl-C",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("argument", nargs="?", help="SERVER, or TIMEOUT for shutdown")
    args = parser.parse_args(argv)
    if args.watch is not None and not (0 < args.watch < 86400):
        parser.error("--watch takes a number of seconds above 0")

    message: dict[str, Any] = {"command": args.command}
    if args.command in NEEDS_SERVER and args.argument is None:
        parser.error(f"{args.command} needs a SERVER")
    if args.command == "shutdown" and args.argument is not None:
        try:
            message["timeout"] = float(args.argument)
        except ValueError:
            parser.error("shutdown takes a TIMEOUT in seconds")
    elif args.argument is not None:
        message["server"] = args.argument
    try:
        path = socket_path(args)
    except ConfigError as exc:
        print(f"selectctl: {exc}", file=sys.stderr)
        return UNREACHABLE
    while True:
        try:
            reply = request(path, message)
        except Unreachable as exc:
            print(f"selectctl: {exc}", file=sys.stderr)
            return UNREACHABLE
        if not reply.get("ok"):
            print(f"selectctl: {reply.get('error', 'unknown error')}", file=sys.stderr)
            return 1
        result = reply.get("result")
        text = json.dumps(result, indent=2) if args.json else render(args.command, result)
        if args.watch and args.command == "status":
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0
            continue
        print(text)
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
