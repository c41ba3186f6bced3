"""Carry the MiniLM text encoder to a machine without internet in under 64 MB.

    python bench/pack_minilm.py pack .minilm/minilm.npz     # here: fp16, unused vocab rows zeroed
    python bench/pack_minilm.py unpack .minilm/minilm.npz /tmp/minilm   # there: a BertModel folder

Only the word-embedding rows of tokens that micro captions can contain are kept (the
rest are zero and compress away), so the encoder's output for every micro caption is
unchanged up to fp16 rounding. Used by the GPU pre-training run only.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch


def caption_token_ids(tokenizer) -> set[int]:
    from b4m_core.micro.world import BACKGROUNDS, CONTENTS, POSITIONS, SIZES, STYLES, Scene

    ids = set(tokenizer.all_special_ids)
    for c, s, b, p, z in itertools.product(CONTENTS, STYLES, BACKGROUNDS, POSITIONS, SIZES):
        ids.update(tokenizer(Scene(c, s, b, p, z).caption()).input_ids)
        ids.update(tokenizer(f"an {s} {c}").input_ids)
    return ids


def pack(out: str) -> None:
    from b4m_core.micro.model import load_text_encoder, minilm_path

    encoder, tokenizer = load_text_encoder()
    keep = torch.tensor(sorted(caption_token_ids(tokenizer)))
    state = {k: v.half().numpy() for k, v in encoder.state_dict().items()}
    emb = state["embeddings.word_embeddings.weight"]
    mask = np.zeros(emb.shape[0], bool)
    mask[keep.numpy()] = True
    emb[~mask] = 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **state)
    folder = Path(out).parent / "minilm_files"
    folder.mkdir(exist_ok=True)
    for f in minilm_path().iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, folder / f.name)
    print(
        f"kept {int(mask.sum())} of {emb.shape[0]} vocabulary rows -> {out} ({Path(out).stat().st_size / 2**20:.1f} MB)"
    )


def unpack(src: str, folder: str) -> None:
    from transformers import BertConfig, BertModel

    files = Path(src).parent / "minilm_files"
    config = BertConfig.from_pretrained(str(files))
    model = BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(v).float() for k, v in np.load(src).items()}
    model.load_state_dict(state, strict=False)
    model.save_pretrained(folder)
    for f in files.iterdir():
        if f.name != "config.json":
            shutil.copy(f, Path(folder) / f.name)
    print(json.dumps({"unpacked": folder, "tensors": len(state)}))


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](*sys.argv[2:])
