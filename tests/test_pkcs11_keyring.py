"""The PKCS#11 keyring against SoftHSM2: KEKs that never leave the token, its configuration, its
sentinels, and the service running on it.

The Keyring protocol itself (rotation, rewrap, tampering, versions) is checked for both keyrings
in tests/test_keyring.py and tests/test_key_rotation.py.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import AttributeSensitive, KeyUnextractable, PKCS11Error

from service.api import create_app
from service.config import Settings
from service.crypto import KeyringError, LocalKeyring, Pkcs11Config, Pkcs11Keyring, WrappedKey, ensure_current_sentinel
from service.errors import ConfigurationError
from service.runtime import build_runtime
from service.secret_files import load_keyring

from .api.helpers import open_conversation, take_turn
from .conftest import CANARY, TEST_PEPPER, asgi_transport, key_store_of, make_tenant
from .softhsm import Token


@contextmanager
def token_session(token: Token, *, log_in: bool) -> Iterator[Any]:
    """A session on the token beside the keyring's, to look at (or plant) objects the way another
    tool would. Log in only while no keyring of this process is open on the token: PKCS#11 login is
    shared by a process's sessions, and closing a logged-in one logs them all out."""
    lib = pkcs11.lib(str(token.module))
    session = lib.get_token(token_label=token.label).open(rw=True, user_pin=token.pin if log_in else None)
    try:
        yield session
    finally:
        session.close()


def _secret_key_labels(session: Any) -> list[str]:
    return sorted(obj.label for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))


def _plant_kek(session: Any, label: str, value: bytes, **attributes: bool) -> None:
    """A KEK made from known bytes, as an operator would import one (by default as the keyring wants it)."""
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: value,
        Attribute.LABEL: label,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.WRAP: True,
        Attribute.UNWRAP: True,
    }
    for name, value_ in attributes.items():
        template[Attribute[name.upper()]] = value_
    session.create_object(template)


@pytest.fixture
def hsm_keyring(token: Token) -> Iterator[Pkcs11Keyring]:
    """A PKCS#11 keyring with KEK version 1, on a token of the test's own."""
    keyring = Pkcs11Keyring.initialize(token.config)
    yield keyring
    keyring.close()


# --- the KEK stays in the token ----------------------------------------------------------------


def test_a_kek_cannot_be_read_or_exported(hsm_keyring: Pkcs11Keyring, token: Token) -> None:
    """The token refuses to show a KEK's value, to make it extractable, or to wrap it out under another key."""
    hsm_keyring.rotate()
    with token_session(token, log_in=False) as session:
        kek = session.get_key(label="custody-kek-1")
        with pytest.raises(AttributeSensitive):
            kek[Attribute.VALUE]
        seen = kek.get_attributes(
            [
                Attribute.SENSITIVE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
                Attribute.MODIFIABLE,
            ]
        )
        assert seen == {
            Attribute.SENSITIVE: True,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.MODIFIABLE: False,
        }
        # CKR_ACTION_PROHIBITED (0x1b), which python-pkcs11 does not name: the object is not modifiable.
        with pytest.raises(PKCS11Error, match="0x1b"):
            kek[Attribute.EXTRACTABLE] = True
        assert not kek[Attribute.EXTRACTABLE]
        with pytest.raises(KeyUnextractable):
            session.get_key(label="custody-kek-2").wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP)


def test_no_data_key_is_left_on_the_token(hsm_keyring: Pkcs11Keyring, token: Token) -> None:
    """The session objects that carry data keys through wrap, unwrap and rewrap are destroyed: only the KEKs remain."""
    wrapped = [hsm_keyring.wrap(bytes([n]) * 32) for n in range(5)]
    hsm_keyring.rotate()
    for item in wrapped:
        hsm_keyring.unwrap(hsm_keyring.rewrap(item))
    with pytest.raises(KeyringError):
        hsm_keyring.unwrap(WrappedKey(1, bytes(40)))
    with token_session(token, log_in=False) as session:
        assert _secret_key_labels(session) == ["custody-kek-1", "custody-kek-2"]


def test_wrapped_data_keys_are_the_file_keyrings_bytes(token: Token) -> None:
    """Under the same KEK bytes the token's AES key wrap gives the file keyring's RFC 3394 bytes, and each unwraps the other's."""
    kek = bytes(range(32))
    with token_session(token, log_in=True) as session:
        _plant_kek(session, "custody-kek-1", kek)
    keyring = Pkcs11Keyring(token.config)
    try:
        local = LocalKeyring({1: kek}, current=1)
        data_key = bytes(range(32, 64))
        assert keyring.wrap(data_key) == local.wrap(data_key)
        assert keyring.unwrap(local.wrap(data_key)) == data_key
        assert local.unwrap(keyring.wrap(data_key)) == data_key
    finally:
        keyring.close()


# --- opening a token ----------------------------------------------------------------------------


def test_an_empty_token_needs_keyring_init_once(token: Token) -> None:
    """A token without KEKs is refused naming `custody keyring init`, which makes version 1 and then refuses to run again."""
    with pytest.raises(KeyringError, match="custody keyring init"):
        Pkcs11Keyring(token.config)
    Pkcs11Keyring.initialize(token.config).close()
    with pytest.raises(KeyringError, match=r"already holds KEK version\(s\) \[1\]"):
        Pkcs11Keyring.initialize(token.config)
    keyring = Pkcs11Keyring(token.config)
    try:
        assert (keyring.versions(), keyring.current_version) == ([1], 1)
    finally:
        keyring.close()


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"extractable": True}, "could leave the token"),
        ({"sensitive": False}, "could leave the token"),
        ({"unwrap": False}, "not allowed to wrap and unwrap"),
    ],
    ids=["extractable", "not-sensitive", "no-unwrap"],
)
def test_a_kek_object_that_breaks_the_rules_is_refused(token: Token, attributes: dict[str, bool], message: str) -> None:
    """A custody-kek object that could leave the token, or cannot unwrap, stops the keyring from opening, naming it."""
    with token_session(token, log_in=True) as session:
        _plant_kek(session, "custody-kek-1", bytes(32), **attributes)
    with pytest.raises(KeyringError, match=message) as caught:
        Pkcs11Keyring(token.config)
    assert "custody-kek-1" in str(caught.value)


def test_a_wrong_pin_is_refused_without_repeating_it(token: Token) -> None:
    """Logging in with a wrong PIN fails with the token's reason and never shows the PIN."""
    wrong = "not-the-pin-" + token.pin
    with pytest.raises(KeyringError, match="PinIncorrect") as caught:
        Pkcs11Keyring(Pkcs11Config(token.module, token.label, wrong))
    assert wrong not in str(caught.value)
    assert token.pin not in str(caught.value)


def test_an_unknown_token_label_is_refused(token: Token) -> None:
    """A token label the module does not have is an error naming it."""
    with pytest.raises(KeyringError, match="no token labelled 'no-such-token'"):
        Pkcs11Keyring(Pkcs11Config(token.module, "no-such-token", token.pin))


def test_repr_names_the_token_and_versions_never_the_pin(hsm_keyring: Pkcs11Keyring, token: Token) -> None:
    """A PKCS#11 keyring's repr names the token, module and versions, and the PIN appears nowhere."""
    assert repr(hsm_keyring) == f"Pkcs11Keyring(PKCS#11 token '{token.label}' (module {token.module}), versions=[1])"
    assert token.pin not in repr(token.config)


# --- sharing and losing the token ---------------------------------------------------------------


def test_a_second_keyring_follows_a_rotation_and_closing_it_keeps_the_first_logged_in(token: Token) -> None:
    """A keyring opened before another rotated meets the new version on unwrap and makes it current; closing one keyring leaves the other working."""
    first = Pkcs11Keyring.initialize(token.config)
    second = Pkcs11Keyring(token.config)
    try:
        assert first.rotate() == 2
        assert second.current_version == 1
        assert second.unwrap(first.wrap(b"r" * 32)) == b"r" * 32
        assert second.current_version == 2
        second.close()
        assert first.unwrap(first.wrap(b"s" * 32)) == b"s" * 32
        with pytest.raises(KeyringError, match="closed"):
            second.wrap(b"t" * 32)
    finally:
        second.close()
        first.close()


def test_a_lost_session_is_reopened(hsm_keyring: Pkcs11Keyring) -> None:
    """When the token forgets the keyring's session (as after an HSM restart), the next call opens a new one and succeeds."""
    wrapped = hsm_keyring.wrap(b"l" * 32)
    hsm_keyring._session.close()  # the session handle is now invalid, as after a token restart
    assert hsm_keyring.unwrap(wrapped) == b"l" * 32


def test_threads_can_share_one_keyring(hsm_keyring: Pkcs11Keyring) -> None:
    """Eight threads wrapping and unwrapping at once through one keyring all get their own data keys back."""
    failures: list[str] = []

    def work(thread: int) -> None:
        for n in range(100):
            data_key = bytes([thread, n % 256]) * 16
            if hsm_keyring.unwrap(hsm_keyring.wrap(data_key)) != data_key:
                failures.append(f"{thread}/{n}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- configuration ------------------------------------------------------------------------------


def _hsm_settings(token: Token, tmp_path: Path, **env: str) -> Settings:
    base = {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/x",
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
        "CUSTODY_PKCS11_MODULE": str(token.module),
        "CUSTODY_PKCS11_TOKEN_LABEL": token.label,
        "CUSTODY_PKCS11_PIN_FILE": str(token.pin_file),
    }
    return Settings.from_env({key: value for key, value in (base | env).items() if value})


def test_the_pkcs11_settings_choose_the_hsm_keyring(hsm_keyring: Pkcs11Keyring, token: Token, tmp_path: Path) -> None:
    """With CUSTODY_PKCS11_MODULE, TOKEN_LABEL and PIN_FILE set, the service loads the token's KEKs and generates no keyring file."""
    keyring = load_keyring(_hsm_settings(token, tmp_path), [])
    try:
        assert isinstance(keyring, Pkcs11Keyring)
        assert keyring.versions() == [1]
        assert keyring.unwrap(hsm_keyring.wrap(b"c" * 32)) == b"c" * 32
    finally:
        assert isinstance(keyring, Pkcs11Keyring)
        keyring.close()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"CUSTODY_PKCS11_TOKEN_LABEL": ""}, "CUSTODY_PKCS11_TOKEN_LABEL is not"),
        ({"CUSTODY_PKCS11_PIN_FILE": ""}, "CUSTODY_PKCS11_PIN_FILE is not"),
        ({"CUSTODY_PKCS11_PIN_FILE": "/nowhere/pin"}, "CUSTODY_PKCS11_PIN_FILE=/nowhere/pin does not exist"),
        (
            {"CUSTODY_PKCS11_MODULE": "/nowhere/libvendor.so"},
            "CUSTODY_PKCS11_MODULE=/nowhere/libvendor.so does not exist",
        ),
        ({"CUSTODY_KEYRING": "/etc/hosts"}, "both CUSTODY_KEYRING and CUSTODY_PKCS11_MODULE"),
    ],
    ids=["no-label", "no-pin-file", "missing-pin-file", "missing-module", "two-keyrings"],
)
def test_incomplete_or_conflicting_pkcs11_settings_stop_startup(
    token: Token, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    """A PKCS#11 setting missing or pointing nowhere, or a keyring file named as well, is an error naming the variable."""
    with pytest.raises(ConfigurationError, match=message):
        load_keyring(_hsm_settings(token, tmp_path, **change), [])


def test_pkcs11_settings_without_the_module_are_refused(token: Token, tmp_path: Path) -> None:
    """A token label or PIN file without CUSTODY_PKCS11_MODULE is refused rather than quietly running on a keyring file."""
    with pytest.raises(ConfigurationError, match="without CUSTODY_PKCS11_MODULE"):
        _hsm_settings(token, tmp_path, CUSTODY_PKCS11_MODULE="").check()


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (b"1234\n", 0o640, "chmod 600"),
        (b"", 0o600, "is empty"),
        (b"\n", 0o600, "is empty"),
        (b"\xff\xfe", 0o600, "not UTF-8"),
    ],
    ids=["group-readable", "empty", "newline-only", "not-utf8"],
)
def test_a_bad_pin_file_is_refused(token: Token, tmp_path: Path, content: bytes, mode: int, message: str) -> None:
    """A PIN file others can read, or one holding no PIN, stops startup as every other secret does."""
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(content)
    pin_file.chmod(mode)
    with pytest.raises(ConfigurationError, match=message):
        load_keyring(_hsm_settings(token, tmp_path, CUSTODY_PKCS11_PIN_FILE=str(pin_file)), [])


# --- the service on the token -------------------------------------------------------------------


def _deployment(token: Token, database: str, tmp_path: Path, signing_key_path: Path, pepper_path: Path) -> Settings:
    return Settings.from_env(
        token.environment()
        | {
            "DATABASE_URL": database,
            "CUSTODY_KEY_STORE_URL": key_store_of(database),
            "CUSTODY_PEPPER_FILE": str(pepper_path),
            "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
            "CUSTODY_DATA_DIR": str(tmp_path / "data"),
            "CUSTODY_USE_SIMULATOR": "true",
        }
    )


async def test_the_service_runs_turns_on_the_hsm_keyring(
    token: Token, fresh_database: str, tmp_path: Path, signing_key_path: Path, pepper_path: Path
) -> None:
    """A deployment configured with the PKCS#11 settings opens a conversation, replays its history on the next turn, reads and deletes it, and closes its session at shutdown."""
    Pkcs11Keyring.initialize(token.config).close()
    runtime = await build_runtime(_deployment(token, fresh_database, tmp_path, signing_key_path, pepper_path))
    try:
        keyring = runtime.ctx.keyring
        assert isinstance(keyring, Pkcs11Keyring)
        assert f"KEKs in the HSM: PKCS#11 token '{token.label}'" in "\n".join(runtime.announcements)
        assert runtime.ctx.pepper == TEST_PEPPER
        tenant = await make_tenant(runtime.ctx)
        async with httpx.AsyncClient(transport=asgi_transport(create_app(runtime.ctx)), base_url="http://hsm") as api:
            conversation = await open_conversation(api, tenant.headers())
            await take_turn(api, tenant.headers(), conversation, f"first words {CANARY}")
            second = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
            assert second["output_text"] == f'You first said: "first words {CANARY}".'
            steps = await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
            assert steps.status_code == 200
            assert CANARY in steps.text
            assert (await api.get("/readyz")).status_code == 200
            deleted = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
            assert deleted.status_code == 200, deleted.text
            assert (
                await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
            ).status_code == 404
    finally:
        await runtime.aclose()
    with pytest.raises(KeyringError, match="closed"):
        keyring.wrap(b"k" * 32)


async def test_the_sentinel_check_fails_when_the_token_lacks_a_version(
    token: Token, fresh_database: str, tmp_path: Path, signing_key_path: Path, pepper_path: Path
) -> None:
    """A token that lost a KEK version the database's data keys name stops startup naming the version, and /readyz says 503 for it."""
    Pkcs11Keyring.initialize(token.config).close()
    settings = _deployment(token, fresh_database, tmp_path, signing_key_path, pepper_path)
    runtime = await build_runtime(settings)
    try:
        keyring = runtime.ctx.keyring
        keyring.rotate()
        async with runtime.ctx.sessions.begin() as session:
            await ensure_current_sentinel(session, keyring)
        # Someone deletes version 2 from the token while the service runs.
        with token_session(token, log_in=False) as session:
            session.get_key(label="custody-kek-2").destroy()
        fresh = Pkcs11Keyring(token.config)
        try:
            app = create_app(dataclasses.replace(runtime.ctx, keyring=fresh))
            async with httpx.AsyncClient(transport=asgi_transport(app), base_url="http://hsm") as api:
                ready = await api.get("/readyz")
            assert ready.status_code == 503
            assert "KEK version(s) 2" in ready.json()["detail"]
        finally:
            fresh.close()
    finally:
        await runtime.aclose()
    with pytest.raises(ConfigurationError, match=r"cannot unwrap .* KEK version\(s\) 2") as caught:
        await build_runtime(settings)
    assert f"PKCS#11 token '{token.label}'" in str(caught.value)


def test_keyring_init_on_the_command_line(token: Token, tmp_path: Path) -> None:
    """`custody keyring init` makes version 1 in the token named by the settings (exit 0), refuses a second time (exit 1), and without PKCS#11 settings exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | {
        "CUSTODY_DATA_DIR": str(tmp_path / "data")
    }

    def run(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "keyring", "init"],
            env=env | extra,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = run(token.environment())
    assert first.returncode == 0, first.stderr
    assert "created KEK version 1 (custody-kek-1)" in first.stderr
    again = run(token.environment())
    assert again.returncode == 1, again.stderr
    assert "already holds KEK version(s) [1]" in again.stderr
    without = run({})
    assert without.returncode == 2
    assert "CUSTODY_PKCS11_MODULE" in without.stderr
    for result in (first, again, without):
        assert "Traceback" not in result.stderr
        assert token.pin not in result.stderr + result.stdout
