"""Writing a model trained with `train.backend=transformers` back out as an HF folder (`moekit export`)."""

from __future__ import annotations

from typing import Any

import torch

from .causal_lm import HFCausalLM


def save_folder(model: HFCausalLM, out_dir: str, tokenizer_dir: str | None = None, overwrite: bool = False,
                dtype: torch.dtype | None = None, inputs: tuple = ()) -> Any:
    """Write `model` as an HF folder (transformers' `save_pretrained`, plus the tokenizer files), atomically."""
    import copy
    import shutil
    from pathlib import Path

    from ..interop.writer import write_atomically

    def write(folder: Path) -> None:
        inner = model.model
        if dtype is not None and dtype != next(inner.parameters()).dtype:
            inner = copy.deepcopy(inner).to(dtype)
        inner.save_pretrained(folder)
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                source = Path(tokenizer_dir) / name
                if source.is_file():
                    shutil.copyfile(source, folder / name)

    return write_atomically(out_dir, overwrite, write, inputs=inputs)
