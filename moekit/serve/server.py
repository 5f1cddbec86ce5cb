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


def build_app(models: list[str], moa: list[str] | None = None, api_key: str | None = None, max_batch: int = 8,
              max_queue: int = 64, max_tokens_limit: int | None = 1024, device: str = "cpu",
              threads: int | None = None) -> Any:
    """The app of `moekit serve`: each path of `models` loaded (run, HF folder or GGUF) and served by name.

    Each `moa` config is loaded with `moekit.moa.backend.load_moa_backend` and served as its own virtual model.
    All local models share one `Scheduler(max_batch, max_queue)`; `max_tokens_limit` caps the answer length of a
    request that sets no max_tokens; `threads` sets torch's CPU threads (`torch.set_num_threads`). Raises
    ValueError when there is nothing to serve or two names clash.
    """
    from .app import create_app
    from .engine import LocalBackend, Scheduler
    from .models import load_served_model

    if not models and not moa:
        raise ValueError("nothing to serve: pass at least one MODEL (a moekit run, an HF folder or a .gguf file) "
                         "or --moa CONFIG.yaml")
    if max_tokens_limit is not None and max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit {max_tokens_limit}: must be >= 1")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: must be >= 1")
        import torch

        torch.set_num_threads(threads)
    scheduler = Scheduler(max_batch=max_batch, max_queue=max_queue)
    try:
        backends: list[Any] = [LocalBackend(load_served_model(path, device), scheduler, max_tokens_limit)
                               for path in models]
        for config in moa or []:
            try:
                from ..moa.backend import load_moa_backend
            except ImportError as error:
                raise ImportError(f"--moa needs moekit.moa, which this moekit does not have ({error})") from error
            backends.append(load_moa_backend(config))
        return create_app(backends, scheduler, api_key=api_key)
    except BaseException:
        scheduler.stop()
        raise
