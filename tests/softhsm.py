"""SoftHSM2 for the PKCS#11 keyring's tests: a token directory of the test session's own, with
tokens made up front.

SoftHSM2 reads its token directory once, when the PKCS#11 module is initialised in a process
(the first keyring opened), and never sees a token created after that. So the session makes a
stock of empty tokens first, and each test takes fresh ones from it; processes the tests start
(`custody ...`) read the same directory through SOFTHSM2_CONF and see every token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from service.crypto import Pkcs11Config

__all__ = ["SOFTHSM_MODULES", "SoftHsm", "Token"]

# Where Debian's `softhsm2` package puts the module (the first is a link to the second).
SOFTHSM_MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)
# Enough for every test that takes a token, with room to spare; each costs about 10 ms.
_STOCK = 64
_SO_PIN = "so-" + "0" * 8


@dataclass(frozen=True)
class Token:
    """One initialised, empty token: its label, its user PIN and a 0600 file holding the PIN."""

    module: Path
    label: str
    pin: str
    pin_file: Path

    @property
    def config(self) -> Pkcs11Config:
        return Pkcs11Config(module=self.module, token_label=self.label, pin=self.pin)

    def environment(self) -> dict[str, str]:
        """The variables that point a `custody` process at this token."""
        return {
            "CUSTODY_PKCS11_MODULE": str(self.module),
            "CUSTODY_PKCS11_TOKEN_LABEL": self.label,
            "CUSTODY_PKCS11_PIN_FILE": str(self.pin_file),
            "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"],
        }


class SoftHsm:
    """A SoftHSM2 token directory with a stock of empty tokens; `take()` hands out a fresh one."""

    def __init__(self, directory: Path) -> None:
        util = shutil.which("softhsm2-util")
        module = next((path for path in SOFTHSM_MODULES if path.exists()), None)
        if util is None or module is None:
            raise RuntimeError(
                "SoftHSM2 is not installed, and the PKCS#11 keyring's tests need it: `apt-get install softhsm2` "
                "(ops/dev.sh test installs it when run as root)"
            )
        self.module = module
        self.conf = directory / "softhsm2.conf"
        tokens = directory / "tokens"
        tokens.mkdir()
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        self._secrets = directory / "pins"
        self._secrets.mkdir(mode=0o700)
        env = os.environ | {"SOFTHSM2_CONF": str(self.conf)}
        self._stock: list[Token] = []
        for number in range(_STOCK):
            label = f"custody-test-{number}"
            pin = secrets.token_hex(8)
            subprocess.run(
                [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", _SO_PIN],
                env=env,
                check=True,
                capture_output=True,
                timeout=30,
            )
            pin_file = self._secrets / label
            pin_file.write_text(pin + "\n")
            pin_file.chmod(0o600)
            self._stock.append(Token(module, label, pin, pin_file))

    def take(self) -> Token:
        """An empty token no other test has used."""
        if not self._stock:
            raise RuntimeError(f"the SoftHSM2 stock of {_STOCK} tokens is used up: raise _STOCK in tests/softhsm.py")
        return self._stock.pop(0)
