#!/usr/bin/env bash
# The GPU checks, in one go (each step has its own time limit, so that one hang cannot eat the rest;
# their limits add up to 575 s on a one-GPU machine, 680 s with two; most steps should end well before them):
#   1. the cuda tests (test_cuda.py: one step against the CPU, short runs, save on CUDA / load on CPU,
#      host-device syncs of the training step, a CUDA-graph replay against the eager step; then, on
#      their own, spd.py section L's compiled Γ against the plain one on the GPU, and its step's syncs)
#   2. benchmark.py --device cuda: every toy preset; resid_mlp2 and resid_mlp3 again with the compiled Γ
#      (--compile_ci); resid_mlp3 with the whole step replayed as one CUDA graph (--cuda_graph, an
#      experiment: does a step wait on the host's ~1000 kernel launches? compare each row's host ms with
#      its ms/step), with the plain and with the compiled Γ; induction at lengths 16, 64, 1024 with scalar, vector and attention CI (the
#      transformer paper's Table 2: 12, 13, 10 it/s at 64); GPT-2 (3 steps)
#   3. 2-process nccl runs (torchrun), plain and with --shard_optimizer, if two GPUs are present
#   4. resid_mlp3 at the paper's settings for 500 steps, its time extrapolated to the paper's 200k
#      (goal: under 30 minutes on one H100), as train.py runs it by default; its target trains 1000 steps
#      instead of 10k (a step of the decomposition costs the same on any target, and the time is the
#      decomposition's alone). The benchmark's --compile_ci and --cuda_graph rows give the same
#      extrapolation for those.
#   5. APD on resid_mlp1 (--method apd) for 200 steps, extrapolated to its 40k (9.7 s/step on one CPU thread)
# Writes gpu_tests.txt, gpu_benchmark_*.json, gpu_summary.json and gpu_check.log to results/ (or to
# $GPU_CHECK_OUT), each as soon as its step ends, and prints a summary. Runs go to runs/gpu_check/.
#
#   bash gpu_check.sh
#   GPU_CHECK_OUT=$OUT bash gpu_check.sh     # on a lent machine whose results come back from $OUT
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}  # python3: the name every virtual environment and every GPU image has
RES=${GPU_CHECK_OUT:-results}
RUNS=runs/gpu_check
$PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "gpu_check.sh: torch ($PY) sees no GPU"; exit 1; }
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name())")
N_GPU=$($PY -c "import torch; print(torch.cuda.device_count())")
rm -rf "$RUNS" && mkdir -p "$RUNS" "$RES"
exec > >(tee "$RES/gpu_check.log") 2>&1
step() { echo "=== $(date -u +%H:%M:%S) $*"; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "cuda tests on $GPU"
timeout 80 $PY -m pytest -q -m cuda test_cuda.py -k "not compiled_ci" -p no:cacheprovider 2>&1 | tail -n 40 \
    | tee "$RES/gpu_tests.txt"
step "cuda tests of the compiled Γ (the first calls compile)"
timeout 75 $PY -m pytest -q -m cuda test_cuda.py -k compiled_ci -p no:cacheprovider 2>&1 | tail -n 40 \
    | tee "$RES/gpu_tests_compiled_ci.txt"

step "benchmarks"
timeout 50 $PY benchmark.py --device cuda --steps 20 --json "$RES/gpu_benchmark_toy.json"
timeout 75 $PY benchmark.py --device cuda --steps 20 --presets resid_mlp3 resid_mlp2 --compile_ci \
    --json "$RES/gpu_benchmark_compile_ci.json"
timeout 30 $PY benchmark.py --device cuda --steps 20 --presets resid_mlp3 --cuda_graph \
    --json "$RES/gpu_benchmark_cuda_graph.json"
timeout 45 $PY benchmark.py --device cuda --steps 20 --presets resid_mlp3 --cuda_graph --compile_ci \
    --json "$RES/gpu_benchmark_cuda_graph_compile_ci.json"
timeout 90 $PY benchmark.py --device cuda --presets induction --seq_lens 16 64 1024 --ci_fns scalar vector attention --batch 64 \
    --steps 20 --json "$RES/gpu_benchmark_induction.json"
timeout 40 $PY benchmark.py --device cuda --presets gpt2 --ci_fns scalar vector --seq_lens 16 --steps 3 \
    --json "$RES/gpu_benchmark_gpt2.json"

if (( N_GPU >= 2 )); then
  step "2 processes, nccl"
  timeout 60 $PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py --model tms_5-2 --steps 2000 \
      --device cuda --out "$RUNS/nccl_tms_5-2" --no_progress --log_every 500 | tail -n 5
  step "2 processes, nccl, --shard_optimizer (checkpoints consolidate Adam's state over nccl)"
  timeout 45 $PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py --model tms_5-2 --steps 500 \
      --device cuda --out "$RUNS/nccl_sharded_tms_5-2" --shard_optimizer --save_every 250 --no_progress \
      --log_every 250 | tail -n 5
fi

step "resid_mlp3, 500 steps of the paper's 200k"
timeout 60 $PY train.py --model resid_mlp3 --steps 500 --target_steps 1000 --device cuda --out "$RUNS/resid_mlp3" \
    --no_progress --log_every 500 | tail -n 3

step "APD resid_mlp1, 200 steps of its 40k"
timeout 30 $PY train.py --model resid_mlp1 --method apd --steps 200 --device cuda --out "$RUNS/apd_resid_mlp1" \
    --no_progress --log_every 100 | tail -n 3

$PY - "$GPU" "$N_GPU" "$RES" <<'EOF'
import json, sys
from pathlib import Path
gpu, n_gpu, res = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
summary = {"gpu": gpu, "n_gpu": n_gpu, "command": "bash gpu_check.sh"}
for key, name in (("tests", "gpu_tests.txt"), ("tests_compiled_ci", "gpu_tests_compiled_ci.txt")):
    lines = (res / name).read_text().strip().splitlines() if (res / name).exists() else []
    summary[key] = lines[-1] if lines else "did not run"
for name in ("toy", "compile_ci", "cuda_graph", "cuda_graph_compile_ci", "induction", "gpt2"):
    path = res / f"gpu_benchmark_{name}.json"
    summary[f"benchmark_{name}"] = json.loads(path.read_text()) if path.exists() else "did not finish"
for run, steps, full in (("resid_mlp3", 500, 200_000), ("nccl_tms_5-2", 2000, None), ("nccl_sharded_tms_5-2", 500, None),
                         ("apd_resid_mlp1", 200, 40_000)):
    m = Path(f"runs/gpu_check/{run}/metrics.json")
    if m.exists():
        metrics = json.loads(m.read_text())
        summary[run] = {"ms_per_step": metrics["ms_per_step"], "steps_timed": steps, "full_steps": full,
                        "minutes_for_full_steps": metrics["ms_per_step"] * full / 60_000 if full else None}
(res / "gpu_summary.json").write_text(json.dumps(summary, indent=1))
print(f"\nGPU: {gpu} (x{n_gpu})\ntests: {summary['tests']}\ntests of the compiled Γ: {summary['tests_compiled_ci']}")
for name in ("toy", "compile_ci", "cuda_graph", "cuda_graph_compile_ci", "induction", "gpt2"):
    rows = summary[f"benchmark_{name}"]
    for r in rows if isinstance(rows, list) else []:
        print(f"  {r['preset']:12s} {r['ci_fn']:9s} seq {str(r.get('seq_len') or '-'):>5s} {r['ms_per_step']:9.2f} ms/step "
              f"(host {r['host_ms_per_step']:7.2f}) {r['it_per_s']:8.1f} it/s  peak {r['peak_gb']:.2f} GB"
              + ("  compiled Γ" if r.get("compile_ci") else "") + ("  CUDA graph" if r.get("cuda_graph") else ""))
        if r["preset"] == "resid_mlp3":
            print(f"    -> {r['ms_per_step'] * 200_000 / 60_000:.1f} min for 200000 steps (goal < 30 on an H100)")
for run in ("resid_mlp3", "apd_resid_mlp1"):
    if run in summary:
        r = summary[run]
        print(f"{run}: {r['ms_per_step']:.2f} ms/step -> {r['minutes_for_full_steps']:.1f} min for {r['full_steps']} steps"
              + (" (goal < 30 on an H100)" if run == "resid_mlp3" else ""))
print(f"wrote {res / 'gpu_summary.json'}")
EOF
