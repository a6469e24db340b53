"""Side by side with the authors' code: the same target, parameters, batch and masks in both codes.

The authors' code (github.com/goodfire-ai/spd, branch spd-paper, commit c6314c9f) is a measuring
instrument here, never a dependency: it runs in its own virtual environment, in a subprocess, and
nothing of it is copied. Its package is also called `spd`, so the two never share a process: this
file's "ours" half imports this project, its "theirs" half (the hidden `_theirs` command) only the
authors' package, found through --ref.

    python parity.py step --model tms_5-2 --ref ../ref/spd --ref_python ../ref/venv/bin/python
    python parity.py step --model resid_mlp1 ... --fixture fixtures/parity_resid_mlp1.json
    python parity.py train --model tms_5-2 --seed 0 --ref ... --ref_python ... --out runs/parity/theirs_tms_5-2_s0

    python parity.py trajectory --model tms_5-2 --seed 9 --steps 40000 --side theirs --out runs/traj_s9 --ref ... --ref_python ...
    python parity.py trajectory ... --side ours --tied_updates separate    (then --side compare)
    python parity.py init --model tms_5-2 --n 500 --batches 100 --ref ... --ref_python ... --report R.json
    python parity.py from_theirs --model tms_5-2 --seeds 0 1 2 --ref ... --ref_python ... --out runs/from_theirs

`step`: one optimisation step of the authors' own `optimize` (steps=1) and of ours on identical
inputs; prints every causal importance, loss term, gradient and updated parameter side by side.
`train`: a full decomposition by the authors' `optimize` of our preset target, written as a run
folder of ours, so that `train.py --evaluate_only` measures it with our evaluation. Every
--checkpoint_every steps it saves their parameters, AdamW state and random state; `--resume`
continues a stopped run from there with the same numbers as an unbroken run (their runs last hours
on a CPU; `--stop_at K` ends one after step K on purpose).
`trajectory`: both codes for a whole run from our initial state for --seed on one shared stream of
batches and mask draws (`stream`), each side in its own process (run them side by side); `compare`
prints how far apart they are at every recorded step and evaluates both final decompositions.
`init`: both codes' random initial states for many seeds and many batches of each code's data loader,
compared as distributions (per-seed means and standard deviations, z-scores, KS distances).
`from_theirs`: our loop with our own batch and mask draws from their initial state for each seed.

Name and layout mapping (theirs -> ours), for matrix `name` (their key: name with "." -> "-"):
    components.<key>.A [d_in, C]      = V^T   (their layer computes ((x A) * m) B + bias)
    components.<key>.B [C, d_out]     = U^T
    gates.<key>.mlp_in  [C, d_gate]   = ci_fns.<key>.w_in
    gates.<key>.in_bias [C, d_gate]   = ci_fns.<key>.b_in
    gates.<key>.mlp_out [C, d_gate]   = ci_fns.<key>.w_out
    gates.<key>.out_bias [C]          = ci_fns.<key>.b_out
Tied TMS weights: their linear2.A / B alias linear1's B^T / A^T (two Parameters, two Adam updates);
ours store one (U, V) for linear1, and linear2 reads (V^T, U^T). Targets: their TMSModel's
linear1.weight / linear2.bias / hidden_layers.i.weight and ResidualMLP's W_E / W_U (= W_E^T) /
layers.i.mlp_in.weight / mlp_out.weight are ours under the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REF_COMMIT = "c6314c9f"
MODELS = ("tms_5-2", "tms_5-2-id", "resid_mlp1")  # compared step by step (fixtures/)
TRAIN_MODELS = MODELS + ("tms_40-10", "tms_40-10-id")  # `train` also takes the 40-10 presets (other sizes)
TMS_MODELS = tuple(m for m in TRAIN_MODELS if m.startswith("tms"))  # `trajectory`: its stream draws TMS data


def their_key(name: str) -> str:
    return name.replace(".", "-")


# ================================================================================================
# Ours: identical inputs from a seed, our step, the mapping to their names
# ================================================================================================


def make_inputs(model: str, seed: int = 0, batch_size: int | None = None, n_mask_samples: int = 1,
                target_state: dict | None = None, ci_biases: str = "random") -> dict:
    """Everything one step needs, from `seed`: the target (untrained, built from its preset seed,
    unless `target_state` is given), our initial U, V and CI parameters (ci_biases "random": the CI
    biases set to small random values so that their mapping is tested too; "init": left at the
    initialisation's zeros, where every zero input's Γ(0) is exactly 0, on the sigmoids' kinks), a
    batch from the preset's data, and the uniform draws r of every mask: r[loss][s][name] [B, C],
    loss 0 = stochastic recon, 1 = layerwise."""
    import models
    import spd
    import train

    cfg = spd.SPDConfig(**{**train.PRESETS[model], "n_mask_samples": n_mask_samples,
                           **({"batch_size": batch_size} if batch_size else {})})
    target, tcfg = models.build_target(model)
    if target_state is not None:
        target.load_state_dict(target_state)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = spd.Decomposition.from_config(target, cfg)
    assert ci_biases in ("random", "init"), ci_biases
    with torch.no_grad():
        for ci_fn in dec.ci_fns.values():
            b_in, b_out = torch.randn(ci_fn.b_in.shape, generator=g), torch.randn(ci_fn.b_out.shape, generator=g)
            if ci_biases == "random":
                ci_fn.b_in.copy_(0.1 * b_in), ci_fn.b_out.copy_(0.1 * b_out)
    x = models.batch_fn(tcfg)(cfg.batch_size, g)
    r = [[{n: torch.rand(cfg.batch_size, dec.C[n], generator=g) for n in dec.names}
          for _ in range(cfg.n_mask_samples)] for _ in range(2)]
    return {"model": model, "seed": seed, "cfg": cfg, "target": target, "tcfg": tcfg, "dec": dec, "x": x, "r": r}


def to_theirs(dec) -> dict[str, torch.Tensor]:
    """Our U, V and CI parameters under their names and layouts (table in the module docstring)."""
    out = {}
    for name in dec.names:
        U, V = dec.UV(name)
        k, ci = their_key(name), dec.ci_fns[name.replace(".", "/")]
        out |= {f"components.{k}.A": V.T, f"components.{k}.B": U.T, f"gates.{k}.mlp_in": ci.w_in,
                f"gates.{k}.in_bias": ci.b_in, f"gates.{k}.mlp_out": ci.w_out, f"gates.{k}.out_bias": ci.b_out}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}  # copies: the caller may change dec


def load_theirs(dec, state: dict[str, torch.Tensor]) -> None:
    """Their trained components and gates (a `model_<step>.pth` state dict) into our Decomposition.
    A tied matrix (TMS linear2) is read from its partner, which their aliasing keeps equal to it."""
    with torch.no_grad():
        for name in dec.names:
            k, ci = their_key(name), dec.ci_fns[name.replace(".", "/")]
            if name not in dec.tied:
                comp = dec.components[name.replace(".", "/")]
                comp.V.copy_(state[f"components.{k}.A"].T)
                comp.U.copy_(state[f"components.{k}.B"].T)
            ci.w_in.copy_(state[f"gates.{k}.mlp_in"])
            ci.b_in.copy_(state[f"gates.{k}.in_bias"])
            ci.w_out.copy_(state[f"gates.{k}.mlp_out"])
            ci.b_out.copy_(state[f"gates.{k}.out_bias"])


def target_to_theirs(model: str, target) -> dict:
    """Our target's weights and their model class's config."""
    tcfg = {k: v for k, v in target.state_dict().items()}
    if model.startswith("tms"):
        cfg = {"n_features": target.linear1.in_features, "n_hidden": target.linear1.out_features,
               "n_hidden_layers": len(target.hidden_layers), "tied_weights": True, "init_bias_to_zero": False,
               "device": "cpu"}
        state = {"linear1.weight": target.linear1.weight.detach(), "linear2.weight": target.linear1.weight.detach().T,
                 "linear2.bias": target.linear2.bias.detach()}
        state |= {f"hidden_layers.{i}.weight": l.weight.detach() for i, l in enumerate(target.hidden_layers)}
        return {"family": "tms", "config": cfg, "state": state}
    assert model.startswith("resid_mlp"), model
    cfg = {"n_features": target.W_E.shape[0], "d_embed": target.W_E.shape[1], "d_mlp": target.layers[0].mlp_in.out_features,
           "n_layers": len(target.layers), "act_fn_name": "relu", "in_bias": False, "out_bias": False}
    state = {"W_E": target.W_E.detach(), "W_U": target.W_E.detach().T.contiguous()}
    for i, layer in enumerate(target.layers):
        state |= {f"layers.{i}.mlp_in.weight": layer.mlp_in.weight.detach(),
                  f"layers.{i}.mlp_out.weight": layer.mlp_out.weight.detach()}
    del tcfg
    return {"family": "resid_mlp", "config": cfg, "state": state}


def their_config(model: str, cfg, seed: int, steps: int) -> dict:
    """Their Config for our preset: the values of their yaml for that experiment (the paper's), the
    steps asked for, wandb and figures off (figures draw extra batches from the RNG and cost time)."""
    common = dict(wandb_project=None, seed=seed, C=cfg.C, n_mask_samples=cfg.n_mask_samples,
                  n_ci_mlp_neurons=cfg.d_gate, target_module_patterns=list(cfg.targets), faithfulness_coeff=1.0,
                  stochastic_recon_coeff=1.0, stochastic_recon_layerwise_coeff=1.0,
                  importance_minimality_coeff=cfg.importance_minimality, pnorm=cfg.p, output_loss_type="mse",
                  batch_size=cfg.batch_size, steps=steps, lr=cfg.lr, lr_schedule=cfg.lr_schedule,
                  lr_warmup_pct=cfg.lr_warmup_pct, n_eval_steps=100, image_freq=None, print_freq=1000, save_freq=None)
    if model.startswith("tms"):
        return common | {"pretrained_model_class": "spd.experiments.tms.models.TMSModel",
                         "task_config": {"task_name": "tms", "feature_probability": 0.05,
                                         "data_generation_type": "at_least_zero_active"}}
    return common | {"out_recon_coeff": 0.0,  # as their resid yaml: computed, weight 0
                     "pretrained_model_class": "spd.experiments.resid_mlp.models.ResidualMLP",
                     "task_config": {"task_name": "residual_mlp", "feature_probability": 0.01,
                                     "data_generation_type": "at_least_zero_active"}}


def our_step(inp: dict, tied_updates: str = "shared", fast: bool = True) -> dict:
    """Our causal importances, losses, gradients and one AdamW step on `inp`, under their names;
    fast: through spd_losses_fast (what optimize runs on a CPU), else the plain spd_losses."""
    import spd

    dec, cfg, x = inp["dec"], inp["cfg"], inp["x"]
    state0 = {k: v.clone() for k, v in dec.state_dict().items()}
    try:
        if tied_updates != dec_tied_mode(dec):
            dec = rebuild(inp, tied_updates)
        acts = dec.target_forward(x)[1]
        with torch.no_grad():
            lower, upper = dec.causal_importance(acts)
        live = spd.live_rows(acts)
        with fixed_draws(inp["r"], live if fast else None):
            losses = (spd.spd_losses_fast if fast else spd.spd_losses)(dec, x, cfg, cfg.p)
        opt = spd.make_optimizer(dec, cfg)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        grads = grads_as_theirs(dec)
        opt.step()
        return {"ci": {n: lower[n] for n in dec.names}, "ci_upper": {n: upper[n] for n in dec.names},
                "losses": {k: v.item() for k, v in losses.items()}, "grads": grads, "params": to_theirs(dec)}
    finally:
        inp["dec"].load_state_dict(state0)


def dec_tied_mode(dec) -> str:
    return "separate" if dec._aliases else "shared"


def rebuild(inp: dict, tied_updates: str):
    """The same decomposition (same values) with the other tied-update mode."""
    import spd

    cfg, old = inp["cfg"], inp["dec"]
    dec = spd.Decomposition.from_config(inp["target"], dataclasses.replace(cfg, tied_updates=tied_updates)).to(inp["x"].dtype)
    dec.load_state_dict(old.state_dict())
    return dec


def grads_as_theirs(dec) -> dict[str, torch.Tensor]:
    """Gradients under their names. A tied matrix: with tied_updates="separate" each use's own
    gradient (as their two aliased Parameters); with "shared" both uses summed into linear1's."""
    out = {}
    for name in dec.names:
        k, ci = their_key(name), dec.ci_fns[name.replace(".", "/")]
        if name not in dec.tied or dec._aliases:  # else its U, V gradient is part of its partner's
            U, V = dec.UV(name)
            out |= {f"components.{k}.A": V.grad.T, f"components.{k}.B": U.grad.T}
        out |= {f"gates.{k}.mlp_in": ci.w_in.grad, f"gates.{k}.in_bias": ci.b_in.grad,
                f"gates.{k}.mlp_out": ci.w_out.grad, f"gates.{k}.out_bias": ci.b_out.grad}
    return out


class fixed_draws:
    """Within the block, torch.rand_like returns the prepared uniform draws r in the order spd_losses
    draws its masks (stochastic recon's S samples, then the layerwise loss's, each over dec.names),
    restricted to the live rows where the loss passes hold only those (spd.live_rows)."""

    def __init__(self, r: list, live: torch.Tensor | None):
        self.queue = [d[n] for loss in r for d in loss for n in d]
        self.live = live

    def __enter__(self):
        self.orig = torch.rand_like

        def rand_like(t, *a, **kw):
            r = self.queue.pop(0)
            r = r[self.live] if self.live is not None and r.shape[0] != t.shape[0] else r
            assert r.shape == t.shape, (r.shape, t.shape)
            return r.to(t)

        torch.rand_like = rand_like
        return self

    def __exit__(self, *exc):
        torch.rand_like = self.orig
        assert exc[0] is not None or not self.queue, f"{len(self.queue)} prepared mask draws were not used"


# --- summaries: what a fixture stores, and what compare() compares

def summary(t: torch.Tensor, key: str, n_probes: int = 3, full_below: int = 64) -> dict:
    """A tensor as its shape, sum, norm, inner products with seeded N(0, 1) probes (one wrong entry
    moves one of them), and its values when small."""
    t = t.detach().double().flatten()
    g = torch.Generator().manual_seed(sum(map(ord, key)))
    probes = torch.randn(n_probes, t.numel(), generator=g, dtype=torch.float64)
    out = {"numel": t.numel(), "sum": t.sum().item(), "norm": t.norm().item(), "probes": (probes @ t).tolist()}
    if t.numel() <= full_below:
        out["values"] = t.tolist()
    return out


def compare_summaries(ours: dict, theirs: dict, rtol: float = 1e-5) -> float:
    """Largest difference between two summaries, relative to the tensor's norm (0 for equal ones)."""
    assert ours["numel"] == theirs["numel"], (ours["numel"], theirs["numel"])
    scale = max(theirs["norm"], 1e-30)
    diffs = [abs(ours["norm"] - theirs["norm"]), abs(ours["sum"] - theirs["sum"]) / math.sqrt(ours["numel"])]
    diffs += [abs(a - b) / math.sqrt(ours["numel"]) for a, b in zip(ours["probes"], theirs["probes"])]
    if "values" in theirs:
        diffs.append(max(abs(a - b) for a, b in zip(ours["values"], theirs["values"])))
    return max(diffs) / scale


def summed_tied_grads(theirs: dict, tied: dict[str, str]) -> dict:
    """Their result with each tied pair's gradients summed into the partner's, as our shared (U, V)
    receives them: dL/dV^T = linear1.A.grad + linear2.B.grad^T, dL/dU^T = linear1.B.grad + linear2.A.grad^T."""
    grads = dict(theirs["grads"])
    for s, t in tied.items():
        ks, kt = their_key(s), their_key(t)
        grads[f"components.{kt}.A"] = grads[f"components.{kt}.A"] + grads.pop(f"components.{ks}.B").T
        grads[f"components.{kt}.B"] = grads[f"components.{kt}.B"] + grads.pop(f"components.{ks}.A").T
    return {**theirs, "grads": grads}


def summarise(result: dict) -> dict:
    """A step result (ours or theirs) as summaries keyed "ci/<name>", "grad/<param>", "param/<param>"."""
    out = {"losses": result["losses"]}
    for group, tensors in (("ci", result["ci"]), ("ci_upper", result["ci_upper"]), ("grad", result["grads"]),
                           ("param", result["params"])):
        for k, t in tensors.items():
            out[f"{group}/{k}"] = summary(t, f"{group}/{k}")
    return out


LOSS_NAMES = {"faithfulness": "loss/faithfulness", "stochastic_recon": "loss/stochastic_recon",
              "stochastic_recon_layerwise": "loss/stochastic_recon_layerwise",
              "importance_minimality": "loss/importance_minimality", "total": "loss/total"}


def compare(a: dict, b: dict) -> dict[str, float]:
    """{quantity: relative difference} for every loss and every tensor summary both have."""
    rows = {f"loss {k}": abs(a["losses"][k] - v) / max(abs(v), 1e-30) for k, v in b["losses"].items()}
    return rows | {k: compare_summaries(a[k], b[k]) for k in sorted(b) if k != "losses" and k in a}


def in_double(inp: dict) -> dict:
    """A float64 copy of the inputs: the rounding-free value both float32 codes approximate."""
    import copy

    out = copy.deepcopy(inp)
    out["dec"].double()
    out["x"] = out["x"].double()
    out["r"] = [[{n: r.double() for n, r in d.items()} for d in loss] for loss in out["r"]]
    return out


# ================================================================================================
# Trajectory: both codes for many steps from one initial state on one shared stream of batches
# and mask draws, so that the runs can differ only by what the two loops compute
# ================================================================================================


def stream(seed: int, step: int, spec: dict) -> tuple[torch.Tensor, list]:
    """Step `step`'s TMS batch and mask draws, drawn the same way in both halves: x [B, n] with each
    feature active with probability p and its value uniform in [0, 1] (both codes' data), and
    r[loss][s][name] [B, C] as make_inputs."""
    g = torch.Generator().manual_seed(1_000_003 * seed + step)
    B, n = spec["batch_size"], spec["n_features"]
    x = torch.rand(B, n, generator=g) * (torch.rand(B, n, generator=g) < spec["feature_probability"])
    r = [[{name: torch.rand(B, c, generator=g) for name, c in spec["C"].items()} for _ in range(spec["S"])]
         for _ in range(2)]
    return x, r


def recorded(step: int, every: int, steps: int) -> bool:
    """The steps after whose update a trajectory records the parameters (and their losses)."""
    return step % every == 0 or step == steps - 1


def our_trajectory(dec, cfg, spec: dict, seed: int, every: int) -> dict:
    """spd.optimize (the CPU fast path, as train.py runs it) on the shared stream: {step: {"losses",
    "params"}} at the recorded steps, the params after that step's update, under their names."""
    import spd

    draws, step = fixed_draws([], None), [-1]

    def batch_fn(batch_size):
        step[0] += 1
        assert not draws.queue, f"{len(draws.queue)} mask draws of step {step[0] - 1} were not used"
        x, r = stream(seed, step[0], spec)
        draws.queue = [d[n] for loss in r for d in loss for n in d]
        draws.live = spd.live_rows(dec.target_forward(x)[1]) if spd.fast_path(dec) else None
        return x

    out = {}

    def log(s, losses):
        assert s == step[0] and recorded(s, every, cfg.steps)
        out[s] = {"losses": losses, "params": to_theirs(dec)}

    with draws:
        spd.optimize(dec, batch_fn, cfg, log=log, log_every=every, progress=False)
    return out


def preset(model: str, *flags: str):
    """train.py's target for MODEL (trained, or loaded from its cache), its data config and the SPD
    config, as `python train.py --model MODEL FLAGS` would build them."""
    import train

    targs = train.parse_args(["--model", model, "--no_progress", *flags])
    target, tcfg = train.get_target(targs, torch.device("cpu"))
    return target, tcfg, train.spd_config(targs)


def trajectory_setup(args, target_state: dict | None = None):
    """The preset's trained target (or, given target_state, the preset's model with those weights: a
    fixture's, since the last digits of a trained target depend on the machine), our initial
    decomposition for --seed (train.py's init) in the asked tied-update mode, and the stream's shape."""
    import spd

    target, tcfg, cfg = preset(args.model)
    if target_state is not None:
        target.load_state_dict({k: torch.tensor(v) for k, v in target_state.items()})
    cfg = spd.SPDConfig(**{**vars(cfg), "steps": args.steps, "seed": args.seed, "tied_updates": args.tied_updates})
    torch.manual_seed(args.seed)
    dec = spd.Decomposition.from_config(target, dataclasses.replace(cfg, tied_updates="shared"))
    init = to_theirs(dec)  # the same initial values whichever mode is asked for
    dec = spd.Decomposition.from_config(target, cfg)
    load_theirs(dec, init)
    spec = {"batch_size": cfg.batch_size, "n_features": target.linear1.in_features, "S": cfg.n_mask_samples,
            "feature_probability": tcfg["p"], "C": dict(dec.C)}
    return target, cfg, dec, init, spec


def cmd_trajectory(args) -> None:
    """--side ours (tied_updates of --tied_updates) or theirs: runs it and saves DIR/<side>.pt;
    --side compare: the relative differences at every recorded step, and our evaluation of each
    side's final decomposition, into DIR/compare.json; --side kinks: near_kinks, into DIR/kinks.json."""
    import train

    torch.set_num_threads(args.threads)
    target, cfg, dec, init, spec = trajectory_setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "seed": args.seed, "steps": args.steps, "every": args.every,
            "code": train.code_version(), "ref_commit": REF_COMMIT, "torch": str(torch.__version__)}
    if args.side == "ours":
        t0 = time.time()
        record = our_trajectory(dec, cfg, spec, args.seed, args.every)
        meta["seconds"] = time.time() - t0
        torch.save({"meta": meta | {"tied_updates": args.tied_updates}, "record": record}, out / f"ours_{args.tied_updates}.pt")
        return
    if args.side == "theirs":
        job = {"target": target_to_theirs(args.model, target), "params": init, "stream": spec, "seed": args.seed,
               "every": args.every, "config": their_config(args.model, cfg, args.seed, args.steps) | {"print_freq": 10**9},
               "tied": bool(dec.tied), "result": str((out / "theirs.pt").resolve())}
        t0 = time.time()
        run_theirs("trajectory", job, args.ref, args.ref_python)
        saved = torch.load(out / "theirs.pt", weights_only=True)
        torch.save({"meta": meta | {"seconds": time.time() - t0}, "record": saved}, out / "theirs.pt")
        return
    if args.side == "kinks":
        return near_kinks(dec, out, spec, args.seed)
    import analysis

    runs = {f.stem: torch.load(f, weights_only=True) for f in sorted(out.glob("*.pt"))}
    if "theirs" not in runs or len(runs) < 2:
        raise SystemExit(f"{out} needs theirs.pt and at least one ours_<mode>.pt; run --side theirs and --side ours first")
    theirs = runs.pop("theirs")["record"]
    report = {**meta, "command": "python parity.py " + shlex.join(sys.argv[1:]), "vs_theirs": {}, "final": {}}
    for name, run in runs.items():
        rows = {}
        for s, rec in run["record"].items():
            t = theirs[s]
            rows[s] = {"loss/" + k: abs(v - t["losses"][k]) / max(abs(t["losses"][k]), 1e-30) for k, v in rec["losses"].items()}
            rows[s]["params"] = max(float((v - t["params"][k]).norm() / t["params"][k].norm().clamp_min(1e-30))
                                    for k, v in rec["params"].items())
        report["vs_theirs"][name] = rows
    last = args.steps - 1
    for name, params in [("theirs", theirs[last]["params"])] + [(n, r["record"][last]["params"]) for n, r in runs.items()]:
        load_theirs(dec, params)
        (out / name).mkdir(exist_ok=True)
        m = analysis.evaluate_tms(dec, out / name)  # (and its figures there)
        report["final"][name] = {k: m[k] for k in ("mmcs", "ml2r", "ml2r_large", "linear1/n_large_subcomponents")}
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    if args.fixture:  # their recorded losses and parameter summaries, for test_parity.py
        steps = {str(s): {"losses": rec["losses"]} | {f"param/{k}": summary(v, f"param/{k}") for k, v in rec["params"].items()}
                 for s, rec in theirs.items()}
        Path(args.fixture).write_text(json.dumps({**meta, "command": report["command"], "theirs": steps,
                                                  "target": {k: v.tolist() for k, v in target.state_dict().items()}},
                                                 indent=1))
    for name, rows in report["vs_theirs"].items():
        print(f"\n{name} vs theirs: largest relative difference of the parameters (norm-relative) and the total loss")
        for s, row in rows.items():
            print(f"  step {s:>6d}  params {row['params']:.1e}  total {row['loss/total']:.1e}")
    for name, m in report["final"].items():
        print(f"final {name:<16s} " + "  ".join(f"{k} {v:.4g}" for k, v in m.items()))


def near_kinks(dec, out: Path, spec: dict, seed: int, tol: float = 2.5e-7) -> None:
    """Where do two trajectories recorded at every step (--every 1) part, and why? For each step s: the
    largest norm-relative parameter difference after it, and every entry of Γ's raw output G (step
    s's batch, each side's parameters after step s-1) within `tol` (about two float32 ulps at 1) of
    a kink of the hard sigmoids (0 or 1), with its float64 value. G as each run computed it: ours
    with the CPU fast path's kernels on the live rows (as optimize runs it); theirs with our plain
    form, a stand-in for their einsums (which may round an ulp differently). An entry on different
    sides of a kink in the two runs gets different sigmoid slopes (1 against 0 or 0.01), so that
    step's gradients differ by about one row's share, 1/B."""
    import spd

    runs = {f.stem: torch.load(f, weights_only=True)["record"] for f in sorted(out.glob("*.pt"))}
    if "theirs" not in runs or len(runs) < 2 or any(len(r) < 2 or sorted(r)[1] != 1 for r in runs.values()):
        raise SystemExit(f"{out} needs theirs.pt and an ours_<mode>.pt recorded with --every 1")
    theirs, report, prev = runs["theirs"], [], 0.0
    for s in sorted(theirs)[1:]:
        x = stream(seed, s, spec)[0]
        acts = dec.target_forward(x)[1]
        row = {"step": s, "entries": []}
        for side, rec in runs.items():
            if side != "theirs":
                row[f"{side} vs theirs"] = max(float((v - theirs[s]["params"][k]).norm() / theirs[s]["params"][k].norm())
                                               for k, v in rec[s]["params"].items())
            load_theirs(dec, rec[s - 1]["params"])
            live = spd.live_rows(acts) if side != "theirs" and spd.fast_path(dec) else None
            with torch.no_grad():
                for name in dec.names:
                    G, G64 = dec.ci_raw(name, acts[name]), dec.double().ci_raw(name, acts[name].double())
                    dec.float()
                    if live is not None and dec.ci_fn == "scalar":  # the fast path's values, as the run had them
                        a, ci_fn = acts[name][live], dec.ci_fns[name.replace(".", "/")]
                        G[live] = spd.scalar_gamma(ci_fn, dec.inner(name, a), spd.nonzero_rows(a))
                        G[~live] = spd.scalar_gamma_at_zero(ci_fn)
                    for kink in (0.0, 1.0):
                        for n, c in ((G - kink).abs() <= tol).nonzero().tolist():
                            row["entries"].append({"side": side, "matrix": name, "row": n, "subcomponent": c, "kink": kink,
                                                   "float32 G - kink": (G[n, c] - kink).item(), "float64 G - kink": (G64[n, c] - kink).item()})
        worst = max(v for k, v in row.items() if k.endswith("vs theirs"))
        if row["entries"] or worst > 3 * prev:
            report.append(row)
            print(f"step {s}: parameters part by {worst:.1e} after it" + "".join(
                f"\n  {e['side']:>14s} {e['matrix']} row {e['row']} subcomponent {e['subcomponent']}: G - {e['kink']:g} = "
                f"{e['float32 G - kink']:+.2e} (float32), {e['float64 G - kink']:+.2e} (float64)" for e in row["entries"]))
        prev = worst
    (out / "kinks.json").write_text(json.dumps(report, indent=1))


# ================================================================================================
# Init: are both codes' random initial states and data drawn from the same distributions?
# ================================================================================================


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov distance D = max |F_a - F_b| of two 1-d samples and its asymptotic
    p-value (Kolmogorov's series, with Stephens' small-sample correction); iid samples assumed."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    F_a = torch.searchsorted(a, grid, right=True).double() / len(a)
    F_b = torch.searchsorted(b, grid, right=True).double() / len(b)
    D = (F_a - F_b).abs().max().item()
    ne = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * D
    p = 1.0 if lam < 0.3 else min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam)
                                                         for k in range(1, 101))))
    return D, p


def z_score(x: torch.Tensor, y: torch.Tensor) -> float:
    """(mean x - mean y) / its standard error, for two samples of iid per-seed (or per-batch) statistics."""
    se = math.sqrt(x.double().var().item() / len(x) + y.double().var().item() / len(y))
    return (x.double().mean().item() - y.double().mean().item()) / se if se > 0 else 0.0


def compare_draws(ours: list[torch.Tensor], theirs: list[torch.Tensor], max_pooled: int = 200_000) -> dict:
    """Per-draw (seed or batch) means and standard deviations of one tensor on each side: their
    averages, the z-scores of the differences, and the KS distance of up to `max_pooled` values picked
    at random from all draws (values of one draw are not independent of each other, e.g. a row of B
    shares one scale, so that p-value is only indicative)."""
    stats = {}
    for side, draws in (("ours", ours), ("theirs", theirs)):
        flat = torch.stack([d.flatten().double() for d in draws])
        pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:max_pooled]
        stats[side] = {"mean": flat.mean(1), "std": flat.std(1), "pooled": flat.flatten()[pick]}
    D, p = ks_distance(stats["ours"]["pooled"], stats["theirs"]["pooled"])
    return {"ours_mean": stats["ours"]["mean"].mean().item(), "theirs_mean": stats["theirs"]["mean"].mean().item(),
            "z_mean": z_score(stats["ours"]["mean"], stats["theirs"]["mean"]),
            "ours_std": stats["ours"]["std"].mean().item(), "theirs_std": stats["theirs"]["std"].mean().item(),
            "z_std": z_score(stats["ours"]["std"], stats["theirs"]["std"]), "ks_D": D, "ks_p": p}


def cmd_init(args) -> None:
    """Both codes' random initial decompositions for seeds 0..n-1 (ours: train.py's path; theirs: their
    decomposition script's set_seed and optimize, stopped after its init) and `--batches` of each
    code's data loader, compared as distributions (compare_draws)."""
    import models
    import spd
    import train

    torch.set_num_threads(args.threads)
    target, tcfg, cfg = preset(args.model)
    ours = []
    for s in range(args.n):
        torch.manual_seed(s)  # as train.py
        dec = spd.Decomposition.from_config(target, cfg)
        ours.append(to_theirs(dec))
    tied = dec.tied
    keys = [k for k in ours[0] if not any(k.startswith(f"components.{their_key(t)}.") for t in tied)]
    sample = models.batch_fn(tcfg)
    g = torch.Generator().manual_seed(0)
    our_batches = [sample(cfg.batch_size, g) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory() as tmp:
        job = {"target": target_to_theirs(args.model, target), "config": their_config(args.model, cfg, 0, steps=1),
               "tied": bool(tied), "n": args.n, "batches": args.batches, "result": str(Path(tmp) / "theirs.pt")}
        run_theirs("init", job, args.ref, args.ref_python)
        theirs = torch.load(job["result"], weights_only=True)
    rows = {k: compare_draws([o[k] for o in ours], [t[k] for t in theirs["states"]]) for k in keys}
    active = lambda bs: [(x != 0).double().mean(0) for x in bs]  # per-feature active share, per batch
    values = lambda bs: [x[x != 0] for x in bs]
    rows["data: active share per feature"] = compare_draws(active(our_batches), active(theirs["batches"]))
    n_vals = min(min(len(v) for v in values(our_batches)), min(len(v) for v in values(theirs["batches"])))
    rows["data: active values"] = compare_draws([v[:n_vals] for v in values(our_batches)],
                                                [v[:n_vals] for v in values(theirs["batches"])])
    print(f"{args.model}: {args.n} seeds' initial states, {args.batches} batches of {cfg.batch_size}; "
          "z: difference of the per-draw means (stds) over its standard error")
    print(f"  {'tensor':<34s} {'mean ours':>10s} {'theirs':>10s} {'z':>6s} {'std ours':>9s} {'theirs':>9s} {'z':>6s} "
          f"{'KS D':>7s} {'KS p':>6s}")
    for k, r in rows.items():
        print(f"  {k:<34s} {r['ours_mean']:>10.4g} {r['theirs_mean']:>10.4g} {r['z_mean']:>6.2f} {r['ours_std']:>9.4g} "
              f"{r['theirs_std']:>9.4g} {r['z_std']:>6.2f} {r['ks_D']:>7.4f} {r['ks_p']:>6.3f}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({"model": args.model, "n_seeds": args.n, "batches": args.batches,
                                                 "batch_size": cfg.batch_size, "code": train.code_version(),
                                                 "ref_commit": REF_COMMIT, "torch": torch.__version__,
                                                 "command": "python parity.py " + " ".join(sys.argv[1:]),
                                                 "rows": rows}, indent=1))


def cmd_from_theirs(args) -> None:
    """Our training loop and our own draws (train.py's seeding: masks from torch.manual_seed(seed),
    data from a generator seeded seed + 1) from the authors' initial state for each seed: does a
    seed's merge follow the initial state (then theirs and ours agree seed by seed) or the draws?
    Writes one run folder per seed (OUT/sSEED), evaluated with train.py --evaluate_only."""
    import models
    import spd
    import train

    torch.set_num_threads(args.threads)
    target, tcfg, cfg = preset(args.model, "--tied_updates", args.tied_updates,
                               *(["--steps", str(args.steps)] if args.steps else []))
    sample = models.batch_fn(tcfg)
    todo = [s for s in args.seeds if not (Path(args.out) / f"s{s}" / "metrics.json").exists()]
    with tempfile.TemporaryDirectory() as tmp:
        job = {"target": target_to_theirs(args.model, target), "config": their_config(args.model, cfg, 0, steps=1),
               "tied": bool(getattr(target, "tied_weights", None)), "seeds": todo, "result": str(Path(tmp) / "t.pt")}
        run_theirs("init", job, args.ref, args.ref_python)
        states = torch.load(job["result"], weights_only=True)["states"]
    for seed, state in zip(todo, states):
        out = Path(args.out) / f"s{seed}"
        sc = spd.SPDConfig(**{**vars(cfg), "seed": seed})
        torch.manual_seed(seed)  # as train.py; our init's draws are then replaced by theirs
        dec = spd.Decomposition.from_config(target, sc)
        load_theirs(dec, state)
        gen = torch.Generator().manual_seed(seed + 1)  # as train.py
        t0 = time.time()
        losses = spd.optimize(dec, lambda b: sample(b, gen), sc, progress=False)
        seconds = time.time() - t0
        run_config = {"model": args.model, "method": "spd", "spd": vars(sc), "target": tcfg, "code": train.code_version(),
                      "command": "python parity.py " + shlex.join(sys.argv[1:]),
                      "init": {"theirs": REF_COMMIT, "seed": seed}}
        spd.save(dec, out, run_config, sc.steps)
        (out / "metrics.json").write_text(json.dumps({"final_losses": losses, "seconds": seconds,
                                                      "ms_per_step": 1000 * seconds / sc.steps}))
        print(f"seed {seed}: {seconds:.0f} s; evaluate with: python train.py --model {args.model} --seed {seed} "
              f"--steps {sc.steps} --tied_updates {args.tied_updates} --out {out} --evaluate_only", flush=True)


# ================================================================================================
# The two halves talk through files; these run their half in its own interpreter
# ================================================================================================


def run_theirs(command: str, job: dict, ref: str, ref_python: str, env: dict | None = None,
               script: str = __file__) -> None:
    """Runs `python SCRIPT _theirs COMMAND JOB_FILE` (SCRIPT: this file, or parity_apd.py) in the
    authors' environment, their checkout `ref` on PYTHONPATH; its output is shown for "train" only."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.pt"
        torch.save(job, path)
        env = {**os.environ, "PYTHONPATH": str(Path(ref).resolve()), "WANDB_MODE": "disabled", **(env or {})}
        quiet = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if command != "train" else {}
        done = subprocess.run([ref_python, str(Path(script).resolve()), "_theirs", command, str(path)], env=env,
                              cwd=tmp, **quiet)
        if done.returncode:
            raise SystemExit(f"the authors' code failed ({command}):\n{(done.stdout or '')[-3000:]}")


def step_job(inp: dict) -> dict:
    cfg = inp["cfg"]
    return {"target": target_to_theirs(inp["model"], inp["target"]), "params": to_theirs(inp["dec"]),
            "config": their_config(inp["model"], cfg, inp["seed"], steps=1), "x": inp["x"], "r": inp["r"],
            "tied": bool(inp["dec"].tied)}


def cmd_step(args) -> None:
    torch.set_num_threads(args.threads)
    inp = make_inputs(args.model, args.seed, args.batch_size, args.n_mask_samples, ci_biases=args.ci_biases)
    with tempfile.TemporaryDirectory() as tmp:
        job = step_job(inp) | {"result": str(Path(tmp) / "theirs.pt")}
        run_theirs("step", job, args.ref, args.ref_python)
        theirs = torch.load(job["result"], weights_only=True)
    theirs["losses"] = {k: theirs["losses"][v] for k, v in LOSS_NAMES.items()}  # their names -> ours
    their_sum = summarise(theirs)
    tied = inp["dec"].tied
    import train

    report = {"model": args.model, "seed": args.seed, "batch_size": inp["cfg"].batch_size, "code": train.code_version(),
              "n_mask_samples": inp["cfg"].n_mask_samples, "ci_biases": args.ci_biases, "ref_commit": REF_COMMIT, "torch": torch.__version__,
              "command": "python parity.py " + " ".join(sys.argv[1:]), "theirs": their_sum, "rows": {}}
    if tied:
        report["theirs_summed_tied_grads"] = {k: v for k, v in summarise(summed_tied_grads(theirs, tied)).items()
                                              if k.startswith("grad/")}
    for mode in (("shared", "separate") if tied else ("shared",)):
        reference = their_sum | (report["theirs_summed_tied_grads"] if mode == "shared" and tied else {})
        ours, exact = summarise(our_step(inp, mode)), summarise(our_step(in_double(inp), mode))
        rows = {"ours vs theirs": compare(ours, reference), "ours vs float64": compare(ours, exact),
                "theirs vs float64": compare(reference, exact)}
        report["rows"][mode] = rows
        print(f"\n{args.model}, tied_updates={mode}: relative differences (norm-relative for tensors)")
        print(f"  {'quantity':<44s} {'ours':>14s} " + " ".join(f"{c:>17s}" for c in rows))
        for q in rows["ours vs theirs"]:
            value = ours["losses"][q[5:]] if q.startswith("loss ") else ours[q]["norm"]
            print(f"  {q:<44s} {value:>14.7g} " + " ".join(f"{rows[c][q]:>17.1e}" for c in rows))
    if args.fixture:
        Path(args.fixture).parent.mkdir(parents=True, exist_ok=True)
        fixture = {k: v for k, v in report.items() if k != "rows"}
        Path(args.fixture).write_text(json.dumps(fixture, indent=1))
        print(f"fixture written: {args.fixture}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({k: v for k, v in report.items() if k != "theirs"}, indent=1))


def fingerprint(job: dict) -> str:
    """A hash of what a run of theirs depends on (target weights, their config): a checkpoint resumes
    only the run it was written by."""
    h = hashlib.sha256(json.dumps(job["config"], sort_keys=True).encode())
    for k, v in sorted(job["target"]["state"].items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cmd_train(args) -> None:
    """Their optimize on our preset target (trained or loaded by train.py's cache), written as our run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here; pass --device cpu")
    import spd
    import train

    torch.set_num_threads(args.threads)
    target, tcfg, cfg = preset(args.model, *args.target_args)
    steps = args.steps or cfg.steps
    if args.stop_at is not None and not 0 < args.stop_at < steps:
        raise SystemExit(f"--stop_at {args.stop_at}: pass a step between 1 and the run's {steps - 1}")
    cfg = spd.SPDConfig(**{**vars(cfg), "steps": steps, "seed": args.seed})
    out = Path(args.out)
    if (out / "metrics.json").exists():
        raise SystemExit(f"{out} holds a finished run; pass another --out")
    job = {"target": target_to_theirs(args.model, target), "config": their_config(args.model, cfg, args.seed, steps),
           "out_dir": str((out / "theirs").resolve()), "tied": bool(getattr(target, "tied_weights", None)),
           "device": args.device, "checkpoint_every": args.checkpoint_every, "stop_at": args.stop_at}
    job["fingerprint"] = fingerprint(job)
    checkpoint = out / "theirs" / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise SystemExit(f"--resume: {checkpoint} does not exist; run without --resume to start this run")
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)  # ours; their lr is a numpy float
        if saved["fingerprint"] != job["fingerprint"]:
            raise SystemExit(f"--resume: {checkpoint} was written for another target or config; "
                             "pass the flags of the run that wrote it")
        job["resume"] = str(checkpoint.resolve())
        print(f"resuming their run at step {saved['step']} of {steps}")
    elif checkpoint.exists():
        raise SystemExit(f"{checkpoint} holds a stopped run; pass --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_theirs("train", job, args.ref, args.ref_python)
    if not (out / "theirs" / f"model_{steps}.pth").exists():
        print(f"their run stopped at step {args.stop_at}; continue it with the same command and --resume")
        return
    losses = json.loads((out / "theirs" / "final_losses.json").read_text())
    seconds = losses.pop("seconds")  # their optimize's wall time, summed over resumed parts
    state = torch.load(out / "theirs" / f"model_{steps}.pth", map_location="cpu", weights_only=True)
    dec = spd.Decomposition.from_config(target, cfg)
    load_theirs(dec, state)
    run_config = {"model": args.model, "spd": vars(cfg), "target": tcfg, "code": train.code_version(),
                  "command": "python parity.py " + shlex.join(sys.argv[1:]),
                  "theirs": {"commit": REF_COMMIT, "config": job["config"]}}
    spd.save(dec, out, run_config, steps)
    (out / "metrics.json").write_text(json.dumps({"final_losses": losses, "seconds": seconds,
                                                  "ms_per_step": 1000 * seconds / steps, "device": args.device}))
    print(f"their decomposition written to {out}; evaluate it with:\n  python train.py --model {args.model} "
          f"--seed {args.seed} --steps {steps} {' '.join(args.target_args)} --out {out} --evaluate_only")


# ================================================================================================
# Theirs: runs in the authors' environment only (their `spd` package on PYTHONPATH)
# ================================================================================================


def _their_target(job: dict):
    t = job["target"]
    if t["family"] == "tms":
        from spd.experiments.tms.models import TMSModel, TMSModelConfig

        model = TMSModel(TMSModelConfig(**t["config"]))
    else:
        from spd.experiments.resid_mlp.models import ResidualMLP, ResidualMLPConfig

        model = ResidualMLP(ResidualMLPConfig(**t["config"]))
    model.load_state_dict(t["state"])
    if t["family"] == "tms":
        model.tie_weights_()
        for layer in model.hidden_layers or []:
            layer.weight.requires_grad_(False)
    return model.eval()


def _their_loader(job: dict):
    from spd.data_utils import DatasetGeneratedDataLoader, SparseFeatureDataset

    cfg = job["config"]
    if job["target"]["family"] == "tms":
        dataset = SparseFeatureDataset(n_features=job["target"]["config"]["n_features"],
                                       feature_probability=cfg["task_config"]["feature_probability"], device="cpu",
                                       data_generation_type="at_least_zero_active", value_range=(0.0, 1.0))
    else:
        from spd.experiments.resid_mlp.resid_mlp_dataset import ResidualMLPDataset

        dataset = ResidualMLPDataset(n_features=job["target"]["config"]["n_features"],
                                     feature_probability=cfg["task_config"]["feature_probability"], device="cpu",
                                     calc_labels=False, label_type=None, act_fn_name=None, label_fn_seed=None,
                                     label_coeffs=None, data_generation_type="at_least_zero_active")
    return DatasetGeneratedDataLoader(dataset, batch_size=cfg["batch_size"], shuffle=False)


def _their_start(run_spd, params: dict) -> dict:
    """Installs in their run_spd the job's parameters in place of their random init_As_and_Bs_, and a
    ComponentModel wrapper that keeps the model it builds; returns that holder, {"model": ...}."""
    holder, their_component_model = {}, run_spd.ComponentModel

    def load_params(model, components):
        state = model.state_dict()
        for k, v in params.items():
            state[k].copy_(v)

    def capture_model(*a, **kw):
        holder["model"] = their_component_model(*a, **kw)
        return holder["model"]

    run_spd.init_As_and_Bs_, run_spd.ComponentModel = load_params, capture_model
    return holder


def _their_tied(job: dict):
    return [("linear1", "linear2")] if job["tied"] else None


def _theirs_step(job: dict) -> None:
    """Their `optimize` for one step on the job's parameters, batch and mask draws; records what
    their code computed: causal importances, loss terms, gradients (at optimizer.step) and the
    parameters after the step (their checkpoint model_1.pth)."""
    import spd.losses
    import spd.run_spd as run_spd
    from spd.configs import Config

    record = {}
    draws = [dict(d) for loss in job["r"] for d in loss]  # stochastic recon's samples, then layerwise's
    S = len(job["r"][0])

    def fixed_masks(causal_importances, n_mask_samples):  # their formula, with the prepared draws r
        assert n_mask_samples == S
        if not draws:  # the final logging-only iteration (step == steps): any masks do
            return [{k: ci + (1 - ci) * torch.rand_like(ci) for k, ci in causal_importances.items()}
                    for _ in range(S)]
        taken = [draws.pop(0) for _ in range(S)]
        return [{k: ci + (1 - ci) * d[k] for k, ci in causal_importances.items()} for d in taken]

    calc_ci, calc_losses = run_spd.calc_causal_importances, run_spd.calculate_losses

    def record_ci(**kw):
        lower, upper = calc_ci(**kw)
        record.setdefault("ci", {k: v.detach().clone() for k, v in lower.items()})
        record.setdefault("ci_upper", {k: v.detach().clone() for k, v in upper.items()})
        return lower, upper

    def record_losses(**kw):
        total, terms = calc_losses(**kw)
        record.setdefault("losses", {**terms, "loss/total": total.item()})
        return total, terms

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *a, **kw):
            if "grads" not in record:
                names = {id(p): n for n, p in model_ref["model"].named_parameters()}
                record["grads"] = {names[id(p)]: p.grad.detach().clone() for group in self.param_groups
                                   for p in group["params"] if p.grad is not None}
            return super().step(*a, **kw)

    model_ref = _their_start(run_spd, job["params"])
    spd.losses.calc_stochastic_masks = fixed_masks
    run_spd.calc_causal_importances = record_ci
    run_spd.calculate_losses = record_losses
    run_spd.optim.AdamW = RecordingAdamW
    batch = job["x"]
    loader = [(batch, batch), (batch, batch)]  # step 0 trains, step 1 (= steps) only logs and saves
    out_dir = Path(job["result"]).parent
    run_spd.optimize(target_model=_their_target(job), config=Config(**job["config"]), device="cpu",
                     train_loader=loader, eval_loader=loader, n_eval_steps=1, out_dir=out_dir,
                     tied_weights=_their_tied(job))
    state = torch.load(out_dir / "model_1.pth", weights_only=True)
    record["params"] = {k: v for k, v in state.items() if k in job["params"]}
    torch.save(record, job["result"])


def _theirs_trajectory(job: dict) -> None:
    """Their optimize from the job's initial parameters on the shared stream (stream()): their
    losses and, after the update of every recorded step, their parameters."""
    import spd.losses
    import spd.run_spd as run_spd
    from spd.configs import Config

    config, every = Config(**job["config"]), job["every"]
    steps, record, state = config.steps, {}, {"step": -1, "draws": []}

    def loader():
        for step in range(steps + 1):  # + their final logging-only iteration
            state["step"] = step
            x, r = stream(job["seed"], step, job["stream"])
            state["draws"] = [d for loss in r for d in loss]
            yield x, x

    def fixed_masks(causal_importances, n_mask_samples):
        if state["step"] == steps:  # the logging-only iteration: any masks do
            return [{k: ci + (1 - ci) * torch.rand_like(ci) for k, ci in causal_importances.items()}
                    for _ in range(n_mask_samples)]
        taken = [state["draws"].pop(0) for _ in range(n_mask_samples)]
        return [{k: ci + (1 - ci) * d[k] for k, ci in causal_importances.items()} for d in taken]

    calc_losses, model_ref = run_spd.calculate_losses, _their_start(run_spd, job["params"])

    def record_losses(**kw):
        total, terms = calc_losses(**kw)
        model_ref["losses"] = {k.removeprefix("loss/"): v for k, v in terms.items()} | {"total": total.item()}
        return total, terms

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *a, **kw):
            out = super().step(*a, **kw)
            s = state["step"]
            assert not state["draws"], f"{len(state['draws'])} mask draws of step {s} were not used"
            if recorded(s, every, steps):
                params = {k: v.detach().clone().contiguous() for k, v in model_ref["model"].state_dict().items()
                          if k in job["params"]}
                record[s] = {"losses": model_ref["losses"], "params": params}
            return out

    spd.losses.calc_stochastic_masks = fixed_masks
    run_spd.calculate_losses = record_losses
    run_spd.optim.AdamW = RecordingAdamW
    data = loader()
    run_spd.optimize(target_model=_their_target(job), config=config, device="cpu", train_loader=data,
                     eval_loader=data, n_eval_steps=1, out_dir=None,
                     tied_weights=_their_tied(job))
    torch.save(record, job["result"])


def _theirs_time(job: dict) -> None:
    """Their optimize for the job's steps on their own data; the wall time between consecutive
    optimizer steps is one whole loop iteration (batch, target pass, CI, losses, backward, step)."""
    import resource
    import time

    import spd.run_spd as run_spd
    from spd.configs import Config

    stamps = []

    class TimedAdamW(torch.optim.AdamW):
        def step(self, *a, **kw):
            out = super().step(*a, **kw)
            stamps.append(time.perf_counter())
            return out

    run_spd.optim.AdamW = TimedAdamW
    loader = _their_loader(job)
    run_spd.optimize(target_model=_their_target(job), config=Config(**job["config"]), device="cpu",
                     train_loader=loader, eval_loader=loader, n_eval_steps=1, out_dir=None,
                     tied_weights=_their_tied(job))
    times = [b - a for a, b in zip(stamps, stamps[1:])]  # the first iteration (step 0 also logs) is left out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(job["result"]).write_text(json.dumps({"times": times, "peak_bytes": peak, "threads": torch.get_num_threads()}))


def their_step_times(model: str, steps: int, ref: str, ref_python: str) -> dict:
    """Their whole-loop seconds per step on our untrained preset target (the cost does not depend on
    the weights), at this process's thread count: {"times": [s, ...], "peak_bytes", "threads"}."""
    import models
    import spd
    import train

    cfg = spd.SPDConfig(**train.PRESETS[model])
    target, _ = models.build_target(model)
    with tempfile.TemporaryDirectory() as tmp:
        job = {"target": target_to_theirs(model, target), "config": their_config(model, cfg, 0, steps + 1),
               "tied": bool(getattr(target, "tied_weights", None)), "result": str(Path(tmp) / "times.json")}
        job["config"]["print_freq"] = 10**9  # step 0's logging only (outside the timed steps)
        run_theirs("time", job, ref, ref_python, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
        return json.loads(Path(job["result"]).read_text())


def _theirs_init(job: dict) -> None:
    """Their initial components and gates for seeds 0..n-1, or job["seeds"] (their script's set_seed,
    then optimize up to its init_As_and_Bs_, before the tied copy), and `batches` batches of their
    data loader."""
    import spd.run_spd as run_spd
    from spd.configs import Config
    from spd.utils import set_seed

    class Initialised(Exception):
        pass

    states, their_init = [], run_spd.init_As_and_Bs_

    def init_and_stop(model, components):
        their_init(model=model, components=components)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()
                       if k.startswith(("components.", "gates."))})
        raise Initialised

    run_spd.init_As_and_Bs_ = init_and_stop
    for seed in job["seeds"] if "seeds" in job else range(job["n"]):
        config = Config(**{**job["config"], "seed": seed})
        set_seed(seed)
        try:
            run_spd.optimize(target_model=_their_target(job), config=config, device="cpu", train_loader=None,
                             eval_loader=None, n_eval_steps=1, out_dir=None, tied_weights=_their_tied(job))
        except Initialised:
            pass
    set_seed(0)
    loader = iter(_their_loader(job))
    batches = [next(loader)[0] for _ in range(job.get("batches", 0))]
    torch.save({"states": states, "batches": batches}, job["result"])


class _Stop(Exception):
    pass


def _theirs_train(job: dict) -> None:
    """Their decomposition script's path (set_seed, their dataset, optimize) on our target. Checkpoints
    (their ComponentModel's state, their AdamW's state, the random states, after an optimizer step)
    come from wrapping their AdamW; a resumed run loads one where their loop begins and starts the
    loop at the checkpoint's step. Nothing else in their loop carries state from step to step (their
    data loader draws each batch fresh from the global generator; the alive counts only log)."""
    import time

    import spd.run_spd as run_spd
    from spd.configs import Config
    from spd.utils import set_seed

    config = Config(**job["config"])
    set_seed(config.seed)
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, t0 = out_dir / "checkpoint.pt", time.time()
    start = torch.load(job["resume"], weights_only=False) if job.get("resume") else None
    prior = start["seconds"] if start else 0.0
    final, held = {}, {}
    calc_losses, their_component_model, their_tqdm = run_spd.calculate_losses, run_spd.ComponentModel, run_spd.tqdm

    def record_losses(**kw):  # keeps the last step's terms for our metrics.json
        total, terms = calc_losses(**kw)
        final.clear()
        final.update({k.removeprefix("loss/"): v for k, v in terms.items()}, total=total.item())
        return total, terms

    def capture_model(*a, **kw):
        held["model"] = their_component_model(*a, **kw)
        return held["model"]

    def random_states():
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    class CheckpointedAdamW(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            held["optimizer"], self.done = self, start["step"] if start else 0

        def step(self, *a, **kw):
            result = super().step(*a, **kw)
            self.done += 1  # their loop's next step is `done`
            if self.done % job["checkpoint_every"] == 0 or self.done == job["stop_at"]:
                saved = {"step": self.done, "model": held["model"].state_dict(), "optimizer": self.state_dict(),
                         "random": random_states(), "seconds": prior + time.time() - t0,
                         "fingerprint": job["fingerprint"]}
                torch.save(saved, checkpoint.with_suffix(".tmp"))
                os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
            if self.done == job["stop_at"]:
                raise _Stop
            return result

    class ResumedTqdm(their_tqdm):
        def __init__(self, iterable, **kw):
            if start:
                state = held["model"].state_dict()
                for k, v in start["model"].items():
                    state[k].copy_(v)
                held["optimizer"].load_state_dict(start["optimizer"])
                torch.set_rng_state(start["random"]["cpu"])
                if start["random"]["cuda"]:
                    torch.cuda.set_rng_state_all(start["random"]["cuda"])
                iterable = iterable[start["step"]:]
            super().__init__(iterable, initial=start["step"] if start else 0, total=config.steps + 1, **kw)

    run_spd.calculate_losses, run_spd.ComponentModel, run_spd.tqdm = record_losses, capture_model, ResumedTqdm
    run_spd.optim.AdamW = CheckpointedAdamW
    loader = _their_loader(job)
    try:
        run_spd.optimize(target_model=_their_target(job), config=config, device=job.get("device", "cpu"),
                         train_loader=loader, eval_loader=loader, n_eval_steps=config.n_eval_steps, out_dir=out_dir,
                         tied_weights=_their_tied(job))  # their loop moves the model and each batch to the device
    except _Stop:
        return
    (out_dir / "final_losses.json").write_text(json.dumps({**final, "seconds": prior + time.time() - t0}))


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_theirs":  # the authors' environment
        sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
        job = torch.load(sys.argv[3], weights_only=True)
        {"step": _theirs_step, "train": _theirs_train, "time": _theirs_time, "trajectory": _theirs_trajectory,
         "init": _theirs_init}[sys.argv[2]](job)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("step", "train", "trajectory", "init", "from_theirs"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True,
                       choices={"step": MODELS, "train": TRAIN_MODELS, "init": MODELS}.get(name, TMS_MODELS))
        p.add_argument("--ref", required=True, help="checkout of goodfire-ai/spd at c6314c9f")
        p.add_argument("--ref_python", required=True, help="python of the virtual environment their code runs in")
        p.add_argument("--threads", type=int, default=1)
        if name in ("step", "train", "trajectory"):
            p.add_argument("--seed", type=int, default=0)
    step = sub.choices["step"]
    step.add_argument("--batch_size", type=int)
    step.add_argument("--n_mask_samples", type=int, default=1)
    step.add_argument("--ci_biases", choices=("random", "init"), default="random",
                      help="the CI biases: small random values, or the initialisation's zeros")
    step.add_argument("--fixture", help="write the authors' numbers here (a JSON file for test_parity.py)")
    step.add_argument("--report", help="write the side-by-side rows here (JSON)")
    tr = sub.choices["train"]
    tr.add_argument("--out", required=True)
    tr.add_argument("--steps", type=int, help="default: the preset's")
    tr.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where their optimize runs (their code on a GPU: for runs too long for a CPU)")
    tr.add_argument("--target_args", default="", type=shlex.split,
                    help='more train.py flags, as one string: --target_args="--n_features 10 --n_hidden 3 --C 20"')
    tr.add_argument("--checkpoint_every", type=int, default=500, help="save their run's state every this many steps")
    tr.add_argument("--resume", action="store_true", help="continue the stopped run in --out from its checkpoint")
    tr.add_argument("--stop_at", type=int, help="stop after this step (and its checkpoint); continue later with --resume")
    tj = sub.choices["trajectory"]
    tj.add_argument("--side", required=True, choices=("ours", "theirs", "compare", "kinks"),
                    help="kinks: where two runs recorded with --every 1 part, and the inputs near a kink (near_kinks)")
    tj.add_argument("--out", required=True, help="folder of the two sides' records (ours_<mode>.pt, theirs.pt)")
    tj.add_argument("--steps", type=int, required=True, help="the run's length (its lr schedule's too)")
    tj.add_argument("--every", type=int, default=1000, help="record the parameters after every this many steps")
    tj.add_argument("--tied_updates", choices=("shared", "separate"), default="separate", help="ours: the update scheme")
    tj.add_argument("--fixture", help="compare: also write their record here (a JSON file for test_parity.py)")
    it = sub.choices["init"]
    it.add_argument("--n", type=int, default=200, help="seeds 0..n-1 in each code")
    it.add_argument("--batches", type=int, default=50, help="batches of each code's data loader")
    it.add_argument("--report", help="write the rows here (JSON)")
    ft = sub.choices["from_theirs"]
    ft.add_argument("--seeds", type=int, nargs="+", required=True)
    ft.add_argument("--steps", type=int, help="default: the preset's")
    ft.add_argument("--tied_updates", choices=("shared", "separate"), default="separate")
    ft.add_argument("--out", required=True, help="one run folder per seed: OUT/sSEED (finished ones are skipped)")
    args = ap.parse_args(argv)
    {"step": cmd_step, "train": cmd_train, "trajectory": cmd_trajectory, "init": cmd_init,
     "from_theirs": cmd_from_theirs}[args.command](args)


if __name__ == "__main__":
    main()
