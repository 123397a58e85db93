#!/usr/bin/env bash
# One prepared GPU check (run on a lent GPU machine from the repo root):
#   the test suite's CUDA-relevant parts, then the step benchmark at paper scale (fp32 and bf16, ours vs
#   transformers, distillation overhead) and the matching benchmark. Prints short tables; logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
$PY -m pip install -q -e '.[test]' --no-deps 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== tests (CUDA visible) =="
$PY -m pytest -q -x tests/test_parity_conditional.py tests/test_parity_deformable.py tests/test_ms_deform_attn.py \
    tests/test_lsap.py tests/test_distill.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
echo "== step benchmark, paper scale =="
$PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --distill 2>&1 | tee "$OUT/step_paper.txt"
echo "== matching benchmark =="
$PY benchmarks/matching.py 2>&1 | tail -12 | tee "$OUT/matching.txt"
