"""The keyrings side by side: the file keyring and the PKCS#11 keyring against SoftHSM2.

Run: .venv/bin/python ops/bench/keyrings.py [--calls 5000] [--samples 40] [--sizes 1,20]

1. Key operations, in this process: unwraps, wraps and rewraps per second, one call at a time,
   with the median and p99 of one call (a call runs on the event loop where the service makes it,
   so this is also how long it holds the loop), then unwraps per second from 4 threads at once
   (the PKCS#11 keyring serialises calls into its module, see service/crypto/_pkcs11_keyring.py).
2. A turn: `custody serve` twice, as deployments on fresh databases of the local Postgres (the
   machinery of ops/bench/turn_latency.py), one on a keyring file and one on a SoftHSM2 token,
   calling the same simulator; turns on a conversation with N stored turns, interleaved sample by
   sample between the two services. Prints median and p99 of each, and of the difference.

SoftHSM2 is a software token in this process's memory and files: a network HSM or a cloud KMS adds
its round trip to every call (docs/key-management.md). Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
from turn_latency import percentile, running_custody, running_simulator

from service.crypto import FileKeyring, Keyring, LocalKeyring, Pkcs11Config, Pkcs11Keyring

TOKEN_LABEL = "custody-bench"  # noqa: S105 - a token's name, not a password
MODULES = (Path("/usr/lib/softhsm/libsofthsm2.so"), Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"))


def softhsm_token(directory: Path) -> tuple[Pkcs11Config, dict[str, str]]:
    """A SoftHSM2 token with KEK version 1, in a token directory of its own; returns its settings
    and the variables that point `custody` at it. Sets SOFTHSM2_CONF for this process."""
    util = shutil.which("softhsm2-util")
    module = next((path for path in MODULES if path.exists()), None)
    if util is None or module is None:
        raise SystemExit("SoftHSM2 is not installed: apt-get install softhsm2")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    pin = secrets.token_hex(8)
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", pin, "--so-pin", secrets.token_hex(8)],
        check=True,
        capture_output=True,
    )
    pin_file = directory / "pin"
    pin_file.write_text(pin)
    pin_file.chmod(0o600)
    env = {
        "SOFTHSM2_CONF": str(conf),
        "CUSTODY_PKCS11_MODULE": str(module),
        "CUSTODY_PKCS11_TOKEN_LABEL": TOKEN_LABEL,
        "CUSTODY_PKCS11_PIN_FILE": str(pin_file),
    }
    subprocess.run([sys.executable, "-m", "service", "keyring", "init"], env=os.environ | env, check=True)
    return Pkcs11Config(module=module, token_label=TOKEN_LABEL, pin=pin), env


def timed(calls: int, work: Callable[[], object]) -> tuple[float, float, float]:
    """(calls per second, median µs, p99 µs) of `calls` calls of `work`, one at a time."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1e6)
    return calls / (sum(times) / 1e6), statistics.median(times), percentile(times, 0.99)


def threaded(calls: int, work: Callable[[], object], threads: int = 4) -> float:
    """Calls per second of `calls` calls of `work` spread over `threads` threads."""
    each = calls // threads

    def run() -> None:
        for _ in range(each):
            work()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return each * threads / (time.perf_counter() - started)


def key_operations(keyrings: dict[str, Keyring], calls: int) -> None:
    print(f"key operations ({calls} calls each; µs per call)")
    print(f"{'keyring':>8} | {'op':>7} | {'per second':>10} | {'p50 µs':>8} {'p99 µs':>8}")
    for name, keyring in keyrings.items():
        data_key = secrets.token_bytes(32)
        wrapped = keyring.wrap(data_key)
        operations: list[tuple[str, Callable[[], object]]] = [
            ("unwrap", partial(keyring.unwrap, wrapped)),
            ("wrap", partial(keyring.wrap, data_key)),
            ("rewrap", partial(keyring.rewrap, wrapped)),
        ]
        for op, work in operations:
            for _ in range(min(200, calls)):  # warm-up
                work()
            rate, p50, p99 = timed(calls, work)
            print(f"{name:>8} | {op:>7} | {rate:>10.0f} | {p50:>8.1f} {p99:>8.1f}")
        rate = threaded(calls, partial(keyring.unwrap, wrapped))
        print(f"{name:>8} | {'unwrap':>7} | {rate:>10.0f} | (4 threads at once)")


async def turns(services: dict[str, tuple[str, str]], sizes: list[int], samples: int) -> None:
    print(f"\nturn latency, ms ({samples} samples per size, interleaved between the two services)")
    names = list(services)
    head = " | ".join(f"{name + ' p50':>12} {'p99':>7}" for name in names)
    print(f"{'stored turns':>12} | {head} | {'difference p50':>14} {'p99':>7}")
    clients = {
        name: httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        for name, (url, key) in services.items()
    }
    try:
        for size in sizes:
            conversations = {}
            for name, client in clients.items():
                created = await client.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
                conversations[name] = created.json()["id"]
                for index in range(size):
                    (
                        await client.post(
                            f"/v1/conversations/{conversations[name]}/turns",
                            json={"input": f"setup turn {index}: the patient reports mild symptoms"},
                        )
                    ).raise_for_status()
            times: dict[str, list[float]] = {name: [] for name in names}
            for sample in range(-3, samples):  # three warm-up rounds, not recorded
                order = names if sample % 2 else list(reversed(names))
                for name in order:
                    started = time.perf_counter()
                    (
                        await clients[name].post(
                            f"/v1/conversations/{conversations[name]}/turns",
                            json={"input": f"sample {sample}: any update on my appointment?"},
                        )
                    ).raise_for_status()
                    if sample >= 0:
                        times[name].append((time.perf_counter() - started) * 1000)
            difference = [b - a for a, b in zip(times[names[0]], times[names[1]], strict=True)]
            cells = " | ".join(
                f"{statistics.median(times[name]):>12.2f} {percentile(times[name], 0.99):>7.2f}" for name in names
            )
            print(
                f"{size:>12} | {cells} | {statistics.median(difference):>14.2f} {percentile(difference, 0.99):>7.2f}"
            )
    finally:
        for client in clients.values():
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        config, hsm_env = softhsm_token(Path(scratch))
        keyring_file = Path(scratch) / "keyring.json"
        LocalKeyring.generate(keyring_file)
        hsm = Pkcs11Keyring(config)
        try:
            key_operations({"file": FileKeyring(keyring_file), "pkcs11": hsm}, args.calls)
        finally:
            hsm.close()
        with (
            running_simulator() as simulator,
            running_custody(simulator) as file_service,
            running_custody(simulator, hsm_env) as hsm_service,
        ):
            asyncio.run(turns({"file": file_service, "pkcs11": hsm_service}, args.sizes, args.samples))


if __name__ == "__main__":
    main()
