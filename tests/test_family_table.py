"""The README's supported-families tables, measured: every row is built and checked here.

For each native MoE family (a tiny checkpoint saved by transformers, `family_cases`): its MoE block through
`MoELayer.from_hf` (exact, or refused), `load_hf` against transformers' logits, `export_hf` loaded back by
transformers and by `load_hf` (bit for bit), `moekit info` against transformers' parameter counts, and
`moekit train --init-from` for 3 steps, then `moekit export`, loaded by transformers with the trained model's
logits. For each dense base: `moekit upcycle` (the MoE computes the base's function) and `moekit merge` (the merge
loads in `load_hf` as in transformers), `moekit info` on the upcycled folder, and the upcycled folder trained 3
steps and exported.

The README states a bound on each measured difference (the power of ten above it); a row passes when every check
holds and every difference is within the README's bound. ``python tests/test_family_table.py`` prints the tables.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moekit import MoELayer  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.families import FAMILIES, MOE_FAMILIES  # noqa: E402
from moekit.info import load_info_source  # noqa: E402
from moekit.interop import export_hf, load_hf  # noqa: E402
from moekit.interop.merge import merge  # noqa: E402
from moekit.interop.upcycle import upcycle  # noqa: E402
from moekit.train.load import load_run  # noqa: E402

from .family_cases import CASES, FAMILY_CASE, hf_model, save_case, token_ids  # noqa: E402
from .merge_fixtures import WORDS, make_merge_inputs  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN = ["train.max_steps=3", "train.block_size=16", "train.batch_size=4", "train.eval_batches=1",
         "train.eval_interval=100", "train.log_interval=1", "train.checkpoint_interval=100", "train.warmup_steps=1",
         "train.lr=0.001"]
#: dense bases: row name -> (family, overrides of the tiny config)
DENSE_BASES = {
    "llama": ("llama", {}),
    "llama (llama3 rope)": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "rope_theta": 10000.0,
                                                          "original_max_position_embeddings": 32}}),
    "mistral": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bound(difference: float) -> str:
    """The power of ten at or above `difference`, as the README writes it ("1e-6"); "0" for none."""
    if difference == 0:
        return "0"
    return f"1e{math.ceil(math.log10(difference))}"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _transformers(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    path = root / "words.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(150)) + "\n")
    return path


def _train_and_export(folder: Path, root: Path) -> float:
    """`moekit train --init-from folder` for 3 steps, `moekit export`; transformers' logits vs the trained model's."""
    run, out = root / "run", root / "exported"
    args = ["train", "--init-from", str(folder), "--out", str(run), "--no-progress", "--set",
            f"train.data={_corpus(root)}"]
    for item in TRAIN:
        args += ["--set", item]
    assert main(args) == 0
    assert main(["export", str(run), str(out)]) == 0
    _, trained, _ = load_run(str(run))
    ids = token_ids(seed=11)
    return _max_diff(_logits(_transformers(out), ids), _logits(trained, ids))


# ---------------------------------------------------------------------------------------------- MoE families
def _block(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last MoE block of a transformers model (the module owning the experts)."""
    blocks = [m for m in model.modules() if hasattr(getattr(m, "experts", None), "num_experts")]
    return blocks[-1] if blocks else None


def _from_hf(block: torch.nn.Module, hidden: int) -> str:
    try:
        layer = MoELayer.from_hf(copy.deepcopy(block)).eval()
    except ValueError:
        return "refused"
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        diff = _max_diff(layer(x).hidden_states, out)
    assert diff <= 1e-5, diff
    return "exact"


def measure_moe(family: str, root: Path) -> dict[str, str]:
    """One MoE family's row (see the module docstring)."""
    name = FAMILY_CASE[family]
    folder = save_case(name, root / "hf")
    reference = hf_model(name)
    ids = token_ids()
    model = load_hf(folder)
    load_diff = _max_diff(_logits(model, ids), _logits(reference, ids))
    exported = export_hf(model, root / "export", format=family)
    export_diff = _max_diff(_logits(_transformers(exported), ids), _logits(reference, ids))
    back = load_hf(exported)
    exact = back.config == model.config and all(torch.equal(a, b) for a, b in
                                                 zip(back.state_dict().values(), model.state_dict().values(),
                                                     strict=True))
    assert exact
    info = load_info_source(folder)
    total = sum(p.numel() for p in reference.parameters())
    assert info.total_params == total
    block = _block(reference)
    return {
        "family": family,
        "transformers class": FAMILIES[family].architecture,
        "from_hf": _from_hf(block, reference.config.hidden_size) if block is not None else "-",
        "load_hf": bound(load_diff),
        "export, round trip": f"{bound(export_diff)}, exact",
        "info": f"exact ({total:,})",
        "train 3 steps, export": bound(_train_and_export(folder, root)),
    }


# ---------------------------------------------------------------------------------------------- dense bases
def measure_dense(row: str, root: Path) -> dict[str, str]:
    """One dense base's row: upcycle, merge, info and training from the upcycled folder."""
    family, overrides = DENSE_BASES[row]
    base, sources = make_merge_inputs(root / "inputs", family, **overrides)
    ids = token_ids()
    dense = _transformers(base)
    up = upcycle(base, root / "up", num_experts=4, top_k=2, progress=False)
    up_diff = _max_diff(_logits(load_hf(up.out), ids), _logits(dense, ids))
    config = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
              "experts": [{"source_model": str(s)} for s in sources]}
    merged = merge(config, root / "merged", progress=False)
    merge_diff = _max_diff(_logits(load_hf(merged.out), ids), _logits(_transformers(merged.out), ids))
    info = load_info_source(up.out)
    total = sum(p.numel() for p in _transformers(up.out).parameters())
    assert info.total_params == total
    return {
        "base": row,
        "upcycle": f"{up.architecture}: {bound(up_diff)} from the base",
        "merge": f"{merged.architecture}: {bound(merge_diff)}",
        "info": f"exact ({total:,})",
        "train 3 steps, export": bound(_train_and_export(up.out, root)),
    }


# ---------------------------------------------------------------------------------------------- README
def render(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[key] for key in header) + " |" for row in rows]
    return "\n".join(lines)


def readme_rows(marker: str) -> dict[str, dict[str, str]]:
    """The README table between ``<!-- marker:start -->`` and ``<!-- marker:end -->``, by its first column."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", text, re.S)
    assert found, f"README has no {marker} table"
    lines = [line for line in found[1].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _within(measured: str, stated: str) -> bool:
    """Whether a measured cell is within the README's: bounds may be lower, every other text must be equal."""
    number = r"(0|1e-?\d+)"
    pattern = re.escape(stated)
    for bound_text in re.findall(number, stated):
        pattern = pattern.replace(re.escape(bound_text), number, 1)
    match = re.fullmatch(pattern, measured)
    if match is None:
        return False
    return all(float(m) <= float(s) for m, s in zip(match.groups(), re.findall(number, stated), strict=True))


def _check(row: dict[str, str], stated: dict[str, str]) -> None:
    assert row.keys() == stated.keys(), (list(row), list(stated))
    for key in row:
        assert _within(row[key], stated[key]), f"{key}: measured {row[key]!r}, README says {stated[key]!r}"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_row(family: str, tmp_path: Path) -> None:
    _check(measure_moe(family, tmp_path), readme_rows("moe-families")[family])


@pytest.mark.parametrize("row", list(DENSE_BASES))
def test_dense_base_row(row: str, tmp_path: Path) -> None:
    _check(measure_dense(row, tmp_path), readme_rows("dense-bases")[row])


def test_readme_lists_every_family_and_base() -> None:
    assert list(readme_rows("moe-families")) == list(MOE_FAMILIES)
    assert list(readme_rows("dense-bases")) == list(DENSE_BASES)
    assert set(CASES[FAMILY_CASE[f]][0] for f in MOE_FAMILIES) == set(MOE_FAMILIES)


if __name__ == "__main__":  # print the tables the README holds
    import tempfile

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        moe_rows = [measure_moe(f, Path(tmp) / f) for f in MOE_FAMILIES]
        dense_rows = [measure_dense(r, Path(tmp) / f"d{i}") for i, r in enumerate(DENSE_BASES)]
    sys.stdout.write(render(moe_rows) + "\n\n" + render(dense_rows) + "\n")
    print(json.dumps({"note": "paste between the README markers"}))
