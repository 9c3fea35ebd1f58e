#!/usr/bin/env python3
"""CPU seconds per training step, podgpu's `bench-step` against PyTorch (tools/bench/torch_step.py), for
a machine that other jobs share.

The wall clock of a step measures the other jobs as much as the step: with the cores shared, a
process gets a slice of them, and PyTorch's OpenMP threads collapse when one of them is descheduled
(BENCHMARKS.md shows steps 3–10× slower under load). The CPU time a process is charged is what its
own instructions cost, whatever else runs, as long as it has one thread (with several, time spent
spinning at a barrier is charged too, so this script is for `--threads 1`; more threads are
allowed but then say so). podgpu runs twice, with `--steps A` and `--steps B`, and the difference of
the two processes' CPU time (user + system, from wait4) divided by B − A is the cost of one step:
start-up, the network build, warm-up and the first step cancel out. PyTorch runs once with
`--steps B` and reports the median of its per-step process CPU time itself (torch_step.py's
`cpu_s_per_step`): its start-up varies too much between runs for the difference.

    python3 tools/bench/cpu_time.py --python .venv/bin/python --model resnet18 --width 16 --batch 32 \\
        --bench-step target/release/bench-step --bench-step /tmp/bench-step-base --rounds 3

Engines alternate within each round; the median over rounds is reported, with the load average at the
start and the end. Ends with one JSON line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def child_cpu_seconds(cmd, env=None):
    """Runs cmd to completion; returns (user + system CPU seconds, wall seconds, output)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{out[-2000:]}")
    return ru.ru_utime + ru.ru_stime, time.time() - t0, out


def load():
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-step", action="append", default=None,
                    help="podgpu bench-step binary; repeat to compare builds (default target/release/bench-step)")
    ap.add_argument("--python", default=None, help="Python with PyTorch (omit to time podgpu alone)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", default="2,6", help="A,B: the two step counts whose difference is timed")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--env", action="append", default=[],
                    help="NAME=VALUE for the podgpu runs (e.g. PODGPU_CPU_KERNELS=portable); repeatable")
    args = ap.parse_args()
    a, b = (int(s) for s in args.steps.split(","))
    assert b > a >= 1, "--steps A,B needs B > A >= 1"
    binaries = args.bench_step or [os.path.join(ROOT, "target/release/bench-step")]

    env = dict(os.environ)
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v

    def podgpu_cmd(binary, steps):
        return [binary, "--device", "cpu", "--models", args.model, "--precision", "fp32", "--batch",
                str(args.batch), "--width", str(args.width), "--steps", str(steps), "--warmup",
                str(args.warmup), "--threads", str(args.threads), "--check-batch", "0"]

    def torch_cmd(steps):
        return [args.python, os.path.join(HERE, "torch_step.py"), "--device", "cpu", "--model", args.model,
                "--mode", "eager-fp32", "--batch", str(args.batch), "--width", str(args.width), "--steps",
                str(steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]

    engines = [(f"podgpu {os.path.relpath(bn, ROOT) if bn.startswith(ROOT) else bn}",
                lambda s, bn=bn: podgpu_cmd(bn, s), env) for bn in binaries]
    if args.python:
        engines.append(("pytorch eager-fp32", torch_cmd, None))

    def torch_in_process(steps):
        # torch_step.py reports the median of its own per-step process CPU time: Python's start-up
        # and torch's import vary by hundreds of ms between runs, too much for the difference method.
        _, _, out = child_cpu_seconds(torch_cmd(steps))
        line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
        return json.loads(line)["cpu_s_per_step"]

    per_step = {name: [] for name, _, _ in engines}
    loads = []
    for r in range(args.rounds):
        for name, make, e in engines:
            l0 = load()
            if name.startswith("pytorch"):
                s = torch_in_process(b)
            else:
                ca, _, _ = child_cpu_seconds(make(a), e)
                cb, _, _ = child_cpu_seconds(make(b), e)
                s = (cb - ca) / (b - a)
            per_step[name].append(s)
            loads.append((l0, load()))
            print(f"round {r + 1} {name}: {s * 1000:.1f} CPU-ms/step (load {l0:.2f} -> {load():.2f})",
                  flush=True)

    lo = min(min(x) for x in loads)
    hi = max(max(x) for x in loads)
    print(f"\n{args.model} width {args.width}, batch {args.batch}, {args.threads} thread(s); podgpu CPU "
          f"seconds per step = (CPU of a {b}-step run - CPU of a {a}-step run) / {b - a}, PyTorch's the "
          f"median of its {b} steps' process CPU time; median of {args.rounds} round(s); load average "
          f"{lo:.1f}-{hi:.1f}")
    ref = per_step.get("pytorch eager-fp32")
    ref_med = statistics.median(ref) if ref else None
    print("| engine | CPU-ms/step (median) | rounds | images per CPU-s | vs PyTorch |")
    print("|---|---|---|---|---|")
    rows = []
    for name, _, _ in engines:
        med = statistics.median(per_step[name])
        ratio = ref_med / med if ref_med else None
        rounds = ", ".join(f"{x * 1000:.0f}" for x in per_step[name])
        vs = f"{ratio:.2f}×" if ratio else ""
        print(f"| {name} | {med * 1000:.1f} | {rounds} | {args.batch / med:.1f} | {vs} |")
        rows.append({"engine": name, "cpu_s_per_step": med, "rounds": per_step[name],
                     "images_per_cpu_s": args.batch / med, "vs_pytorch": ratio})
    print(json.dumps({"bench": "cpu-time", "model": args.model, "width": args.width, "batch": args.batch,
                      "threads": args.threads, "steps": [a, b], "load": [lo, hi], "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
