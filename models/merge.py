"""Fold a LoRA adapter into the base transformer, for export and inference.

A merged model is an ordinary ``BertModel`` whose weights are ``W + B @ A * scale``: it
runs at base-model speed, exports to ONNX like the base model, and needs no peft at
inference time. Training keeps the adapter separate (``learner.trainer``); everything
that only encodes uses this.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .encoder import load_base_model


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be merged into the base encoder."""


def merged_model(adapter_dir: Path | None, device: str = "cpu"):  # type: ignore[no-untyped-def]
    """The base transformer with the adapter in ``adapter_dir`` merged in, in eval mode.

    ``adapter_dir`` is a peft ``save_pretrained`` folder of a ``PeftModel`` wrapping the
    bare model from :func:`models.encoder.load_base_model` (what the learner's registry
    stores); ``None`` gives the base model. Raises :class:`AdapterLoadError` if the folder
    is missing, is not a peft adapter, or its weights do not fit the base model (peft
    itself only warns about unmatched keys, which would silently serve the base model).
    """
    base = load_base_model(device)
    if adapter_dir is None:
        return base
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterLoadError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)")
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        with warnings.catch_warnings():
            # peft warns about unmatched keys; the check below turns that into an error.
            warnings.filterwarnings("ignore", message=".*adapter keys.*")
            model = PeftModel.from_pretrained(base, str(adapter_dir))
            # Load again with the result in hand: an adapter whose keys miss the model would
            # otherwise merge nothing and go unnoticed.
            result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir), device=device))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterLoadError(f"adapter at {adapter_dir} does not fit the base encoder: {exc}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_lora = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing_lora:
        sample = (unexpected or missing_lora)[:3]
        raise AdapterLoadError(
            f"adapter at {adapter_dir} does not fit the base encoder: "
            f"{len(unexpected)} unexpected and {len(missing_lora)} missing LoRA weights (e.g. {sample})"
        )
    return model.merge_and_unload().to(device).eval()
