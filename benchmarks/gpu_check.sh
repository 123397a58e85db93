#!/usr/bin/env bash
# The prepared GPU check, run on a lent GPU machine from the repo root:
#   bash benchmarks/gpu_check.sh [tests] [tests-compiled] [bf16] [b8] [nolt] [step] [distill] [profile]
#                                [profile-distill] [layout]
#                                [matching] [compile] [distill-compile] [kd]
#   (stages run in this order; default: tests step distill layout matching compile kd)
# tests     the CUDA tests (tests/test_gpu.py), all but the compiled-step test, in two pytest runs: first those of
#           CUDA graphs (the teacher's forward, the student's training step: replays equal to eager, a DETRDistill
#           step and a trial with both; TESTS_GRAPH_TIMEOUT, default 120 s), then the rest (CUDA == CPU forward
#           and KD terms, bf16 steps, teacher run-ahead and thread, a whole amp trial, no host waits in a
#           distillation step or a trial's epoch under CUDA's sync check; TESTS_TIMEOUT, default 150 s); each
#           log ends with its slowest tests
# tests-compiled  the compiled-step test (inductor), one family per pytest run, each with its own limit (~1.5-3
#           min each: two input shapes compile)
# bf16      benchmarks/step.py at paper scale, ours only: fp32, bf16 (the engine's: bf16 weight copies, no cuDNN
#           attention) and bf16-ln (the engine's bf16 with schedule.amp_layer_norm bfloat16: LayerNorm returning
#           bf16, a bf16 residual stream, no cast of its outputs before each bf16 matrix product), timed
#           interleaved, each / fp32 (~1 min; BF16_TIMEOUT, default 120 s); then, in a process of its own (a CUDA
#           error of a graph sticks to its process), fp32 beside the three with the training forward and
#           backward replayed from CUDA graphs (-graph: runtime.cuda_graph; the host then issues only losses,
#           matching and optimizer): fp32-graph / fp32 and bf16*-graph / fp32-graph (~1.5 min; BF16_GRAPH_TIMEOUT,
#           default 120 s). bf16-cudnn-sdp and bf16-nhwc, measured on 2026-11-27, did not help (--dtypes takes them)
# b8        Conditional DETR at batch 8 (scale paper_b8, fp32 / bf16 / bf16-ln, ~40 s): a batch-2 step waits on its
#           host's launches, the same in both dtypes, so does bf16 win once the GPU has the work?
# nolt      as bf16 (fp32 and bf16, Conditional DETR and AdaMixer) with DISABLE_ADDMM_CUDA_LT=1: PyTorch's
#           addmm (every Linear with a bias) then uses cuBLAS without cuBLASLt's epilogue, whose per-call
#           set-up may be host time a host-bound bf16 step pays (2026-11-27's profile: aten::addmm's own host
#           time 38 us a call fp32, 53 us bf16) - a question for the host, answered by the ratio
# profile   benchmarks/profile_step.py: student steps' GPU busy time / wall time and top kernels, fp32 and bf16
# profile-distill  the same for the DETRDistill step run ahead (Conditional DETR, Deformable DETR; fp32,
#           bf16-ln): how busy the GPU is, and the host's waits among its top operators (~2 min)
# step      benchmarks/step.py at paper scale: ours vs transformers, fp32 and bf16
# distill   benchmarks/step.py --distill at paper scale: distillation step vs the floor, first with CUDA graphs
#           (DISTILL_GRAPH_DTYPES, default bf16-graph: the student's step and the teacher's forward replayed,
#           runtime.cuda_graph and teacher_cuda_graph; an eager dtype there, e.g. bf16, gets "graphed" rows:
#           the teacher's forward alone graphed) (~2 min; DISTILL_GRAPH_TIMEOUT, default 200 s); then
#           benchmarks/gil_threads.py --solve: 12 assignments solved on the pool's threads alone and beside a
#           thread dispatching CUDA operators, with the interpreter's switch interval at 5 ms and 0.1 ms (is the
#           in-step KD solve, 36-53 ms on 2026-11-27's H200, slowed by waits for the GIL?); then the table eager
#           (DISTILL_DTYPES, default bf16, the engine's amp on CUDA; fp32 was 1.07-1.20 on 2026-11-27), in line,
#           run ahead (the engine's CUDA default) and with the teacher on a helper thread (overlap_teacher
#           thread) (~1.5 min; DISTILL_TIMEOUT, default 200 s). DISTILL_SWITCH (e.g. 0.0001) sets the
#           interpreter's switch interval for both tables (step.py --switch-interval)
# layout    our steps again with channels_last backbones (does bf16 then beat fp32 where it did not?)
# matching  benchmarks/matching.py with the host's cores
# compile   ours through torch.compile as the engine's runtime.compile does (COMPILE_FAMILIES, default Conditional
#           DETR; COMPILE_DTYPES, default fp32 bf16 bf16-nhwc); the first step, compiling (~75 s a graph on an
#           H200's host), is reported apart. 2026-11-27: compiled bf16 / fp32 = 1.11 for Conditional DETR; does
#           a channels_last backbone (no cuDNN NCHW<->NHWC transposes around each bf16 convolution) change that?
# distill-compile  the distillation table with --compile (student and teacher compiled, as runtime.compile),
#           bf16 (the engine's dtype on CUDA): with the host no longer the bottleneck, does the KD overhead hide?
# kd        experiments/synthetic_kd.yaml through benchmarks/run_local.py (teacher, then 10 students at once)
# Each stage has its own time limit and writes its log under $OUT, so one that fails or runs long loses
# nothing of the others. All stages together take far longer than one 10-minute device call; with a
# 15-minute device budget (a machine's start takes ~45 s of it) run `tests bf16 distill` first (timeout_s
# 560: the CUDA tests ~2.5 min, the CUDA-graph tests first, then the rest, among them the sync-debug-mode
# checks of a distillation step; bf16 vs fp32 eager, then graphed, ~2.5 min, bf16-ln being the engine's amp
# with amp_layer_norm bfloat16 (#2); the distillation tables, bf16-graph then eager bf16 with the solve beside
# a dispatching thread (gil_threads --solve, ~15 s) between them, ~3.5 min, with the columns `thread`
# (overlap_teacher "thread"), `landed` / `waited` (the KD assignment's timing) and `alone` / `serial` (the
# step's KD problems solved again with nothing else running: is the in-step solve slowed by the step's other
# threads?)), then `profile nolt` (~3 min) or
# `tests-compiled` with what is left, on the still warm machine. The header's `numba` says whether the
# parallel assignment solver runs there (else scipy, one problem after another). Needs no network: pydantic
# and pycocotools travel as wheels in .whl/ (see docs/performance.md).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=${*:-tests step distill layout matching compile kd}
has() { [[ " $stages " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s since start) =="; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import os, torch, torchvision, transformers; from trainers import lsap; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'cpus', os.cpu_count(), 'torch threads', torch.get_num_threads(), 'OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS'), 'numba (the parallel assignment solver)', lsap.available() and lsap._numba.__version__)" | tee -a "$OUT/gpu.txt"
cuda_tests() {  # cuda_tests LOG LIMIT FILTER: the CUDA tests of tests/test_gpu.py that FILTER (-k) selects
    timeout "$2" $PY -m pytest -q -p no:cacheprovider -m gpu -rf --durations=8 -k "$3" tests/test_gpu.py \
        > "$OUT/$1" 2>&1 || echo "$1: exit $?"
    grep -E "^(FAILED|ERROR)|passed|failed|^E " "$OUT/$1" | cut -c1-600 | head -40
}
distill_table() {  # distill_table NAME LIMIT DTYPES [step.py options]: step.py's distillation table at paper scale
    local name=$1 limit=$2 dtypes=$3; shift 3
    timeout "$limit" $PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --distill-only \
        --threads "$(nproc)" ${DISTILL_SWITCH:+--switch-interval $DISTILL_SWITCH} "$@" \
        --dtypes $dtypes --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
}
if has tests; then
    # the CUDA-graph tests first, in a run of their own: never run on a GPU before 2026-11-28, and what the bf16
    # and distill stages' -graph rows stand on; then the rest, so that a limit reached by one leaves the other's
    stamp "tests: CUDA graphs"
    cuda_tests tests-graph.txt ${TESTS_GRAPH_TIMEOUT:-120} "graph and not compiled"
    stamp "tests: the rest"
    cuda_tests tests.txt ${TESTS_TIMEOUT:-150} "not graph and not compiled"
fi
if has tests-compiled; then
    stamp "compiled-step CUDA tests"
    # the compiled-step tests (inductor: ~1 min of compiling each) one family a run, each with its own limit, so
    # that one running long cannot take the others' results (or the failure report) with it
    for family in conditional_detr deformable_detr adamixer; do
        timeout ${TESTS_COMPILE_TIMEOUT:-180} $PY -m pytest -q -p no:cacheprovider -m gpu -rf \
            -k "compiled and $family" tests/test_gpu.py > "$OUT/tests-compiled-$family.txt" 2>&1 \
            || echo "compiled $family: exit $?"
        grep -E "^(FAILED|ERROR)|passed|failed|^E " "$OUT/tests-compiled-$family.txt" | cut -c1-400
    done
fi
if has bf16; then
    stamp "bf16 vs fp32, paper scale, ours only (interleaved)"
    timeout ${BF16_TIMEOUT:-120} $PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --ours-only \
        --dtypes fp32 bf16 bf16-ln --json "$OUT/bf16.json" 2>&1 | tee "$OUT/bf16.txt"
    # apart: a graph that went wrong (a CUDA error that sticks to the process) cannot take the eager rows with it
    stamp "the same replayed from CUDA graphs (runtime.cuda_graph), beside eager fp32"
    timeout ${BF16_GRAPH_TIMEOUT:-120} $PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --ours-only \
        --dtypes fp32 fp32-graph bf16-graph bf16-ln-graph --json "$OUT/bf16_graph.json" 2>&1 | tee "$OUT/bf16_graph.txt"
fi
if has b8; then
    stamp "bf16 vs fp32 at batch 8, Conditional DETR (the same launches, four times the GPU work)"
    timeout 90 $PY benchmarks/step.py --scale paper_b8 --steps 6 --warmup 2 --ours-only --families conditional_detr \
        --dtypes fp32 bf16 bf16-ln --json "$OUT/bf16_b8.json" 2>&1 | tee "$OUT/bf16_b8.txt"
fi
if has nolt; then
    stamp "bf16 vs fp32 as the bf16 stage, with addmm's cuBLASLt path off (DISABLE_ADDMM_CUDA_LT=1)"
    DISABLE_ADDMM_CUDA_LT=1 timeout 120 $PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --ours-only \
        --families conditional_detr adamixer --dtypes fp32 bf16 --json "$OUT/nolt.json" 2>&1 | tee "$OUT/nolt.txt"
fi
if has step; then
    stamp "step benchmark, paper scale"
    timeout 240 $PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --json "$OUT/step.json" 2>&1 | tee "$OUT/step.txt"
fi
if has distill; then
    # torch threads (and so the KD solve's) = the host's CPUs, as a trial given the whole 1-GPU machine
    # (resources.cpus_per_trial) runs; "serial" in the table is the solve on one thread. The graphed table
    # first (in a process of its own: a CUDA error of a graph sticks to its process): #3's open question
    stamp "distillation step vs floor, paper scale, with CUDA graphs (the student's step and the teacher's forward)"
    distill_table distill_graph ${DISTILL_GRAPH_TIMEOUT:-200} "${DISTILL_GRAPH_DTYPES:-bf16-graph}" --teacher-graph
    stamp "the KD solve beside a dispatching thread; two threads issuing CUDA operators vs one (overlap_teacher thread)"
    timeout 90 $PY benchmarks/gil_threads.py --device cuda --sizes 4 65536 --solve 2>&1 | tee "$OUT/gil.txt"
    stamp "distillation step vs floor, paper scale, eager"
    distill_table distill ${DISTILL_TIMEOUT:-200} "${DISTILL_DTYPES:-bf16}"
fi
if has profile; then
    stamp "where a student step's time goes, paper scale (GPU busy / wall, top kernels)"
    timeout 120 $PY benchmarks/profile_step.py --scale paper --families conditional_detr adamixer \
        --dtypes fp32 bf16 bf16-ln 2>&1 | grep -v "^USDT\|^ERROR:.*gpuGetDeviceCount" | tee "$OUT/profile.txt"
fi
if has profile-distill; then
    stamp "where a DETRDistill step's time goes (run ahead, as the engine on CUDA), paper scale"
    timeout 150 $PY benchmarks/profile_step.py --scale paper --mode distill_ahead \
        --families conditional_detr deformable_detr --dtypes fp32 bf16-ln 2>&1 \
        | grep -v "^USDT\|^ERROR:.*gpuGetDeviceCount" | tee "$OUT/profile-distill.txt"
fi
if has layout; then
    stamp "step benchmark, paper scale, channels_last backbones (ours only)"
    timeout 150 $PY benchmarks/step.py --scale paper --steps 10 --warmup 3 --channels-last --ours-only \
        --json "$OUT/layout.json" 2>&1 | tee "$OUT/layout.txt"
fi
if has matching; then
    stamp "matching benchmark"
    timeout 120 $PY benchmarks/matching.py --threads "$(nproc)" 2>&1 | tail -12 | tee "$OUT/matching.txt"
fi
if has compile; then
    stamp "step benchmark, paper scale, torch.compile (ours only)"
    timeout ${COMPILE_TIMEOUT:-360} $PY benchmarks/step.py --scale paper --steps 10 --warmup 2 --compile --ours-only \
        --families ${COMPILE_FAMILIES:-conditional_detr} --dtypes ${COMPILE_DTYPES:-fp32 bf16 bf16-nhwc} \
        --json "$OUT/compile.json" 2>&1 | tee "$OUT/compile.txt"
fi
if has distill-compile; then
    stamp "distillation step vs floor, paper scale, torch.compile (student and teacher), bf16"
    timeout ${DISTILL_COMPILE_TIMEOUT:-240} $PY benchmarks/step.py --scale paper --steps 10 --warmup 2 --compile \
        --distill-only --dtypes bf16 --families ${DISTILL_COMPILE_FAMILIES:-conditional_detr adamixer deformable_detr} \
        --json "$OUT/distill_compile.json" 2>&1 | tee "$OUT/distill_compile.txt"
fi
if has kd; then
    stamp "synthetic KD experiment"
    timeout ${KD_TIMEOUT:-420} $PY benchmarks/run_local.py experiments/synthetic_kd.yaml --parallel 11 --threads 1 \
        --store /tmp/runs --json "$OUT/kd.json" 2>&1 | tee "$OUT/kd.txt" | grep -v "^  \[" 
    grep "^  \[" "$OUT/kd.txt" | tail -30
fi
stamp done
