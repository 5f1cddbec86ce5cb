"""The text `moekit analyze` prints: one row per MoE layer of the headline numbers of analysis.json."""

from __future__ import annotations

from typing import Any

__all__ = ["summary_text"]


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_text(analysis: dict[str, Any]) -> str:
    """A markdown table of the per-layer numbers and the overall means, with what was analysed."""
    model, data = analysis["model"], analysis["data"]
    domains = data.get("domains")
    lines = [f"{model['source']}: {data['tokens']:,} tokens in {data['batches']} forwards, "
             f"{model['num_experts']} experts, top-{model['num_experts_per_tok']}, capacity factor "
             f"{analysis['capacity_factor']:g}" + (f", domains {', '.join(domains)}" if domains else ""), ""]
    header = ["layer", "MaxVio_global", "MaxVio_batch", "CV", "exp(H)", "dead", "dropped", "next-layer consistency",
              "token spec. (k/E)"]
    if domains:
        header.append("domain MI nats (perm. p95)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in analysis["layers"]:
        row = [str(layer["layer"]), _number(layer["max_violation_global"]), _number(layer["max_violation_batch"]),
               _number(layer["coefficient_of_variation"]), _number(layer["effective_experts"], 2),
               str(len(layer["dead_experts"])), f"{layer['dropped_fraction']:.1%}",
               _number(layer["consistency_with_next"]),
               f"{layer['token_specialisation']:.3f} ({layer['token_specialisation_baseline']:.3f})"]
        if domains:
            info = layer["domains"]
            row.append(f"{info['mutual_information']:.4f} ({info['baseline_p95']:.4f})")
        lines.append("| " + " | ".join(row) + " |")
    overall = analysis["overall"]
    lines.append("")
    lines.append(f"overall: MaxVio_global {overall['max_violation_global']:.3f}, MaxVio_batch "
                 f"{overall['max_violation_batch']:.3f}, exp(H) {overall['effective_experts']:.2f} of "
                 f"{model['num_experts']}, dead experts {overall['dead_experts']}, dropped "
                 f"{overall['dropped_fraction']:.1%}")
    saturation = analysis.get("saturation")
    if saturation:
        steps = zip(saturation["steps"], saturation["overall"], strict=True)
        pairs = ", ".join(f"step {step}: {value:.2f}" for step, value in steps)
        lines.append(f"router saturation (share of the final top-{model['num_experts_per_tok']} already chosen): "
                     f"{pairs}")
    return "\n".join(lines)
