"""xinetd.conf(5)'s syntax: entries of attributes, the files they include, and the operators.

    entries = read_entries(path)
    defaults = merge_defaults(entries)                 # the defaults entry, its lines merged
    attrs = effective(entry, defaults)                 # one service's attributes, all said

The format: a `defaults { ... }` entry and `service NAME { ... }` entries of
`attribute OP value...` lines, OP one of `=`, `+=` (add to the set) and `-=` (remove from it);
lines whose first non-blank character is '#' are comments; `include FILE` and `includedir DIR`
between entries read more files (relative names are taken from the including file's directory;
includedir skips names with a '.' or ending in '~', as xinetd does, and reads the rest in byte
order, the C locale's). A file that cannot be read or does not follow this form is a
ConvertError naming the file and line. What the attributes mean is convert_xinetd's business.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Final

from .convert_service import ConvertError, read_text

ATTRIBUTE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)\s*(.*)")

# Attributes whose value is a set: they take += and -=, and in defaults every line adds.
SETS: Final = {"only_from", "no_access", "log_on_success", "log_on_failure", "passenv", "env"}
CUMULATIVE_DEFAULTS: Final = SETS | {"log_type", "disabled", "enabled"}
# What a service takes from defaults when it does not set it.
INHERITED: Final = {
    "log_type", "bind", "interface", "per_source", "umask", "log_on_success", "log_on_failure",
    "only_from", "no_access", "passenv", "instances", "banner", "banner_success", "banner_fail",
    "groups", "cps", "max_load",
}  # fmt: skip


@dataclass
class Attr:
    """One `name op value...` line; for a service, the value after applying += and -=."""

    name: str
    op: str
    raw: str  # the value as written on its line
    line: int
    values: list[str] = field(default_factory=list)  # the words of the value
    inherited: bool = False  # taken from defaults

    @classmethod
    def parsed(cls, name: str, op: str, raw: str, line: int) -> Attr:
        return cls(name, op, raw, line, raw.split())


@dataclass
class Entry:
    kind: str  # "service" | "defaults"
    name: str
    source: str
    line: int
    attrs: list[Attr] = field(default_factory=list)

    def __str__(self) -> str:
        return "defaults" if self.kind == "defaults" else f"service {self.name}"


# -- reading ---------------------------------------------------------------------------------


def read_entries(
    path: str, including: tuple[str, ...] = (), included_at: str | None = None
) -> list[Entry]:
    """Every entry of `path`, and of the files it includes, in order. `included_at` is the
    "file:line" of the include that names `path`, for the message if it cannot be read."""
    real = os.path.realpath(path)
    if real in including:
        raise ConvertError(f"{included_at}: {path} includes itself")
    try:
        text = read_text(path)
    except ConvertError as exc:
        if included_at is None:
            raise
        raise ConvertError(f"{included_at}: include: {exc}") from None
    entries: list[Entry] = []
    opening: Entry | None = None  # a header whose '{' is still to come
    current: Entry | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if opening is not None:
            if line != "{":
                raise ConvertError(f"{where}: expected '{{' to open {opening}, got {line!r}")
            current, opening = opening, None
        elif current is not None:
            if line == "}":
                entries.append(current)
                current = None
                continue
            match = ATTRIBUTE.fullmatch(line)
            if match is None:
                raise ConvertError(
                    f"{where}: {current}: expected 'attribute = value' or '}}', got {line!r}"
                )
            current.attrs.append(Attr.parsed(match[1], match[2], match[3].strip(), number))
        else:
            words = line.split()
            if words[0] in ("include", "includedir") and len(words) == 2:
                target = os.path.join(os.path.dirname(path), words[1])
                if words[0] == "include":
                    entries += read_entries(target, (*including, real), where)
                else:
                    entries += _read_dir(target, where, (*including, real))
            elif words[0] == "defaults" and words[1:] in ([], ["{"]):
                opening = Entry("defaults", "defaults", path, number)
            elif words[0] == "service" and len(words) in (2, 3) and words[2:] in ([], ["{"]):
                opening = Entry("service", words[1], path, number)
            else:
                raise ConvertError(
                    f"{where}: expected 'service NAME', 'defaults', 'include FILE' or "
                    f"'includedir DIR', got {line!r}"
                )
            if opening is not None and words[-1] == "{":
                current, opening = opening, None
    unclosed = opening or current
    if unclosed is not None:
        raise ConvertError(
            f"{path}:{unclosed.line}: {unclosed}: no closing '}}' before the end of the file"
        )
    return entries


def _read_dir(directory: str, where: str, including: tuple[str, ...]) -> list[Entry]:
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise ConvertError(f"{where}: includedir {directory}: {exc.strerror}") from None
    entries: list[Entry] = []
    for name in sorted(names, key=os.fsencode):  # the C locale's order
        full = os.path.join(directory, name)
        if "." in name or name.endswith("~") or not os.path.isfile(full):
            continue
        entries += read_entries(full, including, where)
    return entries


# -- defaults and the operators --------------------------------------------------------------


def merge_defaults(entries: list[Entry]) -> dict[str, Attr]:
    """The defaults entries' attributes, by name: in defaults, each line of a set attribute adds
    to it ('=' as '+='), and the other attributes take their last value."""
    defaults: dict[str, Attr] = {}
    for entry in entries:
        if entry.kind != "defaults":
            continue
        for attr in entry.attrs:
            old = defaults.get(attr.name)
            if old is not None and attr.op == "-=":
                kept = [v for v in old.values if v not in attr.values]
                defaults[attr.name] = Attr(attr.name, "=", attr.raw, attr.line, kept)
            elif old is not None and attr.name in CUMULATIVE_DEFAULTS:
                values = old.values + attr.values
                defaults[attr.name] = Attr(attr.name, "=", attr.raw, attr.line, values)
            else:
                defaults[attr.name] = attr
    return defaults


def effective(entry: Entry, defaults: dict[str, Attr]) -> dict[str, Attr]:
    """The service's attributes after += and -=, with what it takes from defaults."""
    out: dict[str, Attr] = {}
    for attr in entry.attrs:
        if attr.op == "=":
            out[attr.name] = attr
            continue
        base = out.get(attr.name) or defaults.get(attr.name)
        values = list(base.values) if base else []
        if attr.op == "+=":
            values += attr.values
        else:
            values = [v for v in values if v not in attr.values]
        out[attr.name] = Attr(attr.name, attr.op, attr.raw, attr.line, values)
    for name, attr in defaults.items():
        if name in INHERITED and name not in out:
            out[name] = Attr(name, attr.op, attr.raw, attr.line, list(attr.values), inherited=True)
    return out
