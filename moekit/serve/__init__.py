"""`moekit serve`: an OpenAI-compatible HTTP server (starlette on uvicorn) for moekit runs and HF folders.

Modules: `backend` (the `ChatBackend` protocol every served model implements, and its dataclasses), `models`
(loading a run, an HF folder or a GGUF file), `engine` (token-by-token generation and the scheduler that
interleaves concurrent requests), `app` (routes, validation, errors in OpenAI's schema).
"""

from .backend import ChatBackend, ChatParams, TextDelta, Usage

__all__ = ["ChatBackend", "ChatParams", "TextDelta", "Usage"]
