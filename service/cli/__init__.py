"""The `custody` command line: serve, migrate, tenants, keys, keyring, secrets, audit, retention, simulator.

Every ordinary mistake (a bad argument, a missing file, a setting that does not parse, a
refusal) ends in one line on stderr and an exit code, never a traceback: 2 when the command
cannot run as configured or asked, 1 when it ran and something was refused or failed a check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import ConfigurationError, CustodyError
from ._admin import add_admin_commands
from ._audit import add_audit_commands
from ._common import CommandFailed, say
from ._retention import add_retention_commands
from ._run import add_run_commands

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other mistake; `--help` still shows the usage.
        say(f"custody: {self.prog}: {message}")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="custody", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--as",
        dest="operator",
        metavar="NAME",
        help="the operator to audit administrative actions under (default: the OS user)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_run_commands(commands)
    add_admin_commands(commands)
    add_audit_commands(commands)
    add_retention_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigurationError as exc:
        say(f"custody: cannot start: {exc}")
        return 2
    except CommandFailed as exc:
        say(f"custody: {exc}")
        return exc.exit_code
    except CustodyError as exc:
        say(f"custody: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from ..database_errors import database_unreachable

        if not database_unreachable(exc):
            raise
        # The type only: a driver's message can quote the URL, password included.
        say(f"custody: cannot reach the database at DATABASE_URL ({type(exc).__name__}); is it running?")
        return 2


if __name__ == "__main__":
    sys.exit(main())
