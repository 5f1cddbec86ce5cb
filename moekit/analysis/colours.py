"""One colour per expert for `routing.html`: a fixed categorical palette, distinguishable up to about 64 experts.

The palette is a fixed sequence picked in OKLab (Ottosson's perceptual colour space, where equal distances look
equally different): from a grid of sRGB colours of lightness 0.45..0.9, each next colour is the one farthest from
the page's white background and from every colour already picked (greedy farthest-point). So expert e has the same
colour in every model, and the first E colours are as far apart as this simple search gets them (the closest two
of the first 64 are 0.078 apart in OKLab, about four just-noticeable differences).
Everything is computed here, in Python, and embedded in the page, so a test reads the expected colour of a token
from the same function the page used.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = ["expert_colour", "expert_text_colour", "palette"]


def _oklch_to_srgb(lightness: float, chroma: float, hue_deg: float) -> tuple[float, float, float] | None:
    """sRGB (0..1) of an OKLCH colour, or None when it lies outside the sRGB gamut."""
    a = chroma * math.cos(math.radians(hue_deg))
    b = chroma * math.sin(math.radians(hue_deg))
    l_ = (lightness + 0.3963377774 * a + 0.2158037573 * b) ** 3
    m_ = (lightness - 0.1055613458 * a - 0.0638541728 * b) ** 3
    s_ = (lightness - 0.0894841775 * a - 1.2914855480 * b) ** 3
    linear = (4.0767416621 * l_ - 3.3077115913 * m_ + 0.2309699292 * s_,
              -1.2684380046 * l_ + 2.6097574011 * m_ - 0.3413193965 * s_,
              -0.0041960863 * l_ - 0.7034186147 * m_ + 1.7076147010 * s_)
    if any(c < -1e-4 or c > 1 + 1e-4 for c in linear):
        return None
    return tuple(12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055  # type: ignore[return-value]
                 for c in (min(max(c, 0.0), 1.0) for c in linear))


@lru_cache(maxsize=1)
def _candidates() -> tuple[tuple[tuple[float, float, float], str], ...]:
    """(OKLab point, '#rrggbb') of every in-gamut colour of the search grid."""
    found = []
    for lightness in (0.45 + 0.05 * i for i in range(10)):
        for chroma in (0.04 + 0.03 * i for i in range(7)):
            for hue in range(0, 360, 10):
                rgb = _oklch_to_srgb(lightness, chroma, hue)
                if rgb is not None:
                    point = (lightness, chroma * math.cos(math.radians(hue)), chroma * math.sin(math.radians(hue)))
                    found.append((point, "#" + "".join(f"{round(c * 255):02x}" for c in rgb)))
    return tuple(found)


@lru_cache(maxsize=8)
def _sequence(count: int) -> tuple[str, ...]:
    """The first `count` colours of the palette (greedy farthest-point from white and from each other)."""
    candidates = _candidates()
    nearest = [math.dist(point, (1.0, 0.0, 0.0)) for point, _ in candidates]  # white: the page background
    picked: list[str] = []
    for _ in range(min(count, len(candidates))):
        best = max(range(len(candidates)), key=lambda j: (nearest[j], -j))
        picked.append(candidates[best][1])
        nearest[best] = -1.0
        for j, (point, _) in enumerate(candidates):
            if nearest[j] >= 0:
                nearest[j] = min(nearest[j], math.dist(point, candidates[best][0]))
    return tuple(picked)


def expert_colour(expert: int, num_experts: int) -> str:
    """The background colour ('#rrggbb') of `expert` among `num_experts` in the routing page.

    Expert e has the same colour in every model; the colours of one model's experts are all different while
    E <= 1,500 or so (the search grid), and distinguishable by eye up to about 64 experts.
    """
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert {expert} is outside 0..{num_experts - 1}")
    colours = _sequence(max(64, 1 << (num_experts - 1).bit_length()))  # powers of two: few cached lengths
    return colours[expert % len(colours)]


def _luminance(colour: str) -> float:
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(int(colour[i:i + 2], 16) / 255) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def expert_text_colour(expert: int, num_experts: int) -> str:
    """'#000000' or '#ffffff', whichever contrasts more (WCAG) with :func:`expert_colour`."""
    luminance = _luminance(expert_colour(expert, num_experts))
    return "#000000" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "#ffffff"


def palette(num_experts: int) -> list[str]:
    """:func:`expert_colour` of every expert, in expert order."""
    return [expert_colour(e, num_experts) for e in range(num_experts)]
