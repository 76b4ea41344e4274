"""serving.shoppers: the nearest-shopper index serving keeps from the shopper-vectors records."""

from __future__ import annotations

import numpy as np

from freshrec.settings import Settings
from serving.shoppers import ShopperNeighbours


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_an_empty_record_removes_the_shopper_and_bad_bytes_are_counted() -> None:
    """The collab flow sends an empty value for a shopper it forgot (retention) or whose
    vector is gone: serving must stop finding them as someone's neighbour."""
    rng = np.random.default_rng(3)
    vecs = {f"u{k}": _unit(rng.normal(size=8)) for k in range(6)}
    shoppers = ShopperNeighbours(Settings(), 8, load=lambda: {}, follow=False)
    shoppers.apply([(u, v.astype("<f4").tobytes()) for u, v in vecs.items()])
    assert len(shoppers) == 6
    near = [u for u, _ in shoppers.search(vecs["u0"], 6, exclude="u0")]
    assert near and near[0] != "u0"
    gone = near[0]
    shoppers.apply([(gone, b""), ("u9", b"\x00\x01")])  # a removal and unusable bytes
    assert len(shoppers) == 5 and shoppers.invalid == 1
    assert gone not in [u for u, _ in shoppers.search(vecs["u0"], 6, exclude="u0")]
    assert gone not in [u for u, _ in shoppers.search(vecs[gone], 6)]
