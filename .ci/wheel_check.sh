#!/usr/bin/env bash
# CI: what a non-editable install gets. Builds the wheel, installs it into a fresh virtual
# environment outside the checkout and runs the tiny pipeline and `em probe` from there, so a data
# file missing from the wheel or an import that only the checkout satisfies fails here (every
# test installs editable, which sees the whole checkout).
#
# Offline: the venv reuses the installed dependencies (--system-site-packages; torch & co are not
# downloaded) and the wheel goes in with --no-deps. The tiny model comes from EM_LAB_CACHE, else
# EM_LAB_TEST_CACHE (the test session's, as .ci/run sets it), else it is built (~1-2 minutes).
# About 2 minutes on 2 CPU cores with the tiny model cached.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/em-wheel-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
py="${PYTHON:-python}"

# The checkout must not leak in: no PYTHONPATH, no inherited store, run id or API key.
unset PYTHONPATH MLFLOW_TRACKING_URI MLFLOW_RUN_ID EM_LAB_MLRUNS EM_LAB_ARTIFACT_ROOT OPENAI_API_KEY OPENAI_BASE_URL
export EM_LAB_CACHE="${EM_LAB_CACHE:-${EM_LAB_TEST_CACHE:-$work/cache}}"
export EM_LAB_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

# Build from a copy of the sources, so the checkout gets no build/ or *.egg-info.
mkdir "$work/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/em_core" "$repo/em_lab" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$py" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/em_lab-*.whl)"
echo "wheel-check: built $(basename "$wheel") ($((SECONDS - start)) s)"

"$py" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
test ! -e "$site/entrypoints" || { echo "wheel-check: the wheel installed a top-level entrypoints package" >&2; exit 1; }

# A user's working directory: their configs, nothing else of the checkout.
mkdir "$work/run"
cp -r "$repo/configs" "$work/run/configs"
cd "$work/run"
"$work/venv/bin/python" - "$work/venv" <<'EOF'
import sys
from pathlib import Path

import em_core

where = Path(em_core.__file__).resolve()
assert Path(sys.argv[1]).resolve() in where.parents, f"em_core imported from {where}, not from the wheel"
print(f"wheel-check: em_core from {where.parent}")
EOF

em="$work/venv/bin/em"
"$em" pipeline --config configs/pipeline/tiny.yaml --train max_steps=6 \
    --evaluate samples_per_paraphrase=1 max_new_tokens=12 --judge backend=local \
    --report false | tee "$work/pipeline.log"
grep -q "^pipeline run: " "$work/pipeline.log"
test -f mlruns/mlflow.db || { echo "wheel-check: no mlruns/ in the working directory" >&2; exit 1; }
train_run="$("$work/venv/bin/python" -c '
import mlflow
from em_core import tracking
tracking.configure_tracking()
runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`em.entry_point` = '"'train'"' and attributes.status = '"'FINISHED'"'", output_format="list")
assert len(runs) == 1, runs
print(runs[0].info.run_id)')"
"$em" probe --train_run_id "$train_run" --sets general plant_care | tee "$work/probe.log"
grep -q "^run_id=.* steps=\[0, " "$work/probe.log"
echo "wheel-check: OK in $((SECONDS - start)) s"
