"""Generation for `moekit serve`: one choice decoded token by token, and the scheduler that runs them all.

A `Generation` holds one choice's KV cache and seeded `torch.Generator`; each `step()` runs one forward (the prompt
first, then one token) and picks the next token with `moekit.model.generate.sample_next`, so a seed fixes the text.
Its text is released as it becomes final: never half a UTF-8 character, never the start of a stop string.

The `Scheduler` owns one worker thread that runs every forward, off the event loop: requests wait in a bounded
queue (`max_queue`; beyond it `Overloaded`, which the HTTP layer answers with 503 and Retry-After), up to
`max_batch` of them are active at once. At each round the worker admits what waits (continuous batching: a new
request starts at the next step, without waiting for the others to finish) and advances every active unit by one
decoding step, in turn, so concurrent streams progress together. Requests for a model that takes padded batches
(transformers' classes: HF folders, GGUF files, runs trained with the transformers backend) admitted in the same
round form a `Cohort`: one left-padded forward per step for all of them. moekit's own model takes no padding
mask, so each of its requests is a unit of its own. A cancelled request (a client gone) leaves at the next step,
freeing its slot.

`LocalBackend` puts a `ServedModel` behind the `ChatBackend` protocol (and `complete_stream` for /v1/completions).
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

import torch

from ..model.generate import sample_next
from .backend import ChatParams, TextDelta, Usage
from .models import ServedModel

__all__ = ["Generation", "LocalBackend", "Overloaded", "PromptTooLong", "RequestRejected", "Scheduler"]


class Overloaded(RuntimeError):
    """The scheduler's queue is full: the request is refused (HTTP 503 with Retry-After)."""


class RequestRejected(ValueError):
    """A request a backend cannot serve as sent; `status` is the HTTP status that says why."""

    status = 400


class PromptTooLong(RequestRejected):
    """The prompt plus max_tokens do not fit the model's context (HTTP 413)."""

    status = 413


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


class Generation:
    """One choice: prompt ids in, text deltas out, one model step per `step()` (see the module docstring)."""

    def __init__(self, model: ServedModel, prompt_ids: list[int], params: ChatParams, max_tokens: int) -> None:
        self.model, self.prompt_ids, self.params, self.max_tokens = model, prompt_ids, params, max_tokens
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=model.device).manual_seed(seed % 2**64)
        self.ids: list[int] = []
        self.emitted = ""
        self.past: Any = None
        self.sampled = 0

    def _sample(self, logits: torch.Tensor) -> int:
        top_p = self.params.top_p if self.params.top_p < 1 else None
        return int(sample_next(logits, self.params.temperature, None, top_p, self.generator)[0])

    def step(self) -> TextDelta | None:
        """Run one forward and sample one token; the new final text (or None), finished when `finish_reason`."""
        feed = self.prompt_ids if self.sampled == 0 else self.ids[-1:]
        logits, self.past = self.model.forward(feed, self.past)
        return self.accept(logits)

    def accept(self, logits: torch.Tensor) -> TextDelta | None:
        """Sample the next token from `logits` [1, V] (this choice's row of a forward); as `step` returns."""
        token = self._sample(logits)
        self.sampled += 1
        finish = None
        if token in self.model.eos_ids:
            finish = "stop"
        else:
            self.ids.append(token)
        text = self.model.decode(self.ids)
        cut = [text.find(stop) for stop in self.params.stop if stop in text]
        if cut:
            text, finish = text[:min(cut)], "stop"
        elif finish is None and (self.sampled >= self.max_tokens
                                 or len(self.prompt_ids) + len(self.ids) >= self.model.context_length):
            finish = "length"
        if finish is None:
            if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
                return None
            text = text[:len(text) - _held_back(text, self.params.stop)]
        if not text.startswith(self.emitted):  # a tokenizer that rewrote text already sent: send nothing more
            if finish is None:
                return None
            text = self.emitted
        delta, self.emitted = text[len(self.emitted):], text
        if finish is not None:
            self.past = None
            usage = Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.sampled)
            return TextDelta(delta, finish_reason=finish, usage=usage)
        return TextDelta(delta) if delta else None


class Job(Protocol):
    """What the scheduler runs: `step()` returns True when the job is done; `cancelled` makes it leave."""

    cancelled: bool

    def step(self) -> bool: ...

    def fail(self, error: BaseException) -> None: ...


class GenerationJob:
    """A `Generation` whose deltas go to an asyncio queue on `loop` (the request's coroutine reads them)."""

    def __init__(self, generation: Generation, loop: asyncio.AbstractEventLoop) -> None:
        self.generation, self.loop = generation, loop
        self.queue: asyncio.Queue[TextDelta | BaseException] = asyncio.Queue()
        self.cancelled = False

    def put(self, item: TextDelta | BaseException) -> None:
        """Hand `item` to the request's coroutine (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancelled = True

    def step(self) -> bool:
        delta = self.generation.step()
        if delta is not None:
            self.put(delta)
        return delta is not None and delta.finish_reason is not None

    def fail(self, error: BaseException) -> None:
        self.put(error)


class Cohort:
    """Requests for one model admitted together, decoded as one padded batch: one forward per step for all.

    The prompts are left-padded (attention mask 0 on the padding, positions counted from each prompt's start), so
    each row sees only its own tokens; a finished or cancelled row is dropped from the batch and its cache
    (`Cache.batch_select_indices`) before the next step. Every row keeps its own seeded generator.
    """

    def __init__(self, jobs: list[GenerationJob]) -> None:
        self.jobs = jobs
        self.model = jobs[0].generation.model
        self.past: Any = None
        self.mask: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self.finished: set[int] = set()

    @property
    def size(self) -> int:
        """Requests still decoded in this cohort."""
        return sum(not job.cancelled and id(job) not in self.finished for job in self.jobs)

    @property
    def cancelled(self) -> bool:
        return all(job.cancelled for job in self.jobs)

    def _drop_gone(self) -> None:
        keep = [i for i, job in enumerate(self.jobs) if not job.cancelled and id(job) not in self.finished]
        if len(keep) == len(self.jobs):
            return
        self.jobs = [self.jobs[i] for i in keep]
        if self.past is not None and keep:
            index = torch.tensor(keep, dtype=torch.long)
            self.past.batch_select_indices(index.to(self.model.device))
            self.mask, self.next_position = self.mask[index], self.next_position[index]

    def step(self) -> bool:
        self._drop_gone()
        if not self.jobs:
            return True
        generations = [job.generation for job in self.jobs]
        if self.past is None:
            width = max(len(g.prompt_ids) for g in generations)
            ids = torch.tensor([[self.model.pad_id] * (width - len(g.prompt_ids)) + g.prompt_ids for g in generations])
            self.mask = torch.tensor([[0] * (width - len(g.prompt_ids)) + [1] * len(g.prompt_ids)
                                      for g in generations])
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            self.next_position = self.mask.sum(-1)
        else:
            ids = torch.tensor([[g.ids[-1]] for g in generations])
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = self.next_position.unsqueeze(-1)
            self.next_position = self.next_position + 1
        logits, self.past = self.model.forward_batch(ids, self.mask, positions, self.past)
        for row, job in enumerate(self.jobs):
            delta = job.generation.accept(logits[row:row + 1])
            if delta is not None:
                job.put(delta)
                if delta.finish_reason is not None:
                    self.finished.add(id(job))
        return all(id(job) in self.finished or job.cancelled for job in self.jobs)

    def fail(self, error: BaseException) -> None:
        for job in self.jobs:
            job.fail(error)


class Scheduler:
    """Bounded waiting queue + up to `max_batch` active jobs stepped in turn by one worker thread."""

    def __init__(self, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue}: need max_batch >= 1, max_queue >= 0")
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="moekit-serve-worker", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests being decoded now."""
        with self._condition:
            return sum(getattr(unit, "size", 1) for unit in self._active)

    @property
    def waiting(self) -> int:
        """Jobs queued for a free slot."""
        with self._condition:
            return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue `job`; raises `Overloaded` when `max_queue` jobs already wait and no slot is free."""
        with self._condition:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            running = sum(getattr(unit, "size", 1) for unit in self._active)
            if running + len(self._waiting) >= self.max_batch + self.max_queue:
                raise Overloaded(f"the server is busy: {running} requests running and "
                                 f"{len(self._waiting)} queued (--max-queue {self.max_queue}); retry later")
            self._waiting.append(job)
            self._condition.notify()

    def cancel(self, job: Job) -> None:
        """Make `job` leave: at once if it still waits, at the next step if it runs."""
        job.cancelled = True
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)
            self._condition.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (jobs left are dropped) and wait up to `timeout` seconds for it."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._active and not self._waiting:
                    self._condition.wait()
                if self._stopping:
                    for unit in [*self._active, *self._waiting]:  # their requests end with a 500, not a hang
                        unit.fail(RuntimeError("the server is stopping"))
                    return
                running = sum(getattr(unit, "size", 1) for unit in self._active)
                admitted = []
                while self._waiting and running + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
                self._active.extend(_cohorts(admitted))
                jobs = list(self._active)
            for job in jobs:
                done = job.cancelled
                if not done:
                    try:
                        done = job.step()
                    except Exception as error:  # a failing request must not stop the others
                        job.fail(error)
                        done = True
                if done:
                    with self._condition:
                        self._active.remove(job)


def _cohorts(jobs: list[Job]) -> list[Job]:
    """`jobs` with those of one model that takes padded batches grouped into a `Cohort` each."""
    units: list[Job] = []
    groups: dict[int, list[GenerationJob]] = {}
    for job in jobs:
        model = getattr(getattr(job, "generation", None), "model", None)
        if isinstance(job, GenerationJob) and model is not None and model.batch_step is not None:
            groups.setdefault(id(model), []).append(job)
        else:
            units.append(job)
    return units + [Cohort(group) for group in groups.values()]


class LocalBackend:
    """A `ServedModel` served through a `Scheduler`: implements `ChatBackend`, plus `complete_stream`."""

    def __init__(self, model: ServedModel, scheduler: Scheduler, max_tokens_limit: int | None = None) -> None:
        self.model, self.scheduler, self.max_tokens_limit = model, scheduler, max_tokens_limit
        self.name = model.name

    def budget(self, prompt_ids: list[int], params: ChatParams) -> int:
        """The number of tokens to generate at most; raises `PromptTooLong` when the request cannot fit."""
        context, used = self.model.context_length, len(prompt_ids)
        if not prompt_ids:
            raise RequestRejected("the prompt is empty after tokenisation: send some text")
        if params.max_tokens is not None:
            if used + params.max_tokens > context:
                raise PromptTooLong(f"the prompt ({used} tokens) plus max_tokens ({params.max_tokens}) exceed "
                                    f"{self.name}'s context of {context} tokens; shorten the prompt or lower "
                                    "max_tokens")
            return params.max_tokens
        if used >= context:
            raise PromptTooLong(f"the prompt ({used} tokens) fills {self.name}'s context of {context} tokens; "
                                "shorten it")
        room = context - used
        return min(room, self.max_tokens_limit) if self.max_tokens_limit else room

    async def stream_ids(self, prompt_ids: list[int], params: ChatParams) -> AsyncIterator[TextDelta]:
        """Stream one choice generated from `prompt_ids`; the job leaves the scheduler when this is closed."""
        generation = Generation(self.model, prompt_ids, params, self.budget(prompt_ids, params))
        job = GenerationJob(generation, asyncio.get_running_loop())
        self.scheduler.submit(job)
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.scheduler.cancel(job)

    async def chat_stream(self, messages: list[dict], params: ChatParams) -> AsyncIterator[TextDelta]:
        """Stream choice 0 of the answer to `messages`, rendered with the model's chat template."""
        try:
            prompt_ids = self.model.encode_chat(messages)
        except Exception as error:  # the template's own refusal (jinja's TemplateError, raise_exception)
            raise RequestRejected(f"{self.name}'s chat template cannot render these messages: {error}") from error
        async for delta in self.stream_ids(prompt_ids, params):
            yield delta

    async def complete_stream(self, prompt: str, params: ChatParams) -> AsyncIterator[TextDelta]:
        """Stream choice 0 of the continuation of the raw text `prompt`."""
        async for delta in self.stream_ids(self.model.encode_prompt(prompt), params):
            yield delta

    async def aclose(self) -> None:
        """Nothing to release: the scheduler is the server's."""
