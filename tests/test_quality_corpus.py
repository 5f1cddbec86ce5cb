"""The mixed corpus of benchmarks/quality.py: deterministic, three domains in the training file (its validation
tail included), held-out files whose text is not in the training file, and arithmetic that is right."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_corpus_module():
    spec = importlib.util.spec_from_file_location("quality_corpus", ROOT / "benchmarks" / "quality_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quality_corpus", module)
    spec.loader.exec_module(module)
    return module


qc = _load_corpus_module()
SIZES = {"domain_bytes": 24_000, "heldout_bytes": 6_000, "chunk_bytes": 1_000, "file_cap": 5_000}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    first = tmp_path_factory.mktemp("a")
    second = tmp_path_factory.mktemp("b")
    return qc.build_corpus(first, **SIZES), qc.build_corpus(second, **SIZES)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_deterministic(built):
    a, b = built
    files = ["train.txt", *(f"domains/{d}.txt" for d in qc.DOMAINS)]
    for rel in files:
        assert (a.train.parent / rel).read_bytes() == (b.train.parent / rel).read_bytes(), rel
    meta = json.loads(_read(a.train.parent / "corpus.json"))
    assert meta["python_version"] == a.python_version and sys.version.split()[0] in a.python_version
    assert meta["parameters"]["domain_bytes"] == SIZES["domain_bytes"]


def test_three_domains_in_the_training_file_and_its_tail(built):
    info, _ = built
    train = _read(info.train)
    assert sorted(p.name for p in info.domains_dir.iterdir()) == sorted(f"{d}.txt" for d in qc.DOMAINS)
    for domain, size in info.train_bytes.items():  # equal-ish sizes, within the budget
        assert 0.9 * SIZES["domain_bytes"] <= size <= SIZES["domain_bytes"], domain
    assert len(train.encode("utf-8")) == sum(info.train_bytes.values())
    tail = train[-len(train) // 20:]  # the validation split of train.val_fraction = 0.05
    # each domain, told apart by its own look
    looks = {"plays": re.compile(r"^[A-Z][A-Za-z .']+\.$", re.M),  # a speaker's name line, e.g. "CELIA."
             "python": re.compile(r"^\s*(def |class |import |return |if |for )", re.M),
             "arithmetic": re.compile(r"^-?\d+ [-+*/]+ -?\d+ = -?\d+", re.M)}
    for domain, look in looks.items():
        assert look.search(train[:len(train) // 20]), f"{domain} missing at the start"
        assert look.search(tail), f"{domain} missing from the validation tail"
    assert train.startswith("ALL'S WELL THAT ENDS WELL") or "ALL'S WELL THAT ENDS WELL" in train[:4000]
    assert info.stdlib_files["train"][0] == qc.stdlib_modules()[0].name


def test_heldout_text_is_not_in_the_training_file(built):
    info, _ = built
    train = _read(info.train)
    train_lines = set(train.splitlines())
    for domain in qc.DOMAINS:
        held = _read(info.domains_dir / f"{domain}.txt")
        assert len(held.encode("utf-8")) >= 0.9 * SIZES["heldout_bytes"]
        lines = [line for line in held.splitlines() if line.strip()]
        if domain == "arithmetic":  # not one line in common
            assert not train_lines.intersection(lines)
            continue
        # no run of three consecutive non-blank lines (at least 60 characters) occurs in the training text
        windows = ["\n".join(lines[i:i + 3]) for i in range(len(lines) - 2)]
        windows = [w for w in windows if len(w) >= 60]
        assert len(windows) > 20
        assert not [w for w in windows if w in train], domain
    assert not set(info.stdlib_files["train"]) & set(info.stdlib_files["heldout"])
    assert "THE TWO GENTLEMEN OF VERONA" in _read(info.domains_dir / "plays.txt")
    assert "THE TWO GENTLEMEN OF VERONA" not in train


def test_arithmetic_is_right():
    train, held = qc.arithmetic_text(4_000, 2_000, seed=3)
    lines = train.splitlines() + held.splitlines()
    assert len(lines) > 100
    for line in lines:
        for statement in line.split(", "):
            sides = statement.split(" = ")
            assert len(sides) >= 2, line
            values = {eval(side, {"__builtins__": {}}) for side in sides}  # our own digits and operators
            assert len(values) == 1, line
    assert qc.arithmetic_text(4_000, 2_000, seed=3) == (train, held)
    assert qc.arithmetic_text(4_000, 2_000, seed=4)[0] != train


def test_interleave_mixes_by_relative_position():
    texts = {"a": "a\n" * 30, "b": "bb\n" * 10}  # 60 and 30 bytes: chunks of 6 bytes -> 10 and 5 chunks
    mixed = qc.interleave(texts, 6)
    assert sorted(mixed) == sorted("".join(texts.values()))
    assert mixed.startswith("a\na\na\n" "a\na\na\n" "bb\nbb\n")  # b's first chunk sits at 1/5, after a's second
    assert mixed.endswith("a\na\na\n" "bb\nbb\n")  # both end at 1: a's last chunk, then b's


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        qc.build_corpus(tmp_path / "x", domain_bytes=0)
    assert not (tmp_path / "x").exists()
