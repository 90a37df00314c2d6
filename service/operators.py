"""Who acts at the console: the operator identity CLI actions are audited under.

A CLI action has no API key, so its audit records name the operator instead: the name given
with `--as`, or the OS user running the command. Either must have a safe shape (it is written
into audit records that auditors read and export), so anything else is refused, never copied.
"""

from __future__ import annotations

import getpass
import os
import re

from .errors import InvalidInput

__all__ = ["operator_name"]

_OPERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def operator_name(given: str | None = None) -> str:
    """The operator to record: `given` (from `--as`) when it has the safe shape, else the OS user."""
    if given is not None:
        if not _OPERATOR.fullmatch(given):
            raise InvalidInput(
                "--as takes 1 to 64 letters, digits, `.`, `_`, `@` or `-`, starting with a letter or digit"
            )
        return given
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container, say)
        user = ""
    return user if _OPERATOR.fullmatch(user) else f"uid-{os.getuid()}"
