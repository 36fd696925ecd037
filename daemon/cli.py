"""`selectd`: run the daemon, check a config, print the effective config.

    selectd [run] [-c FILE]      serve in the foreground until SIGTERM/SIGINT
    selectd check [-c FILE|-]    validate; `ok` and 0, or one line per problem and 2
    selectd config [-c FILE]     the effective config, every default filled in, as TOML
    selectd convert --from xinetd|inetd FILE...
                                 an xinetd or inetd config as selectd TOML, notes on stderr

Without -c: $SELECTD_CONFIG if set, else the embedded default (the built-in services on
127.0.0.1 high ports). Exit status: 0 after a graceful stop, 1 on a fatal runtime error, 2 on a
usage or config error. No input produces a Python traceback: config problems are lines naming
the TOML key path.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from . import log as logmod
from .config import Config, ConfigError, dump_config, load_config
from .errors import DaemonError, ExitStatus

COMMANDS = ("run", "check", "config", "convert")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selectd",
        description="selectd: many socket servers, one selectors loop.",
    )
    parser.add_argument("--version", action="version", version=f"selectd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,check,config,convert}")
    for name, text in (
        ("run", "serve in the foreground (the default command)"),
        ("check", "validate the config and exit"),
        ("config", "print the effective config as TOML"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="config file ('-' for stdin with check); default: $SELECTD_CONFIG, "
            "else the embedded default",
        )
    text = "print an xinetd or inetd config as selectd TOML (what has no equivalent: on stderr)"
    convert = sub.add_parser("convert", help=text, description=text)
    convert.add_argument("--from", dest="source_format", required=True, choices=("xinetd", "inetd"))
    convert.add_argument(
        "files", nargs="+", metavar="FILE", help="xinetd.conf (with what it includes), inetd.conf"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    if args.command == "convert":
        from .convert import main as convert  # imported here: the other commands stay light

        return convert(args.source_format, args.files)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitStatus.USAGE
    if args.command == "check":
        print("ok")
        return ExitStatus.OK
    if args.command == "config":
        sys.stdout.write(dump_config(config))
        return ExitStatus.OK
    return run(config, args.config)


def run(config: Config, path: str | None) -> int:
    # Imported here so that `check` and `config` stay light.
    from .supervisor import Supervisor

    logmod.line_buffered_stdout()
    logmod.start_background()
    logmod.configure(config.daemon.log_format, config.daemon.log_level)
    try:
        return Supervisor(config, path).run()
    except DaemonError as exc:
        logmod.get_logger().error("startup_failed", error=str(exc))
        logmod.drain()  # the event first, then the line for a human
        print(f"selectd: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:  # pragma: no cover - only before the signal handlers exist
        return ExitStatus.RUNTIME
    except Exception as exc:  # a bug: say so in the log's own format, exit 1
        logmod.get_logger().critical("daemon_crashed", exc_type=type(exc).__name__, exc_info=True)
        logmod.drain()
        print(f"selectd: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ExitStatus.RUNTIME
    finally:
        logmod.release_stdio()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
