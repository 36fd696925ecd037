"""xinetd's internal echo service as a peer: the classic C super-server.

Usage:

    target = XinetdTarget(ports)      # unavailable() says why when xinetd is not installed

xinetd runs in the foreground (-dontfork) on a config of its own in a temporary directory; the
system's /etc/xinetd.conf and /etc/xinetd.d are not read. For each connection xinetd forks a child
that runs the echo loop, so it is measured with its children like ForkingTCPServer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .ports import PortAllocator
from .targets import ProcessTarget

XINETD_PATHS = ("xinetd", "/usr/sbin/xinetd")

# "UNLISTED": /etc/services maps echo to port 7, and xinetd refuses a listed service on another
# port; an unlisted internal service is looked up by its id and takes any port.
_CONFIG = """\
defaults
{{
	instances = UNLIMITED
	cps = 100000 1
}}

service echo
{{
	type = INTERNAL UNLISTED
	id = echo-stream
	socket_type = stream
	protocol = tcp
	port = {port}
	bind = {host}
	wait = no
{user}	flags = REUSE
	cps = 100000 1
	instances = UNLIMITED
	per_source = UNLIMITED
}}
"""


def find_xinetd() -> str | None:
    """Path of the xinetd binary, or None."""
    for name in XINETD_PATHS:
        if path := shutil.which(name):
            return path
    return None


def xinetd_config(host: str, port: int) -> str:
    """The config text for the echo service on host:port."""
    # "user" may only be given when xinetd runs as root; otherwise it serves as the caller.
    user = "\tuser = root\n" if os.geteuid() == 0 else ""
    return _CONFIG.format(host=host, port=port, user=user)


class XinetdTarget(ProcessTarget):
    """xinetd serving its internal stream echo on one port."""

    # From 127.0.0.2 and up, some of its connections stall (the generator's ops time out) under
    # load; at its ~4k connections/s one source address is far from the generator's limit.
    max_source_addrs = 1

    def __init__(self, ports: PortAllocator, name: str = "xinetd") -> None:
        super().__init__(name, ports)

    def unavailable(self) -> str | None:
        if find_xinetd() is None:
            return "xinetd is not installed (Debian package xinetd)"
        return None

    def command(self, workdir: Path, ports: Sequence[int]) -> list[str]:
        config = workdir / "xinetd.conf"
        config.write_text(xinetd_config(self.host, ports[0]))
        binary = find_xinetd()
        assert binary is not None
        return [binary, "-dontfork", "-f", str(config), "-pidfile", str(workdir / "xinetd.pid")]
