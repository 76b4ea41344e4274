"""The GPU paths' own logic, on a machine without one: the encoder's provider check, the
back-end import errors, and bench.gpu's report when CUDA is absent.

(The FAISS GPU mirror's tests are in test_live_index.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from models import backends
from models import onnx_encoder
from models.onnx_encoder import CPU, CUDA, EncoderDeviceError, OnnxEncoder, check_providers

ROOT = Path(__file__).resolve().parents[2]


class _Session:
    """Stands in for onnxruntime.InferenceSession: only what the check reads."""

    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


def test_check_providers_fails_when_cuda_was_asked_and_not_got() -> None:
    with pytest.raises(EncoderDeviceError, match=r"asked for CUDAExecutionProvider but runs on \['CPUExecutionProvider'\]"):
        check_providers(_Session([CPU]), [CUDA, CPU], "encoder.fp16.onnx")
    with pytest.raises(EncoderDeviceError, match="FRESHREC_ENCODER_PRECISION=int8"):
        check_providers(_Session([CPU]), [CUDA], "m")


def test_check_providers_passes_what_was_asked() -> None:
    assert check_providers(_Session([CUDA, CPU]), [CUDA, CPU]) == [CUDA, CPU]
    assert check_providers(_Session([CPU]), [CPU]) == [CPU]  # the CPU was asked for


def test_encoder_preloads_cuda_and_refuses_a_cpu_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """OnnxEncoder wires both in: CUDA libraries preloaded before the session, the session's
    real providers checked after (ONNX Runtime's CUDA-less fallback stood in)."""
    ort = backends.onnxruntime()
    made: list[tuple[str, list[str]]] = []
    preloads: list[int] = []

    def fake_session(path: str, opts: Any, providers: list[str]) -> _Session:
        made.append((path, providers))
        return _Session([CPU])  # what onnxruntime-gpu does when CUDA cannot start

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    monkeypatch.setattr(ort, "preload_dlls", lambda: preloads.append(1), raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnx_encoder, "cuda_device_visible", lambda: True)
    monkeypatch.setattr(onnx_encoder, "_preloaded", False)
    with pytest.raises(EncoderDeviceError, match="encoder.fp16.onnx"):
        OnnxEncoder(tmp_path / "encoder.fp16.onnx", precision="fp16")
    assert made == [(str(tmp_path / "encoder.fp16.onnx"), [CUDA, CPU])]
    assert preloads == [1]
    # int8 asks for the CPU only: no preload, no error
    monkeypatch.setattr(onnx_encoder.FastTokenizer, "shared", classmethod(lambda cls: None))
    enc = OnnxEncoder(tmp_path / "encoder.int8.onnx", precision="int8")
    assert enc.providers == [CPU] and made[-1][1] == [CPU] and preloads == [1]


def test_preload_failure_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ort = backends.onnxruntime()

    def broken() -> None:
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", broken, raising=False)
    monkeypatch.setattr(onnx_encoder, "_preloaded", False)
    onnx_encoder.preload_cuda_libraries()
    onnx_encoder.preload_cuda_libraries()  # once per process
    warned = [r.getMessage() for r in caplog.records if "preload_dlls" in r.getMessage()]
    assert len(warned) == 1 and "libcudnn.so.9" in warned[0]


def test_auto_precision_needs_a_gpu_not_just_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu on a CPU-only host (the GPU image there) stays on int8."""
    ort = backends.onnxruntime()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnx_encoder, "cuda_device_visible", lambda: False)
    assert onnx_encoder.resolve_precision("auto") == "int8"
    monkeypatch.setattr(onnx_encoder, "cuda_device_visible", lambda: True)
    assert onnx_encoder.resolve_precision("auto") == "fp16"


def test_cuda_device_visible_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert backends.cuda_device_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not backends.cuda_device_visible()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(backends.glob, "glob", lambda pattern: [])
    assert not backends.cuda_device_visible()


def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ModuleNotFoundError
    with pytest.raises(ImportError, match=r"neither onnxruntime nor onnxruntime-gpu is installed.*\.\[cpu\].*\.\[gpu\]"):
        backends.onnxruntime()


def test_broken_backend_keeps_the_reason() -> None:
    err = backends.backend_import_error("faiss", ImportError("libcudart.so.12: cannot open shared object file"))
    assert "faiss is installed but failed to load (libcudart.so.12" in str(err)
    assert "pip uninstall -y faiss-gpu" in str(err)


def test_missing_faiss_fails_the_index_import_clearly() -> None:
    """The live index imports faiss at module level: without it, the message names the extra."""
    code = "import sys; sys.modules['faiss'] = None; import models.live_index"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "neither faiss-cpu nor faiss-gpu is installed" in out.stderr


def test_bench_gpu_without_cuda_writes_what_was_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu

    monkeypatch.setattr(gpu, "probe_cuda", lambda timeout=60.0: {"available": False, "reason": "no NVIDIA driver (nvidia-smi not found)"})
    out = tmp_path / "gpu.json"
    assert gpu.main(["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cuda"]["available"] is False
    assert set(report["parts"]) == set(gpu.PARTS)
    for part in report["parts"].values():
        assert part["status"] == "skipped" and "no NVIDIA driver" in part["reason"]
    assert report["installed_gpu_extra"] == {"status": "skipped", "reason": "no CUDA device"}


def test_gpu_requirements_come_from_pyproject() -> None:
    from bench import gpu

    reqs = gpu.extra_requirements("gpu")
    assert any(r.startswith("onnxruntime-gpu") for r in reqs) and any(r.startswith("faiss-gpu") for r in reqs)
    assert not any(r.startswith(("onnxruntime>", "faiss-cpu")) for r in gpu.base_requirements())


def test_gpu_compose_override_reserves_a_gpu_for_real_services() -> None:
    """docker-compose.gpu.yml layers over docker-compose.yml: every service it gives a GPU
    must exist there (a rename would otherwise add a service with no image)."""
    yaml = pytest.importorskip("yaml")
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert {"learner", "indexer", "serving"} <= set(gpu)
    for name, service in gpu.items():
        assert name in base, f"docker-compose.gpu.yml names {name!r}, which docker-compose.yml lacks"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # what `docker compose -f docker-compose.yml -f docker-compose.gpu.yml` merges still
    # validates against the compose spec (the schema that tests/unit/test_deploy.py uses)
    jsonschema = pytest.importorskip("jsonschema")
    vendor = pytest.importorskip("importlib.resources").files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    merged = _merge(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text()))
    errors = [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(merged)]
    assert errors == []
    assert merged["services"]["serving"]["deploy"]["replicas"] >= 1  # kept from the base file


def _merge(base: Any, over: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, the rest is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: _merge(base[k], v) if k in base else v for k, v in over.items()} | {k: v for k, v in base.items() if k not in over}
    return over
