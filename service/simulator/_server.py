"""Running the simulator: embedded on a free port in a background thread, or standalone."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn

from ._app import DroppedConnection, Simulator
from ._config import SimulatorConfig

__all__ = ["RunningSimulator", "serve_forever", "start_simulator"]


class _HideDroppedConnections(logging.Filter):
    """Injected drops are the point of the exercise, not server errors worth a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


def _uvicorn_config(app: Simulator, log_level: str) -> uvicorn.Config:
    logging.getLogger("uvicorn.error").addFilter(_HideDroppedConnections())
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        # Hung requests poll `app.closing`; they must not hold shutdown for long.
        timeout_graceful_shutdown=2,
    )


class RunningSimulator:
    """A simulator serving on 127.0.0.1 in a daemon thread; use as a context manager."""

    def __init__(self, app: Simulator, server: uvicorn.Server, sock: socket.socket) -> None:
        self.app = app
        self._server = server
        self._socket = sock
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"simulator:{port}", daemon=True
        )

    def _start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Gemini simulator did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.app.closing.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_simulator(
    config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Start a simulator in this process; `port=0` takes a free port."""
    app = Simulator(config)
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(_uvicorn_config(app, "warning"))
    running = RunningSimulator(app, server, sock)
    running._start()
    return running


def serve_forever(config: SimulatorConfig, *, host: str, port: int) -> None:
    """Run a simulator in the foreground until interrupted (`custody simulator`)."""
    app = Simulator(config)
    uv_config = _uvicorn_config(app, "info")
    uv_config.host, uv_config.port = host, port
    gc.freeze()  # long-lived startup objects out of the collector's way, as in `custody serve`
    uvicorn.Server(uv_config).run()
