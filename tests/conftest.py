"""Fixtures shared by the test files."""

from pathlib import Path

import pytest

from .run_helpers import TEXT


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small text file to train on."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def quiet_transformers():
    """transformers' log at error level for the test (its loading bars and notes are noise here)."""
    import transformers

    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()
