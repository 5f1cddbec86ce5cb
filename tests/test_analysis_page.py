"""The figures and the routing page of `moekit analyze`, from an analysis dict made by hand.

The dict (E = 4, k = 2, MoE layers 1 and 3, 30 tokens including a newline, `</script>` and `<b>`) is built here with
its loads, co-activation and domain tables counted from its own sample, so each figure and the page can be checked
against numbers computed independently of the code under test. The page is also rendered in headless Chromium
(Debian's package), where the colours its script gives the tokens are read back from the DOM and the screenshot.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from moekit.analysis.browser import CHROMIUM_MISSING, ChromiumError, dump_dom, find_chromium
from moekit.analysis.colours import expert_colour, palette
from moekit.analysis.figures import (
    FIGURES,
    domain_figure,
    dropped_by_position_figure,
    load_heatmap_figure,
    write_figures,
)
from moekit.analysis.page import DATA_ID, embedded_json, page_data, screenshot_page, write_page

E, K, LAYERS, BLOCK = 4, 2, (1, 3), 8
TOKENS = ["The", " cat", " sat", " on", " the", " mat", ".", "\n", "</script>", "<b>", "bold", "</b>", " &amp;",
          " \"quoted\"", " 'x'", "\n", "def", " f", "(", "x", "):", "\n", "    return", " x", " +", " 1", "\n",
          "<!--", " end", "\u2028"]


def _routing(layer: int) -> tuple[list[list[int]], list[list[float]]]:
    """First and second choices of every token in `layer` (layer 3's first choice always differs from layer 1's)."""
    rng = random.Random(17)
    first1 = [rng.randrange(E) for _ in TOKENS]
    first = first1 if layer == 1 else [(f + 1 + i % 3) % E for i, f in enumerate(first1)]
    experts = [[f, (f + 1 + (i * layer) % (E - 1)) % E] for i, f in enumerate(first)]
    weights = [[round(0.55 + 0.4 * rng.random(), 4)] for _ in TOKENS]
    return experts, [[w[0], round(1 - w[0], 4)] for w in weights]


def make_analysis() -> dict:
    """A small but complete "moekit-analysis/1" dict whose tables are counted from its own sample."""
    domain = [0 if i < 16 else 1 for i in range(len(TOKENS))]
    layers, experts_of, weights_of = [], {}, {}
    for layer in LAYERS:
        experts, weights = _routing(layer)
        experts_of[str(layer)], weights_of[str(layer)] = experts, weights
        load = [sum(row.count(e) for row in experts) for e in range(E)]
        ideal = K * len(TOKENS) / E
        together = [[sum(1 for row in experts if a in row and b in row and a != b) for b in range(E)]
                    for a in range(E)]
        coactivation = [[together[a][b] / load[a] if load[a] else 0.0 for b in range(E)] for a in range(E)]
        domain_load = [[sum(row.count(e) for row, d in zip(experts, domain, strict=True) if d == dd)
                        for e in range(E)] for dd in (0, 1)]
        share = [v / ideal for v in load]
        layers.append({
            "layer": layer, "load": load, "load_share_of_ideal": share,
            "max_violation_global": max(share) - 1, "max_violation_batch": max(share) - 0.9,
            "coefficient_of_variation": 0.2, "entropy": 1.3, "entropy_max": float(np.log(E)),
            "effective_experts": 3.6, "dead_experts": [], "saturated_experts": [],
            "dropped_fraction": 0.05, "dropped_by_position": [0.0, 0.0, 0.01, 0.02, 0.05, 0.08, 0.1, 0.14],
            "coactivation": coactivation, "consistency_with_next": 0.4 if layer == 1 else None,
            "token_specialisation": 0.7, "token_specialisation_baseline": K / E,
            "domains": {"names": ["prose", "code"], "load": domain_load, "mutual_information": 0.12,
                        "baseline_mean": 0.01, "baseline_p95": 0.02},
            "top_tokens": [[] for _ in range(E)]})
    return {
        "format": "moekit-analysis/1",
        "model": {"source": "hand-made </script><b>", "kind": "trace", "num_experts": E, "num_experts_per_tok": K,
                  "moe_layers": list(LAYERS)},
        "data": {"source": "hand", "tokens": len(TOKENS), "batches": 4, "batch_size": 1, "block_size": BLOCK,
                 "domains": ["prose", "code"]},
        "capacity_factor": 1.0,
        "overall": {"max_violation_global": 0.3, "max_violation_batch": 0.4, "coefficient_of_variation": 0.2,
                    "entropy": 1.3, "effective_experts": 3.6, "dead_experts": 0, "dropped_fraction": 0.05,
                    "token_specialisation": 0.7, "token_specialisation_baseline": 0.5,
                    "domain_mutual_information": 0.12, "domain_baseline_mean": 0.01, "domain_baseline_p95": 0.02},
        "layers": layers,
        "saturation": {"steps": [100, 200, 300, 400], "final_step": 400,
                       "layers": {"1": [0.4, 0.6, 0.85, 1.0], "3": [0.5, 0.7, 0.9, 1.0]},
                       "overall": [0.45, 0.65, 0.875, 1.0]},
        "sample": {"tokens": list(TOKENS), "ids": list(range(len(TOKENS))), "domain": domain,
                   "experts": experts_of, "weights": weights_of},
    }


def without_optional(analysis: dict) -> dict:
    """The analysis with no domains and no saturation (a run analysed on its validation split, one checkpoint)."""
    bare = copy.deepcopy(analysis)
    bare["saturation"] = None
    bare["data"]["domains"] = None
    bare["sample"]["domain"] = None
    for entry in bare["layers"]:
        entry["domains"] = None
    return bare


# ------------------------------------------------------------------------------------------------------ figures


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return matplotlib.image.imread(path)


def test_write_figures_draws_every_figure_with_data(tmp_path: Path) -> None:
    paths = write_figures(make_analysis(), tmp_path)
    assert [p.name for p in paths] == list(FIGURES)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(FIGURES)  # no temp file left
    for path in paths:
        pixels = _pixels(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, path.name
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
        assert len(colours) > 50 and pixels[..., :3].std() > 0.05, f"{path.name} is (nearly) one flat colour"


def test_absent_sections_draw_no_figure_and_remove_stale_ones(tmp_path: Path) -> None:
    write_figures(make_analysis(), tmp_path)
    paths = write_figures(without_optional(make_analysis()), tmp_path)
    expected = [name for name in FIGURES if name not in ("domain_experts.png", "saturation.png")]
    assert [p.name for p in paths] == expected
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(expected)
    one_choice = without_optional(make_analysis())
    one_choice["model"]["num_experts_per_tok"] = 1  # k = 1: no two experts share a token, nothing to co-activate
    assert "coactivation.png" not in [p.name for p in write_figures(one_choice, tmp_path / "k1")]


def test_load_heatmap_shows_the_load_shares_centred_on_the_ideal() -> None:
    import matplotlib.pyplot as plt

    analysis = make_analysis()
    fig = load_heatmap_figure(analysis)
    try:
        image = fig.axes[0].images[0]
        expected = [[v / (K * len(TOKENS) / E) for v in entry["load"]] for entry in analysis["layers"]]
        np.testing.assert_allclose(np.asarray(image.get_array()), expected)
        assert image.norm(1.0) == pytest.approx(0.5)  # the ideal sits at the centre of the diverging map
        assert min(image.cmap(0.5)[:3]) > 0.9  # ... whose centre is (near) white
        assert image.norm(0.0) == pytest.approx(0.0)
        colourbar_labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
        assert "1.0 = ideal" in colourbar_labels
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["1", "3"]
    finally:
        plt.close(fig)


def test_a_collapsed_layer_with_an_uneven_top_share_still_draws(tmp_path: Path) -> None:
    """Two experts taking everything (shares near 4, not a round number) once put a colourbar tick past vmax."""
    analysis = make_analysis()
    for entry in analysis["layers"]:
        entry["load_share_of_ideal"] = [3.9558, 0.0, 0.0442, 0.0][: len(entry["load_share_of_ideal"])]
    written = write_figures(analysis, tmp_path)
    assert tmp_path / "figures" / "load_heatmap.png" in written


def test_domain_heatmap_is_each_domain_against_its_own_ideal() -> None:
    import matplotlib.pyplot as plt

    analysis = make_analysis()
    fig = domain_figure(analysis)
    try:
        experts = analysis["sample"]["experts"]["3"]
        code = [row for row, d in zip(experts, analysis["sample"]["domain"], strict=True) if d == 1]
        counts = [sum(row.count(e) for row in code) for e in range(E)]
        expected_code_row = [c / (len(code) * K / E) for c in counts]
        np.testing.assert_allclose(np.asarray(fig.axes[1].images[0].get_array())[1], expected_code_row)
        assert "layer 3" in fig.axes[1].get_title() and "0.120 nats" in fig.axes[1].get_title()
    finally:
        plt.close(fig)


def test_drop_curves_are_each_layer_and_their_mean() -> None:
    import matplotlib.pyplot as plt

    analysis = make_analysis()
    analysis["layers"][1]["dropped_by_position"] = [0.0] * BLOCK
    fig = dropped_by_position_figure(analysis)
    try:
        lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
        assert lines["layer 1"] == analysis["layers"][0]["dropped_by_position"]
        assert lines["layer 3"] == [0.0] * BLOCK
        np.testing.assert_allclose(lines["mean over layers"],
                                   [v / 2 for v in analysis["layers"][0]["dropped_by_position"]])
        assert "capacity factor 1.0" in fig.axes[0].get_title()
    finally:
        plt.close(fig)


def test_bad_analysis_is_refused_and_nothing_written(tmp_path: Path) -> None:
    broken = make_analysis()
    broken["format"] = "something-else/9"
    with pytest.raises(ValueError, match="format 'something-else/9'"):
        write_figures(broken, tmp_path)
    with pytest.raises(ValueError, match="format"):
        write_page(broken, tmp_path / "routing.html")
    wrong_expert = make_analysis()
    wrong_expert["sample"]["experts"]["3"][5] = [7, 0]
    with pytest.raises(ValueError, match=r"\[7, 0\] in layer 3, outside 0..3"):
        write_page(wrong_expert, tmp_path / "routing.html")
    short = make_analysis()
    short["sample"]["weights"]["1"].pop()
    with pytest.raises(ValueError, match="30 tokens but 30 expert rows and 29 weight rows for layer 1"):
        write_page(short, tmp_path / "routing.html")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------- colours


def test_expert_colours_are_distinct_and_fixed() -> None:
    for num_experts in (1, 4, 8, 64, 128):
        colours = palette(num_experts)
        assert len(set(colours)) == num_experts
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
        assert "#ffffff" not in colours  # never the page's background
    assert palette(8) == palette(64)[:8]  # an expert keeps its colour whatever the model's E
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        expert_colour(4, 4)


# ---------------------------------------------------------------------------------------------------------- page


class _Page(HTMLParser):
    """Every start tag, the text of each token span, and the content of each script element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.tokens: dict[int, str] = {}
        self.scripts: list[tuple[dict, str]] = []
        self._open: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag not in ("meta", "br", "input"):
            self._open.append((tag, attributes))
        if tag == "script":
            self.scripts.append((attributes, ""))

    def handle_endtag(self, tag: str) -> None:
        assert self._open and self._open[-1][0] == tag, f"</{tag}> closes {self._open[-1:]}: the page is malformed"
        self._open.pop()

    def handle_data(self, data: str) -> None:
        if not self._open:
            return
        tag, attributes = self._open[-1]
        if tag == "span" and "data-i" in attributes:
            index = int(attributes["data-i"])
            self.tokens[index] = self.tokens.get(index, "") + data
        elif tag == "script":
            self.scripts[-1] = (self.scripts[-1][0], self.scripts[-1][1] + data)


def test_embedded_json_cannot_end_the_script_element() -> None:
    tricky = {"t": ["</script>", "<!--", "<b>&amp;", "\u2028\u2029", "\n"], "n": [1.5, float("nan")]}
    text = embedded_json(tricky)
    assert not set("<>&") & set(text) and "\u2028" not in text
    assert json.loads(text) == {"t": tricky["t"], "n": [1.5, None]}


def test_page_is_self_contained_and_parses(tmp_path: Path) -> None:
    analysis = make_analysis()
    path = write_page(analysis, tmp_path / "routing.html")
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"(?i)(https?|wss?|ftp):", text) and "//" not in text, "the page refers to the network"
    parser = _Page()
    parser.feed(text)
    parser.close()
    tags = [tag for tag, _ in parser.tags]
    assert not any("src" in attributes or "href" in attributes for _, attributes in parser.tags)
    assert "b" not in tags and "link" not in tags and "img" not in tags  # the <b> token stayed text
    assert tags.count("script") == 2 and text.count("</script>") == 2
    # the text is the tokens, each in its own span, in order (newlines kept: the page shows them with pre-wrap)
    assert [parser.tokens[i] for i in range(len(TOKENS))] == TOKENS
    data_scripts = [body for attributes, body in parser.scripts if attributes.get("id") == DATA_ID]
    assert [attributes.get("type") for attributes, _ in parser.scripts if attributes.get("id") == DATA_ID] == \
        ["application/json"]
    data = json.loads(data_scripts[0])
    assert data == json.loads(json.dumps(page_data(analysis)))
    assert data["tokens"] == TOKENS and data["experts"]["3"] == analysis["sample"]["experts"]["3"]
    assert data["colours"] == palette(E)
    # the headline numbers are on the page itself
    assert "MaxVio<sub>global</sub></div><div class=\"value\">0.300" in text
    assert "3.60 of 4" in text
    assert [tag for tag, attributes in parser.tags if tag == "option"] == ["option", "option"]
    assert "&lt;/script&gt;&lt;b&gt;" in text  # the model's name, escaped in the title


# ------------------------------------------------------------------------------------------------------ chromium

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason=CHROMIUM_MISSING)


def _backgrounds(dom: str) -> dict[int, str]:
    """data-i -> the background colour ('#rrggbb') the page's script gave each token span."""
    found = {}
    for index, style in re.findall(r'<span data-i="(\d+)" style="([^"]*)"', dom):
        rgb = re.search(r"background-color:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", style)
        assert rgb, f"token {index} has no background colour: {style!r}"
        found[int(index)] = "#" + "".join(f"{int(c):02x}" for c in rgb.groups())
    return found


@needs_chromium
def test_chromium_colours_each_token_by_its_first_choice(tmp_path: Path) -> None:
    analysis = make_analysis()
    page = write_page(analysis, tmp_path / "routing.html")
    for layer in (None, 3):  # None: the page's default, the first MoE layer; 3 through the address (#layer=3)
        dom = dump_dom(page, layer=layer)
        shown = layer if layer is not None else LAYERS[0]
        expected = {i: expert_colour(row[0], E) for i, row in enumerate(analysis["sample"]["experts"][str(shown)])}
        assert _backgrounds(dom) == expected, f"layer {shown}"
        shares = analysis["layers"][LAYERS.index(shown)]["load_share_of_ideal"]
        for e, share in enumerate(shares):
            assert f"expert {e}: {share:.2f}\u00d7 ideal" in dom, f"legend of layer {shown}"
    first = [row[0] for row in analysis["sample"]["experts"]["1"]]
    third = [row[0] for row in analysis["sample"]["experts"]["3"]]
    assert all(a != b for a, b in zip(first, third, strict=True))  # so the two checks above are different


@needs_chromium
def test_chromium_screenshot_is_not_blank(tmp_path: Path) -> None:
    analysis = make_analysis()
    page = write_page(analysis, tmp_path / "routing.html")
    png = screenshot_page(page, tmp_path / "routing.png", width=1000, height=800)
    pixels = _pixels(png)
    assert pixels.shape[:2] == (800, 1000)
    rgb = np.round(pixels[..., :3] * 255).astype(int)
    colours = {f"#{r:02x}{g:02x}{b:02x}" for r, g, b in np.unique(rgb.reshape(-1, 3), axis=0)}
    assert len(colours) > 50 and rgb.std() > 10, "the screenshot is (nearly) blank"
    used = {row[0] for row in analysis["sample"]["experts"]["1"]}
    missing = {e for e in used if expert_colour(e, E) not in colours}
    assert not missing, f"the colours of experts {sorted(missing)} do not appear on the rendered page"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_screenshot_without_chromium_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    page = write_page(make_analysis(), tmp_path / "routing.html")
    with pytest.raises(ChromiumError, match=re.escape("apt-get install chromium")):
        screenshot_page(page, tmp_path / "routing.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.html"]


def test_a_hanging_chromium_is_killed_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "chromium"  # a browser that starts a helper process and never finishes
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $$ $! > {tmp_path / 'pids'}\nsleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    page = write_page(make_analysis(), tmp_path / "routing.html")
    with pytest.raises(ChromiumError, match="did not finish within 1 s"):
        screenshot_page(page, tmp_path / "routing.png", timeout=1)
    assert not (tmp_path / "routing.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".routing.png")]
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        for _ in range(50):  # killed, it is reaped by whoever adopted it: give that a moment
            if not _running(pid):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {pid} of the fake chromium is still running")


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, killed but not yet reaped by its adopter, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
