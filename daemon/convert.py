"""`selectd convert`: an xinetd or inetd configuration, as selectd TOML.

    selectd convert --from xinetd /etc/xinetd.conf > selectd.toml
    selectd convert --from inetd /etc/inetd.conf > selectd.toml

    result = convert("xinetd", ["/etc/xinetd.conf"])   # Conversion: .text (TOML) and .notes

The readers (convert_xinetd, convert_inetd) turn each file into Services in selectd's terms;
convert_service holds what they share. This module drops a service that would listen where an
earlier one does, names the servers, and writes the TOML: a header, then each server's table with
its notes as "# NOTE" comments above it. Every note is also printed on stderr, one a line, naming
the file, line and service: nothing is left out without one. The text is checked with
parse_config() before it is returned, so it always passes `selectd check`.

Exit statuses (main()): 0 when it converted, notes or not; 2 when a file cannot be read or is
not in the format, with one line naming the file and line; 1 on a bug (the output fails check).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

import tomli_w

from .config import ConfigError, parse_config
from .config_schema import Address, Invalid, parse_listen
from .convert_inetd import read_inetd
from .convert_service import ConvertError, Note, Service, finish, printable, server_names
from .convert_xinetd import read_xinetd
from .errors import ExitStatus

FORMATS: Final = ("xinetd", "inetd")


@dataclass(frozen=True)
class Conversion:
    text: str  # the selectd config, TOML
    notes: list[Note]  # in the order the text shows them


def convert(source_format: str, paths: Sequence[str]) -> Conversion:
    """Convert the files at `paths`, all in `source_format` ("xinetd" or "inetd").

    Raises ConvertError for a file that cannot be read or parsed, ValueError for an unknown
    format, and ConfigError if the result would not pass check (a bug in the converter).
    """
    if source_format not in FORMATS:
        raise ValueError(f"unknown format {source_format!r}: expected one of {', '.join(FORMATS)}")
    services: list[Service] = []
    general: list[Note] = []
    for path in paths:
        try:
            if source_format == "xinetd":
                found, notes = read_xinetd(path)
                services += found
                general += notes
            else:
                services += read_inetd(path)
        except RecursionError:
            raise ConvertError(f"{path}: includes nested too deeply") from None
    tables = [finish(service) for service in services]
    _drop_shared_addresses(services, tables)
    if paths:
        general += _implicit(source_format, paths[0], services, tables)
    text = _render(source_format, paths, services, tables, general)
    parse_config(text, "<converted>")
    return Conversion(text, general + [note for s in services for note in s.notes])


def main(source_format: str, paths: Sequence[str], out: TextIO | None = None) -> int:
    """What `selectd convert` does: the TOML on stdout (or `out`), the notes on stderr."""
    out = out or sys.stdout
    try:
        result = convert(source_format, paths)
    except ConvertError as exc:
        print(f"selectd convert: {printable(str(exc))}", file=sys.stderr)
        return ExitStatus.USAGE
    except ConfigError as exc:
        problems = "; ".join(exc.problems)
        print(
            f"selectd convert: internal error: the output fails check: {problems}", file=sys.stderr
        )
        return ExitStatus.RUNTIME
    out.write(result.text)
    for note in result.notes:
        print(note, file=sys.stderr)
    return ExitStatus.OK


def _drop_shared_addresses(services: list[Service], tables: list[dict[str, Any] | None]) -> None:
    """Two servers cannot listen on one address (xinetd would refuse the second too): keep
    the first, and note the others."""
    holders: dict[Any, Service] = {}
    for i, (service, table) in enumerate(zip(services, tables, strict=True)):
        if table is None:
            continue
        try:
            address: Address = parse_listen(table["listen"])
        except Invalid:  # finish() checked it; kept for safety
            continue
        key = ("unix", address.path) if address.kind == "unix" else (address, table["socket_type"])
        holder = holders.setdefault(key, service)
        if holder is not service:
            service.skip(
                f"{table['listen']} ({table['socket_type']}) is taken already by service "
                f"{holder.name} ({holder.source}:{holder.line})"
            )
            tables[i] = None


def _implicit(
    source_format: str, path: str, services: list[Service], tables: list[dict[str, Any] | None]
) -> list[Note]:
    """Notes on what the source does without being told, where selectd does otherwise."""
    converted = [t for t in tables if t is not None]
    notes: list[str] = []
    if any("command" in t and "passenv" not in t for t in converted):
        notes.append(
            f"{source_format} passes its own environment to a program that is not given passenv; "
            "selectd passes only env and passenv (add passenv where a program needs more)"
        )
    moot = ("instances", "per_source")
    waiting = [
        t
        for t in converted
        if "command" in t and t.get("socket_type") == "dgram" and any(k in t for k in moot)
    ]
    if waiting:
        keys = sorted({k for t in waiting for k in moot if k in t})
        notes.append(
            f"{' and '.join(keys)} mean nothing to a datagram (wait) service in selectd: it runs "
            "one program at a time, which reads what it will from the socket itself"
        )
    if any("command" in t and t.get("socket_type") != "dgram" for t in converted):
        notes.append(
            "selectd gives a stream program SO_RCVTIMEO/SO_SNDTIMEO of timeout (60 s unless set); "
            f"{source_format} gives none: add timeout = 0 where a program must wait longer"
        )
    if source_format == "xinetd" and converted:
        if any("cps" not in t for t in converted):
            notes.append(
                "xinetd gives a service without cps the limit cps = 50 10; selectd has no default "
                "rate limit (add cps = [50, 10] to keep it)"
            )
        notes.append(
            "xinetd built with TCP wrappers (Debian's is) also checks /etc/hosts.allow and "
            "/etc/hosts.deny, unless a service has flags = NOLIBWRAP; selectd does not (carry "
            "those rules over to allow and deny)"
        )
    return [Note(path, 1, source_format, text) for text in notes]


def _render(
    source_format: str,
    paths: Sequence[str],
    services: list[Service],
    tables: list[dict[str, Any] | None],
    general: list[Note],
) -> str:
    lines = [
        f"# selectd config converted from {source_format} by `selectd convert`, from:",
        *[f"#   {printable(path)}" for path in paths],
        "# Check it with `selectd check -c FILE`. A NOTE is something in the source with no exact",
        "# equivalent in selectd; convert printed the same notes on stderr.",
        "",
    ]
    lines += [f"# NOTE {note}" for note in general]
    live = [(s, t) for s, t in zip(services, tables, strict=True) if t is not None]
    names = dict(zip([id(s) for s, _ in live], server_names([s for s, _ in live]), strict=True))
    for service, table in zip(services, tables, strict=True):
        lines.append("")
        lines += [f"# NOTE {note}" for note in service.notes]
        if table is not None:
            lines.append(tomli_w.dumps({"servers": {names[id(service)]: table}}).rstrip("\n"))
    return "\n".join(lines).strip("\n") + "\n"
