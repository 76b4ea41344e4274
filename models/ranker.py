"""The ranking model: one interface, two families, trained on baskets and scored with numpy.

A ranker orders one shopper's candidates (rows of the feature matrix of
``ranking.features``) by how likely each is bought next. It is trained on groups: one
group is one basket's candidates, label 1 where the basket bought the item.

Two families, chosen by measurement (issue 14, item 3), behind one interface
(:class:`RankerModel`):

- ``lightgbm``: LightGBM lambdarank. An update either refits on the caller's sliding
  window of examples (``mode="refit"``) or adds new trees to the parent version's
  booster (``mode="continue"``, LightGBM's ``init_model``); a continued model that would
  pass ``max_trees`` is refitted instead, because scoring cost grows with the trees.
  One thread, ``deterministic=True`` and the seed make the model string a function of
  the data and the seed.
- ``mlp``: a two-layer perceptron over standardised features, trained with a listwise
  softmax loss (the basket's bought items against its other candidates), continued from
  the parent's weights and standardisation, on CUDA when present. Training needs torch;
  scoring does not: the weights are exported to numpy arrays, so serving never imports it.

Scoring refuses what the model was not trained on: a matrix of another width, or a
caller that names another feature schema, raises :class:`RankerMismatch`; scores that
are not finite raise :class:`RankerFailed`. Serving falls back to the blend on either,
and says so, which is why these are errors and not warnings.

Measured scoring cost, 300 candidates x 17 features, p50 on one core of the 2-core
development machine under load (``bench.ranker_cost`` measures it beside the blend):
``mlp`` at the default 64-32 hidden units 0.045 ms; ``lightgbm`` at the default 200
trees of 15 leaves 1.6 ms (over the 1 ms budget of issue 14 item 4), 100 trees 0.7 ms,
50 trees of 31 leaves 0.35 ms: LightGBM's own predict costs ~7 us per tree for 300 rows,
so ``ranker_trees`` / ``ranker_max_trees`` set it. LightGBM must be told
``num_threads=1`` at predict time: its default OpenMP pool took 10 ms for the same call
on 2 shared cores.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

FAMILIES = ("lightgbm", "mlp")
Family = Literal["lightgbm", "mlp"]


class RankerMismatch(ValueError):
    """Features the ranker was not trained on (width or schema); the caller falls back to the blend."""


class RankerFailed(RuntimeError):
    """The ranker produced scores that cannot rank (NaN or infinite); the caller falls back to the blend."""


@dataclass(frozen=True)
class RankerParams:
    """How a ranker is trained (``ranker_*`` settings); nothing here changes how a trained one scores.

    The LightGBM defaults are docs/ranker_study.md's regularised configuration (it overfit
    its fit window least), as ``evaluation.ranker_method`` runs it.
    """

    family: Family = "lightgbm"
    mode: Literal["refit", "continue"] = "refit"
    trees: int = 200  # trees of a fresh (refitted) LightGBM model
    new_trees: int = 25  # trees added by one continued update
    max_trees: int = 300  # a continued model past this is refitted instead (scoring cost grows with trees)
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_child_samples: int = 200
    bagging_fraction: float = 0.8
    feature_fraction: float = 0.8
    truncation_level: int = 20
    hidden: tuple[int, ...] = (64, 32)  # mlp hidden layers
    first_epochs: int = 4  # passes over the first training set (no parent)
    epochs: int = 2  # passes over a continued update's examples
    mlp_lr: float = 3e-3
    groups_per_batch: int = 32
    device: str = "auto"

    @classmethod
    def from_settings(cls, settings: Any) -> RankerParams:
        """``ranker_family`` is ``lgbm`` (refit), ``lgbm_continue`` (new trees) or ``torch`` (the MLP)."""
        choice = settings.ranker_family
        if choice not in SETTINGS_FAMILIES:
            raise ValueError(f"unknown ranker_family {choice!r} (known: {', '.join(SETTINGS_FAMILIES)})")
        family, mode = SETTINGS_FAMILIES[choice]
        return cls(
            family=family,
            mode=mode,
            trees=settings.ranker_trees,
            new_trees=settings.ranker_more_trees,
            max_trees=settings.ranker_max_trees,
            hidden=tuple(int(h) for h in settings.ranker_mlp_hidden.split(",") if h.strip()),
            mlp_lr=settings.ranker_mlp_lr,
            device=settings.device,
        )


# settings.ranker_family -> (model family, LightGBM update mode)
SETTINGS_FAMILIES: dict[str, tuple[Family, Literal["refit", "continue"]]] = {
    "lgbm": ("lightgbm", "refit"),
    "lgbm_continue": ("lightgbm", "continue"),
    "torch": ("mlp", "refit"),
}


class RankerModel(ABC):
    """A trained ranker: scores candidate rows; knows the feature names and schema it was trained on."""

    family: ClassVar[str]

    def __init__(self, feature_names: Sequence[str], feature_schema: str) -> None:
        self.feature_names = tuple(feature_names)
        self.feature_schema = feature_schema

    def score(self, features: np.ndarray, *, schema: str) -> np.ndarray:
        """One float64 score per row of ``features`` (n x len(feature_names)); higher ranks first.

        ``schema`` is the feature schema the caller computed ``features`` with
        (``ranking.features.FEATURE_SCHEMA``): a required argument, because a matrix of
        the right width in another column order would score silently wrong.
        """
        if schema != self.feature_schema:
            raise RankerMismatch(
                f"{self.family} ranker was trained on feature schema {self.feature_schema!r}, given {schema!r}"
            )
        if features.ndim != 2 or features.shape[1] != len(self.feature_names):
            raise RankerMismatch(
                f"{self.family} ranker takes {len(self.feature_names)} feature columns, given shape {features.shape}"
            )
        if features.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        scores = np.asarray(self._score(features), dtype=np.float64)
        if not np.isfinite(scores).all():
            raise RankerFailed(f"{self.family} ranker produced {int((~np.isfinite(scores)).sum())} non-finite scores")
        return scores

    @abstractmethod
    def _score(self, features: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def to_bytes(self) -> bytes:
        """The model alone (LightGBM's model string; the MLP's arrays as npz), what the registry checksums."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Trees (LightGBM) or hidden units (MLP), for logs and manifests."""


class LightGBMRanker(RankerModel):
    family = "lightgbm"

    def __init__(self, booster: Any, feature_names: Sequence[str], feature_schema: str) -> None:
        super().__init__(feature_names, feature_schema)
        if tuple(booster.feature_name()) != self.feature_names:
            raise RankerMismatch(
                f"the LightGBM model names features {booster.feature_name()}, expected {list(self.feature_names)}"
            )
        self.booster = booster

    def _score(self, features: np.ndarray) -> np.ndarray:
        # num_threads=1 per call: a booster loaded from a string ignores the params it is
        # built with, and LightGBM's default OpenMP pool costs 10x on shared cores.
        return self.booster.predict(features, num_threads=1)

    def to_bytes(self) -> bytes:
        return self.booster.model_to_string().encode()

    @property
    def size(self) -> int:
        return int(self.booster.num_trees())

    @classmethod
    def from_bytes(cls, data: bytes, feature_names: Sequence[str], feature_schema: str) -> LightGBMRanker:
        import lightgbm as lgb

        try:
            booster = lgb.Booster(model_str=data.decode())
        except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a LightGBM model string ({exc})") from None
        return cls(booster, feature_names, feature_schema)


class MLPRanker(RankerModel):
    """``relu(...relu((x - mean) / std @ w0 + b0)...) @ wL + bL``: float32 numpy, any number of hidden layers.

    Arrays: ``mean``, ``std`` (d,), then ``w0`` (d, h0), ``b0`` (h0,), ..., and the last
    layer ``wL`` (h_last,), ``bL`` () with L the number of hidden layers.
    """

    family = "mlp"

    def __init__(self, arrays: dict[str, np.ndarray], feature_names: Sequence[str], feature_schema: str) -> None:
        super().__init__(feature_names, feature_schema)
        a = {k: np.array(v, dtype=np.float32, order="C") for k, v in arrays.items()}  # copies: immutable here
        layers = sum(1 for k in a if k.startswith("w"))
        expected = {"mean", "std", *(f"w{k}" for k in range(layers)), *(f"b{k}" for k in range(layers))}
        if set(a) != expected or layers < 1:
            raise ValueError(f"MLP arrays {sorted(a)} are not mean, std and w0..wL, b0..bL")
        width = len(self.feature_names)
        shapes = {"mean": (width,), "std": (width,)}
        for k in range(layers - 1):
            h = a[f"b{k}"].shape[0] if a[f"b{k}"].ndim == 1 else -1
            shapes[f"w{k}"], shapes[f"b{k}"] = (width, h), (h,)
            width = h
        shapes[f"w{layers - 1}"], shapes[f"b{layers - 1}"] = (width,), ()
        for k, shape in shapes.items():
            if a[k].shape != shape:
                raise ValueError(f"MLP array {k} has shape {a[k].shape}, expected {shape}")
        if (a["std"] <= 0).any():
            raise ValueError("MLP standardisation has a non-positive std")
        self.arrays = a
        # Folding the standardisation into the first layer leaves one affine map per layer.
        self._layers = [(a[f"w{k}"], a[f"b{k}"]) for k in range(layers)]
        self._layers[0] = (a["w0"] / (a["std"][:, None] if layers > 1 else a["std"]),
                           a["b0"] - (a["mean"] / a["std"]) @ a["w0"])

    def _score(self, features: np.ndarray) -> np.ndarray:
        h = features.astype(np.float32, copy=False)
        for w, b in self._layers[:-1]:
            h = np.maximum(h @ w + b, 0.0)
        w, b = self._layers[-1]
        return h @ w + b

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = json.dumps({"feature_names": list(self.feature_names), "feature_schema": self.feature_schema})
        np.savez(buf, meta=np.array(meta), **self.arrays)
        return buf.getvalue()

    @property
    def size(self) -> int:
        return int(sum(self.arrays[f"b{k}"].size for k in range(len(self._layers) - 1)))

    @classmethod
    def from_bytes(cls, data: bytes, feature_names: Sequence[str], feature_schema: str) -> MLPRanker:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files if k != "meta"}
                meta = json.loads(str(npz["meta"]))
        except (ValueError, KeyError, OSError, EOFError) as exc:
            raise ValueError(f"not an MLP ranker npz ({exc})") from None
        if tuple(meta.get("feature_names", ())) != tuple(feature_names) or meta.get("feature_schema") != feature_schema:
            raise RankerMismatch(
                f"the MLP weights were exported for schema {meta.get('feature_schema')!r} "
                f"with {len(meta.get('feature_names', ()))} features, expected {feature_schema!r}"
            )
        return cls(arrays, feature_names, feature_schema)


def ranker_from_bytes(family: str, data: bytes, feature_names: Sequence[str], feature_schema: str) -> RankerModel:
    """Rebuild a ranker from :meth:`RankerModel.to_bytes`; ValueError if the bytes are not that family's model."""
    if family == "lightgbm":
        return LightGBMRanker.from_bytes(data, feature_names, feature_schema)
    if family == "mlp":
        return MLPRanker.from_bytes(data, feature_names, feature_schema)
    raise ValueError(f"unknown ranker family {family!r} (known: {', '.join(FAMILIES)})")


# -- training --------------------------------------------------------------------------------


def fit_ranker(
    features: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[int],
    seed: int,
    feature_names: Sequence[str],
    feature_schema: str,
    params: RankerParams,
    parent: RankerModel | None = None,
) -> RankerModel:
    """Train a ranker on ``features`` (n x d), ``labels`` (n, 1 = bought) and ``groups`` (rows per basket, in order).

    With ``parent`` (the active version) a ``continue`` LightGBM update adds trees to it
    and an MLP update starts from its weights; ``refit`` ignores its weights. A parent of
    another family or feature schema cannot be continued and raises :class:`RankerMismatch`
    (the caller passes ``parent=None`` to start afresh).
    """
    x, y, g = _check_examples(features, labels, groups, feature_names)
    if parent is not None and (parent.family != params.family or parent.feature_schema != feature_schema
                               or parent.feature_names != tuple(feature_names)):
        raise RankerMismatch(
            f"cannot continue a {parent.family} ranker on schema {parent.feature_schema!r} "
            f"as a {params.family} ranker on {feature_schema!r}"
        )
    if params.family == "lightgbm":
        return _fit_lightgbm(x, y, g, seed, tuple(feature_names), feature_schema, params, parent)
    if params.family == "mlp":
        return _fit_mlp(x, y, g, seed, tuple(feature_names), feature_schema, params, parent)
    raise ValueError(f"unknown ranker family {params.family!r} (known: {', '.join(FAMILIES)})")


def _check_examples(
    features: np.ndarray, labels: np.ndarray, groups: Sequence[int], feature_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    g = np.asarray(groups, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != len(feature_names):
        raise RankerMismatch(f"features of shape {x.shape} for {len(feature_names)} feature names")
    if y.shape != (x.shape[0],) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be one 0/1 per row ({x.shape[0]} rows), got shape {y.shape}")
    if g.ndim != 1 or (g <= 0).any() or int(g.sum()) != x.shape[0]:
        raise ValueError(f"groups must be positive row counts summing to {x.shape[0]}, got sum {int(g.sum())}")
    if not y.any():
        raise ValueError("no row is labelled bought: nothing to learn from")
    return x, y.astype(np.float32), g


def _fit_lightgbm(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    seed: int,
    names: tuple[str, ...],
    schema: str,
    params: RankerParams,
    parent: RankerModel | None,
) -> LightGBMRanker:
    import lightgbm as lgb

    lgb_params = {
        "objective": "lambdarank",
        "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves,
        "min_data_in_leaf": params.min_child_samples,
        "bagging_fraction": params.bagging_fraction,
        "bagging_freq": 1 if params.bagging_fraction < 1 else 0,
        "feature_fraction": params.feature_fraction,
        "lambdarank_truncation_level": params.truncation_level,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbose": -1,
    }
    init = None
    rounds = params.trees
    if params.mode == "continue" and isinstance(parent, LightGBMRanker) and parent.size + params.new_trees <= params.max_trees:
        init, rounds = parent.booster, params.new_trees
    data = lgb.Dataset(x, y, group=g, feature_name=list(names), free_raw_data=False)
    booster = lgb.train(lgb_params, data, num_boost_round=rounds, init_model=init, keep_training_booster=False)
    # Serving loads from the string; so does the model returned here, so a fitted and a
    # loaded version are the same object in every respect.
    return LightGBMRanker.from_bytes(booster.model_to_string().encode(), names, schema)


def _fit_mlp(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    seed: int,
    names: tuple[str, ...],
    schema: str,
    params: RankerParams,
    parent: RankerModel | None,
) -> MLPRanker:
    import torch

    device = "cuda" if params.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    if isinstance(parent, MLPRanker):
        start = parent.arrays
        epochs = params.epochs
    else:
        # The standardisation is fixed at the first fit: continuing would otherwise move
        # every weight's meaning under it.
        std = x.std(axis=0)
        start = {"mean": x.mean(axis=0), "std": np.where(std > 1e-3, std, 1.0)}
        dims = [x.shape[1], *params.hidden, 1]
        for k in range(len(dims) - 1):
            bound = 1.0 / dims[k] ** 0.5  # torch.nn.Linear's initialisation
            shape = (dims[k], dims[k + 1]) if k < len(dims) - 2 else (dims[k],)
            start[f"w{k}"] = (torch.rand(shape, generator=gen) * 2 - 1).numpy() * bound
            start[f"b{k}"] = (torch.rand(shape[1:], generator=gen) * 2 - 1).numpy() * bound
        epochs = params.first_epochs
    layers = sum(1 for k in start if k.startswith("w"))
    weights = {
        k: torch.tensor(np.asarray(v, dtype=np.float32), device=device, requires_grad=True)
        for k, v in start.items() if k not in ("mean", "std")
    }
    opt = torch.optim.Adam(list(weights.values()), lr=params.mlp_lr)

    xs = torch.tensor((x - start["mean"]) / start["std"], dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.float32)
    offsets = np.concatenate(([0], np.cumsum(g)))
    # Only baskets with something bought carry a listwise signal.
    useful = [k for k in range(len(g)) if y[offsets[k]:offsets[k + 1]].any()]
    for _ in range(epochs):
        order = torch.randperm(len(useful), generator=gen).tolist()
        for start_at in range(0, len(order), params.groups_per_batch):
            batch = [useful[k] for k in order[start_at:start_at + params.groups_per_batch]]
            xb, yb, mask = (t.to(device) for t in _pad_groups(xs, ys, offsets, batch))
            h = xb
            for k in range(layers - 1):
                h = torch.relu(h @ weights[f"w{k}"] + weights[f"b{k}"])
            logits = (h @ weights[f"w{layers - 1}"] + weights[f"b{layers - 1}"]).masked_fill(~mask, float("-inf"))
            logp = torch.log_softmax(logits, dim=1).masked_fill(~mask, 0.0)
            # Listwise softmax: the bought items share the target mass of their basket.
            loss = -((logp * yb).sum(dim=1) / yb.sum(dim=1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = {"mean": np.asarray(start["mean"]), "std": np.asarray(start["std"])}
    out.update({k: v.detach().cpu().numpy() for k, v in weights.items()})
    return MLPRanker(out, names, schema)


def _pad_groups(xs: Any, ys: Any, offsets: np.ndarray, batch: list[int]) -> tuple[Any, Any, Any]:
    """Stack groups of unequal size into (groups, longest, d) with a mask of real rows."""
    import torch

    longest = max(int(offsets[k + 1] - offsets[k]) for k in batch)
    xb = torch.zeros(len(batch), longest, xs.shape[1])
    yb = torch.zeros(len(batch), longest)
    mask = torch.zeros(len(batch), longest, dtype=torch.bool)
    for row, k in enumerate(batch):
        a, b = int(offsets[k]), int(offsets[k + 1])
        xb[row, : b - a] = xs[a:b]
        yb[row, : b - a] = ys[a:b]
        mask[row, : b - a] = True
    return xb, yb, mask
