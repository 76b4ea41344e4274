"""The native back ends, ONNX Runtime and FAISS, come from an extra: ``cpu`` or ``gpu``.

Neither is a base dependency: the CPU and the CUDA wheels of each install the same
module (``onnxruntime``, ``faiss``), and two of them in one environment overwrite each
other's files. So ``pip install 'freshrec[cpu]'`` (what ``./dev`` does) or
``'freshrec[gpu]'`` on a CUDA host, never both. :func:`backend_import_error` turns a
missing module into an error that says so.
"""

from __future__ import annotations

import glob
import os
from types import ModuleType

# module -> (CPU wheel, GPU wheel), as in pyproject.toml's extras
WHEELS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu"),
}


def backend_import_error(module: str, exc: ImportError) -> ImportError:
    """The error to raise when ``import <module>`` failed with ``exc``.

    Not installed: names the extra that brings it. Installed but unloadable (a GPU wheel
    without its CUDA libraries, say): keeps the loader's reason and names the way back.
    """
    cpu, gpu = WHEELS[module]
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module:
        return ImportError(
            f"freshrec needs the Python module {module!r}, and neither {cpu} nor {gpu} is installed: "
            f"install the extra for this host, pip install -e '.[cpu]' (./dev does this) "
            f"or pip install -e '.[gpu]' on a CUDA host (never both)"
        )
    return ImportError(
        f"{module} is installed but failed to load ({exc}); a {gpu} wheel needs the CUDA libraries it was built "
        f"for. On a host without them: pip uninstall -y {gpu} && pip install -e '.[cpu]'"
    )


def onnxruntime() -> ModuleType:
    """``import onnxruntime``, with :func:`backend_import_error`'s message if that fails."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise backend_import_error("onnxruntime", exc) from exc
    return ort


def cuda_device_visible() -> bool:
    """An NVIDIA GPU is there for this process: a device node exists and
    ``CUDA_VISIBLE_DEVICES`` does not hide them all.

    Read from the file system on purpose, not by initialising CUDA: a process that
    initialises CUDA and then forks (server workers) leaves its children unable to use it.
    Telling "built with CUDA" (``onnxruntime-gpu`` on a CPU host) from "has a GPU" is what
    lets the GPU image run on CPU-only hosts.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))
