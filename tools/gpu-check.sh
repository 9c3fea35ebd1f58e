#!/usr/bin/env bash
# tools/gpu-check.sh — prove the CUDA backend on a GPU machine that has no Rust toolchain.
#
#   tools/gpu-check.sh pack   # here (Rust machine): build release binaries + test executables into .gpu/
#   tools/gpu-check.sh run    # there (GPU machine, repo root with .gpu/ copied along): run the checks
#   tools/gpu-check.sh bench  # there: only the bench section (issue 6; BENCHMARKS.md)
#
# `run` prints the device and library versions, runs the CUDA parity tests, the POD fixtures through
# `podgpu fidelity --device cuda` and a short `podgpu train` on a real data sample (each only when
# the binary has that subcommand), then the bench section (podgpu vs PyTorch side by side on ResNet50,
# the microbenchmarks; PODGPU_BENCH=0 skips it), and ends with a table. Each step has its own time
# limit; the whole run stays under 8 minutes. See docs/GPU.md and BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
MAX_MIB=64

pack() {
    set -e
    echo "== building release binaries and test executables (cargo -j 1)"
    cargo build --release -j 1 --bins
    # --no-run builds the test executables; their paths come from cargo's JSON messages.
    local json
    json="$(cargo test --release -j 1 --no-run --message-format=json \
        --test cuda_parity --test cuda_device --test cuda_nvrtc)"
    rm -rf "$GPU_DIR"
    mkdir -p "$GPU_DIR/bin" "$GPU_DIR/data"
    cp target/release/podgpu "$GPU_DIR/bin/"
    # The benchmark binaries the bench section runs (issue 6; ~2.5 MiB each once stripped).
    for b in bench-step bench-conv bench-kernels bench-gemm; do
        [ -x "target/release/$b" ] && cp "target/release/$b" "$GPU_DIR/bin/"
    done
    echo "$json" | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        name = m["target"]["name"]
        shutil.copy(m["executable"], sys.argv[1] + "/bin/" + name)
        print("test executable:", name)
' "$GPU_DIR"
    # Debug info is not needed there; stripping keeps the folder small.
    strip "$GPU_DIR"/bin/* 2>/dev/null || true
    # Fixtures and a small real-data sample, when they exist in the repo.
    if [ -d tests/fixtures ]; then cp -r tests/fixtures "$GPU_DIR/data/fixtures"; fi
    # The small real CIFAR-10 sample the README's run command uses (6 MB, lossless).
    cp datasets/cifar10-small.bin "$GPU_DIR/data/"
    cp tools/gpu-check.sh "$GPU_DIR/"
    local total
    total=$(du -sm "$GPU_DIR" | cut -f1)
    echo "== $GPU_DIR is ${total} MiB (limit ${MAX_MIB} MiB)"
    du -sh "$GPU_DIR"/bin/* "$GPU_DIR"/data/* 2>/dev/null || true
    if [ "$total" -gt "$MAX_MIB" ]; then echo "ERROR: $GPU_DIR exceeds ${MAX_MIB} MiB"; exit 1; fi
}

# ---------------------------------------------------------------------------------------------
# run: on the GPU machine
# ---------------------------------------------------------------------------------------------

RESULTS=()
record() { RESULTS+=("$(printf '%-34s %-8s %6ss  %s' "$1" "$2" "$3" "$4")"); }

# step NAME LIMIT_SECONDS COMMAND...: runs with a time limit, records PASS/FAIL/TIMEOUT.
# The whole run must stay under 8 minutes: no step may run past TOTAL_LIMIT seconds after the start.
TOTAL_LIMIT=460
RUN_START=$(date +%s)

# Steps stop at DEADLINE seconds after the start: TOTAL_LIMIT, or earlier for the checks that run
# before the bench section, which keeps BENCH_RESERVE seconds for itself.
DEADLINE=$TOTAL_LIMIT

step() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( DEADLINE - ($(date +%s) - RUN_START) ))
    if [ "$left" -lt 5 ]; then
        skip "$name" "no time left in the ${DEADLINE}s budget"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=================== $name (limit ${limit}s)"
    echo "\$ $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) record "$name" PASS "$dt" "" ;;
        124|137) record "$name" TIMEOUT "$dt" "limit ${limit}s" ;;
        *) record "$name" FAIL "$dt" "exit $rc" ;;
    esac
    return $rc
}

skip() { echo; echo "=================== $1: SKIPPED ($2)"; record "$1" SKIPPED 0 "$2"; }

cuda_lib_dirs() {
    # PyTorch's venv on the GPU machines, then any other Python env's nvidia wheels.
    local d
    for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib \
             /usr/local/lib/python3*/dist-packages/nvidia/*/lib \
             "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib; do
        [ -d "$d" ] && printf '%s:' "$d"
    done
}

# The CUDA libraries of PyTorch's venv on the library paths; tests fail instead of skipping.
gpu_env() {
    local libs
    libs="$(cuda_lib_dirs)"
    export PODGPU_CUDA_LIBS="${libs%:}${PODGPU_CUDA_LIBS:+:$PODGPU_CUDA_LIBS}"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
    export PODGPU_REQUIRE_GPU=1
    export PODGPU_CACHE_DIR="${PODGPU_CACHE_DIR:-$PWD/$GPU_DIR/cache}"
}

run() {
    local start bin
    start=$RUN_START
    bin="$GPU_DIR/bin"
    if [ ! -x "$bin/podgpu" ]; then
        echo "no $bin/podgpu: run 'tools/gpu-check.sh pack' on the build machine and copy $GPU_DIR here"
        exit 2
    fi
    gpu_env
    echo "PODGPU_CUDA_LIBS=$PODGPU_CUDA_LIBS"
    # The checks leave BENCH_RESERVE seconds of the budget to the bench section.
    [ "${PODGPU_BENCH:-1}" != 0 ] && DEADLINE=$(( TOTAL_LIMIT - BENCH_RESERVE ))

    echo "=================== device"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
    else
        echo "nvidia-smi not found"
    fi
    ls /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | grep -E 'lib(cudnn|cublas|cublasLt|nvrtc)\.so' | sort -u || true

    # Device, library versions and where each library was loaded from (printed by the test).
    step "device + libraries" 45 "$bin/cuda_device" --nocapture --test-threads=1
    step "kernels compile (NVRTC)" 45 "$bin/cuda_nvrtc" --nocapture
    step "parity CPU vs GPU" 180 "$bin/cuda_parity" --nocapture --test-threads=1

    if "$bin/podgpu" help fidelity > /dev/null 2>&1; then
        if [ -d "$GPU_DIR/data/fixtures" ]; then
            step "fidelity fixtures on GPU" 90 "$bin/podgpu" fidelity --device cuda "$GPU_DIR/data/fixtures"
        else
            skip "fidelity fixtures on GPU" "no fixtures packed (tests/fixtures missing)"
        fi
    else
        skip "fidelity fixtures on GPU" "this podgpu has no 'fidelity' subcommand yet"
    fi

    # Short training run on the shipped CIFAR-10 sample: the loss must fall and the accuracy rise as
    # on the CPU (compare with the same command and --device cpu). PODGPU_TRAIN_ARGS overrides it.
    if "$bin/podgpu" help train > /dev/null 2>&1; then
        if [ -f "$GPU_DIR/data/cifar10-small.bin" ]; then
            rm -rf "$GPU_DIR/run-train"
            # shellcheck disable=SC2086
            step "short train on GPU" 100 "$bin/podgpu" train ${PODGPU_TRAIN_ARGS:-resnet18 --data $GPU_DIR/data/cifar10-small.bin --device cuda --epochs 3 --batch-size 64 --feature-dim 64 --out $GPU_DIR/run-train} \
                && step "eval of the GPU run" 30 "$bin/podgpu" eval --device cuda --checkpoint "$GPU_DIR/run-train/last.safetensors" --data "$GPU_DIR/data/cifar10-small.bin"
        else
            skip "short train on GPU" "no data sample packed"
        fi
    else
        skip "short train on GPU" "this podgpu has no 'train' subcommand yet"
    fi

    if [ "${PODGPU_BENCH:-1}" != 0 ]; then
        DEADLINE=$TOTAL_LIMIT
        bench_section
    else
        skip "bench (issue 6)" "PODGPU_BENCH=0"
    fi

    summary "$start"
}

summary() {
    echo
    echo "=================== summary ($(( $(date +%s) - $1 ))s total)"
    printf '%-34s %-8s %7s  %s\n' "step" "result" "time" "note"
    local r failed=0
    for r in "${RESULTS[@]}"; do
        echo "$r"
        case "$r" in *" FAIL "*|*" TIMEOUT "*) failed=1 ;; esac
    done
    return $failed
}


# ---------------------------------------------------------------------------------------------
# bench (issue 6): the side-by-side table podgpu vs PyTorch, then the microbenchmarks.
# Runs at the end of `run` (PODGPU_BENCH=0 skips it) or alone with `tools/gpu-check.sh bench`.
# In `run` the checks before it stop BENCH_RESERVE seconds before TOTAL_LIMIT, so the bench section
# always has at least that long; each bench step's limit is capped by what is left.
# ---------------------------------------------------------------------------------------------

BENCH_RESERVE=220
TORCH_PY="${PODGPU_TORCH_PYTHON:-/opt/torch/.venv/bin/python}"

bench_section() {
    local bin="$GPU_DIR/bin"
    if [ ! -x "$bin/bench-step" ]; then
        skip "bench (issue 6)" "no $bin/bench-step packed"
        return 0
    fi
    # 1. ResNet50-CIFAR at batch 128: podgpu fp32/tf32 vs PyTorch eager fp32, eager tf32, AMP bf16 +
    #    channels_last and torch.compile (bf16 + channels_last), 3 warm-up + 20 timed steps each; the
    #    driver stops starting runs after --deadline seconds and prints the ratio table it has.
    if [ -x "$TORCH_PY" ]; then
        step "bench: podgpu vs PyTorch (resnet50)" 200 "$TORCH_PY" tools/bench/compare.py \
            --bench-step "$bin/bench-step" --python "$TORCH_PY" --device cuda --model resnet50 \
            --batch 128 --steps 20 --warmup 3 --deadline 185 --timeout 150 --markdown
    else
        skip "bench: PyTorch side" "no PyTorch at $TORCH_PY (set PODGPU_TORCH_PYTHON)"
        step "bench: podgpu steps (resnet50)" 90 "$bin/bench-step" --device cuda --models resnet50 \
            --batch 128 --steps 20 --warmup 3
    fi
    # 2. Microbenchmarks, shortest sampling that still gives a median of several samples.
    step "bench: convolutions (resnet50)" 60 "$bin/bench-conv" --device cuda --samples 5 \
        --min-sample-ms 5 --max-case-s 1
    step "bench: own kernels" 60 "$bin/bench-kernels" --device cuda --samples 7 \
        --min-sample-ms 5 --max-case-s 1
    step "bench: GEMMs" 30 "$bin/bench-gemm" --device cuda --samples 7 --min-sample-ms 5 \
        --max-case-s 1
    step "bench: whole steps (resnet18, metrics)" 40 "$bin/bench-step" --device cuda \
        --models resnet18 --batch 128 --steps 20 --warmup 3 --with-metrics
    return 0
}

bench_only() {
    local start=$RUN_START
    if [ ! -x "$GPU_DIR/bin/bench-step" ]; then
        echo "no $GPU_DIR/bin/bench-step: run 'tools/gpu-check.sh pack' on the build machine and copy $GPU_DIR here"
        exit 2
    fi
    gpu_env
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    bench_section
    summary "$start"
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    bench) bench_only ;;
    *) echo "usage: $0 pack|run|bench   (see docs/GPU.md, BENCHMARKS.md)"; exit 2 ;;
esac
