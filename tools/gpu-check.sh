#!/usr/bin/env bash
# tools/gpu-check.sh — prove the CUDA backend on a GPU machine that has no Rust toolchain.
#
# Here (the Rust machine):
#   tools/gpu-check.sh pack     build the release binaries and the CUDA test executables into the
#                               git-ignored .gpu/bin, and check that what the device tool uploads
#                               (tracked + untracked-not-ignored files + .gpu) fits in 64 MiB
#   tools/gpu-check.sh size     only that size check
# There (the GPU machine, repository root, .gpu/ carried along), as two separate calls:
#   bash tools/gpu-check.sh checks   ≤ 4 min: device and library report, NVRTC compile, every parity
#                                    test, every fixture on the GPU, a short `podgpu train` + `eval`
#   bash tools/gpu-check.sh bench    ≤ 5 min: podgpu vs PyTorch side by side, the microbenchmarks
#   bash tools/gpu-check.sh run      both, one after the other
#
# Each writes its whole log and a JSON summary into $PODGPU_GPU_RESULTS (default .gpu/results;
# point it at the device tool's $OUT): checks.log + checks.json (+ train-metrics.jsonl),
# bench.log + bench.json (+ compare.json). Steps are PASS, FAIL, TIMEOUT, SKIPPED or NO-DEVICE.
# Exit status: 0 every step passed; 1 a step failed or timed out; 2 nothing packed / bad usage;
# 3 no GPU here (every step that needs none passed, every GPU step said NO-DEVICE) — the no-GPU
# rehearsal in .ci/run expects exactly 3. See docs/GPU.md.
#
# Variables: PODGPU_GPU_RESULTS (results folder), PODGPU_CHECKS_BUDGET_S / PODGPU_BENCH_BUDGET_S
# (lower the 240 s / 300 s totals when less device time is left; never raised), PODGPU_TRAIN_ARGS
# (replaces the short train's arguments), PODGPU_TORCH_PYTHON (PyTorch for the bench),
# PODGPU_CACHE_DIR (PTX cache, default .gpu/cache).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
SELF="$ROOT/tools/gpu-check.sh"
GPU_DIR=.gpu
BIN="$GPU_DIR/bin"
MAX_MIB=64
EXIT_NO_DEVICE=3
CHECKS_BUDGET=240
BENCH_BUDGET=480
CIFAR_BUDGET=240
FOLLOWUP_BUDGET=420
AB_BUDGET=300
TEST_BINS=(cuda_device cuda_nvrtc cuda_parity cuda_nccl)
# Everything is packed with NCCL (issue 16; loaded at run time, no MPI needed): `podgpu device --env`
# then also exports its libnccl.so link, and cuda_nccl exists only with the feature.
PACK_FEATURES=nccl
BENCH_BINS=(bench-step bench-conv bench-kernels bench-gemm)
TORCH_PY="${PODGPU_TORCH_PYTHON:-/opt/torch/.venv/bin/python}"

# ---------------------------------------------------------------------------------------------
# pack / size: on the Rust machine
# ---------------------------------------------------------------------------------------------

bytes_of_files() { # NUL-separated paths on stdin -> total apparent size in bytes
    local total=0 f s
    while IFS= read -r -d '' f; do
        s=$(stat -c %s -- "$f" 2>/dev/null) || continue   # a tracked file deleted here uploads nothing
        total=$((total + s))
    done
    echo "$total"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# What the device tool uploads: tracked + untracked-not-ignored files, a git-ignored shared/ folder
# inside the checkout (it travels too), and the carried .gpu/. Prints it; fails above the limit.
size() {
    local tree shared=0 gpu=0 total limit=$((MAX_MIB * 1048576))
    tree=$(git ls-files -z -co --exclude-standard | bytes_of_files)
    if [ -d shared ] && git check-ignore -q shared; then
        shared=$(find shared -type f -print0 | bytes_of_files)
    fi
    [ -d "$GPU_DIR" ] && gpu=$(find "$GPU_DIR" -type f -print0 | bytes_of_files)
    total=$((tree + shared + gpu))
    echo "== upload: tracked + untracked files $(mib "$tree") MiB$([ "$shared" -gt 0 ] && echo " + shared/ $(mib "$shared") MiB") + $GPU_DIR $(mib "$gpu") MiB = $(mib "$total") MiB (limit $MAX_MIB MiB, $(mib $((limit - total))) MiB to spare)"
    if [ "$total" -gt "$limit" ]; then
        echo "ERROR: the upload exceeds $MAX_MIB MiB; the device tool would refuse it"
        return 1
    fi
}

pack() {
    set -e
    local jobs="${CARGO_BUILD_JOBS:-1}" json b f
    echo "== building release binaries and the CUDA test executables (cargo -j $jobs)"
    cargo build --release -j "$jobs" --features "$PACK_FEATURES" --bins
    # --no-run builds the test executables; their paths come from cargo's JSON messages.
    json="$(cargo test --release -j "$jobs" --features "$PACK_FEATURES" --no-run --message-format=json \
        --test cuda_parity --test cuda_device --test cuda_nvrtc --test cuda_nccl)"
    rm -rf "$GPU_DIR"
    mkdir -p "$BIN"
    cp target/release/podgpu "$BIN/"
    # The cifar and followup calls carry the JPEG tree, which does not fit beside every test and
    # benchmark executable: their pack keeps the ones the followup call uses (docs/GPU.md, call 3).
    local cifar="${PODGPU_PACK_CIFAR:-0}" bench_bins=("${BENCH_BINS[@]}") test_bins=("${TEST_BINS[@]}")
    if [ "$cifar" = 1 ]; then
        bench_bins=(bench-step bench-kernels)
        test_bins=(cuda_parity)
    fi
    for b in "${bench_bins[@]}"; do
        if [ -x "target/release/$b" ]; then cp "target/release/$b" "$BIN/"; fi
    done
    echo "$json" | python3 -c '
import json, sys, shutil
wanted = set(sys.argv[2:])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"] \
            and m["target"]["name"] in wanted:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
' "$BIN" "${test_bins[@]}"
    for b in "${test_bins[@]}"; do
        [ -f "$BIN/$b" ] || { echo "ERROR: test executable $b was not built"; exit 1; }
    done
    # Line tables are not needed there; the symbols stay, so backtraces name functions.
    strip --strip-debug "$BIN"/*
    # Sources the binaries were built from: the device run checks them (stale binaries = FAIL), and
    # reads fixtures and data from their repository paths (tests/fixtures, datasets/), not from .gpu.
    git ls-files -co --exclude-standard -- src cuda tests Cargo.toml Cargo.lock build.rs \
        | while IFS= read -r f; do if [ -f "$f" ]; then sha256sum -- "$f"; fi; done \
        > "$GPU_DIR/sources.sha256"
    {
        echo "commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "dirty=$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo yes || echo no)"
        echo "packed=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "rustc=$(rustc --version 2>/dev/null || echo unknown)"
    } > "$GPU_DIR/MANIFEST"
    # The real CIFAR-10 run of the optional third call (`cifar`): the 18 MB JPEG tree from the shared
    # data folder (the converted .bin is 185 MB, over the upload limit; it is converted there).
    if [ "$cifar" = 1 ]; then
        local src="${PODGPU_SHARED_DATA:-../shared/data}/cifar10-jpeg.tar.xz"
        mkdir -p "$GPU_DIR/data"
        cp "$src" "$GPU_DIR/data/"
        echo "packed $src with podgpu, ${bench_bins[*]} and ${test_bins[*]}, for the cifar and followup calls (pack again without PODGPU_PACK_CIFAR for checks and bench)"
    fi
    set +e
    du -h "$BIN"/* | sort -k2
    if ! size; then
        echo "== stripping the symbols too and measuring again"
        strip "$BIN"/*
        size || exit 1
    fi
}

# ---------------------------------------------------------------------------------------------
# checks / bench: on the GPU machine (and in the no-GPU rehearsal of .ci/run)
# ---------------------------------------------------------------------------------------------

now_ms() { local t="${EPOCHREALTIME//[.,]/}"; echo $((t / 1000)); }
secs() { awk -v m="$1" 'BEGIN { printf "%.1f", m / 1000 }'; }

json_str() { # a JSON string literal of $1
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//$'\n'/\\n}"
    s="${s//$'\r'/\\r}"
    s="${s//$'\t'/\\t}"
    s="$(printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037\177')"
    printf '"%s"' "$s"
}

last_line() { # the last non-empty line of a file, at most 160 characters
    local l
    l="$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1)"
    printf '%s' "${l:0:160}"
}

S_NAME=() S_STATUS=() S_MS=() S_LIMIT=() S_GPU=() S_NOTE=()
FAILED_TESTS=()  # "executable<TAB>test name"
NO_DEVICE=0
NO_DEVICE_REASON=""
DEVICE_LINE="not detected yet"
LIB_REPORT=""
STATUS=RUNNING
EXIT_CODE=null
WORK=""

begin() { # KIND BUDGET
    KIND="$1"
    BUDGET="$2"
    START_MS=$(now_ms)
    START_ISO=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    JSON="$RESULTS/$KIND.json"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    STEP_OUT="$WORK/step.out"
    echo "== tools/gpu-check.sh $KIND on $(uname -n), $START_ISO; budget ${BUDGET}s; results in $RESULTS"
    write_json
}

elapsed_s() { echo $((($(now_ms) - START_MS) / 1000)); }
left_s() { echo $((BUDGET - $(elapsed_s))); }

# record NAME STATUS MS LIMIT GPU(0/1) NOTE
record() {
    S_NAME+=("$1") S_STATUS+=("$2") S_MS+=("$3") S_LIMIT+=("$4") S_GPU+=("$5") S_NOTE+=("$6")
    write_json
}

write_json() {
    local i sep="" manifest=""
    if [ -f "$GPU_DIR/MANIFEST" ]; then
        local k v
        while IFS='=' read -r k v; do
            [ -n "$k" ] && manifest+="$sep$(json_str "$k"): $(json_str "$v")" && sep=", "
        done < "$GPU_DIR/MANIFEST"
        sep=""
    fi
    {
        printf '{\n  "run": %s,\n  "status": %s,\n  "exit_code": %s,\n' "$(json_str "$KIND")" \
            "$(json_str "$STATUS")" "$EXIT_CODE"
        printf '  "started": %s,\n  "seconds": %s,\n  "budget_s": %s,\n  "host": %s,\n' \
            "$(json_str "$START_ISO")" "$(secs $(($(now_ms) - START_MS)))" "$BUDGET" "$(json_str "$(uname -n)")"
        printf '  "device": %s,\n  "library_report": %s,\n  "packed": {%s},\n' \
            "$(json_str "$DEVICE_LINE")" "$(json_str "$LIB_REPORT")" "$manifest"
        printf '  "log": %s,\n  "steps": [' "$(json_str "$KIND.log")"
        for i in "${!S_NAME[@]}"; do
            printf '%s\n    {"name": %s, "status": %s, "seconds": %s, "limit_s": %s, "gpu": %s, "note": %s}' \
                "$sep" "$(json_str "${S_NAME[$i]}")" "$(json_str "${S_STATUS[$i]}")" "$(secs "${S_MS[$i]}")" \
                "${S_LIMIT[$i]}" "$([ "${S_GPU[$i]}" = 1 ] && echo true || echo false)" \
                "$(json_str "${S_NOTE[$i]}")"
            sep=","
        done
        printf '\n  ],\n  "reruns": ['
        sep=""
        for i in "${RERUNS[@]}"; do
            printf '%s\n    %s' "$sep" "$i"
            sep=","
        done
        printf '\n  ],\n  "failed_tests": ['
        sep=""
        for i in "${FAILED_TESTS[@]}"; do
            printf '%s%s' "$sep" "$(json_str "${i/$'\t'/ }")"
            sep=", "
        done
        printf ']\n}\n'
    } > "$JSON.tmp" && mv -f "$JSON.tmp" "$JSON"
}

# run_limited LIMIT CMD...: runs with a time limit, output to the log and to $STEP_OUT;
# sets RL_RC, RL_MS, RL_TIMEOUT (1 when the limit stopped it).
run_limited() {
    local limit="$1" t0
    shift
    echo "\$ $*"
    t0=$(now_ms)
    timeout --kill-after=5 "$limit" "$@" < /dev/null 2>&1 | tee "$STEP_OUT"
    RL_RC=${PIPESTATUS[0]}
    RL_MS=$(($(now_ms) - t0))
    RL_TIMEOUT=0
    if { [ "$RL_RC" = 124 ] || [ "$RL_RC" = 137 ]; } && [ "$RL_MS" -ge $((limit * 1000 - 500)) ]; then
        RL_TIMEOUT=1
    fi
}

# Cap a step's limit by what is left of the budget; 0 when too little is left to start it.
cap() {
    local limit="$1" left
    left=$(left_s)
    if [ "$left" -lt 5 ]; then echo 0; elif [ "$limit" -gt "$left" ]; then echo "$left"; else echo "$limit"; fi
}

header() { echo; echo "=================== $1"; }

# Says why a step does not run, in one line, and records it.
not_run() { # NAME STATUS GPU NOTE [LIMIT]
    header "$1: $2 ($4)"
    record "$1" "$2" 0 "${5:-0}" "$3" "$4"
}

rc_note() {
    local rc="$1"
    case "$rc" in
        126) echo "exit 126 (not executable)" ;;
        127) echo "exit 127 (command not found)" ;;
        134) echo "aborted (SIGABRT)" ;;
        137) echo "killed (SIGKILL)" ;;
        139) echo "segmentation fault (SIGSEGV)" ;;
        *) if [ "$rc" -gt 128 ]; then echo "killed by signal $((rc - 128))"; else echo "exit $rc"; fi ;;
    esac
}

# step NAME LIMIT GPU CMD...: one command with a time limit; PASS / FAIL / TIMEOUT.
step() {
    local name="$1" limit="$2" gpu="$3" pass_note="${STEP_NOTE:-}"
    shift 3
    STEP_NOTE=""
    if [ "$gpu" = 1 ] && [ "$NO_DEVICE" = 1 ]; then
        not_run "$name" NO-DEVICE 1 "no GPU: $NO_DEVICE_REASON" "$limit"
        return 1
    fi
    limit=$(cap "$limit")
    if [ "$limit" = 0 ]; then
        not_run "$name" TIMEOUT "$gpu" "not started: the ${BUDGET}s budget is used up"
        return 1
    fi
    header "$name (limit ${limit}s)"
    run_limited "$limit" "$@"
    if [ "$RL_TIMEOUT" = 1 ]; then
        record "$name" TIMEOUT "$RL_MS" "$limit" "$gpu" "stopped at ${limit}s; last line: $(last_line "$STEP_OUT")"
    elif [ "$RL_RC" = 0 ]; then
        record "$name" PASS "$RL_MS" "$limit" "$gpu" "$pass_note"
    else
        record "$name" FAIL "$RL_MS" "$limit" "$gpu" "$(rc_note "$RL_RC"): $(last_line "$STEP_OUT")"
    fi
    [ "$RL_RC" = 0 ]
}

# test_step NAME LIMIT GPU EXECUTABLE [VAR=VALUE...] -- LIBTEST ARGS...
# Runs a test executable; lists the failed tests (for the reruns), and when the executable crashes
# (no "test result:" line) names the test that was running and goes on with the tests after it.
test_step() {
    local name="$1" limit="$2" gpu="$3" exe="$4"
    shift 4
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    local path="$BIN/$exe"
    if [ "$gpu" = 1 ] && [ "$NO_DEVICE" = 1 ]; then
        not_run "$name" NO-DEVICE 1 "no GPU: $NO_DEVICE_REASON" "$limit"
        return 1
    fi
    if [ ! -x "$path" ]; then
        not_run "$name" FAIL "$gpu" "$path is not packed"
        return 1
    fi
    limit=$(cap "$limit")
    if [ "$limit" = 0 ]; then
        not_run "$name" TIMEOUT "$gpu" "not started: the ${BUDGET}s budget is used up"
        return 1
    fi
    header "$name (limit ${limit}s)"
    local t0 status=PASS failed=() crashed=() filters=() rounds=0 left summary=""
    t0=$(now_ms)
    while :; do
        left=$((limit - ($(now_ms) - t0) / 1000))
        if [ "$left" -lt 3 ]; then status=TIMEOUT; summary="no time left to go on after the crash"; break; fi
        run_limited "$left" env "${envs[@]}" "$path" "${filters[@]}" "$@"
        rounds=$((rounds + 1))
        # Failed tests: libtest's list after the last "failures:" when it got to its summary, else
        # (a crash or a timeout) every test whose result line says FAILED.
        local t
        while IFS= read -r t; do
            [ -n "$t" ] && failed+=("$t") && FAILED_TESTS+=("$exe"$'\t'"$t")
        done < <(awk '/^test [^ ]+ \.\.\. / { cur = $2; if ($0 ~ / FAILED$/ && !(cur in f)) { f[cur] = 1; s[m++] = cur }; next }
                      /^FAILED$/ && cur != "" && !(cur in f) { f[cur] = 1; s[m++] = cur }
                      /^failures:$/ { n = 0; inblk = 1; next }
                      inblk && /^    [^ ]+$/ { a[n++] = $1; next }
                      inblk && /^test result:/ { inblk = 0; done = 1 }
                      END { if (done) for (i = 0; i < n; i++) print a[i]; else for (i = 0; i < m; i++) print s[i] }' "$STEP_OUT")
        if grep -q '^test result:' "$STEP_OUT"; then
            [ "$RL_RC" = 0 ] || status=FAIL
            break
        fi
        if [ "$RL_TIMEOUT" = 1 ]; then
            status=TIMEOUT
            summary="stopped at ${limit}s in $(sed -n 's/^test \([^ ]*\) \.\.\. .*/\1/p' "$STEP_OUT" | tail -n 1)"
            break
        fi
        if [ "$RL_RC" = 0 ]; then break; fi
        # Crashed: the last test started is the one that was running.
        status=FAIL
        local cur
        cur="$(sed -n 's/^test \([^ ]*\) \.\.\. .*/\1/p' "$STEP_OUT" | tail -n 1)"
        if [ -z "$cur" ]; then
            summary="$(rc_note "$RL_RC") before any test ran: $(last_line "$STEP_OUT")"
            break
        fi
        crashed+=("$cur ($(rc_note "$RL_RC"))")
        FAILED_TESTS+=("$exe"$'\t'"$cur")
        [ "$rounds" -ge 6 ] && { summary="gave up after $rounds crashes"; break; }
        # The tests after it, in libtest's order, run next.
        local all rest=() seen=0
        mapfile -t all < <(env "${envs[@]}" timeout 20 "$path" --list "$@" 2>/dev/null | sed -n 's/: test$//p')
        for t in "${all[@]}"; do
            if [ "$seen" = 1 ]; then rest+=("$t"); elif [ "$t" = "$cur" ]; then seen=1; fi
        done
        if [ "${#rest[@]}" = 0 ]; then break; fi
        echo "== $exe crashed in $cur; going on with the ${#rest[@]} test(s) after it"
        filters=("${rest[@]}" --exact)
    done
    local ms=$(($(now_ms) - t0)) note=""
    [ "${#failed[@]}" -gt 0 ] && note="${#failed[@]} failed: ${failed[*]}"
    [ "${#crashed[@]}" -gt 0 ] && note="${note:+$note; }crashed: ${crashed[*]}"
    [ -n "$summary" ] && note="${note:+$note; }$summary"
    if [ "$status" = PASS ]; then
        note="$(grep '^test result:' "$STEP_OUT" | tail -n 1 | sed 's/^test result: //; s/; finished in.*//')"
        # Without a device the GPU tests say so instead of running (see tests/cuda_parity.rs).
        local skipped
        skipped=$(grep -c 'SKIPPED' "$STEP_OUT")
        [ "$skipped" -gt 0 ] && note="$note; $skipped line(s) say SKIPPED"
    elif [ -z "$note" ]; then
        note="$(rc_note "$RL_RC"): $(last_line "$STEP_OUT")"
    fi
    record "$name" "$status" "$ms" "$limit" "$gpu" "$note"
}

# Every failed test alone, synchronous launches, full output in the log (issue 10 item 5), in what
# is left of the budget; one step in the table, each rerun in the JSON's "reruns".
RERUNS=()  # JSON objects
rerun_failed() {
    local entry exe name n="${#FAILED_TESTS[@]}" limit again=() alone=() not_run_n=0 t0
    [ "$n" = 0 ] && return 0
    header "rerunning the $n failed test(s) alone with CUDA_LAUNCH_BLOCKING=1"
    t0=$(now_ms)
    for entry in "${FAILED_TESTS[@]}"; do
        exe="${entry%%$'\t'*}"
        name="${entry#*$'\t'}"
        limit=$(cap 60)
        if [ "$limit" -lt 10 ]; then
            not_run_n=$((not_run_n + 1))
            continue
        fi
        header "rerun: $exe $name (limit ${limit}s)"
        run_limited "$limit" env CUDA_LAUNCH_BLOCKING=1 RUST_BACKTRACE=1 \
            "$BIN/$exe" "$name" --exact --include-ignored --nocapture --test-threads=1
        local st=FAIL
        if [ "$RL_TIMEOUT" = 1 ]; then st=TIMEOUT; elif [ "$RL_RC" = 0 ]; then st=PASS; fi
        if [ "$st" = PASS ]; then alone+=("$exe $name"); else again+=("$exe $name"); fi
        RERUNS+=("{\"test\": $(json_str "$exe $name"), \"status\": $(json_str "$st"), \"seconds\": $(secs "$RL_MS"), \"note\": $(json_str "$([ "$st" = PASS ] || echo "$(rc_note "$RL_RC"): $(last_line "$STEP_OUT")")")}")
    done
    local note="$n failed test(s): ${#again[@]} fail again alone"
    [ "${#alone[@]}" -gt 0 ] && note="$note, ${#alone[@]} pass alone (order-dependent or flaky: ${alone[*]})"
    [ "$not_run_n" -gt 0 ] && note="$note; $not_run_n not rerun (no time left)"
    # FAIL: failures reproduce alone; PASS: all pass alone; SKIPPED: no time to rerun any.
    local st=FAIL
    if [ "${#again[@]}" = 0 ]; then st=PASS; [ "${#alone[@]}" = 0 ] && st=SKIPPED; fi
    record "reruns of failed tests (CUDA_LAUNCH_BLOCKING=1)" "$st" $(($(now_ms) - t0)) 60 0 "$note"
}

# Libraries: `podgpu device --env` when this podgpu has it, else the script's own search.
cuda_lib_dirs() {
    local d
    for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib \
             /usr/local/lib/python3*/dist-packages/nvidia/*/lib \
             "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib; do
        [ -d "$d" ] && printf '%s:' "$d"
    done
}

# Finds the GPU and the libraries, sets the environment every later binary runs in, and records
# the "device" step: PASS (a GPU podgpu can use), NO-DEVICE (none here), FAIL (nvidia-smi sees a
# GPU but podgpu cannot use it).
detect_device() {
    header "device and libraries"
    local t0 smi_ok=0 smi_note="" out rc dev_rc=none note="" has_dev=0
    t0=$(now_ms)
    export PODGPU_CACHE_DIR="${PODGPU_CACHE_DIR:-$ROOT/$GPU_DIR/cache}"
    export PODGPU_FIXTURES="${PODGPU_FIXTURES:-$ROOT/tests/fixtures}"
    export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
    if command -v nvidia-smi > /dev/null; then
        out="$(timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1)"
        rc=$?
        if [ "$rc" = 0 ] && [ -n "$out" ] && ! grep -qi 'failed\|error\|no devices' <<< "$out"; then
            smi_ok=1
            DEVICE_LINE="$(head -n 1 <<< "$out")"
            [ "$(wc -l <<< "$out")" -gt 1 ] && DEVICE_LINE="$DEVICE_LINE (+$(($(wc -l <<< "$out") - 1)) more)"
            timeout 10 nvidia-smi 2>&1 | head -n 30
        else
            smi_note="nvidia-smi failed ($(rc_note "$rc")): $(tail -n 1 <<< "$out")"
        fi
    else
        smi_note="nvidia-smi not found"
    fi
    echo "nvidia-smi: ${smi_note:-$DEVICE_LINE}"
    # PyTorch's CUDA libraries first (after any the caller named): the bench then compares podgpu
    # and PyTorch on the same cuBLAS and cuDNN files, and the checks test those.
    local venv_libs
    venv_libs="$(cuda_lib_dirs)"
    if [ -n "$venv_libs" ]; then
        export PODGPU_CUDA_LIBS="${PODGPU_CUDA_LIBS:+$PODGPU_CUDA_LIBS:}${venv_libs%:}"
    fi
    if "$BIN/podgpu" help device > /dev/null 2>&1; then
        has_dev=1
        out="$(timeout 10 "$BIN/podgpu" device --env 2>&1)"
        rc=$?
        echo "\$ $BIN/podgpu device --env   (exit $rc)"
        echo "$out"
        local exports
        exports="$(grep -E '^export [A-Za-z_][A-Za-z0-9_]*=' <<< "$out")"
        if [ -n "$exports" ]; then
            eval "$exports"
        else
            note="podgpu device --env printed no export lines (exit $rc); library folders from the script"
            libs_fallback
        fi
        echo "\$ $BIN/podgpu device"
        LIB_REPORT="$(timeout 10 "$BIN/podgpu" device 2>&1)"
        dev_rc=$?
        echo "$LIB_REPORT"
        echo "(exit $dev_rc)"
    else
        note="this podgpu has no 'device' subcommand: library folders from the script's own search, library report from the cuda_device test"
        libs_fallback
    fi
    echo "PODGPU_CUDA_LIBS=${PODGPU_CUDA_LIBS:-}"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    local status=PASS
    if [ "$smi_ok" = 1 ]; then
        if [ "$dev_rc" != none ] && [ "$dev_rc" != 0 ]; then
            status=FAIL
            note="nvidia-smi sees a GPU but podgpu device says exit $dev_rc: $(tail -n 1 <<< "$LIB_REPORT")${note:+; $note}"
        fi
    elif [ "$dev_rc" = 0 ]; then
        note="$smi_note, but podgpu device found a GPU${note:+; $note}"
        DEVICE_LINE="$(grep -m 1 -i 'cuda:\|gpu' <<< "$LIB_REPORT" || echo "GPU (no nvidia-smi)")"
    else
        NO_DEVICE=1
        status=NO-DEVICE
        NO_DEVICE_REASON="$smi_note"
        if [ "$has_dev" = 1 ]; then
            NO_DEVICE_REASON="$NO_DEVICE_REASON; podgpu device (exit $dev_rc): $(grep -v '^[[:space:]]*$' <<< "$LIB_REPORT" | tail -n 1)"
        fi
        DEVICE_LINE="none ($NO_DEVICE_REASON)"
        header "device: NO-DEVICE (no GPU: $NO_DEVICE_REASON)"
    fi
    # With a GPU here, GPU tests must fail rather than skip.
    [ "$NO_DEVICE" = 0 ] && export PODGPU_REQUIRE_GPU=1
    [ "$status" = NO-DEVICE ] && note="no GPU: $NO_DEVICE_REASON${note:+; $note}"
    record device "$status" $(($(now_ms) - t0)) 20 1 "${note:-$DEVICE_LINE}"
}

libs_fallback() {
    local libs
    libs="$(cuda_lib_dirs)"
    if [ -n "$libs" ]; then
        export PODGPU_CUDA_LIBS="${libs%:}${PODGPU_CUDA_LIBS:+:$PODGPU_CUDA_LIBS}"
        export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
    fi
}

# The packed binaries: run bits back (the upload may drop them), built from these sources?
prepare() {
    header "packed binaries"
    if [ ! -x "$BIN/podgpu" ] && [ ! -f "$BIN/podgpu" ]; then
        echo "no $BIN/podgpu: run 'tools/gpu-check.sh pack' on the build machine and carry $GPU_DIR along"
        STATUS=FAIL EXIT_CODE=2
        record "packed binaries" FAIL 0 0 0 "no $BIN/podgpu (run tools/gpu-check.sh pack, carry .gpu)"
        exit 2
    fi
    chmod +x "$BIN"/*
    cat "$GPU_DIR/MANIFEST" 2>/dev/null
    ls -l "$BIN"
    local status=PASS note bad
    note="$(grep '^commit=' "$GPU_DIR/MANIFEST" 2>/dev/null | cut -c8-19)$(grep -q '^dirty=yes' "$GPU_DIR/MANIFEST" 2>/dev/null && echo ' (dirty tree)')"
    if [ -f "$GPU_DIR/sources.sha256" ]; then
        bad="$(sha256sum --quiet -c "$GPU_DIR/sources.sha256" 2>&1 | sed 's/: .*//' | head -n 5 | tr '\n' ' ')"
        if [ -n "$bad" ]; then
            status=FAIL
            note="sources changed since the pack, binaries are stale (repack): $bad"
            echo "$note"
        else
            note="built from these sources; commit $note"
        fi
    fi
    record "packed binaries" "$status" 0 0 0 "$note"
}

# Short training run on the shipped CIFAR-10 sample, then a note: loss and accuracy first → last.
train_note() {
    local m="$1" first last
    [ -f "$m" ] || return 0
    first="$(head -n 1 "$m")"
    last="$(tail -n 1 "$m")"
    f() { grep -o "\"$1\":[^,}]*" <<< "$2" | cut -d: -f2 | awk '{ printf "%.4g", $1 }'; }
    pc() { grep -o "\"$1\":[^,}]*" <<< "$2" | cut -d: -f2 | awk '{ printf "%.1f%%", 100 * $1 }'; }
    echo "epochs $(f epoch "$last"): train loss $(f train_loss "$first") -> $(f train_loss "$last"), test acc $(pc test_acc "$first") -> $(pc test_acc "$last"), $(f images_per_s "$last") img/s"
}

# The GPU run's checkpoint scored on the GPU and on the CPU: the accuracies must agree.
eval_both() {
    local ck="$1" data="$2" a b
    echo "\$ podgpu eval --device cuda --checkpoint $ck --data $data"
    "$BIN/podgpu" eval --device cuda --checkpoint "$ck" --data "$data" > "$ck.cuda.txt" 2>&1
    a=$?
    cat "$ck.cuda.txt"
    echo "\$ podgpu eval --device cpu --checkpoint $ck --data $data"
    "$BIN/podgpu" eval --device cpu --checkpoint "$ck" --data "$data" > "$ck.cpu.txt" 2>&1
    b=$?
    cat "$ck.cpu.txt"
    [ "$a" = 0 ] && [ "$b" = 0 ] || return 1
    a="$(sed -n 's/^accuracy .*(\([0-9]*\) \/ [0-9]*).*/\1/p' "$ck.cuda.txt" | head -n 1)"
    b="$(sed -n 's/^accuracy .*(\([0-9]*\) \/ [0-9]*).*/\1/p' "$ck.cpu.txt" | head -n 1)"
    echo "correct: cuda $a, cpu $b (test split; they may differ by 5 at most)"
    [ -n "$a" ] && [ -n "$b" ] && [ $((a > b ? a - b : b - a)) -le 5 ]
}

checks_main() {
    begin checks "$CHECKS_BUDGET"
    prepare
    detect_device
    # Per-step limits (s): device 20 + 15 + 15 + 95 + 10 + 20 + 45 + 20 = 240; reruns use what is left.
    test_step "cuda_device (device, libraries)" 15 0 cuda_device -- --nocapture --test-threads=1
    if [ -z "$LIB_REPORT" ]; then
        LIB_REPORT="(from the cuda_device test)"$'\n'"$(sed 's/^test [^ ]* \.\.\. //' "$STEP_OUT" \
            | grep -v '^ok$\|^running [0-9]\|^test result:\|^[[:space:]]*$' | head -c 8000)"
        write_json
    fi
    test_step "kernels compile (NVRTC)" 15 0 cuda_nvrtc CI=true -- --nocapture --test-threads=1
    test_step "parity CPU vs GPU" 95 1 cuda_parity -- --include-ignored --nocapture --test-threads=1
    # Issue 16: one rank through NCCL's own single-process init (no MPI), on the device.
    test_step "NCCL one rank (smoke)" 10 1 cuda_nccl -- --include-ignored --nocapture --test-threads=1
    step "fixtures on GPU" 20 1 "$BIN/podgpu" fidelity --device cuda tests/fixtures
    local run="$GPU_DIR/run-train" data=datasets/cifar10-small.bin
    rm -rf "$run"
    # shellcheck disable=SC2086  # PODGPU_TRAIN_ARGS is a word list
    if step "short train on GPU" 45 1 "$BIN/podgpu" train ${PODGPU_TRAIN_ARGS:-resnet18 --data $data --device cuda --epochs 3 --batch-size 64 --feature-dim 64 --out $run}; then
        S_NOTE[-1]="$(train_note "$run/metrics.jsonl")"
        write_json
    fi
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$RESULTS/train-metrics.jsonl"
    if [ -f "$run/last.safetensors" ] || [ "$NO_DEVICE" = 1 ]; then
        step "eval of the GPU run (cuda, cpu)" 20 1 bash "$SELF" _eval-both "$run/last.safetensors" "$data" \
            && { S_NOTE[-1]="$(grep '^correct:' "$STEP_OUT")"; write_json; }
    else
        not_run "eval of the GPU run (cuda, cpu)" SKIPPED 1 "the short train wrote no checkpoint"
    fi
    rerun_failed
    finish
}

# ResNet50-CIFAR at batch 128: podgpu fp32/tf32/bf16 vs PyTorch eager fp32, eager tf32, AMP bf16 +
# channels_last (bf16 rows paired like with like; bench-step says when it skips bf16 on the GPU);
# compare.py starts no run after --deadline s, and prints the ratio table it has.
bench_compare_eager() {
    if [ ! -x "$BIN/bench-step" ]; then
        not_run "bench: podgpu vs PyTorch (resnet50)" FAIL 1 "no $BIN/bench-step packed"
    elif [ -x "$TORCH_PY" ] || [ "$NO_DEVICE" = 1 ]; then
        step "bench: podgpu vs PyTorch (resnet50)" 130 1 env PYTHONUNBUFFERED=1 "$TORCH_PY" \
            tools/bench/compare.py --bench-step "$BIN/bench-step" --python "$TORCH_PY" --device cuda \
            --model resnet50 --batch 128 --steps 20 --warmup 3 --check-batch 2 --deadline 115 \
            --timeout 90 --modes eager-fp32,eager-tf32,amp-bf16-cl --markdown \
            --json-out "$RESULTS/compare.json"
    else
        not_run "bench: PyTorch side" SKIPPED 1 "no PyTorch at $TORCH_PY (set PODGPU_TORCH_PYTHON)"
        step "bench: podgpu steps (resnet50)" 90 1 "$BIN/bench-step" --device cuda --models resnet50 \
            --batch 128 --steps 20 --warmup 3 --check-batch 2 --precision fp32,tf32,bf16 --cuda-graph
    fi
}

# torch.compile in a step of its own: compiling ResNet50's training step took more than the 60 s
# that were left of the shared comparison on the first H200 run (2026-11-30).
bench_compile() {
    if [ ! -x "$BIN/bench-step" ]; then
        not_run "bench: torch.compile (resnet50)" FAIL 1 "no $BIN/bench-step packed"
    elif [ -x "$TORCH_PY" ] || [ "$NO_DEVICE" = 1 ]; then
        step "bench: torch.compile (resnet50)" 170 1 env PYTHONUNBUFFERED=1 "$TORCH_PY" \
            tools/bench/compare.py --bench-step "$BIN/bench-step" --python "$TORCH_PY" --device cuda \
            --model resnet50 --batch 128 --steps 20 --warmup 3 --check-batch 2 --deadline 160 \
            --timeout 160 --precisions tf32,bf16 --modes compile-bf16-cl --cuda-graph --markdown \
            --json-out "$RESULTS/compare-compile.json"
    else
        not_run "bench: torch.compile (resnet50)" SKIPPED 1 "no PyTorch at $TORCH_PY"
    fi
}

bench_kernels() {
    step "bench: own kernels" 45 1 "$BIN/bench-kernels" --device cuda --samples 5 \
        --min-sample-ms 5 --max-case-s 1
}

bench_main() {
    begin bench "$BENCH_BUDGET"
    prepare
    detect_device
    # Per-step limits (s): device 20 + 130 + 170 + 55 + 50 + 45 = 470 (10 to spare).
    bench_compare_eager
    bench_compile
    # Channels-last (PODGPU_GPU_LAYOUT=nhwc, opt-in until measured): the rows to set beside the
    # NCHW ones above and PyTorch's channels_last AMP row, each also as a CUDA graph replayed
    # (`--cuda-graph`: its check compares the loss after the replays with the eager row's). (The
    # resnet18 metrics-overhead step was recorded on 2026-11-30 and gave its time to this one.)
    step "bench: NHWC steps + CUDA graph (resnet50)" 55 1 env PODGPU_GPU_LAYOUT=nhwc "$BIN/bench-step" \
        --device cuda --models resnet50 --batch 128 --steps 20 --warmup 3 --check-batch 2 \
        --precision tf32,bf16 --cuda-graph
    # Microbenchmarks: the shortest sampling that still gives a median of several samples. The
    # convolutions in the bf16 step's storage and layouts, beside TF32 (fp32 and the POD head's
    # GEMMs were recorded on 2026-11-30; `bench-gemm` still packs and runs by hand).
    step "bench: convolutions (resnet50)" 50 1 "$BIN/bench-conv" --device cuda --samples 5 \
        --min-sample-ms 5 --max-case-s 1 --modes tf32,bf16,bf16-nhwc
    bench_kernels
    finish
}

# Real CIFAR-10 (all 60,000 images, from the packed JPEG tree), ResNet18 trained with softmax and
# with POD side by side (`podgpu compare`), accuracy per epoch and images/s; the comparison gets
# what is left of the budget.
cifar_steps() {
    local tar="$GPU_DIR/data/cifar10-jpeg.tar.xz" work="${TMPDIR:-/tmp}/podgpu-cifar" run="$GPU_DIR/run-cifar"
    local data="$work/cifar10.bin" epochs="${PODGPU_CIFAR_EPOCHS:-4}" left
    if [ ! -f "$tar" ]; then
        not_run "unpack + convert CIFAR-10" SKIPPED 0 "not packed: PODGPU_PACK_CIFAR=1 tools/gpu-check.sh pack"
        not_run "compare softmax vs pod (resnet18)" SKIPPED 1 "no data"
        return
    fi
    rm -rf "$work" "$run"
    mkdir -p "$work"
    if step "unpack + convert CIFAR-10" 60 0 bash -c "tar -xJf '$tar' -C '$work' && '$BIN/podgpu' data convert --from image-folder --norm cifar10 --out '$data' '$work/cifar10-jpeg'"; then
        S_NOTE[-1]="$("$BIN/podgpu" data info "$data" 2>&1 | head -n 3 | tr '\n' ' ' | cut -c1-150)"
        write_json
    fi
    left=$(($(left_s) - 5))
    if [ -f "$data" ] || [ "$NO_DEVICE" = 1 ]; then
        step "compare softmax vs pod (resnet18)" "$left" 1 "$BIN/podgpu" compare --losses softmax,pod \
            --models resnet18 --data "$data" --device cuda --epochs "$epochs" --batch-size 128 --out "$run"
    else
        not_run "compare softmax vs pod (resnet18)" SKIPPED 1 "the conversion wrote no dataset"
    fi
    # Whatever the comparison wrote (each epoch appends its metrics), even when it was cut off.
    local f
    for f in comparison.md comparison.csv; do [ -f "$run/$f" ] && cp "$run/$f" "$RESULTS/"; done
    for f in "$run"/*/metrics.jsonl; do
        [ -f "$f" ] && cp "$f" "$RESULTS/$(basename "$(dirname "$f")")-metrics.jsonl"
    done
}

# The optional third call: the CIFAR-10 run alone (docs/GPU.md).
cifar_main() {
    begin cifar "$CIFAR_BUDGET"
    prepare
    detect_device
    # Per-step limits (s): device 20 + 60 + the rest for the comparison.
    cifar_steps
    finish
}

# The third call of a session whose first two calls left work (docs/GPU.md): the parity tests
# again (after a fix), torch.compile and the kernel table with their own time, then the CIFAR-10
# run with what is left. Packed like the cifar call (PODGPU_PACK_CIFAR=1), which keeps
# cuda_parity, bench-step and bench-kernels beside podgpu.
followup_main() {
    begin followup "$FOLLOWUP_BUDGET"
    prepare
    detect_device
    # Per-step limits (s): device 20 + 60 + 170 + 60 + 60 + the rest for the comparison.
    test_step "parity CPU vs GPU" 60 1 cuda_parity -- --include-ignored --nocapture --test-threads=1
    rerun_failed
    bench_compile
    bench_kernels
    cifar_steps
    finish
}

# An A/B call for one GPU switch (an environment variable, e.g. PODGPU_AB_ENV=PODGPU_GPU_BN=own):
# the parity tests without it, the tests that run through the ops with it, then the same timings
# without (A) and with (B) it, alternating, and a short train with it. Packed like followup.
# PODGPU_AB_PRECISION picks the timed precisions (default fp32,tf32; e.g. tf32,bf16 for
# PODGPU_AB_ENV=PODGPU_GPU_LAYOUT=nhwc).
ab_main() {
    begin ab "$AB_BUDGET"
    prepare
    detect_device
    local ab="${PODGPU_AB_ENV:-}" run="$GPU_DIR/run-ab" data=datasets/cifar10-small.bin
    local prec="${PODGPU_AB_PRECISION:-fp32,tf32}"
    if [[ ! "$ab" =~ ^[A-Z0-9_]+=[A-Za-z0-9_.,-]*$ ]]; then
        not_run "A/B switch" FAIL 0 "set PODGPU_AB_ENV=NAME=value (got '$ab')"
        finish
    fi
    if [[ ! "$prec" =~ ^(fp32|tf32|bf16)(,(fp32|tf32|bf16))*$ ]]; then
        not_run "A/B precisions" FAIL 0 "PODGPU_AB_PRECISION must list fp32, tf32, bf16 (got '$prec')"
        finish
    fi
    # Per-step limits (s): device 20 + 60 + 60 + 6 × 40 + 30 + 45 = 455; capped by the budget.
    test_step "parity CPU vs GPU (A)" 60 1 cuda_parity -- --include-ignored --nocapture --test-threads=1
    rerun_failed
    FAILED_TESTS=()
    test_step "parity through the ops (B: $ab)" 60 1 cuda_parity "$ab" -- --include-ignored --nocapture \
        --test-threads=1 resnet:: ops_parity:: trainer::
    local i
    for i in 1 2; do
        step "resnet50 $prec (A, round $i)" 40 1 "$BIN/bench-step" --device cuda --models resnet50 \
            --batch 128 --steps 20 --warmup 3 --check-batch $((i == 1 ? 2 : 0)) --precision "$prec"
        step "resnet50 $prec (B, round $i)" 40 1 env "$ab" "$BIN/bench-step" --device cuda --models resnet50 \
            --batch 128 --steps 20 --warmup 3 --check-batch $((i == 1 ? 2 : 0)) --precision "$prec"
    done
    step "resnet18 (A)" 30 1 "$BIN/bench-step" --device cuda --models resnet18 --batch 128 --steps 20 \
        --warmup 3 --check-batch 0 --precision "$prec"
    step "resnet18 (B)" 30 1 env "$ab" "$BIN/bench-step" --device cuda --models resnet18 --batch 128 \
        --steps 20 --warmup 3 --check-batch 0 --precision "$prec"
    step "batch norm kernels (A)" 20 1 "$BIN/bench-kernels" --device cuda --samples 7 --min-sample-ms 5 \
        --max-case-s 1 --only "batch norm"
    step "batch norm kernels (B)" 20 1 env "$ab" "$BIN/bench-kernels" --device cuda --samples 7 \
        --min-sample-ms 5 --max-case-s 1 --only "batch norm"
    rm -rf "$run"
    if step "short train (B)" 45 1 env "$ab" "$BIN/podgpu" train resnet18 --data "$data" --device cuda \
        --epochs 3 --batch-size 64 --feature-dim 64 --out "$run"; then
        S_NOTE[-1]="$(train_note "$run/metrics.jsonl")"
        write_json
    fi
    finish
}

# Overall status, the JSON, the table; exits with 0, 1 or 3.
finish() {
    local i any_failed=0
    for i in "${!S_STATUS[@]}"; do
        case "${S_STATUS[$i]}" in FAIL|TIMEOUT) any_failed=1 ;; esac
    done
    if [ "$any_failed" = 1 ]; then STATUS=FAIL EXIT_CODE=1
    elif [ "$NO_DEVICE" = 1 ]; then STATUS=NO-DEVICE EXIT_CODE=$EXIT_NO_DEVICE
    else STATUS=PASS EXIT_CODE=0
    fi
    write_json
    echo
    echo "=================== $KIND summary: $STATUS (exit $EXIT_CODE) in $(secs $(($(now_ms) - START_MS)))s of ${BUDGET}s; device: $DEVICE_LINE"
    printf '%-38s %-9s %7s %6s  %s\n' step result time limit note
    for i in "${!S_NAME[@]}"; do
        printf '%-38s %-9s %6ss %5ss  %s\n' "${S_NAME[$i]:0:38}" "${S_STATUS[$i]}" "$(secs "${S_MS[$i]}")" \
            "${S_LIMIT[$i]}" "${S_NOTE[$i]:0:110}"
    done
    echo "results: $RESULTS/$KIND.json, $RESULTS/$KIND.log"
    exit "$EXIT_CODE"
}

budget() { # NAME DEFAULT: the default, or the variable's value when it is lower
    local v="${!1:-}"
    if [[ "$v" =~ ^[0-9]+$ ]] && [ "$v" -lt "$2" ]; then echo "$v"; else echo "$2"; fi
}

device_run() { # checks|bench: runs it with its whole output into RESULTS/KIND.log
    RESULTS="${PODGPU_GPU_RESULTS:-$GPU_DIR/results}"
    mkdir -p "$RESULTS" || exit 2
    RESULTS="$(cd "$RESULTS" && pwd)"
    case "$1" in
        checks) CHECKS_BUDGET=$(budget PODGPU_CHECKS_BUDGET_S "$CHECKS_BUDGET"); checks_main 2>&1 | tee "$RESULTS/checks.log" ;;
        bench) BENCH_BUDGET=$(budget PODGPU_BENCH_BUDGET_S "$BENCH_BUDGET"); bench_main 2>&1 | tee "$RESULTS/bench.log" ;;
        cifar) CIFAR_BUDGET=$(budget PODGPU_CIFAR_BUDGET_S "$CIFAR_BUDGET"); cifar_main 2>&1 | tee "$RESULTS/cifar.log" ;;
        followup) FOLLOWUP_BUDGET=$(budget PODGPU_FOLLOWUP_BUDGET_S "$FOLLOWUP_BUDGET"); followup_main 2>&1 | tee "$RESULTS/followup.log" ;;
        ab) AB_BUDGET=$(budget PODGPU_AB_BUDGET_S "$AB_BUDGET"); ab_main 2>&1 | tee "$RESULTS/ab.log" ;;
    esac
    return "${PIPESTATUS[0]}"
}

case "${1:-}" in
    pack) pack ;;
    size) size ;;
    checks|bench|cifar|followup|ab) device_run "$1" ;;
    run)
        device_run checks
        a=$?
        device_run bench
        b=$?
        for s in 2 1 3 0; do if [ "$a" = "$s" ] || [ "$b" = "$s" ]; then exit "$s"; fi; done
        exit 1
        ;;
    _eval-both) shift; eval_both "$@" ;;
    *) echo "usage: $0 pack|size (here) | checks|bench|cifar|followup|ab|run (on the GPU machine)   (see docs/GPU.md)"; exit 2 ;;
esac
