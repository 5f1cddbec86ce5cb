"""The record of every call a mixture made: endpoint, model, layer, latency, tokens, retries and error."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CallRecord:
    """One chat completion of the mixture (its retries included)."""

    endpoint: str
    base_url: str
    model: str
    layer: int
    """1..L for the proposer layers; L+1 for the aggregator."""
    role: str
    """"proposer" or "aggregator"."""
    index: int
    """Position of the proposer in its layer (0 for the aggregator)."""
    latency_s: float = 0.0
    """From the first try to the last byte, backoff waits included."""
    prompt_tokens: int | None = None
    """From the server's `usage`; None when it sent none."""
    completion_tokens: int | None = None
    retries: int = 0
    error: str | None = None
    """Why the call failed in the end (None: it succeeded)."""
    attempt_errors: list[str] = field(default_factory=list)
    """What each failed try met, retried ones included."""
    finish_reason: str | None = None
    """The server's finish_reason ("stop", "length") when it gave one."""
    first_token_s: float | None = None
    """Seconds from the start to the first streamed text (streamed calls only)."""

    @property
    def ok(self) -> bool:
        """True when the call brought an answer."""
        return self.error is None


@dataclass
class MoAReport:
    """Every call of one mixture run, in the order they started."""

    calls: list[CallRecord] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def failures(self) -> list[CallRecord]:
        """The calls that brought no answer."""
        return [call for call in self.calls if not call.ok]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over every call that reported usage."""
        return sum(call.prompt_tokens or 0 for call in self.calls)

    @property
    def completion_tokens(self) -> int:
        """Completion tokens over every call that reported usage."""
        return sum(call.completion_tokens or 0 for call in self.calls)

    @property
    def retries(self) -> int:
        """Retries over every call."""
        return sum(call.retries for call in self.calls)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the calls and the totals."""
        return {"calls": [{**asdict(call), "ok": call.ok} for call in self.calls],
                "totals": {"calls": len(self.calls), "failed": len(self.failures), "retries": self.retries,
                           "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                           "total_s": round(self.total_s, 4)}}

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically (a crash leaves the old file or the whole new one)."""
        from .._files import atomic_write

        path = Path(path)
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n", what="the MoA report")
        return path

    def format_table(self) -> str:
        """A plain-text table of the calls and a totals line."""
        head = ("layer", "role", "endpoint", "model", "latency_s", "tok_in", "tok_out", "retries", "status")
        rows = [head]
        for call in self.calls:
            rows.append((str(call.layer), call.role, call.endpoint, call.model, f"{call.latency_s:.2f}",
                         "-" if call.prompt_tokens is None else str(call.prompt_tokens),
                         "-" if call.completion_tokens is None else str(call.completion_tokens),
                         str(call.retries), "ok" if call.ok else f"FAILED: {call.error}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
                 for row in rows]
        lines.append(f"{len(self.calls)} calls, {len(self.failures)} failed, {self.retries} retries, "
                     f"{self.prompt_tokens} tokens in, {self.completion_tokens} tokens out, {self.total_s:.2f} s")
        return "\n".join(line.rstrip() for line in lines)
