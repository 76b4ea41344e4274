"""The CUDA paths in one run, each beside its CPU floor, time-boxed to fit 8 minutes.

    python -m bench.gpu --json bench/out/gpu.json [--budget 450] [--data DIR] [--no-install]
    bash bench/gpu.sh [bench.gpu args]    # a fresh GPU machine: venv, the gpu extra, this

On a machine with CUDA it first installs the ``gpu`` extra if its packages are missing
(``onnxruntime-gpu``, ``faiss-gpu``, read from pyproject.toml; the CPU wheels of the same
modules are uninstalled first, since both install the same files), then runs four parts,
each in its own process with its own time box (a part that overruns is killed and
reported as ``timeout``; the rest still run):

- ``learner``: LoRA training pairs/s (``learner.trainer.LoraTrainer.train_step``) on CUDA
  and on the CPU (``--cpu-threads``, default 2: the deployment's two cores);
- ``encoder``: catalog encoding items/s and one-query latency of the fp16 ONNX encoder
  on CUDA against the int8 one on the CPU, and how close their vectors are;
- ``faiss``: the live index (``models.live_index.LiveIndex``, exact) with its GPU copy
  against the CPU: bulk add, batched search, one-query search, and upsert-then-search
  churn (the GPU copy updated in place, rebuilt off the lock every so often);
- ``hotswap``: ``bench.hotswap`` (learn, publish, serving swaps under load), on CUDA.

Without CUDA (no NVIDIA driver, or no GPU that torch or nvidia-smi can see) it installs
nothing, runs nothing, and writes a JSON that says so and why: every part ``skipped``.
The JSON always has ``cuda`` (what was probed), ``installed_gpu_extra`` and ``parts``
(per part: ``status`` ok / skipped / error / timeout, its figures or the reason).

This module imports only the standard library at the top: the parts import the system
in their own processes, after the install.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "freshrec" / "sample"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "online_retail_ii"
PARTS = ("learner", "encoder", "faiss", "hotswap")
# (least, most) seconds per part; a part gets the most that leaves the later parts their least
BOXES: dict[str, tuple[float, float]] = {"learner": (30, 70), "encoder": (45, 100), "faiss": (20, 50), "hotswap": (120, 240)}
INSTALL_TIMEOUT_S = 240.0
CPU_WHEELS = {"onnxruntime-gpu": "onnxruntime", "faiss-gpu": "faiss-cpu"}


# -- requirements, probe, install ----------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extra_requirements(extra: str) -> list[str]:
    """The requirement strings of one of pyproject.toml's extras."""
    return list(_pyproject()["project"]["optional-dependencies"][extra])


def base_requirements() -> list[str]:
    return list(_pyproject()["project"]["dependencies"])


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_cuda(timeout: float = 60.0) -> dict[str, Any]:
    """What this machine shows of CUDA: nvidia-smi's GPUs and torch's view, each with a reason when absent."""
    out: dict[str, Any] = {}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        out["nvidia_smi"] = "not found"
        gpus: list[str] = []
    else:
        try:
            res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout)
            gpus = [line.strip() for line in res.stdout.splitlines() if line.startswith("GPU")]
            out["nvidia_smi"] = gpus or (res.stderr.strip() or "no GPU listed")
        except (OSError, subprocess.TimeoutExpired) as exc:
            gpus = []
            out["nvidia_smi"] = f"failed: {exc}"
    code = (
        "import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
        "'torch_cuda_build': torch.version.cuda, 'torch_sees_cuda': c, "
        "'device_name': torch.cuda.get_device_name(0) if c else None}))"
    )
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        out.update(json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"torch": f"import failed: {res.stderr.strip()[-300:]}"})
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        out["torch"] = f"probe failed: {exc}"
    out["available"] = bool(gpus) or bool(out.get("torch_sees_cuda"))
    if not out["available"]:
        out["reason"] = (
            "no NVIDIA driver (nvidia-smi not found) and torch sees no CUDA device"
            if smi is None
            else "nvidia-smi lists no GPU and torch sees no CUDA device"
        )
    return out


def install_gpu_extra(timeout: float = INSTALL_TIMEOUT_S) -> dict[str, Any]:
    """pip-install the gpu extra's missing packages (after removing their CPU twins).

    If the install fails, the CPU twins are put back, so the environment still works.
    """
    reqs = extra_requirements("gpu")
    missing = [r for r in reqs if _installed(_dist_name(r)) is None]
    if not missing:
        return {"status": "present", "versions": {_dist_name(r): _installed(_dist_name(r)) for r in reqs}}
    twins = [CPU_WHEELS[_dist_name(r)] for r in missing if _dist_name(r) in CPU_WHEELS and _installed(CPU_WHEELS[_dist_name(r)])]
    pip = [sys.executable, "-m", "pip"]
    started = time.monotonic()
    if twins:
        subprocess.run([*pip, "uninstall", "-y", *twins], capture_output=True, text=True, timeout=120)
    try:
        res = subprocess.run([*pip, "install", "-q", *missing], capture_output=True, text=True, timeout=timeout)
        ok, detail = res.returncode == 0, (res.stderr or res.stdout).strip()[-1500:]
    except subprocess.TimeoutExpired:
        ok, detail = False, f"pip install did not finish in {timeout:.0f} s"
    if not ok and twins:
        subprocess.run([*pip, "install", "-q", *twins], capture_output=True, text=True, timeout=timeout)
    return {
        "status": "installed" if ok else "failed",
        "packages": missing,
        "removed_cpu_wheels": twins,
        "seconds": round(time.monotonic() - started, 1),
        **({} if ok else {"error": detail}),
        "versions": {_dist_name(r): _installed(_dist_name(r)) for r in reqs},
    }


# -- the orchestration ----------------------------------------------------------------------


def _run_part(name: str, box: float, args: argparse.Namespace) -> dict[str, Any]:
    """Run one part in its own process group; kill it (TERM, then KILL) at the end of its box."""
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{name}-") as tmp:
        out = Path(tmp) / "part.json"
        cmd = [
            # the part plans for 10 s less than its box: its start-up and imports are not in its own clock
            sys.executable, "-m", "bench.gpu", "--part", name, "--out", str(out), "--seconds", f"{max(box - 10, 10):.0f}",
            "--data", str(args.data), "--cpu-threads", str(args.cpu_threads),
        ]
        log = Path(tmp) / "part.log"
        started = time.monotonic()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc: int | None = proc.wait(box)
            except subprocess.TimeoutExpired:
                rc = None
                _stop_group(proc)
        tail = log.read_text(errors="replace")[-2000:]
        print(tail, end="" if tail.endswith("\n") else "\n")
        seconds = round(time.monotonic() - started, 1)
        if rc is None:
            return {"status": "timeout", "box_s": round(box), "seconds": seconds, "log_tail": tail[-800:]}
        if rc != 0 or not out.exists():
            return {"status": "error", "returncode": rc, "seconds": seconds, "error": tail[-1500:]}
        return {"status": "ok", "box_s": round(box), "seconds": seconds, **json.loads(out.read_text())}


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_all(args: argparse.Namespace, save: Any = lambda report: None) -> dict[str, Any]:
    """Probe, install, then the parts in turn; ``save(report)`` after each step, so that a
    run stopped from outside still leaves what it measured so far."""
    started = time.monotonic()
    report: dict[str, Any] = {
        "bench": "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": args.budget,
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "data": str(args.data),
        "cpu_threads": args.cpu_threads,
    }
    cuda = probe_cuda()
    report["cuda"] = cuda
    parts: dict[str, Any] = {}
    report["parts"] = parts
    if not cuda["available"]:
        report["installed_gpu_extra"] = {"status": "skipped", "reason": "no CUDA device"}
        for name in PARTS:
            parts[name] = {"status": "skipped", "reason": f"CUDA absent: {cuda['reason']}"}
        report["note"] = "nothing ran: the CUDA paths are untested on this machine"
        report["wall_s"] = round(time.monotonic() - started, 1)
        return report
    report["installed_gpu_extra"] = (
        {"status": "skipped", "reason": "--no-install"}
        if args.no_install
        else install_gpu_extra(min(INSTALL_TIMEOUT_S, max(30.0, args.budget / 3)))
    )
    save(report)
    wanted = [p for p in PARTS if p in args.parts]
    for i, name in enumerate(wanted):
        left = args.budget - (time.monotonic() - started)
        least, most = BOXES[name]
        reserve = sum(BOXES[later][0] for later in wanted[i + 1 :])
        box = min(most, left - reserve)
        if box < least:
            parts[name] = {"status": "skipped", "reason": f"out of time: {left:.0f} s left of the {args.budget:.0f} s budget"}
            continue
        print(f"\n== bench.gpu: {name} (up to {box:.0f} s)", flush=True)
        parts[name] = _run_part(name, box, args)
        report["wall_s"] = round(time.monotonic() - started, 1)
        save(report)
    for name in PARTS:
        parts.setdefault(name, {"status": "skipped", "reason": "not asked for (--parts)"})
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def _summary(report: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("cuda", "yes" if report["cuda"]["available"] else "absent")]
    for name, part in report["parts"].items():
        rows.append((name, part["status"]))
        for key in part.get("headline", []):
            rows.append((f"  {key}", part.get(key)))
    return rows


# -- the parts (each runs in its own process) -------------------------------------------------


def _items(data: Path) -> dict[str, Any]:
    from freshrec.contracts import CatalogItem
    from freshrec.dataset import locate, read_items

    files = locate(data)
    out: dict[str, Any] = {}
    for row in read_items(files.items) if files.items else ():
        try:
            item = CatalogItem.model_validate(row)
        except Exception:
            continue
        out[item.item_id] = item
    return out


def _pairs(settings: Any, data: Path, limit: int, max_events: int = 60_000) -> list[Any]:
    import itertools

    from bench.hotswap import train_pairs
    from freshrec.contracts import Event
    from freshrec.dataset import locate, read_events

    files = locate(data)
    events = []
    for row in itertools.islice(read_events(files.events, files.name), max_events):
        try:
            events.append(Event.model_validate(row))
        except Exception:
            continue
    return train_pairs(settings, events, _items(data), limit)


def part_learner(seconds: float, data: Path, cpu_threads: int) -> dict[str, Any]:
    """Training pairs/s, CUDA then the CPU, each for about half the box."""
    import torch

    from freshrec.settings import Settings
    from learner.trainer import LoraTrainer

    settings = Settings(state_dir=Path(tempfile.mkdtemp(prefix="bench-gpu-learner-")))
    t0 = time.monotonic()
    pairs = _pairs(settings, data, 64 * settings.learner_batch_size)
    bs = settings.learner_batch_size
    batches = [pairs[i : i + bs] for i in range(0, len(pairs) - bs + 1, bs)]
    if not batches:
        raise SystemExit(f"no training pairs from {data}")
    out: dict[str, Any] = {"batch_size": bs, "prepare_s": round(time.monotonic() - t0, 1)}
    torch.set_num_threads(cpu_threads)
    deadline = t0 + seconds - 8  # margin for the last step and the write
    for device, share in (("cuda", 0.35), ("cpu", 1.0)):
        trainer = LoraTrainer(settings, device)
        end = time.monotonic() + (deadline - time.monotonic()) * share
        times: list[float] = []
        while len(times) < 200:
            ts = time.perf_counter()
            trainer.train_step(batches[len(times) % len(batches)])  # returns the loss: synchronises
            times.append(time.perf_counter() - ts)
            timed = times[1:] or times
            if time.monotonic() + sum(timed) / len(timed) > end:
                break
        timed = times[1:] or times  # the first step warms up kernels, allocator, cuBLAS
        out[f"pairs_per_s_{device}"] = round(bs * len(timed) / sum(timed), 1)
        out[f"steps_{device}"] = len(timed)
        del trainer
        if device == "cuda":
            out["cuda_device"] = torch.cuda.get_device_name(0)
            torch.cuda.empty_cache()
    if out.get("pairs_per_s_cuda") and out.get("pairs_per_s_cpu"):
        out["speedup_cuda_over_cpu"] = round(out["pairs_per_s_cuda"] / out["pairs_per_s_cpu"], 2)
    out["headline"] = ["pairs_per_s_cuda", "pairs_per_s_cpu", "speedup_cuda_over_cpu"]
    return out


def part_encoder(seconds: float, data: Path, cpu_threads: int) -> dict[str, Any]:
    """fp16 on CUDA against int8 on the CPU: catalog items/s, one-query latency, agreement."""
    import numpy as np

    from freshrec.settings import Settings
    from models.onnx_encoder import encoder_for

    t0 = time.monotonic()
    settings = Settings(state_dir=Path(tempfile.mkdtemp(prefix="bench-gpu-encoder-")))
    # the same texts for both encoders
    texts = [it.text() for it in _items(data).values()][:2000]
    queries = [t.split(" | ")[0].lower() for t in texts[:200]]
    cpu = encoder_for(settings, "base", None, precision="int8", threads=cpu_threads)
    gpu = encoder_for(settings, "base", None, precision="fp16", threads=1)  # raises if CUDA does not start
    out: dict[str, Any] = {"items": len(texts), "export_s": round(time.monotonic() - t0, 1), "gpu_providers": gpu.providers}
    deadline = t0 + seconds - 6
    vectors: dict[str, Any] = {}
    for name, enc, batch_sizes, share in (("cuda_fp16", gpu, (64, 256), 0.3), ("cpu_int8", cpu, (64,), 1.0)):
        span = (deadline - time.monotonic()) * share
        vectors[name] = enc.encode(texts[:256])  # warm-up, and the vectors compared below
        for bs in batch_sizes:
            # chunks of 512 texts, cycling, until 3 passes or this batch size's share of the time
            end = time.monotonic() + 0.7 * span / len(batch_sizes)
            done, ts = 0, time.perf_counter()
            while done < 3 * len(texts) and (done == 0 or time.monotonic() < end):
                start = done % len(texts)
                chunk = texts[start : start + 512]
                enc.encode(chunk, batch_size=bs)
                done += len(chunk)
            out[f"items_per_s_{name}_batch{bs}"] = round(done / (time.perf_counter() - ts), 1)
        end = time.monotonic() + 0.3 * span
        lat = []
        for q in queries:
            if time.monotonic() > end:
                break
            ts = time.perf_counter()
            enc.encode([q])
            lat.append(time.perf_counter() - ts)
        lat.sort()
        out[f"query_p50_ms_{name}"] = round(1000 * lat[len(lat) // 2], 3) if lat else None
        out[f"queries_{name}"] = len(lat)
    if "cuda_fp16" in vectors and "cpu_int8" in vectors:
        a, b = vectors["cuda_fp16"], vectors["cpu_int8"]
        n = min(len(a), len(b))
        cos = np.sum(a[:n] * b[:n], axis=1)
        out["cosine_fp16_vs_int8_mean"] = round(float(cos.mean()), 5)
        out["cosine_fp16_vs_int8_min"] = round(float(cos.min()), 5)
    best = max((v for k, v in out.items() if k.startswith("items_per_s_cuda_fp16")), default=None)
    if best and out.get("items_per_s_cpu_int8_batch64"):
        out["speedup_items_per_s"] = round(best / out["items_per_s_cpu_int8_batch64"], 2)
    out["headline"] = ["items_per_s_cuda_fp16_batch256", "items_per_s_cpu_int8_batch64", "speedup_items_per_s", "query_p50_ms_cuda_fp16", "query_p50_ms_cpu_int8"]
    return out


def part_faiss(seconds: float, data: Path, cpu_threads: int, n: int = 100_000, dim: int = 384) -> dict[str, Any]:
    """The live index with its GPU copy against the CPU one, same vectors and queries."""
    import numpy as np

    import models.live_index as live_index
    from models.live_index import LiveIndex

    gpus = live_index._gpu_count()
    if gpus == 0:
        raise SystemExit("faiss sees no GPU (is faiss-gpu installed, and does it load?)")
    live_index.faiss.omp_set_num_threads(cpu_threads)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(n)]
    queries = vecs[rng.choice(n, 1024, replace=False)] + 0.05 * rng.standard_normal((1024, dim)).astype(np.float32)
    out: dict[str, Any] = {"items": n, "dim": dim, "faiss_gpus": gpus}
    results: dict[str, Any] = {}
    for name, use_gpu, share in (("gpu", True, 0.45), ("cpu", False, 0.45)):
        end = time.monotonic() + seconds * share
        index = LiveIndex(dim, "bench", kind="flat", use_gpu=use_gpu)
        ts = time.perf_counter()
        for start in range(0, n, 10_000):
            index.upsert(ids[start : start + 10_000], vecs[start : start + 10_000])
        out[f"add_items_per_s_{name}"] = round(n / (time.perf_counter() - ts))
        index.search(queries[:8], k=10)
        ts = time.perf_counter()
        results[name] = index.search(queries, k=10)
        out[f"batch_search_queries_per_s_{name}"] = round(len(queries) / (time.perf_counter() - ts))
        lat = []
        for q in queries[:300]:
            if time.monotonic() > end:
                break
            ts = time.perf_counter()
            index.search(q, k=10)
            lat.append(time.perf_counter() - ts)
        lat.sort()
        out[f"query_p50_ms_{name}"] = round(1000 * lat[len(lat) // 2], 3) if lat else None
        churn, rounds = 0.0, 0
        while time.monotonic() < end and rounds < 2000:
            j = int(rng.integers(n))
            ts = time.perf_counter()
            index.upsert([ids[j]], vecs[j : j + 1])
            index.search(queries[rounds % len(queries)], k=10)
            churn += time.perf_counter() - ts
            rounds += 1
        out[f"upsert_then_search_ms_{name}"] = round(1000 * churn / rounds, 3) if rounds else None
        out[f"churn_rounds_{name}"] = rounds
        if use_gpu and index._gpu is not None:
            out["gpu_uploads"] = index._gpu.uploads
        del index
    if "gpu" in results and "cpu" in results:
        same = sum(len({i for i, _ in a} & {i for i, _ in b}) for a, b in zip(results["gpu"], results["cpu"]))
        out["top10_overlap_gpu_vs_cpu"] = round(same / (10 * len(queries)), 4)
    for key in ("batch_search_queries_per_s", "query_p50_ms", "upsert_then_search_ms"):
        g, c = out.get(f"{key}_gpu"), out.get(f"{key}_cpu")
        if g and c:
            out[f"{key}_gpu_over_cpu"] = round(g / c, 3)
    out["headline"] = ["batch_search_queries_per_s_gpu", "batch_search_queries_per_s_cpu", "query_p50_ms_gpu", "query_p50_ms_cpu", "upsert_then_search_ms_gpu", "upsert_then_search_ms_cpu"]
    return out


def part_hotswap(seconds: float, data: Path, cpu_threads: int) -> dict[str, Any]:
    """bench.hotswap with few, short swaps, in this process (its own stack, server and load)."""
    out_json = Path(tempfile.mkdtemp(prefix="bench-gpu-hotswap-")) / "hotswap.json"
    swaps = 3 if seconds >= 200 else 2
    from bench import hotswap

    rc = hotswap.main(["--data", str(data), "--swaps", str(swaps), "--steps", "2", "--steady", "5", "--json", str(out_json)])
    figures = json.loads(out_json.read_text()) if out_json.exists() else {}
    figures.pop("machine", None)
    figures["returncode"] = rc
    figures["headline"] = ["device", "publish_to_live_p50_s", "publish_to_live_max_s", "pairs_per_s", "errors", "mixed_version_responses"]
    return figures


PART_FUNCS = {"learner": part_learner, "encoder": part_encoder, "faiss": part_faiss, "hotswap": part_hotswap}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--json", help="where to write the report")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run, install included (default 450)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else SAMPLE, help="dataset folder (default: ../shared/data/online_retail_ii, else the bundled sample)")
    p.add_argument("--cpu-threads", type=int, default=2, help="threads of the CPU floors (default 2, the deployment's cores)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--no-install", action="store_true", help="do not pip-install the gpu extra")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        figures = PART_FUNCS[args.part](args.seconds, args.data, args.cpu_threads)
        Path(args.out).write_text(json.dumps(figures, indent=2, default=str))
        return 0
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")

    def save(report: dict[str, Any]) -> None:
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            os.replace(tmp, path)

    report = run_all(args, save)
    save(report)
    from bench.report import print_table

    print_table("bench.gpu", _summary(report))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
