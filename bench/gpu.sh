#!/usr/bin/env bash
# bench.gpu on a fresh GPU machine, one command from the repository root:
#   bash bench/gpu.sh [OUT.json] [bench.gpu args, e.g. --data DIR]
# Makes .venv-gpu (it sees the system's packages, so a CUDA torch already there is kept;
# otherwise PyPI's torch, whose Linux wheel is a CUDA build), installs freshrec's other
# dependencies with the gpu and bench extras (onnxruntime-gpu and faiss-gpu, never their
# CPU twins), then runs python -m bench.gpu under an 8-minute timeout. freshrec itself
# runs from the working tree, not installed. Wheels in .whl/, if any, are used as well
# (for a machine that cannot reach PyPI). The JSON is written after each part, so even a
# stopped run leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/out/gpu.json}"
shift || true
VENV="${FRESHREC_GPU_VENV:-.venv-gpu}"
PY="${PYTHON:-python3}"
export PIP_DEFAULT_TIMEOUT=30 PIP_RETRIES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || exit 1
vpy="$VENV/bin/python"
pip=("$vpy" -m pip install -q)
[ -d .whl ] && pip+=(--find-links .whl)
if ! "$vpy" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh: no torch with CUDA here; installing PyPI's torch" >&2
  timeout 900 "${pip[@]}" torch || echo "gpu.sh: torch did not install; bench.gpu will say what that stops" >&2
fi
# freshrec's dependencies less torch (kept as found), plus the gpu and bench extras
"$vpy" - >"$VENV/requirements-gpu.txt" <<'PYEOF' || exit 1
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join([d for d in project["dependencies"] if not re.match(r"torch\b", d)] + extras["gpu"] + extras["bench"]))
PYEOF
timeout 900 "${pip[@]}" -r "$VENV/requirements-gpu.txt" \
  || echo "gpu.sh: some requirements did not install (no PyPI?); bench.gpu reports what fails" >&2
timeout 480 "$vpy" -m bench.gpu --json "$out" --no-install "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu.sh: bench.gpu ran past 8 minutes and was stopped; $out has the parts that finished" >&2
exit "$rc"
