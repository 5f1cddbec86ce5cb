"""Faults injected for real into moekit.train.data and `moekit info`: a full disk (a small tmpfs), a file-size limit
(RLIMIT_FSIZE), a zeroed token cache, FIFOs, fake and truncated gzip, a 3 MB line without spaces, bad info sources.

Whatever could hang runs in a subprocess with a generous timeout; a timeout fails the test as a hang.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.info import INFO_SOURCES, load_info_source
from moekit.train.data import PreparedTokens, TokenDataset, load_corpus_text
from moekit.train.tokenizers import MAX_TRAINING_RUN, ByteTokenizer, _training_pieces

REPO = Path(__file__).resolve().parent.parent
LINE = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


def run_python(code: str, *args: str, timeout: float = 120, wrap: list[str] | None = None) -> dict:
    """Run `code` in a fresh interpreter (optionally under the command `wrap`); it must print one JSON object last.

    Fails the test on a timeout (a hang), on a non-zero exit (a crash: SIGBUS would be -7 or 135) and on no JSON.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [*(wrap or []), sys.executable, "-c", textwrap.dedent(code), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the subprocess did not finish within {timeout} s: it hangs")
    assert done.returncode == 0, f"rc {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# ------------------------------------------------------------------------------------------- full storage

FULL_STORAGE = """
    import hashlib, json, resource, sys
    from pathlib import Path
    import torch
    from moekit._files import StorageError
    from moekit.train.data import TokenDataset
    from moekit.train.tokenizers import ByteTokenizer

    cache, small, big, limit = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    tok = ByteTokenizer()
    first = TokenDataset.build(small, tok, cache)
    def files():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.iterdir())}
    before = files()
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    error = kind = None
    try:
        TokenDataset.build(big, tok, cache)
    except Exception as exc:  # reported to the test, which asserts it is a StorageError
        error, kind = str(exc), type(exc).__name__
    after = files()
    again = TokenDataset.build(small, tok, cache)
    print(json.dumps({"error": error, "kind": kind, "before": before, "after": after, "reused": again.reused,
                      "same_tokens": bool(torch.equal(again.tokens, first.tokens))}))
"""


@pytest.fixture
def corpora(tmp_path: Path) -> tuple[Path, Path]:
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(LINE * 200)  # 16 KB of text: 32 KB of uint16 tokens
    big.write_text(LINE * 9000)  # 711 KB of text: 1.4 MB of tokens, more than the 1 MiB limits below
    return small, big


def check_full_storage(report: dict, phrase: str) -> None:
    assert report["kind"] == "StorageError", report
    message = report["error"]
    assert "\n" not in message
    assert phrase in message and "token cache" in message and "tokens.bin" in message
    assert "it needs 1.4 MB" in message  # 711,000 tokens of 2 bytes
    assert report["after"] == report["before"]  # no temporary file left, the previous cache byte for byte
    assert sorted(report["after"]) == ["tokens.bin", "tokens.json"]
    assert report["reused"] and report["same_tokens"]  # and it is still valid


def test_full_disk_leaves_the_previous_cache_and_no_temp_file(tmp_path: Path, corpora: tuple[Path, Path]) -> None:
    small, big = corpora
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if unshare_works():  # a real 1 MiB tmpfs in a private mount namespace
        wrap = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{mount}" && exec "$0" "$@"']
        report = run_python(FULL_STORAGE, str(mount / "cache"), str(small), str(big), "0", wrap=wrap)
        check_full_storage(report, "no space left on the device")
    else:  # no namespaces here: the file-size limit is the real fault that remains
        report = run_python(FULL_STORAGE, str(mount / "cache"), str(small), str(big), str(2**20))
        check_full_storage(report, "file size limit")


def test_file_size_limit_leaves_the_previous_cache_and_no_temp_file(tmp_path: Path,
                                                                    corpora: tuple[Path, Path]) -> None:
    small, big = corpora
    report = run_python(FULL_STORAGE, str(tmp_path / "cache"), str(small), str(big), str(2**20))
    check_full_storage(report, "file size limit")


def test_tokenizer_files_are_written_atomically_under_a_file_size_limit(tmp_path: Path) -> None:
    report = run_python("""
        import hashlib, json, resource, sys
        from pathlib import Path
        from moekit._files import StorageError
        from moekit.train.tokenizers import BPETokenizer, HFTokenizer, load_tokenizer

        text = open(sys.argv[2]).read()
        out = Path(sys.argv[1])
        small = BPETokenizer.train([text], 300)
        small.save(out / "bpe")
        HFTokenizer(small._tok.to_str()).save(out / "hf")
        def files(d):
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}
        before = {name: files(out / name) for name in ("bpe", "hf")}
        limit = max((out / name / "tokenizer.json").stat().st_size for name in ("bpe", "hf")) + 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        bigger = BPETokenizer.train([text], 600)
        errors = []
        for name, tok in (("bpe", bigger), ("hf", HFTokenizer(bigger._tok.to_str(pretty=True)))):
            try:
                tok.save(out / name)
            except StorageError as exc:
                errors.append(str(exc))
        after = {name: files(out / name) for name in ("bpe", "hf")}
        print(json.dumps({"errors": errors, "before": before, "after": after,
                          "loads": load_tokenizer(out / "bpe").vocab_size == small.vocab_size}))
    """, str(tmp_path), str(REPO / "README.md"))
    assert len(report["errors"]) == 2
    for message in report["errors"]:
        assert "file size limit" in message and "tokenizer" in message and "tokenizer.json" in message
    assert report["after"] == report["before"]  # old files intact, no temporary file
    assert report["loads"]


# ------------------------------------------------------------------------------------------- checksums


def test_zeroed_tokens_bin_is_never_used(tmp_path: Path) -> None:
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text(LINE * 50)
    first = TokenDataset.build(src, ByteTokenizer(), cache)
    original = first.tokens.clone()  # the map itself would show the zeros written into its file below
    good = (cache / "tokens.bin").read_bytes()
    meta = json.loads((cache / "tokens.json").read_text())
    assert meta["tokens_sha256"] == hashlib.sha256(good).hexdigest()
    assert meta["source_sha256"] == hashlib.sha256((LINE * 50).encode()).hexdigest() == first.source_sha256

    (cache / "tokens.bin").write_bytes(bytes(len(good)))  # same size, all token 0
    with pytest.warns(RuntimeWarning, match=r"tokens\.bin does not match the sha256.*rebuilt from the corpus"):
        rebuilt = TokenDataset.build(src, ByteTokenizer(), cache)
    assert not rebuilt.reused
    assert torch.equal(rebuilt.tokens, original) and int(rebuilt.tokens.long().max()) > 0
    assert (cache / "tokens.bin").read_bytes() == good

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good cache is reused without a word
        assert TokenDataset.build(src, ByteTokenizer(), cache).reused

    (cache / "tokens.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match=r"tokens\.json is not a JSON object.*rebuilt"):
        assert not TokenDataset.build(src, ByteTokenizer(), cache).reused


def test_cache_of_an_older_format_is_rebuilt_silently(tmp_path: Path) -> None:
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text(LINE * 50)
    TokenDataset.build(src, ByteTokenizer(), cache)
    meta = json.loads((cache / "tokens.json").read_text())
    del meta["tokens_sha256"]
    (cache / "tokens.json").write_text(json.dumps({**meta, "format": 1}))  # what moekit wrote before checksums
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not TokenDataset.build(src, ByteTokenizer(), cache).reused
    assert "tokens_sha256" in json.loads((cache / "tokens.json").read_text())


# ------------------------------------------------------------------------------------------- prepare, then write


def test_prepare_checks_everything_and_writes_nothing(tmp_path: Path) -> None:
    src, cache = tmp_path / "corpus.txt", tmp_path / "run" / "data"
    text = LINE * 40
    src.write_text(text)
    prepared = TokenDataset.prepare(src, ByteTokenizer(), cache, val_fraction=0.1, block_size=64)
    assert isinstance(prepared, PreparedTokens) and not prepared.reused
    assert prepared.source_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert prepared.num_tokens == len(text)
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder
    held = prepared.in_memory()  # the dataset without any file (a read-only run)
    assert held.tokens.dtype == torch.uint16 and held.source_sha256 == prepared.source_sha256
    assert held.tokens.long().tolist() == ByteTokenizer().encode(text) and not (tmp_path / "run").exists()

    ds = prepared.write()
    assert not ds.reused and ds.source_sha256 == prepared.source_sha256
    assert ds.split_sizes() == (len(text) - 312, 312) and ds.block_size == 64  # ceil(0.1 * 3120) > 65
    assert sorted(p.name for p in cache.iterdir()) == ["tokens.bin", "tokens.json"]

    again = TokenDataset.prepare(src, ByteTokenizer(), cache, val_fraction=0.1, block_size=64)
    assert again.reused and again.in_memory().reused and torch.equal(again.in_memory().tokens, ds.tokens)
    shutil.rmtree(tmp_path / "run")  # e.g. the trainer replacing the run directory after prepare
    redone = again.write()
    assert not redone.reused and torch.equal(redone.tokens, ds.tokens)
    assert TokenDataset.prepare(src, ByteTokenizer(), cache, reuse=False).reused is False

    bad_cache = tmp_path / "never"
    with pytest.raises(ValueError, match=r"too few for train and validation"):
        TokenDataset.prepare(src, ByteTokenizer(), bad_cache, block_size=2000)
    with pytest.raises(ValueError, match=r"block_size must be an integer"):
        TokenDataset.prepare(src, ByteTokenizer(), bad_cache, block_size=0)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8 text"):
        TokenDataset.prepare(latin, ByteTokenizer(), bad_cache)
    with pytest.raises(FileNotFoundError, match=r"nothing\.txt.*does not exist"):
        TokenDataset.prepare(tmp_path / "nothing.txt", ByteTokenizer(), bad_cache)
    assert not bad_cache.exists()

    from_text = TokenDataset.prepare_text(text, ByteTokenizer(), tmp_path / "t").write()
    assert from_text.source_sha256 == prepared.source_sha256 and torch.equal(from_text.tokens, ds.tokens)


# ------------------------------------------------------------------------------------------- input that hangs


def test_fifo_corpus_is_refused_and_skipped_in_a_folder(tmp_path: Path) -> None:
    report = run_python("""
        import io, json, os, sys
        from contextlib import redirect_stderr
        from pathlib import Path
        from moekit.cli import main
        from moekit.train.data import TokenDataset, load_corpus_text
        from moekit.train.tokenizers import ByteTokenizer

        root = Path(sys.argv[1])
        fifo = root / "corpus.txt"
        os.mkfifo(fifo)
        folder = root / "folder"
        folder.mkdir()
        (folder / "a.txt").write_text("hello\\n")
        os.mkfifo(folder / "x.txt")
        model_dir = root / "model"
        model_dir.mkdir()
        os.mkfifo(model_dir / "config.json")
        out = {}
        for name, call in (("load", lambda: load_corpus_text(fifo)),
                           ("prepare", lambda: TokenDataset.prepare(fifo, ByteTokenizer(), root / "cache"))):
            try:
                call()
            except ValueError as exc:
                out[name] = str(exc)
        out["folder"] = load_corpus_text(folder)
        for name, target in (("info", fifo), ("info_dir", model_dir)):
            err = io.StringIO()
            with redirect_stderr(err):
                out[name + "_rc"] = main(["info", str(target)])
            out[name] = err.getvalue()
        out["cache"] = (root / "cache").exists()
        print(json.dumps(out))
    """, str(tmp_path), timeout=60)
    for name in ("load", "prepare"):
        assert report[name] == (f"corpus path {str(tmp_path / 'corpus.txt')!r} is a FIFO (named pipe), not a regular "
                                "file or a folder; moekit reads only files and folders of files (reading from a pipe "
                                "or device could block forever): save the text to a file and pass that")
    assert report["folder"] == "hello\n"  # x.txt, a FIFO, skipped
    assert not report["cache"]
    assert report["info_rc"] == 2 and report["info_dir_rc"] == 2
    assert report["info"].startswith(f"moekit info: error: {tmp_path / 'corpus.txt'} is a FIFO (named pipe)")
    assert report["info_dir"].startswith(f"moekit info: error: {tmp_path / 'model'} has no config.json")
    assert report["info"].count("\n") == report["info_dir"].count("\n") == 1


@pytest.mark.slow
def test_bpe_on_a_3mb_line_without_spaces_trains_encodes_and_round_trips(tmp_path: Path) -> None:
    report = run_python("""
        import json, random, string
        from moekit.train.tokenizers import BPETokenizer

        letters = "".join(random.Random(0).choices(string.ascii_lowercase, k=3_000_000))
        out = {}
        for name, text in (("ab", "ab" * 1_500_000), ("letters", letters), ("spaces", "x" + " " * 3_000_000 + "y")):
            tok = BPETokenizer.train([text], 1024)
            ids = tok.encode_to_tensor(text)
            out[name] = [tok.vocab_size, ids.numel(), tok.decode(ids) == text]
        print(json.dumps(out))
    """, timeout=120)
    assert report["ab"][0] > 260 and report["ab"][1] < 30_000  # it learned "ab", "abab", ... (pieces of 500)
    assert report["letters"][0] == 1024 and report["letters"][1] < 3_000_000
    assert all(result[2] for result in report.values()), report  # exact round trips


def test_training_pieces_cut_only_long_runs() -> None:
    bound = MAX_TRAINING_RUN
    text = "short words stay whole\n" + "a" * (5 * bound) + " tail" + " " * (bound + 2) + "end"
    pieces = list(_training_pieces(text))
    assert "".join(pieces) == text
    assert max(len(run) for piece in pieces for run in re.findall(r"\S+|\s+", piece)) <= bound
    assert len(pieces) == 6  # 4 cuts in the run of a's, 1 in the run of spaces
    assert list(_training_pieces(LINE * 100)) == [LINE * 100]
    assert list(_training_pieces("abcdefgh", bound=3)) == ["abc", "def", "gh"]


# ------------------------------------------------------------------------------------------- bad gzip


def test_fake_and_damaged_gzip_name_the_file(tmp_path: Path) -> None:
    fake = tmp_path / "x.txt.gz"
    fake.write_text(LINE)
    with pytest.raises(ValueError, match=r"x\.txt\.gz is not a gzip file") as caught:
        load_corpus_text(fake)
    assert "\n" not in str(caught.value)
    packed = gzip.compress((LINE * 100).encode())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"cut\.txt\.gz is damaged: its gzip data is truncated or corrupt"):
        load_corpus_text(cut)
    flipped = tmp_path / "crc.txt.gz"
    flipped.write_bytes(packed[:-8] + bytes(8))  # CRC and length zeroed
    with pytest.raises(ValueError, match=r"crc\.txt\.gz is damaged"):
        TokenDataset.prepare(flipped, ByteTokenizer(), tmp_path / "cache")
    bad_utf8 = tmp_path / "bytes.txt.gz"
    bad_utf8.write_bytes(gzip.compress(b"\xff\xfe\xfa" * 10))
    with pytest.raises(ValueError, match=r"bytes\.txt\.gz is not UTF-8 text"):
        load_corpus_text(bad_utf8)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------- moekit info


def _write(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path if "/" not in name else path.parent
    return make


BAD_SOURCES = {
    "binary": (_write("weights.bin", os.urandom(4096)), ValueError, "holds binary data"),
    "readme": (_write("README.md", "# moekit\n\nA toolkit.\n"), ValueError,
               "is not a config file: not JSON (line 1 column 1"),
    "broken_yaml": (_write("run.yaml", "model: {hidden_size: 8\n  moe: [\n"), ValueError, "is not valid YAML (line"),
    "broken_json": (_write("config.json", '{"model_type": "mixtral",'), ValueError, "is not valid JSON (line 1"),
    "yaml_list": (_write("list.yaml", "- 1\n- 2\n"), ValueError, "holds a list, not a mapping"),
    "empty_yaml": (_write("empty.yml", ""), ValueError, "is empty"),
    "not_a_config": (_write("other.json", '{"hidden_size": 8}'), ValueError, "is neither an HF config"),
    "bad_model_field": (_write("m.json", '{"model": {"bogus": 1}}'), ValueError, "ModelConfig has no field 'bogus'"),
    "bad_model_type": (_write("t.json", '{"model": {"moe": 5}}'), ValueError, "model section is not a valid"),
    "unknown_hf": (_write("nm/config.json", '{"model_type": "no_such_model"}'), ValueError,
                   "'no_such_model' is not supported"),
    "hf_lacks_keys": (_write("mx/config.json", '{"model_type": "mixtral"}'), ValueError, "lacks 'hidden_size'"),
    "hf_bad_value": (_write("q/config.json", json.dumps({"model_type": "llama", "hidden_size": "big",
                                                          "num_hidden_layers": 2, "vocab_size": 10,
                                                          "num_attention_heads": 2, "intermediate_size": 8})),
                     ValueError, "wrong type"),
    "no_config_dir": (_write("emptydir/notes.txt", "x"), FileNotFoundError, "has no config.json"),
    "missing": (lambda root: root / "tiny-mixtrl", FileNotFoundError, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_info_on_a_bad_source_is_one_line_naming_it(tmp_path: Path, case: str) -> None:
    make, kind, phrase = BAD_SOURCES[case]
    path = make(tmp_path)
    with pytest.raises(kind) as caught:
        load_info_source(path)
    assert phrase in str(caught.value) and str(path) in str(caught.value)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli_main(["info", str(path)])
    lines = err.getvalue().splitlines()
    assert rc == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith(f"moekit info: error: {path}") and phrase in lines[0]
    if case not in ("bad_model_field", "bad_model_type", "unknown_hf", "hf_lacks_keys", "hf_bad_value"):
        assert INFO_SOURCES in lines[0]  # says what it expects
