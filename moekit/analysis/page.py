"""`routing.html`: one self-contained page that shows which expert each token of the sample went to.

The page needs no server and no network: the style, the script and the data (as JSON in a
``<script type="application/json">``, with ``<``, ``>`` and ``&`` escaped so no token can end the script) are all
inside it. The sample text is written as one ``<span data-i="N">`` per token (HTML-escaped, so a token such as
``</script>`` or ``<b>`` shows as text); the script colours each token's background by its first-choice expert in
the chosen MoE layer (:func:`moekit.analysis.colours.expert_colour`), fills the legend (each expert's colour and its
load as a share of the ideal in that layer), and shows the token's experts and weights on hover. The layer is chosen
in a ``<select>`` and kept in the address (``routing.html#layer=3`` opens layer 3). Headline numbers (MaxVio,
effective experts per layer, dead experts, drops) are written into the page as plain HTML.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from .._files import atomic_write
from .browser import screenshot_page
from .colours import expert_colour, expert_text_colour
from .figures import check_analysis

__all__ = ["embedded_json", "expert_colour", "page_data", "render_page", "screenshot_page", "write_page"]

DATA_ID = "moekit-data"
"""The id of the ``<script type="application/json">`` that holds the page's data."""


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def embedded_json(data: Any) -> str:
    """`data` as JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` appear literally.

    They are written as ``\\u003c`` ... inside the JSON strings (the only place JSON can hold them), so
    ``JSON.parse`` reads the same text back, and ``</script>`` or ``<!--`` in a token cannot end the element.
    """
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _per_layer(mapping: dict[Any, Any], layer: int, what: str) -> Any:
    for key in (str(layer), layer):
        if key in mapping:
            return mapping[key]
    raise ValueError(f"the analysis sample has no {what} for MoE layer {layer}: the analysis is damaged")


def page_data(analysis: dict[str, Any]) -> dict[str, Any]:
    """What the page's script reads: the sample, per-layer choices, colours and per-layer numbers.

    Raises ValueError naming the problem when the sample does not match the model (wrong layers, lengths or
    expert numbers).
    """
    check_analysis(analysis)
    model = analysis["model"]
    num_experts = model["num_experts"]
    sample = analysis.get("sample") or {}
    tokens = [str(token) for token in sample.get("tokens") or []]
    layers = [entry["layer"] for entry in analysis["layers"]]
    experts, weights = {}, {}
    for layer in layers:
        chosen = _per_layer(sample.get("experts") or {}, layer, "experts") if tokens else []
        given = _per_layer(sample.get("weights") or {}, layer, "weights") if tokens else []
        if len(chosen) != len(tokens) or len(given) != len(tokens):
            raise ValueError(f"the analysis sample has {len(tokens)} tokens but {len(chosen)} expert rows and "
                             f"{len(given)} weight rows for layer {layer}: the analysis is damaged")
        for row in chosen:
            if not row or any(not isinstance(e, int) or not 0 <= e < num_experts for e in row):
                raise ValueError(f"the analysis sample names expert choices {row} in layer {layer}, outside "
                                 f"0..{num_experts - 1}: the analysis is damaged")
        experts[str(layer)] = [list(row) for row in chosen]
        weights[str(layer)] = [[round(float(w), 4) for w in row] for row in given]
    domains = (analysis.get("data") or {}).get("domains")
    keys = ("max_violation_global", "max_violation_batch", "effective_experts", "entropy", "dropped_fraction")
    return {
        "num_experts": num_experts,
        "top_k": model.get("num_experts_per_tok"),
        "layers": layers,
        "default_layer": layers[0],
        "colours": [expert_colour(e, num_experts) for e in range(num_experts)],
        "text_colours": [expert_text_colour(e, num_experts) for e in range(num_experts)],
        "tokens": tokens,
        "domain": sample.get("domain") if domains else None,
        "domain_names": domains,
        "experts": experts,
        "weights": weights,
        "load_share": {str(e["layer"]): [round(float(v), 4) for v in e["load_share_of_ideal"]]
                       for e in analysis["layers"]},
        "stats": {str(e["layer"]): {key: e.get(key) for key in keys} | {"dead": len(e.get("dead_experts") or [])}
                  for e in analysis["layers"]},
    }


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _headline(analysis: dict[str, Any]) -> str:
    overall = analysis.get("overall") or {}
    num_experts = analysis["model"]["num_experts"]
    cards = [("MaxVio<sub>global</sub>", _number(overall.get("max_violation_global"))),
             ("MaxVio<sub>batch</sub>", _number(overall.get("max_violation_batch"))),
             ("effective experts", f"{_number(overall.get('effective_experts'), 2)} of {num_experts}"),
             ("dead experts", _number(overall.get("dead_experts"))),
             ("dropped", f"{_number(overall.get('dropped_fraction'))} at capacity factor "
                         f"{_number(analysis.get('capacity_factor'), 2)}")]
    parts = ['<div class="cards">']
    parts += [f'<div class="card"><div class="label">{label}</div><div class="value">{html.escape(value)}</div>'
              "</div>" for label, value in cards]
    parts.append("</div>")
    rows = "".join(
        f"<tr><td>{entry['layer']}</td><td>{_number(entry.get('max_violation_global'))}</td>"
        f"<td>{_number(entry.get('max_violation_batch'))}</td><td>{_number(entry.get('effective_experts'), 2)}</td>"
        f"<td>{_number(entry.get('entropy'))}</td><td>{len(entry.get('dead_experts') or [])}</td>"
        f"<td>{_number(entry.get('dropped_fraction'))}</td></tr>" for entry in analysis["layers"])
    parts.append(f'<details><summary>per layer (means over layers above; effective experts of {num_experts})'
                 '</summary><table id="per-layer"><thead><tr><th>layer</th><th>MaxVio<sub>global</sub></th>'
                 "<th>MaxVio<sub>batch</sub></th><th>effective experts</th><th>entropy (nats)</th>"
                 f"<th>dead</th><th>dropped</th></tr></thead><tbody>{rows}</tbody></table></details>")
    return "\n".join(parts)


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.2em 2em; color: #1a1a1a; background: #ffffff; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
.sub { color: #555; margin: 0 0 .8em; }
.cards { display: flex; flex-wrap: wrap; gap: .6em; margin: .4em 0 .6em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .3em .7em; }
.card .label { color: #666; font-size: .85em; } .card .value { font-size: 1.15em; font-weight: 600; }
table { border-collapse: collapse; margin: .4em 0; } td, th { border: 1px solid #ddd; padding: .15em .6em; }
td { text-align: right; font-variant-numeric: tabular-nums; }
#controls { margin: .8em 0 .4em; } #layer-stats { color: #444; margin-left: 1em; }
#legend { display: flex; flex-wrap: wrap; gap: .25em .9em; margin: .3em 0 .8em; font-size: .85em; }
#legend .item { white-space: nowrap; cursor: default; }
#legend .swatch { display: inline-block; width: 1em; height: 1em; border-radius: 2px; margin-right: .3em;
                  vertical-align: -.15em; border: 1px solid #0003; }
#text { font: 15px/1.9 ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap; word-break: break-word;
        border: 1px solid #ddd; border-radius: 6px; padding: .8em; }
#text span { border-radius: 2px; box-shadow: inset -1px 0 0 #ffffff99; }
#text.focus span:not(.hit) { opacity: .2; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #999; border-radius: 4px;
       padding: .35em .6em; font-size: 13px; box-shadow: 0 2px 6px #0003; max-width: 28em; }
#tip .token { font-family: ui-monospace, monospace; white-space: pre; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("moekit-data").textContent);
  var text = document.getElementById("text"), spans = text.querySelectorAll("span[data-i]");
  var select = document.getElementById("layer"), legend = document.getElementById("legend");
  var stats = document.getElementById("layer-stats"), tip = document.getElementById("tip");
  var current = data.default_layer;
  function fixed(v, d) { return v === null || v === undefined ? "\\u2013" : Number(v).toFixed(d); }
  function layerFromHash() {
    var value = new URLSearchParams(location.hash.slice(1)).get("layer");
    return value !== null && data.layers.indexOf(Number(value)) >= 0 ? Number(value) : data.default_layer;
  }
  function show(layer) {
    current = layer;
    var key = String(layer), experts = data.experts[key], s = data.stats[key];
    select.value = key;
    for (var i = 0; i < spans.length; i++) {
      var e = experts[Number(spans[i].getAttribute("data-i"))][0];
      spans[i].style.backgroundColor = data.colours[e];
      spans[i].style.color = data.text_colours[e];
    }
    legend.textContent = "";
    data.load_share[key].forEach(function (share, e) {
      var item = document.createElement("span"), swatch = document.createElement("span");
      item.className = "item"; item.setAttribute("data-expert", e);
      swatch.className = "swatch"; swatch.style.backgroundColor = data.colours[e];
      item.appendChild(swatch);
      item.appendChild(document.createTextNode("expert " + e + ": " + fixed(share, 2) + "\\u00d7 ideal"));
      legend.appendChild(item);
    });
    stats.textContent = "MaxVio global " + fixed(s.max_violation_global, 3) + ", batch " +
      fixed(s.max_violation_batch, 3) + "; effective experts " + fixed(s.effective_experts, 2) + " of " +
      data.num_experts + "; dead " + s.dead + "; dropped " + fixed(s.dropped_fraction, 3);
  }
  select.addEventListener("change", function () { location.hash = "layer=" + select.value; });
  window.addEventListener("hashchange", function () { show(layerFromHash()); });
  legend.addEventListener("mouseover", function (event) {
    var item = event.target.closest(".item");
    if (!item) return;
    var e = Number(item.getAttribute("data-expert")), experts = data.experts[String(current)];
    text.classList.add("focus");
    for (var i = 0; i < spans.length; i++)
      spans[i].classList.toggle("hit", experts[Number(spans[i].getAttribute("data-i"))][0] === e);
  });
  legend.addEventListener("mouseleave", function () { text.classList.remove("focus"); });
  text.addEventListener("mousemove", function (event) {
    var span = event.target.closest("span[data-i]");
    if (!span) { tip.hidden = true; return; }
    var i = Number(span.getAttribute("data-i")), key = String(current);
    tip.textContent = "";
    var head = document.createElement("div"), token = document.createElement("span");
    token.className = "token"; token.textContent = JSON.stringify(data.tokens[i]);
    head.appendChild(token);
    head.appendChild(document.createTextNode("  token " + i + (data.domain ? ", domain " +
      data.domain_names[data.domain[i]] : "") + ", layer " + key));
    tip.appendChild(head);
    data.experts[key][i].forEach(function (e, rank) {
      var row = document.createElement("div"), swatch = document.createElement("span");
      swatch.className = "swatch"; swatch.style.cssText = "display:inline-block;width:.9em;height:.9em;" +
        "margin-right:.4em;border-radius:2px;background:" + data.colours[e];
      row.appendChild(swatch);
      row.appendChild(document.createTextNode((rank + 1) + ". expert " + e + "  weight " +
        fixed(data.weights[key][i][rank], 3)));
      tip.appendChild(row);
    });
    tip.hidden = false;
    tip.style.left = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = Math.min(event.clientY + 16, window.innerHeight - tip.offsetHeight - 8) + "px";
  });
  text.addEventListener("mouseleave", function () { tip.hidden = true; });
  show(layerFromHash());
})();
"""


def render_page(analysis: dict[str, Any]) -> str:
    """The text of `routing.html` for `analysis` (see the module's description)."""
    data = page_data(analysis)
    model, source = analysis["model"], analysis.get("data") or {}
    title = f"moekit routing: {model.get('source', 'model')}"
    spans = "".join(f'<span data-i="{i}">{html.escape(token, quote=False)}</span>'
                    for i, token in enumerate(data["tokens"])) or "(the analysis holds no sample tokens)"
    options = "".join(f'<option value="{layer}">{layer}</option>' for layer in data["layers"])
    described = (f"{model['num_experts']} experts, top-{model.get('num_experts_per_tok', '?')}, "
                 f"MoE layers {', '.join(map(str, data['layers']))}; data {source.get('source', '?')}, "
                 f"{source.get('tokens', '?')} tokens analysed; the first {len(data['tokens'])} shown below, "
                 "coloured by their first-choice expert (hover a token for its experts and weights, a legend "
                 "entry to pick out that expert's tokens)")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(described)}</p>
{_headline(analysis)}
<div id="controls"><label>MoE layer <select id="layer">{options}</select></label><span id="layer-stats"></span></div>
<div id="legend"></div>
<div id="text">{spans}</div>
<div id="tip" hidden></div>
<script type="application/json" id="{DATA_ID}">{embedded_json(data)}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_page(analysis: dict[str, Any], path: Path) -> Path:
    """Write `routing.html` for `analysis` at `path`, atomically; return `path`.

    Raises ValueError (and writes nothing) when the analysis is not a complete "moekit-analysis/1" dict or its
    sample does not match its model.
    """
    path = Path(path)
    text = render_page(analysis)
    atomic_write(path, text, what="routing page")
    return path
