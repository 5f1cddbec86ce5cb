"""The run report: `report.md` with PNG plots of loss, expert load, MaxVio, drops and speed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .._files import atomic_write, read_json_lines
from .rundir import read_run_config


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) from `metrics.jsonl`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `moekit train`?")
    train, evals = [], []
    for record in read_json_lines(path):  # a last line cut by a crash is skipped
        if record.get("kind") == "eval":
            evals.append(record)
        elif record.get("kind") == "train":
            train.append(record)
    return train, evals


def wall_clock_tokens_per_s(train: list[dict[str, Any]]) -> float | None:
    """Tokens over the wall-clock training time (evaluation and checkpoints included), from the last record.

    `elapsed_s` counts every session of a resumed run. None for a run stopped before its first logged step.
    """
    if not train:
        return None
    return train[-1]["tokens"] / train[-1]["elapsed_s"]


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue(), what="plot")


def _plots(run_dir: Path, train: list[dict], evals: list[dict]) -> list[tuple[str, str]]:
    """Draw the PNGs; returns (title, file name) pairs. Needs matplotlib (the `train` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[tuple[str, str]] = []
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        save_figure(fig, plot_dir / name)
        plt.close(fig)
        out.append((title, f"plots/{name}"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "tokens", "tokens")):
        ax.plot([r[key] for r in train], [r["loss"] for r in train], label="train")
        if evals:
            ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy")
        ax.legend()
    save(fig, "loss.png", "Loss against steps and tokens")

    moe = [r for r in train if "load" in r]
    if moe:
        layers = sorted(moe[0]["load"], key=int)
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers, strict=True):
            grid = [[v / max(1e-9, sum(r["load"][layer])) for v in r["load"][layer]] for r in moe]
            first, last = moe[0]["step"], moe[-1]["step"]
            if first == last:  # one logged step: give it a width of one step
                first, last = first - 0.5, last + 0.5
            image = ax.imshow(list(map(list, zip(*grid, strict=True))), aspect="auto", cmap="viridis",
                              extent=(first, last, len(grid[0]) - 0.5, -0.5))
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            fig.colorbar(image, ax=ax, fraction=0.05)
        save(fig, "expert_load.png", "Share of routed tokens per expert, per MoE layer, over training")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        axes[0].plot([r["step"] for r in moe], [r["max_violation"] for r in moe])
        axes[0].set_ylabel("MaxVio (batch)")
        axes[1].plot([r["step"] for r in moe], [r["dropped_fraction"] for r in moe])
        axes[1].set_ylabel("dropped fraction")
        for ax in axes:
            ax.set_xlabel("step")
        save(fig, "balance.png", "MaxVio and dropped fraction")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    save(fig, "speed.png", "Training throughput")
    return out


def write_report(run_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/report.md` (and `plots/*.png` when matplotlib is installed)."""
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    config = read_run_config(run_dir, "report")
    lines = [f"# Run report: {config.get('name', run_dir.name)}", ""]
    rows = [("steps", train[-1]["step"] if train else 0), ("tokens", f"{train[-1]['tokens']:,}" if train else 0)]
    if train:
        rows.append(("final train loss", f"{train[-1]['loss']:.4f}"))
        rows.append(("tokens/s (wall clock: tokens / training time, eval and checkpoints included)",
                     f"{wall_clock_tokens_per_s(train):,.0f}"))
        rows.append(("training time", f"{train[-1]['elapsed_s']:,.1f} s"))
    if evals:
        rows += [("val loss", f"{evals[-1]['val_loss']:.4f}"), ("val perplexity", f"{evals[-1]['val_ppl']:.2f}")]
        if "val_max_violation" in evals[-1]:
            rows.append(("MaxVio on val (mean over layers)", f"{evals[-1]['val_max_violation']:.3f}"))
    for key, value in (extra or {}).items():
        rows.append((key, value))
    lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    moe = (config.get("model") or {}).get("moe")
    hf_config = (config.get("model") or {}).get("hf_config")
    if hf_config is not None:
        lines.append(f"Model: transformers' own {hf_config.get('model_type')} class (train.backend=transformers), "
                     "balanced from its recorded routing.")
    else:
        kind = "dense" if not moe else f"{moe.get('router')} router, {moe.get('num_local_experts')}"
        lines.append(f"Model: {kind}" + ("" if not moe else f" experts, top-{moe.get('num_experts_per_tok')}") + ".")
    if moe and moe.get("router") in ("expert_choice", "soft"):
        lines.append("")
        lines.append("**Warning:** this router mixes tokens of a sequence, future ones included; in a causal LM "
                     "its loss is optimistic and must not be compared with token-choice runs.")
    lines.append("")
    try:
        plots = _plots(run_dir, train, evals)
    except ImportError:
        lines.append("(Plots need matplotlib: `pip install matplotlib`, then `moekit report RUN_DIR`.)")
    else:
        for title, path in plots:
            lines += [f"## {title}", "", f"![{title}]({path})", ""]
    path = run_dir / "report.md"
    atomic_write(path, "\n".join(lines) + "\n", what="report")
    return path


def _summary(run_dir: Path) -> dict[str, Any]:
    train, evals = read_metrics(run_dir)
    config = read_run_config(run_dir, "report")
    moe = (config.get("model") or {}).get("moe")
    return {
        "run": config.get("name", run_dir.name),
        "dir": str(run_dir),
        "router": moe.get("router") if moe else ("transformers" if (config.get("model") or {}).get("hf_config")
                                                 else "dense"),
        "leaks_future": bool(moe and moe.get("router") in ("expert_choice", "soft")),
        "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1]["tokens"] if train else 0,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_ppl": evals[-1]["val_ppl"] if evals else None,
        "val_max_violation": evals[-1].get("val_max_violation") if evals else None,
        "tokens_per_s": wall_clock_tokens_per_s(train) or 0.0,
        "train": train,
        "evals": evals,
    }


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A side-by-side markdown table of runs, and overlaid plots in `out_dir` when matplotlib is installed.

    A run whose router mixes tokens (expert choice, Soft MoE) is flagged: in a causal LM its loss
    benefits from seeing the future and is not a fair win.
    """
    summaries = [_summary(Path(d)) for d in run_dirs]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| run | router | steps | tokens | val loss | val ppl | MaxVio (val) | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        name = s["run"] + (" (leaks future: not comparable)" if s["leaks_future"] else "")
        lines.append(f"| {name} | {s['router']} | {s['steps']} | {s['tokens']:,} | {fmt(s['val_loss'], '.4f')} | "
                     f"{fmt(s['val_ppl'], '.2f')} | {fmt(s['val_max_violation'], '.3f')} | "
                     f"{s['tokens_per_s']:,.0f} |")
    table = "\n".join(lines)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = ["# Comparison", "", table, ""]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            text.append("(Plots need matplotlib: `pip install matplotlib`.)")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
            for s in summaries:
                label = s["run"] + (" (leaks)" if s["leaks_future"] else "")
                axes[0].plot([r["tokens"] for r in s["evals"]], [r["val_loss"] for r in s["evals"]], "o-", label=label)
                moe = [r for r in s["train"] if "max_violation" in r]
                if moe:
                    axes[1].plot([r["step"] for r in moe], [r["max_violation"] for r in moe], label=label)
            axes[0].set_xlabel("tokens")
            axes[0].set_ylabel("val loss")
            axes[1].set_xlabel("step")
            axes[1].set_ylabel("MaxVio (batch)")
            for ax in axes:
                ax.legend(fontsize=8)
            fig.tight_layout()
            save_figure(fig, out_dir / "compare.png")
            plt.close(fig)
            text += ["![val loss and MaxVio](compare.png)", ""]
        atomic_write(out_dir / "compare.md", "\n".join(text) + "\n", what="comparison")
    return table, summaries
