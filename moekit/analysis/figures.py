"""The PNG figures of `moekit analyze`, drawn from an analysis dict (format "moekit-analysis/1").

:func:`write_figures` writes into `OUT/figures/`, each PNG atomically, and only the figures whose data the analysis
holds (a figure that an earlier analysis left there but this one has no data for is removed):

- `load_heatmap.png`: MoE layer x expert, colour = load as a share of the ideal k*N/E, on a diverging scale whose
  neutral colour is 1.0 (the ideal, marked in the colourbar);
- `domain_experts.png` (when `layers[i].domains` is present): per layer, domain x expert on the same scale, each
  domain's own load against its own ideal, with the mutual information and its permutation baseline in the title;
- `coactivation.png` (k > 1): per layer (up to 12, evenly spread), P(expert b | expert a);
- `saturation.png` (when `saturation` is present): OLMoE's router saturation over the checkpoints;
- `dropped_by_position.png`: the dropped fraction at each position of the window, per layer.

Each figure is also available as a matplotlib Figure (`load_heatmap_figure` ...) for a notebook or a test.
matplotlib (the `train` extra) is imported only when a figure is drawn, with the Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..train.report import save_figure

FORMAT = "moekit-analysis/1"
FIGURES = ("load_heatmap.png", "domain_experts.png", "coactivation.png", "saturation.png",
           "dropped_by_position.png")
"""Every file name :func:`write_figures` may write, in the order it writes them."""
MAX_GRID_LAYERS = 12
"""The most layers a per-layer grid (domains, co-activation) shows; more are thinned to this many, evenly."""

__all__ = ["FIGURES", "coactivation_figure", "domain_figure", "dropped_by_position_figure", "load_heatmap_figure",
           "saturation_figure", "write_figures"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_analysis(analysis: Any) -> None:
    """Raise ValueError naming the problem when `analysis` is not a "moekit-analysis/1" dict with layers."""
    if not isinstance(analysis, dict):
        raise ValueError(f"the analysis must be a dict in the {FORMAT} format (analysis.json), not "
                         f"{type(analysis).__name__}")
    if analysis.get("format") != FORMAT:
        raise ValueError(f"the analysis has format {analysis.get('format')!r}, expected {FORMAT!r}: write it with "
                         "this version of `moekit analyze`")
    layers = analysis.get("layers")
    model = analysis.get("model") or {}
    if not isinstance(layers, list) or not layers:
        raise ValueError("the analysis has no MoE layers (`layers` is empty): nothing to draw")
    if not isinstance(model.get("num_experts"), int) or model["num_experts"] < 1:
        raise ValueError("the analysis lacks model.num_experts: it is not a complete analysis.json")
    for entry in layers:
        if len(entry.get("load_share_of_ideal") or []) != model["num_experts"]:
            raise ValueError(f"layer {entry.get('layer')} has {len(entry.get('load_share_of_ideal') or [])} load "
                             f"shares for {model['num_experts']} experts: the analysis is damaged")


def _expert_ticks(ax: Any, num_experts: int, axis: str = "x") -> None:
    step = 1 if num_experts <= 32 else 8 if num_experts <= 128 else 16
    ticks = list(range(0, num_experts, step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
    (ax.set_xticklabels if axis == "x" else ax.set_yticklabels)([str(t) for t in ticks])


def _ideal_norm(values: list[float]) -> Any:
    """A diverging norm with 1.0 (the ideal) at its centre: 0 at one end, at least 2 at the other."""
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, max(values, default=2.0)))


IDEAL_CMAP = "RdBu_r"
"""Blue below the ideal, white at it, red above it."""


def _ideal_colourbar(fig: Any, image: Any, ax: Any, label: str = "load / ideal (k·N/E)") -> Any:
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    top = image.norm.vmax
    last = math.floor(top * 100) / 100  # rounded down: a tick past the scale's top breaks the colourbar
    ticks = [t for t in (0.0, 0.5, 1.0, 1.5, 2.0) if t <= top] + ([last] if top > 2.2 else [])
    bar.set_ticks(ticks)
    bar.set_ticklabels(["1.0 = ideal" if t == 1.0 else f"{t:.1f}" for t in ticks])
    bar.ax.axhline(1.0, color="black", linewidth=1.2)
    bar.set_label(label)
    return bar


def _thin(items: list[Any], most: int = MAX_GRID_LAYERS) -> list[Any]:
    if len(items) <= most:
        return items
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)]


def _grid(plt: Any, count: int, cell: tuple[float, float], most_columns: int = 4) -> tuple[Any, list[Any]]:
    columns = min(count, most_columns)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(cell[0] * columns, cell[1] * rows), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def load_heatmap_figure(analysis: dict[str, Any]) -> Any:
    """MoE layer x expert, coloured by load as a share of the ideal (1.0 = white, marked in the colourbar)."""
    check_analysis(analysis)
    plt = _pyplot()
    layers = analysis["layers"]
    num_experts = analysis["model"]["num_experts"]
    grid = [[float(v) for v in entry["load_share_of_ideal"]] for entry in layers]
    fig, ax = plt.subplots(figsize=(min(12.0, 4.5 + 0.32 * num_experts), min(10.0, 3.6 + 0.3 * len(layers))),
                           layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap=IDEAL_CMAP, norm=_ideal_norm([v for row in grid for v in row]),
                      interpolation="nearest")
    if num_experts * len(layers) <= 160:  # few cells: print the number in each
        for row, values in enumerate(grid):
            for column, value in enumerate(values):
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value - 1.0) > 0.6 else "black")
    _expert_ticks(ax, num_experts)
    labels = [str(entry["layer"]) for entry in layers]
    step = max(1, len(labels) // 24)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels(labels[::step])
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer (MoE)")
    ax.set_title(f"Expert load as a share of the ideal, per MoE layer\n(E = {num_experts}, "
                 f"k = {analysis['model'].get('num_experts_per_tok', '?')}; white = ideal)")
    _ideal_colourbar(fig, image, ax)
    return fig


def _domain_layers(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in analysis["layers"] if entry.get("domains")]


def domain_figure(analysis: dict[str, Any]) -> Any | None:
    """Per layer, domain x expert: each domain's load as a share of its own ideal; None without domains."""
    check_analysis(analysis)
    layers = _thin(_domain_layers(analysis))
    if not layers:
        return None
    plt = _pyplot()
    num_experts = analysis["model"]["num_experts"]
    names = layers[0]["domains"]["names"]
    fig, axes = _grid(plt, len(layers), (min(7.0, 2.4 + 0.28 * num_experts), 1.7 + 0.35 * len(names)),
                      most_columns=4 if num_experts <= 16 else 2)
    grids = []
    for entry in layers:
        rows = []
        for counts in entry["domains"]["load"]:
            total = sum(counts)
            ideal = total / num_experts if total else 0.0
            rows.append([c / ideal if ideal else 0.0 for c in counts])
        grids.append(rows)
    norm = _ideal_norm([v for grid in grids for row in grid for v in row])
    image = None
    for ax, entry, grid in zip(axes, layers, grids, strict=True):
        image = ax.imshow(grid, aspect="auto", cmap=IDEAL_CMAP, norm=norm, interpolation="nearest")
        info = entry["domains"]
        ax.set_title(f"layer {entry['layer']}: MI {info['mutual_information']:.3f} nats\n"
                     f"(chance: mean {info['baseline_mean']:.3f}, p95 {info['baseline_p95']:.3f})", fontsize=9)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        _expert_ticks(ax, num_experts)
        ax.set_xlabel("expert", fontsize=8)
    fig.suptitle("Expert load per domain, as a share of that domain's ideal (white = ideal)")
    _ideal_colourbar(fig, image, axes, "load / the domain's ideal")
    return fig


def coactivation_figure(analysis: dict[str, Any]) -> Any | None:
    """Per layer, P(expert b | expert a) for the same token (diagonal greyed); None when k = 1 (nothing to show)."""
    check_analysis(analysis)
    if int(analysis["model"].get("num_experts_per_tok", 1)) < 2:
        return None
    layers = _thin([entry for entry in analysis["layers"] if entry.get("coactivation")])
    if not layers:
        return None
    plt = _pyplot()
    import numpy as np

    num_experts = analysis["model"]["num_experts"]
    side = min(3.8, 1.6 + 0.12 * num_experts)
    fig, axes = _grid(plt, len(layers), (side + 0.6, side))
    top = max(max(max(row) for row in entry["coactivation"]) for entry in layers) or 1.0
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = None
    for ax, entry in zip(axes, layers, strict=True):
        grid = np.array(entry["coactivation"], dtype=float)
        np.fill_diagonal(grid, np.nan)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(f"layer {entry['layer']}", fontsize=9)
        _expert_ticks(ax, num_experts, "x")
        _expert_ticks(ax, num_experts, "y")
        ax.set_xlabel("expert b", fontsize=8)
        ax.set_ylabel("expert a", fontsize=8)
    fig.suptitle("Co-activation P(expert b | expert a) for the same token")
    bar = fig.colorbar(image, ax=axes, fraction=0.046, pad=0.02)
    bar.set_label("P(b | a)")
    return fig


def saturation_figure(analysis: dict[str, Any]) -> Any | None:
    """OLMoE's router saturation against the training step, per layer and overall; None without checkpoints."""
    check_analysis(analysis)
    saturation = analysis.get("saturation")
    if not saturation or not saturation.get("steps"):
        return None
    plt = _pyplot()
    steps = saturation["steps"]
    fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
    per_layer = saturation.get("layers") or {}
    for layer in sorted(per_layer, key=int):
        ax.plot(steps, per_layer[layer], linewidth=1, alpha=0.6, label=f"layer {layer}")
    ax.plot(steps, saturation["overall"], color="black", linewidth=2.4, marker="o", label="mean over layers")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("share of the final top-k already chosen")
    ax.set_title(f"Router saturation against the final checkpoint (step {saturation.get('final_step', steps[-1])})")
    ax.legend(fontsize=7, ncol=2 if len(per_layer) > 6 else 1, loc="lower right")
    return fig


def dropped_by_position_figure(analysis: dict[str, Any]) -> Any | None:
    """The dropped fraction at each position of the window, per layer; None when no layer has it."""
    check_analysis(analysis)
    layers = [entry for entry in analysis["layers"] if entry.get("dropped_by_position")]
    if not layers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.2), layout="constrained")
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(plt.get_cmap("viridis")([0.85 * i / 255 for i in range(256)]))  # no pale yellow line
    first, span = layers[0]["layer"], max(1, layers[-1]["layer"] - layers[0]["layer"])
    for entry in layers:
        values = entry["dropped_by_position"]
        ax.plot(range(len(values)), values, linewidth=1, color=cmap((entry["layer"] - first) / span),
                label=f"layer {entry['layer']}")
    width = max(len(entry["dropped_by_position"]) for entry in layers)
    mean = [sum(e["dropped_by_position"][p] for e in layers if p < len(e["dropped_by_position"])) / len(layers)
            for p in range(width)]
    ax.plot(range(width), mean, color="black", linewidth=2, label="mean over layers")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("dropped fraction of assignments")
    ax.set_ylim(bottom=0.0)
    ax.set_title(f"Dropped assignments by position, capacity factor {analysis.get('capacity_factor', '?')}")
    if len(layers) <= 8:
        ax.legend(fontsize=7)
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(layers[0]["layer"], layers[-1]["layer"]), cmap=cmap), ax=ax)
        bar.set_label("decoder layer")
    return fig


_DRAWERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "load_heatmap.png": load_heatmap_figure, "domain_experts.png": domain_figure,
    "coactivation.png": coactivation_figure, "saturation.png": saturation_figure,
    "dropped_by_position.png": dropped_by_position_figure}


def write_figures(analysis: dict[str, Any], out: Path) -> list[Path]:
    """Draw the figures the analysis has data for into `out/figures/` (PNG, atomic); return their paths.

    A figure of :data:`FIGURES` that this analysis has no data for is removed from `out/figures/` if an earlier
    analysis left it there, so the folder always shows one analysis. Needs matplotlib (the `train` extra).
    """
    check_analysis(analysis)
    plt = _pyplot()
    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FIGURES:
        fig = _DRAWERS[name](analysis)
        path = folder / name
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        try:
            save_figure(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written
