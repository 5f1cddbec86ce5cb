"""The harness every `moekit bench` benchmark shares: where it runs, how it times, what it records.

* where: `Env` (device and dtype; CPU in fp32, CUDA in bf16) from `bench_env`, `bench_context` (thread count and
  a forked RNG, both restored), `machine_info`, `calibrate_gflops` and `load_average` (noise indicators printed
  by `header` and `footer`);
* how it times: a `Timer` per measurement, timed round-robin by `run_interleaved` (a noisy machine slows every
  row alike), `timed` for one device-synchronised call, `is_slow` for rows too slow to repeat every round, and
  `measure_peak_memory` (CUDA) for the memory one call adds;
* memory estimates: `saved_activation_mib` / `saved_tensors_mib` (what autograd keeps for backward) and
  `gathered_weight_bytes` (the weight copies of transformers' ``batched_mm``) with `training_step_skip_note`;
* the comparison side: `load_transformers` (imported lazily, here only) and `quiet_transformers`;
* output: `fmt`, `print_rows`, `first_line`, `check_json_path`, `write_result`.

The tolerances and seeds every benchmark checks and draws with live here too (`ATOL`, `RTOL`, `LOSS_ATOL`, `SEED`).
"""

from __future__ import annotations

import datetime
import inspect
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._files import write_json

T = TypeVar("T")
WARMUP = 2  # untimed rounds before the timed ones
ATOL = RTOL = 1e-4  # fp32 equality of outputs and logits (the compared implementations agree to ~1e-6)
LOSS_ATOL = 1e-5  # fp32 equality of losses
SEED = 0  # the benchmarks' weights and inputs are drawn from SEED (inputs from SEED + a per-benchmark offset)
QUICK_REPEATS = 2  # timed rounds of a --quick smoke run, at most
#: a candidate whose first measured call takes more than SLOW_FACTOR times moekit's (and over SLOW_SECONDS) is
#: timed once instead of in every round (transformers' batched_mm gathers one weight copy per token and expert)
SLOW_FACTOR = 10.0
SLOW_SECONDS = 5.0
#: a training step whose estimated memory exceeds this share of the available memory is skipped (the machine
#: may be shared); see `gathered_weight_bytes`
TRAIN_MEMORY_FRACTION = 0.25


# ---------------------------------------------------------------------------------------------- where
@dataclass
class Env:
    """Where and in which precision the benchmark runs."""

    device: torch.device
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def available_bytes(self) -> int | None:
        if self.cuda:
            return torch.cuda.mem_get_info(self.device)[0]
        return _available_ram()


def bench_env(device: str) -> Env:
    """The run's device and dtype: CPU in fp32, CUDA in bf16; ValueError when CUDA is asked for but absent."""
    if device == "cpu":
        return Env(torch.device("cpu"), torch.float32)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
        return Env(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def bench_context(threads: int, env: Env) -> Iterator[None]:
    """Set the thread count and fork the RNG for the run; both restored afterwards."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    devices = [env.device.index] if env.cuda else []
    try:
        torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(previous)


def resolve_repeats(repeats: int, quick: bool) -> int:
    """The timed rounds of a run: at most `QUICK_REPEATS` with `quick`; ValueError under 1."""
    repeats = min(repeats, QUICK_REPEATS) if quick else repeats
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return repeats


def machine_info(threads: int, env: Env, tf: SimpleNamespace | None) -> dict:
    """Platform, CPU, library versions, threads, date (and the GPU on CUDA) of this run."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf.version if tf is not None else "not installed",
        "threads": threads,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if env.cuda:
        info["gpu"] = torch.cuda.get_device_name(env.device)
        info["cuda"] = torch.version.cuda
    return info


def calibrate_gflops(env: Env) -> tuple[str, float]:
    """Matmul throughput right now (a noise indicator: compare the value at the start and the end)."""
    m, k, n = (2048, 512, 2048) if not env.cuda else (8192, 8192, 8192)
    a = torch.randn(m, k, device=env.device, dtype=env.dtype)
    b = torch.randn(k, n, device=env.device, dtype=env.dtype)
    ms = median_ms(lambda: a @ b, 5, env.sync)
    label = f"{m}x{k}x{n} {'fp32' if env.dtype == torch.float32 else 'bf16'} matmul"
    return label, 2 * m * k * n / (ms / 1e3) / 1e9


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timer:
    """One thing to time: `run` (after `before`), whose median (ms) lands in `row.<attribute>`."""

    row: Any
    attribute: str
    run: Callable[[], object]
    before: Callable[[], None] | None = None


def timed(run: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds one call of `run` takes; `sync` waits for the device before and after it."""
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def timed_result(run: Callable[[], T], sync: Callable[[], None] = lambda: None) -> tuple[float, T]:
    """(seconds, result) of one call of `run` (`timed`, keeping what it returns)."""
    holder: list[T] = []
    seconds = timed(lambda: holder.append(run()), sync)
    return seconds, holder[0]


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    times = [timed(fn, sync) for _ in range(WARMUP + repeats)][WARMUP:]
    return statistics.median(times) * 1e3


def run_interleaved(timers: list[Timer], repeats: int, sync: Callable[[], None] = lambda: None) -> None:
    """Time every timer once per round, round after round, and keep each one's median.

    Interleaving spreads the machine's slow and fast moments over all rows alike, so the ratios
    measured in one run stay meaningful on a noisy shared machine. `sync` waits for the device
    (torch.cuda.synchronize on CUDA) before and after each timed call.
    """
    samples: list[list[float]] = [[] for _ in timers]
    for round_index in range(WARMUP + repeats):
        for timer, times in zip(timers, samples, strict=True):
            if timer.before is not None:
                timer.before()
            elapsed = timed(timer.run, sync)
            if round_index >= WARMUP:
                times.append(elapsed)
    for timer, times in zip(timers, samples, strict=True):
        setattr(timer.row, timer.attribute, statistics.median(times) * 1e3)
        if timer.before is not None:
            timer.before()


def is_slow(seconds: float, reference_seconds: float) -> bool:
    """Too slow to repeat every round: over `SLOW_SECONDS` and `SLOW_FACTOR` times the reference's call."""
    return seconds > SLOW_SECONDS and seconds > SLOW_FACTOR * reference_seconds


def measure_peak_memory(timers: list[Timer], env: Env) -> None:
    """CUDA: run each timer once more and record the peak memory that call adds over what is resident.

    The peak counter is reset before each measurement; `torch.cuda.max_memory_allocated` minus the memory
    allocated just before the call is stored (in MiB) as `<attribute without _ms>_peak_mib` on the row.
    """
    if not env.cuda:
        return
    for timer in timers:
        if timer.before is not None:
            timer.before()
        env.sync()
        resident = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        timer.run()
        env.sync()
        peak = torch.cuda.max_memory_allocated(env.device)
        setattr(timer.row, timer.attribute.replace("_ms", "_peak_mib"), (peak - resident) / 2**20)
        if timer.before is not None:
            timer.before()


# ---------------------------------------------------------------------------------------------- memory
def saved_tensors_mib(run: Callable[[], object], module: nn.Module) -> float:
    """MiB of the tensors autograd keeps for backward while `run` runs: activation memory.

    Every saved tensor passes `saved_tensors_hooks`; storages are counted once (views share one) and the
    module's own parameters and buffers are left out. Unlike the process's RSS this is separable per model on CPU.
    """
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    kept: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    del out
    return sum(kept.values()) / 2**20


def saved_activation_mib(module: nn.Module, x: Tensor) -> float:
    """MiB of tensors `module`'s forward on `x` keeps for backward (`saved_tensors_mib`), the input requiring grad.

    The input is counted, so a layer that saves only its input reports the input's size.
    """
    xg = x.detach().clone().requires_grad_(True)
    return saved_tensors_mib(lambda: module(xg), module)


def gathered_weight_bytes(impl: str | None, tokens: int, top_k: int, weights_per_expert: int, dtype: torch.dtype,
                          moe_layers: int = 1, backward: bool = False) -> int:
    """Rough peak of the per-(token, expert) weight copies transformers' ``batched_mm`` makes (0 for the others).

    One MoE layer copies one expert's `weights_per_expert` elements per (token, expert) pair. A forward holds one
    layer's copies at a time; with `backward`, every MoE layer's copies are kept for it, plus two layers' worth
    (the gradient of the copies and the forward's transient) while it runs.
    """
    if impl != "batched_mm":
        return 0
    one_layer = tokens * top_k * weights_per_expert * torch.empty((), dtype=dtype).element_size()
    return one_layer * (moe_layers + 2 if backward else 1)


def training_step_skip_note(label: str, need: int, tokens: int, available: int | None) -> str | None:
    """The note for a training step whose estimated memory `need` exceeds `TRAIN_MEMORY_FRACTION` of `available`
    (it is skipped then), or None when it fits (or the available memory is unknown)."""
    if available is None or need <= TRAIN_MEMORY_FRACTION * available:
        return None
    return (f"{label}: training step skipped: it copies the expert weights once per (token, expert) pair and keeps "
            f"the copies for backward, ~{need / 2**30:.1f} GiB at {tokens} tokens vs {available / 2**30:.1f} GiB "
            f"available (limit {TRAIN_MEMORY_FRACTION:.0%} of it)")


# ---------------------------------------------------------------------------------------------- transformers
def load_transformers() -> SimpleNamespace:
    """transformers (`module`), its `version` and its experts `implementations` (eager first); ImportError with the
    fix when it is not installed."""
    try:
        import transformers
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as error:
        raise ImportError("the model and decode benchmarks compare against transformers, which is not installed: "
                          "pip install transformers") from error
    return SimpleNamespace(module=transformers, version=transformers.__version__,
                           implementations=["eager", *[n for n in ALL_EXPERTS_FUNCTIONS if n != "eager"]])


@contextmanager
def quiet_transformers(tf: SimpleNamespace) -> Iterator[None]:
    """No loading progress bars and no warnings from transformers inside the block (restored afterwards)."""
    logging = tf.module.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def uses_router_loss(model: nn.Module) -> bool:
    """True when transformers adds a load-balancing loss for this model in training: its config has
    ``router_aux_loss_coef > 0`` and its forward takes ``output_router_logits``."""
    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    return coef > 0 and "output_router_logits" in inspect.signature(type(model).forward).parameters


# ---------------------------------------------------------------------------------------------- output
def fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    """`value` formatted with `pattern`, or "-" for a missing value."""
    return "-" if value is None else pattern.format(value)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 160 characters (for one-line notes)."""
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else ""


def print_rows(headers: list[str], table: list[list[str]], print_fn: Callable[..., Any]) -> None:
    """A left-aligned first column and right-aligned others."""
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                strict=True)))

    print_fn(line(headers))
    print_fn("-" * len(line(headers)))
    for cells in table:
        print_fn(line(cells))


def print_checks_and_notes(result: dict, print_fn: Callable[..., Any],
                           detail: Callable[[dict], str] | None = None) -> None:
    """One line per passed check of `result` (`detail(check)` appended where given), then one per note."""
    for check in result["checks"]:
        print_fn(f"  check passed: {check['what']}{detail(check) if detail else ''}")
    for note in result["notes"]:
        print_fn(f"  note: {note}")


def header(title: str, env: Env, tf: SimpleNamespace, threads: int, repeats: int,
           print_fn: Callable[..., Any]) -> dict:
    """Print the run's title, machine, calibration and load; return the machine info dict."""
    info = machine_info(threads, env, tf)
    precision = "fp32, CPU" if not env.cuda else "checks in fp32, timing in bf16, CUDA"
    print_fn(f"{title} ({precision})")
    for key, value in info.items():
        print_fn(f"  {key}: {value}")
    print_fn(f"  warmup {WARMUP}, median of {repeats} interleaved rounds (round-robin over every row)")
    label, info["calibration_start_gflops"] = calibrate_gflops(env)
    info["load_average_start"] = load_average()
    print_fn(f"  calibration at start: {label} {info['calibration_start_gflops']:.0f} GFLOP/s, "
             f"load average {info['load_average_start']}")
    return info


def footer(info: dict, env: Env, print_fn: Callable[..., Any]) -> None:
    """Calibrate again and record the load and the process's peak RSS."""
    _, info["calibration_end_gflops"] = calibrate_gflops(env)
    info["load_average_end"] = load_average()
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print_fn(f"\ncalibration at end: {info['calibration_end_gflops']:.0f} GFLOP/s (start "
             f"{info['calibration_start_gflops']:.0f}), load average {info['load_average_end']}; "
             "a large drop means the timings above were disturbed")
    if not env.cuda:
        print_fn(f"memory: per-row peaks are not separable on CPU (one process, one allocator); the process's "
                 f"peak RSS over the whole run was {info['peak_rss_mib']:,.0f} MiB")


def check_json_path(json_path: str | Path | None) -> None:
    """Refuse, before any work, a JSON destination whose folder does not exist (the run's results would be lost)."""
    if json_path and not Path(json_path).expanduser().absolute().parent.is_dir():
        raise FileNotFoundError(f"the folder of --json {str(json_path)!r} does not exist; create it or choose "
                                "another path")


def write_result(json_path: str | Path | None, output: dict, print_fn: Callable[..., Any]) -> None:
    if json_path:
        write_json(Path(json_path), output)
        print_fn(f"\nwrote {json_path}")
