"""Running the app on uvicorn: in the foreground (`moekit serve`) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["run_server", "server_in_thread"]


def _server(app: Any, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2,
                            lifespan="on")
    return uvicorn.Server(config)


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` on host:port until interrupted (Ctrl-C)."""
    _server(app, host, port, log_level).run()


@contextlib.contextmanager
def server_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                     log_level: str = "warning") -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL ("http://127.0.0.1:PORT"), stops it on exit.

    Port 0 picks a free port. Raises RuntimeError when the server has not started within `timeout` seconds.
    """
    server = _server(app, host, port, log_level)
    thread = threading.Thread(target=server.run, name="moekit-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout)
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
