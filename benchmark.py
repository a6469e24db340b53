"""Speed of one SPD training step at each preset's paper hyperparameters.

    python benchmark.py                          # toy presets: ms/step and peak memory
    python benchmark.py --presets induction --seq_lens 16 64 1024 --ci_fns scalar vector attention
    python benchmark.py --presets gpt2           # GPT-2 small architecture, random weights (same cost)
    python benchmark.py --presets tms_5-2 --profile   # also where a step's time goes (torch.profiler)
    python benchmark.py --presets tms_5-2 --compile   # spd_losses under torch.compile (an experiment)
    python benchmark.py --presets tms_5-2 --plain     # the plain spd_losses, without spd.py's section K
    python benchmark.py --presets resid_mlp3 --compile_ci   # the CI functions under torch.compile (section L)
    python benchmark.py --presets resid_mlp3 --device cuda --cuda_graph   # the whole step as one CUDA graph (an experiment)
    python benchmark.py --presets gpt2 --ci_fns scalar vector attention --params   # will it fit? (counts only)
    python benchmark.py --presets gpt2 --seq_lens 16 --processes 2 --shard_optimizer   # data parallel, per process
    python benchmark.py --presets tms_5-2 --against /tmp/old --rounds 8   # speedup over another checkout
    python benchmark.py --presets tms_5-2 --reference ../ref/spd --reference_python ../ref/venv/bin/python

Each (preset, CI function, sequence length) runs in its own subprocess, so the peak memory is
that configuration's alone (RSS on CPU, torch.cuda.max_memory_allocated on GPU). A step is the
whole loop iteration: batch, target pass, CI, every loss, backward, optimizer step. Reported:
the median over the timed steps after warm-up, and the host's share of it ("host ms": until the
step's last kernel is launched, before the GPU is waited for; on a CPU the whole step). On a GPU,
host ms near ms/step means the step waits on Python and kernel launches, not on the GPU. On a CPU
it times what optimize runs there (spd.py section K; --plain: the plain spd_losses). --reference
times the authors' code on the same machine in alternating rounds with this one (their code runs in
its own environment: see parity.py).
--processes N: each configuration data parallel over N processes (gloo on CPU, where they share
its threads; nccl with a GPU each), each on 1/N of the batch, as torchrun train.py runs; the row is
process 0's, with every process's peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REFERENCE_PRESETS = ("tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id", "resid_mlp1", "resid_mlp2", "resid_mlp3")
TOY = ["tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id", "resid_mlp1", "resid_mlp2", "resid_mlp3"]


def build(preset: str, ci_fn: str | None, seq_len: int | None, device: torch.device, batch: int | None):
    import models
    import spd
    import train

    overrides = {"ci_fn": ci_fn} if ci_fn else {}
    if batch:
        overrides["batch_size"] = batch
    cfg = spd.SPDConfig(**{**train.PRESETS[preset], **overrides})
    if preset == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel  # GPT-2 small's shapes; weights do not change the cost

        target = models.GPT2Logits(GPT2LMHeadModel(GPT2Config()).eval())
        S = seq_len or 8
        tokens = torch.randint(0, 50257, (cfg.batch_size, S), device=device)
        sample = lambda b: tokens[:b]  # noqa: E731
    else:
        sizes = {"seq_len": seq_len} if seq_len else {}
        target, tcfg = models.build_target(preset, **sizes)
        S = tcfg.get("seq_len")
        fn = models.batch_fn(tcfg, device)
        sample = lambda b: fn(b)  # noqa: E731
    torch.manual_seed(0)
    dec = spd.Decomposition.from_config(target.to(device), cfg, max_seq_len=S).to(device)
    return dec, cfg, sample


def count_one(preset: str, ci_fn: str | None, seq_len: int | None) -> dict:
    """Parameters a decomposition trains, counted on the meta device (nothing is allocated), and the
    fp32 training state they need: weights, gradients and Adam's two moments, 16 bytes each.
    Activations come on top (the timed runs' peak memory includes them)."""
    meta = torch.device("meta")
    with meta:
        dec, cfg, _ = build(preset, ci_fn, seq_len, meta, None)
    uv = sum(p.numel() for p in dec.components.parameters())
    ci = sum(p.numel() for p in dec.ci_fns.parameters())
    return {"preset": preset, "ci_fn": cfg.ci_fn, "seq_len": seq_len, "C": cfg.C, "d_gate": cfg.d_gate,
            "uv_params": uv, "ci_params": ci, "state_gb": 16 * (uv + ci) / 1e9}


def time_one(preset, ci_fn, seq_len, steps, device_name, batch, profile=False, compile=False, plain=False,
             shard=False, compile_ci=False, cuda_graph=False) -> dict:
    import spd

    device = torch.device(device_name)
    dec, cfg, sample = build(preset, ci_fn, seq_len, device, batch)
    losses_fn = spd.spd_losses if plain or not spd.fast_path(dec) else spd.spd_losses_fast  # as optimize, unless --plain
    losses_fn = torch.compile(losses_fn) if compile else losses_fn
    warmup = 10 if compile else 3 if compile_ci or cuda_graph else 2  # torch.compile recompiles over the first steps
    opt = spd.make_optimizer(dec, cfg, shard=shard, capturable=cuda_graph)
    world, params = spd.world_size(), dec.parameters_to_train()
    times, host_times = [], []

    def step() -> dict:
        losses = losses_fn(dec, sample(cfg.batch_size // world), cfg, cfg.p)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if world > 1:  # as spd.optimize
            spd.average_gradients_(params)
        opt.step()
        return losses

    if profile:  # the timed steps, under torch.profiler: top ops and how many ran per step
        from torch.profiler import profile as torch_profile

        prof = torch_profile()
        prof.__enter__()
    with spd.compiled_ci(dec) if compile_ci else contextlib.nullcontext():
        if cuda_graph:
            check_graphable(dec, cfg, device)
            step = cuda_graphed(step, warmup)  # runs the warm-up steps, then captures one
        for _ in range(steps + warmup):
            t = time.perf_counter()
            losses = step()
            host_times.append(time.perf_counter() - t)  # the host's share: launching the step's work
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    if profile:
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        top_level = sum(1 for e in prof.events() if e.name.startswith("aten::")
                        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
        print(f"top-level aten ops per step: {top_level / (steps + warmup):.0f}", file=sys.stderr)
    ms = statistics.median(times[warmup:]) * 1000
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"preset": preset, "ci_fn": cfg.ci_fn, "seq_len": seq_len, "batch": cfg.batch_size, "C": cfg.C,
            "d_gate": cfg.d_gate, "ms_per_step": ms, "it_per_s": 1000 / ms, "peak_gb": peak / 1e9,
            "host_ms_per_step": statistics.median(host_times[warmup:]) * 1000, "total_loss": losses["total"].item(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
            "path": ("plain" if plain or not spd.fast_path(dec) else "fast (spd.py section K)")
            + (", compiled CI (section L)" if compile_ci else "") + (", CUDA graph" if cuda_graph else ""),
            "processes": world, "shard_optimizer": shard, "compile_ci": compile_ci, "cuda_graph": cuda_graph}


# ------------------------------------------------------------------------------------------------
# An experiment for GPUs, not yet run on one (--cuda_graph): the whole training step captured once
# into a CUDA graph and replayed, so that the host launches one graph per step instead of ~1000
# kernels. A resid_mlp3 step's host-side work alone (its ops on tiny tensors) took 7.9-8.3 ms on
# this project's CPU (results/benchmark.md), near the 9 ms/step of the 30-minute goal.
# test_cuda.py checks a replay against the eager step. train.py does not use it.
# ------------------------------------------------------------------------------------------------


def check_graphable(dec, cfg, device) -> None:
    """What a replayed graph would freeze or cannot hold: ValueError naming it."""
    if device.type != "cuda":
        raise ValueError(f"--cuda_graph needs --device cuda, got {device}")
    if (cfg.stochastic_recon_partial or cfg.recon_partial) and cfg.partial_routing == "pass":
        raise ValueError("--cuda_graph: the partial losses draw their subset of matrices on the host, which a "
                         "graph would freeze; this preset needs partial_routing='position'")


def cuda_graphed(step: Callable[[], dict], warmup: int) -> Callable[[], dict]:
    """`step` (a whole training step: fixed shapes, no host-device sync, randomness drawn on the GPU
    only) run `warmup` times on a side stream, as torch requires before a capture, then captured once.
    Returns a function that replays the capture and returns its losses (the same tensors each time,
    overwritten by each replay). Random draws in a replay continue the GPU generator's stream, as
    the eager step's would (torch's graph-safe RNG)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # zero_grad(set_to_none) inside: the gradients live in the graph's memory
        losses = step()

    def replay() -> dict:
        graph.replay()
        return losses

    return replay


def _parallel_worker(rank: int, world: int, port: int, out: str, one: tuple) -> None:
    """One of time_parallel's processes: joins the group, times its share, writes its row."""
    import torch.distributed as dist

    import spd

    preset, ci_fn, seq_len, steps, device_name, batch, shard = one
    cuda = device_name.startswith("cuda")
    if cuda:
        device_name = f"cuda:{rank}"
        torch.cuda.set_device(device_name)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    spd.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=world)
    try:
        row = time_one(preset, ci_fn, seq_len, steps, device_name, batch, shard=shard)
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def time_parallel(processes: int, *one) -> dict:
    """time_one in `processes` processes (torch.distributed); process 0's row with every process's peak."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_parallel_worker, args=(processes, port, out, one), nprocs=processes, join=True)
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(processes)]
    return {**rows[0], "peak_gb_per_process": [r["peak_gb"] for r in rows]}


HERE = Path(__file__).resolve().parent


def run_child(checkout: Path, preset, ci_fn, seq_len, args) -> dict | str:
    """One configuration in a fresh process, with the benchmark.py (and so the spd.py) of `checkout`.
    Returns its row, or why it failed."""
    cmd = [sys.executable, str(checkout / "benchmark.py"), "--_one", preset, ci_fn or "-", str(seq_len or "-"),
           "--steps", str(args.steps), "--device", args.device]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    cmd += ["--profile"] * args.profile + ["--compile"] * args.compile + ["--plain"] * args.plain
    cmd += ["--compile_ci"] * args.compile_ci + ["--cuda_graph"] * args.cuda_graph
    cmd += ["--processes", str(args.processes or 1)] + ["--shard_optimizer"] * args.shard_optimizer
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout)
    if args.profile:
        print(res.stderr)
    line = [l for l in res.stdout.splitlines() if l.startswith("ROW ")]
    if line:
        return json.loads(line[0][4:])
    why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit code {res.returncode}"
    return why + " (killed: out of memory?)" if res.returncode == -9 else why


def run_reference(preset, args) -> dict | str:
    """The authors' optimisation step (parity.their_step_times: their code in its own environment)
    on this preset, as a row like run_child's."""
    import parity

    if preset not in REFERENCE_PRESETS:
        return f"--reference times {', '.join(REFERENCE_PRESETS)} only"
    try:
        r = parity.their_step_times(preset, args.steps + 1, args.reference, args.reference_python)
    except SystemExit as e:
        return str(e).splitlines()[-1]
    times = r["times"][1:]  # one more warm-up step, as time_one's two
    return {"ms_per_step": statistics.median(times) * 1000, "peak_gb": r["peak_bytes"] / 1e9}


def compare(args) -> None:
    """This checkout against another one (say a git worktree of an older commit), or against the
    authors' code (--reference), in alternating rounds on the same machine, so that its drift over
    minutes hits both alike: per preset the median ms/step of each, the median over rounds of the
    per-round ratio other / this, and each one's peak memory."""
    if args.reference:
        if not (Path(args.reference) / "spd" / "run_spd.py").exists() or not args.reference_python:
            raise SystemExit(f"--reference {args.reference}: pass a checkout of goodfire-ai/spd (spd-paper) "
                             "and --reference_python, the python of the environment it runs in")
        other, run_other = f"the authors' code in {args.reference}", lambda p, c, s: run_reference(p, args)
    else:
        other = Path(args.against).resolve()
        if not (other / "benchmark.py").exists():
            raise SystemExit(f"--against {other}: no benchmark.py there; pass a checkout of this project")
        run_other = lambda p, c, s: run_child(other, p, c, s, args)  # noqa: E731
    runs = {(p, c, s): {"other": [], "this": [], "peak_gb": {}} for p in args.presets for c in args.ci_fns
            for s in args.seq_lens}
    for i in range(args.rounds):
        for (preset, ci_fn, seq_len), ms in runs.items():
            for name in ("other", "this")[:: 1 if i % 2 == 0 else -1]:
                r = run_other(preset, ci_fn, seq_len) if name == "other" else run_child(HERE, preset, ci_fn, seq_len, args)
                if isinstance(r, str):
                    raise SystemExit(f"{preset} ({name}) failed: {r}")
                ms[name].append(r["ms_per_step"])
                ms["peak_gb"][name] = max(ms["peak_gb"].get(name, 0.0), r["peak_gb"])
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"other: {other}; threads: {torch.get_num_threads()}")
    print(f"{'preset':14s} {'ci_fn':9s} {'seq':>5s} {'other ms':>9s} {'this ms':>8s} {'speedup':>8s} "
          f"{'other GB':>8s} {'this GB':>8s}  per round")
    for (preset, ci_fn, seq_len), ms in runs.items():
        ratios = [o / t for o, t in zip(ms["other"], ms["this"])]
        print(f"{preset:14s} {ci_fn or 'preset':9s} {str(seq_len or '-'):>5s} {statistics.median(ms['other']):9.1f} "
              f"{statistics.median(ms['this']):8.1f} {statistics.median(ratios):7.2f}x {ms['peak_gb']['other']:8.2f} "
              f"{ms['peak_gb']['this']:8.2f}  " + " ".join(f"{r:.2f}" for r in ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"other": str(other), "this": str(HERE), "threads": torch.get_num_threads(), "args": vars(args),
                       "ms_per_step": {"/".join(map(str, k)): v for k, v in runs.items()}}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=TOY)
    ap.add_argument("--ci_fns", nargs="+", default=[None], help="override the preset's CI function(s)")
    ap.add_argument("--seq_lens", nargs="+", type=int, default=[None], help="induction/gpt2 sequence lengths")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size (the paper's Table 2 uses 64)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--profile", action="store_true", help="print where each configuration's step time goes")
    ap.add_argument("--plain", action="store_true",
                    help="time the plain spd_losses (spd.py sections A-J) instead of what optimize runs (on a CPU: section K)")
    ap.add_argument("--compile", action="store_true", help="time spd_losses under torch.compile (an experiment; train.py does not use it)")
    ap.add_argument("--compile_ci", action="store_true",
                    help="run the CI functions under torch.compile, as train.py --compile_ci (spd.py section L)")
    ap.add_argument("--cuda_graph", action="store_true",
                    help="capture the whole step in a CUDA graph and replay it (an experiment, GPU only; train.py does not use it)")
    ap.add_argument("--params", action="store_true",
                    help="only count the trained parameters and their fp32 training state (nothing is run)")
    ap.add_argument("--processes", type=int, default=None, metavar="N",
                    help="time each configuration data parallel over N processes; with --params: also the state "
                         "per process with --shard_optimizer (Adam's moments split: 8 + 8/N bytes per parameter)")
    ap.add_argument("--shard_optimizer", action="store_true",
                    help="with --processes: Adam's moments split over the processes, as train.py --shard_optimizer")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="compare with another checkout of this project (e.g. `git worktree add /tmp/old COMMIT`)")
    ap.add_argument("--reference", default=None, metavar="DIR",
                    help="compare with the authors' code: a checkout of goodfire-ai/spd at spd-paper (c6314c9f)")
    ap.add_argument("--reference_python", default=None, metavar="PY",
                    help="with --reference: the python of the virtual environment their code runs in")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds for --against / --reference")
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import train

    unknown = [p for p in args.presets if p not in train.PRESETS]
    if unknown:
        raise SystemExit(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(train.PRESETS)}")
    if args.processes is not None and args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {args.processes}")
    if args.shard_optimizer and not (args.processes or 1) > 1 and not args.params:
        raise SystemExit("--shard_optimizer splits Adam's moments over processes; add --processes N (N >= 2)")
    if (args.processes or 1) > 1 and (args.against or args.reference or args.profile or args.compile or args.plain):
        raise SystemExit("--processes times this checkout alone, without --against, --reference, --profile, "
                         "--compile or --plain")
    if args.cuda_graph and (not args.device.startswith("cuda") or args.compile or (args.processes or 1) > 1
                            or args.against or args.reference):
        raise SystemExit(f"--cuda_graph times one process on a GPU (--device cuda, got {args.device}), without --compile, "
                         "--processes, --against or --reference")
    if args.params:
        sharded = f"  sharded over {args.processes}, GB" if args.processes else ""
        print(f"{'preset':14s} {'ci_fn':9s} {'seq':>5s} {'U,V (M)':>9s} {'CI (M)':>9s} {'state GB':>9s}{sharded}")
        for preset in args.presets:
            for ci_fn in args.ci_fns:
                for seq_len in args.seq_lens:
                    try:
                        r = count_one(preset, ci_fn, seq_len)
                    except ValueError as e:
                        print(f"{preset:14s} {ci_fn or 'preset':9s} {str(seq_len or '-'):>5s} failed: {e}")
                        continue
                    per_process = (f"  {r['state_gb'] * (8 + 8 / args.processes) / 16:>20.3g}" if args.processes else "")
                    print(f"{preset:14s} {r['ci_fn']:9s} {str(seq_len or '-'):>5s} {r['uv_params'] / 1e6:9.4g} "
                          f"{r['ci_params'] / 1e6:9.4g} {r['state_gb']:9.3g}{per_process}")
        return
    if args._one:  # child process: one configuration
        preset, ci_fn, seq_len = args._one
        one = (preset, None if ci_fn == "-" else ci_fn, None if seq_len == "-" else int(seq_len), args.steps,
               args.device, args.batch)
        row = (time_parallel(args.processes, *one, args.shard_optimizer) if (args.processes or 1) > 1 else
               time_one(*one, args.profile, args.compile, args.plain, compile_ci=args.compile_ci,
                        cuda_graph=args.cuda_graph))
        print("ROW " + json.dumps(row))
        return
    if args.against or args.reference:
        return compare(args)
    rows = []
    print(f"{'preset':14s} {'ci_fn':9s} {'seq':>5s} {'ms/step':>10s} {'host ms':>8s} {'it/s':>7s} {'peak GB':>8s}  path")
    for preset in args.presets:
        for ci_fn in args.ci_fns:
            for seq_len in args.seq_lens:
                r = run_child(HERE, preset, ci_fn, seq_len, args)
                if isinstance(r, str):
                    print(f"{preset:14s} {ci_fn or 'preset':9s} {str(seq_len or '-'):>5s} failed: {r}", flush=True)
                    continue
                rows.append(r)
                where = r["path"] if r.get("processes", 1) == 1 else (
                    f"{r['processes']} processes{', --shard_optimizer' if r['shard_optimizer'] else ''}, peak GB each: "
                    + " ".join(f"{g:.2f}" for g in r["peak_gb_per_process"]))
                print(f"{preset:14s} {r['ci_fn']:9s} {str(seq_len or '-'):>5s} {r['ms_per_step']:10.1f} "
                      f"{r['host_ms_per_step']:8.1f} {r['it_per_s']:7.2f} {r['peak_gb']:8.2f}  {where}", flush=True)
                if args.json:  # after every row, so that a run stopped by a time limit keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    if rows:
        print(f"device: {rows[0]['device']}")


if __name__ == "__main__":
    main()
