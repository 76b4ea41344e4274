"""LoRA merging: the merged model and its ONNX export encode like the unmerged peft model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from freshrec.settings import Settings  # noqa: E402
from models.encoder import TorchEncoder, load_base_model  # noqa: E402
from models.merge import AdapterLoadError, merged_model  # noqa: E402
from models.onnx_encoder import encoder_for  # noqa: E402

TEXTS = ["lamp", "WHITE HANGING HEART T-LIGHT HOLDER | home decor | " + "heart shaped holder " * 20, "cake tins"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A saved LoRA adapter with non-zero weights, and what the peft model encodes."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(load_base_model("cpu"), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero (a no-op adapter); make it matter
                param.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("adapter") / "v1"
    model.save_pretrained(str(path))
    model.eval()
    return path, TorchEncoder(model=model, version="v1").encode(TEXTS)


def test_base_when_no_adapter() -> None:
    model = merged_model(None)
    assert type(model).__name__ == "BertModel" and not model.training


def test_merged_model_encodes_like_the_peft_model(adapter: tuple[Path, np.ndarray]) -> None:
    path, expected = adapter
    merged = merged_model(path)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = TorchEncoder(model=merged, version="v1").encode(TEXTS)
    assert np.sum(got * expected, axis=1).min() >= 0.99999
    base = TorchEncoder(model=load_base_model()).encode(TEXTS)
    assert np.sum(base * expected, axis=1).max() < 0.9999  # the adapter really changed something


def test_onnx_export_of_adapter_matches_peft_model(adapter: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, expected = adapter
    settings = Settings(state_dir=tmp_path / "state")
    enc = encoder_for(settings, "v1", path, "fp32")
    assert enc.version == "v1"
    assert np.sum(enc.encode(TEXTS) * expected, axis=1).min() >= 0.9999
    int8 = encoder_for(settings, "v1", None, "int8")  # cached: the adapter folder is not needed again
    assert np.sum(int8.encode(TEXTS) * expected, axis=1).mean() >= 0.98


def test_adapter_that_does_not_fit_is_refused(adapter: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k.replace("encoder.layer", "decoder.block"): v for k, v in weights.items()}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="does not fit the base encoder"):
        merged_model(bad)
    with pytest.raises(AdapterLoadError, match="not a peft adapter folder"):
        merged_model(tmp_path)
