"""The encoder's tokenizer without transformers: the same ``tokenizer.json``, called directly.

``transformers``' tokenizer wrapper costs ~130 us per one-query call here; the Rust
``tokenizers`` object it wraps costs ~10 us, which matters when the whole int8 query
encoding is about a millisecond. Truncation (``MAX_TOKENS``) and padding (to the longest
text of the batch, with the model's pad token) are set to match
:meth:`models.encoder.TorchEncoder.tokenize` exactly; a unit test compares the two on
the bundled catalog.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from .encoder import MAX_TOKENS, model_dir


class FastTokenizer:
    """Token ids and attention masks as int64 arrays (batch, longest text in tokens)."""

    _shared: FastTokenizer | None = None
    _lock = threading.Lock()

    def __init__(self, max_tokens: int = MAX_TOKENS) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
        # tokenizer.json ships fixed 128-token padding; :meth:`pad` pads to the longest text.
        self.pad_id = int((tok.padding or {}).get("pad_id", 0))
        tok.no_padding()
        tok.enable_truncation(max_length=max_tokens)
        self._tok = tok
        self.max_tokens = max_tokens

    @classmethod
    def shared(cls) -> FastTokenizer:
        """One per process: loading takes ~20 ms and the object is safe to share."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Truncated token ids of each text, unpadded (so callers can group by length)."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int64 (len(rows), longest row), padded on the right."""
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise and pad ``texts`` as one batch, exactly as ``TorchEncoder.tokenize`` does."""
        return self.pad(self.ids(texts))
