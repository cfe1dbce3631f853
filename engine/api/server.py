"""Running the API: uvicorn on a thread of the process that owns the model.

The app's switch and `tandem serve` both start an `ApiServer` beside the engine, so every client and the
person at the keyboard share one inference worker. Exposure is decided once, before binding: loopback
by default, and any other address only with a bearer token; without one the server refuses to start.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from engine.api.app import Api, build_app
from engine.serve.chat import Engine
from engine.settings import ApiSettings, is_loopback


class ApiConfigError(ValueError):
    """The [api] settings would expose the server unsafely, or its address cannot be bound. One line."""


def check_exposure(api: ApiSettings) -> None:
    if not is_loopback(api.host) and not api.token:
        raise ApiConfigError(f"api.host = {api.host!r} accepts connections from other machines, and api.token "
                             "is empty: set api.token (clients send it as a bearer token) or bind 127.0.0.1; "
                             "not starting")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.set_inheritable(True)
    except (OSError, OverflowError) as e:
        sock.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ApiConfigError(f"api: cannot listen on {host}:{port} ({why})") from None
    return sock


class ApiServer:
    def __init__(self, engine: Callable[[], Engine | None], settings: ApiSettings):
        check_exposure(settings)
        self.settings = settings
        self.app, self.api = build_app(engine, settings)
        self._server = None
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 15.0) -> str:
        """Bind, serve on a thread, and return the base URL once it accepts connections."""
        import uvicorn

        sock = _bind(self.settings.host, self.settings.port)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3, server_header=False)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="api-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise ApiConfigError(f"api: the server on {host}:{port} did not start")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/v1"
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end open replies (their clients see the stream close), wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    def wait(self) -> None:
        """Block until the server stops (headless `tandem serve`); Ctrl-C stops it."""
        try:
            while self.running:
                time.sleep(0.2)
        finally:
            self.stop()


__all__ = ["Api", "ApiConfigError", "ApiServer", "check_exposure"]
