#!/usr/bin/env python3
"""Side by side: podgpu's `bench-step` and PyTorch (tools/bench/torch_step.py) on the same model,
batch, loss, optimizer and device, then the ratio table podgpu images/s / PyTorch images/s.

Each engine runs in its own process, alternating for --rounds rounds so that the machine's other load
hits both alike; per configuration the step times of all rounds are pooled and their median (and the
fastest single step) is reported. A run that fails or times out is reported as such and the others
still print.

    # CPU (2 threads, a small ResNet18), with CPU PyTorch in a venv (see BENCHMARKS.md)
    python3 tools/bench/compare.py --python .venv/bin/python --device cpu --threads 2 \\
        --model resnet18 --width 16 --batch 32 --steps 10 --rounds 3
    # GPU (tools/gpu-check.sh runs this)
    python3 tools/bench/compare.py --python /opt/torch/.venv/bin/python --device cuda \\
        --model resnet50 --batch 128 --bench-step .gpu/bin/bench-step

Pairs: podgpu fp32 vs torch eager-fp32 (true fp32) and compile-fp32; podgpu tf32 vs eager-tf32; podgpu
bf16 vs amp-bf16-cl and compile-bf16-cl (like with like: bf16 convolution/GEMM inputs and activations,
f32 master weights, the loss in f32). Where podgpu has no bf16 row (bench-step skips bf16 for a network
whose GPU bf16 step does not exist) those rows take the faster podgpu precision and say that the
precisions differ. With --cuda-graph each podgpu precision is also timed replayed as a CUDA graph, and
a row takes the faster of the two (the note says so). Goals (issue 6): >= 1.5x eager AMP bf16 +
channels_last, >= 1.1x torch.compile, on the CPU >= 1.0x eager fp32.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

GOALS = {"amp-bf16-cl": 1.5, "compile-bf16-cl": 1.1}
CPU_GOAL = 1.0


def last_json(text, bench):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("bench") == bench:
                return obj
    return None


def run(cmd, timeout, env=None):
    """Runs a command; returns (stdout+stderr, error or None, seconds)."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return out, f"timed out after {timeout}s", time.time() - t0
    except OSError as e:
        return "", str(e), time.time() - t0
    err = None if p.returncode == 0 else f"exit {p.returncode}"
    return p.stdout, err, time.time() - t0


def find_bench_step(given):
    if given:
        return given
    for c in [os.path.join(ROOT, "target/release/bench-step"), os.path.join(ROOT, ".gpu/bin/bench-step")]:
        if os.path.exists(c):
            return c
    return shutil.which("bench-step") or os.path.join(ROOT, "target/release/bench-step")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-step", help="podgpu's bench-step binary (default: target/release/bench-step)")
    ap.add_argument("--python", default=sys.executable, help="Python with PyTorch")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precisions", default=None, help="podgpu precisions (default: fp32 on the CPU, fp32,tf32 on a GPU)")
    ap.add_argument("--modes", default=None,
                    help="torch modes (default: eager-fp32 on the CPU; eager-fp32,eager-tf32,amp-bf16-cl,compile-bf16-cl on a GPU)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--deadline", type=float, default=None,
                    help="stop starting new runs after this many seconds in total")
    ap.add_argument("--check-batch", type=int, default=None, help="bench-step --check-batch (first round only)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="GPU: podgpu also replays each precision's step as a CUDA graph (bench-step "
                         "--cuda-graph); a row takes the faster of the two and says which")
    ap.add_argument("--markdown", action="store_true", help="print the ratio table as Markdown too")
    ap.add_argument("--json-out", help="write all results to this file")
    args = ap.parse_args()

    cpu = args.device == "cpu"
    precisions = (args.precisions or ("fp32" if cpu else "fp32,tf32,bf16")).split(",")
    modes = (args.modes or ("eager-fp32" if cpu else "eager-fp32,eager-tf32,amp-bf16-cl,compile-bf16-cl")).split(",")
    bench_step = find_bench_step(args.bench_step)
    common = ["--batch", str(args.batch), "--width", str(args.width), "--image", str(args.image),
              "--classes", str(args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    started = time.time()

    def time_left():
        return args.deadline is None or time.time() - started < args.deadline

    def timeout():
        if args.deadline is None:
            return args.timeout
        return max(5, min(args.timeout, int(args.deadline - (time.time() - started))))

    podgpu = {}   # precision -> results of every round
    torch = {}    # mode -> results of every round
    errors = {}   # name -> message
    commands = {}
    for rnd in range(args.rounds):
        if not time_left():
            break
        cmd = [bench_step, "--device", args.device, "--models", args.model, "--precision", ",".join(precisions)] + common
        if args.cuda_graph:
            cmd += ["--cuda-graph"]
        if rnd > 0:
            cmd += ["--check-batch", "0"]
        elif args.check_batch is not None:
            cmd += ["--check-batch", str(args.check_batch)]
        out, err, _ = run(cmd, timeout())
        sys.stdout.write(out)
        res = last_json(out, "step")
        if res is None:
            errors["podgpu"] = err or "no JSON line in bench-step's output"
        else:
            if err:
                errors["podgpu"] = f"{err} (results kept; see the check column above)"
            for r in res["results"]:
                if r.get("metrics_every_step"):
                    continue
                r["command"] = " ".join(cmd)
                podgpu.setdefault(r["precision"], []).append(r)
        for mode in modes:
            if not time_left():
                errors.setdefault(mode, "not run: out of time (--deadline)")
                continue
            tcmd = [args.python, os.path.join(HERE, "torch_step.py"), "--device", args.device,
                    "--model", args.model, "--mode", mode] + common
            out, err, _ = run(tcmd, timeout())
            sys.stdout.write(out[-2000:] if err else out)
            res = last_json(out, "torch-step")
            if res is None:
                errors[mode] = err or "no JSON line in torch_step.py's output"
                continue
            res["command"] = " ".join(tcmd)
            torch.setdefault(mode, []).append(res)

    def pooled(runs):
        """One result from the rounds: all step times pooled (median, min), the first run's rest."""
        times = sorted(t for r in runs for t in r.get("step_times_s") or [r["time"]["median_s"]])
        n = len(times)
        med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
        out = dict(runs[0])
        out.update({"ms_per_step": med * 1e3, "images_per_s": args.batch / med, "rounds": len(runs),
                    "time": {"median_s": med, "min_s": times[0], "max_s": times[-1], "samples": n},
                    "round_medians_ms": [r["ms_per_step"] for r in runs]})
        return out

    podgpu = {p: pooled(rs) for p, rs in podgpu.items()}
    torch = {m: pooled(rs) for m, rs in torch.items()}

    # The ratio table.
    best_p = min(podgpu, key=lambda p: podgpu[p]["ms_per_step"]) if podgpu else None
    rows = []
    for mode in modes:
        if mode in ("eager-fp32", "compile-fp32"):
            p = "fp32"
        elif mode == "eager-tf32":
            p = "tf32"
        elif "bf16" in podgpu:
            p = "bf16"
        else:
            p = best_p.split("+")[0] if best_p else None
        # A replayed graph of the same precision counts when it is faster (an execution strategy,
        # not a different arithmetic); the note says so.
        if p is not None and (p + "+graph") in podgpu and (
                p not in podgpu or podgpu[p + "+graph"]["ms_per_step"] < podgpu[p]["ms_per_step"]):
            p = p + "+graph"
        a, b = podgpu.get(p), torch.get(mode)
        goal = CPU_GOAL if cpu and mode == "eager-fp32" else GOALS.get(mode)
        ratio = a["images_per_s"] / b["images_per_s"] if a and b else None
        note = ""
        if not b:
            note = errors.get(mode, "not run")
        elif not a:
            note = errors.get("podgpu", f"podgpu {p} not run")
        elif mode in ("amp-bf16-cl", "compile-bf16-cl") and not p.startswith("bf16"):
            note = f"podgpu {p} vs torch bf16 (no podgpu bf16 row: different precisions)"
        if ratio is not None and goal is not None:
            met = "met" if ratio >= goal else f"missed by {goal / ratio:.2f}x"
            note = (note + "; " if note else "") + f"goal >= {goal}x: {met}"
        if p and p.endswith("+graph"):
            note = (note + "; " if note else "") + "podgpu's step replayed as one CUDA graph"
        if b and "first_step_s" in b and mode.startswith("compile"):
            note = (note + "; " if note else "") + f"compile + first step {b['first_step_s']:.0f} s"
        # The fastest single step of each: on a shared machine the least disturbed one.
        ratio_min = b["time"]["min_s"] / a["time"]["min_s"] if a and b else None
        rows.append({
            "podgpu": p, "torch": mode,
            "podgpu_images_per_s": a["images_per_s"] if a else None,
            "torch_images_per_s": b["images_per_s"] if b else None,
            "podgpu_ms": a["ms_per_step"] if a else None,
            "torch_ms": b["ms_per_step"] if b else None,
            "podgpu_ms_min": a["time"]["min_s"] * 1e3 if a else None,
            "torch_ms_min": b["time"]["min_s"] * 1e3 if b else None,
            "ratio": ratio, "ratio_min": ratio_min, "goal": goal, "note": note,
        })

    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
    head = ["podgpu", "torch", "podgpu img/s", "torch img/s", "podgpu ms", "torch ms", "podgpu/torch",
            "min ms", "min ratio", "note"]
    x = lambda v: "-" if v is None else f"{v:.2f}x"
    cells = [[r["podgpu"] or "-", r["torch"], f(r["podgpu_images_per_s"]), f(r["torch_images_per_s"]),
              f(r["podgpu_ms"]), f(r["torch_ms"]), x(r["ratio"]),
              f"{f(r['podgpu_ms_min'])} / {f(r['torch_ms_min'])}", x(r["ratio_min"]), r["note"]]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    print()
    print(f"side by side: {args.model} width {args.width}, batch {args.batch}, {args.image}x{args.image}, "
          f"{args.classes} classes, POD loss + SGD, on {args.device}"
          + (f" ({args.threads} threads)" if args.threads else "")
          + f"; {args.rounds} alternating round(s) of {args.steps} steps, median of all steps (img/s, ms,"
          " podgpu/torch); min ms = fastest single step, podgpu / torch")
    line = lambda c: "  ".join(s.ljust(widths[i]) if i in (0, 1, 9) else s.rjust(widths[i]) for i, s in enumerate(c))
    print(line(head).rstrip())
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for c in cells:
        print(line(c).rstrip())
    if args.markdown:
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(["---"] * len(head)) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
    summary = {"bench": "compare", "args": vars(args), "podgpu": podgpu, "torch": torch, "rows": rows,
               "errors": errors}
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0 if podgpu and torch and not any(k == "podgpu" for k in errors) else 1


if __name__ == "__main__":
    sys.exit(main())
