"""Train a target model (or reload it) and decompose it with SPD, in one command.

    python train.py --model tms_5-2
    python train.py --model resid_mlp3 --steps 200000 --device cuda
    python train.py --model tms_40-10 --C 100 --importance_minimality 3e-4 --out runs/my_run

Reads top to bottom: parse args, build the config, seed and device, target model, decomposition,
training loop (progress bar and periodic loss lines), evaluation, save. Every field of
spd.SPDConfig is a flag; each preset's defaults are the paper's appendix values (PRESETS below).
The run folder gets decomposition.pt + config.json (reload with spd.load), metrics.json,
losses.jsonl and PNG figures; the trained target is cached under --target_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
import typing
from pathlib import Path

import torch

import analysis
import models
import spd

# SPD hyperparameters per preset: overrides of spd.SPDConfig's defaults (the paper's TMS values).
_TMS = dict(C=20, d_gate=16, importance_minimality=3e-3, p=1.0, lr=1e-3, lr_schedule="cosine", steps=40_000, batch_size=4096)
_RESID = dict(targets=["layers.*.mlp_in", "layers.*.mlp_out"], d_gate=16, p=2.0, lr_schedule="constant", batch_size=2048)
PRESETS: dict[str, dict] = {
    "tms_5-2": dict(_TMS, targets=["linear1", "linear2"]),
    "tms_5-2-id": dict(_TMS, targets=["linear1", "linear2", "hidden_layers.0"]),
    # C for 40-10 is not in the paper; 200 is the authors' config.
    "tms_40-10": dict(_TMS, targets=["linear1", "linear2"], C=200, importance_minimality=1e-4, p=2.0),
    "tms_40-10-id": dict(_TMS, targets=["linear1", "linear2", "hidden_layers.0"], C=200, importance_minimality=1e-4, p=2.0),
    "resid_mlp1": dict(_RESID, C=100, importance_minimality=1e-5, lr=2e-3, steps=30_000),
    # Paper's β3 1e-5; the authors' final config has 2e-5.
    "resid_mlp2": dict(_RESID, C=400, importance_minimality=1e-5, lr=1e-3, steps=50_000),
    # Paper's 200k steps ("converges around 70k"); the authors' final config has 100k.
    "resid_mlp3": dict(_RESID, C=500, d_gate=128, importance_minimality=5e-6, lr=1e-3, steps=200_000),
    # Transformer paper, Table 4. O is decomposed too (authors' config); pass --targets to drop it.
    "induction": dict(targets=[f"blocks.*.attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")],
                      C=100, d_gate=16, ci_fn="attention", faithfulness=1000.0, stochastic_recon=1.0,
                      stochastic_recon_layerwise=1.0, recon=0.5, importance_minimality=0.02, p=0.9, p_final=0.1,
                      output_loss="kl", last_token_only=True, lr=1e-3, lr_schedule="cosine", steps=100_000,
                      batch_size=1024),
    # Transformer paper, Figure 6 table: all 48 Conv1D matrices of GPT-2 small, both sentences every step.
    "gpt2": dict(targets=[f"model.transformer.h.*.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
                 C=768, d_gate=64, ci_fn="vector", faithfulness=1e6, stochastic_recon=0.1,
                 stochastic_recon_layerwise=0.1, recon=0.1, stochastic_recon_partial=10.0, recon_partial=10.0,
                 importance_minimality=0.05, p=0.9, p_final=0.1, output_loss="kl", lr=1e-3, weight_decay=0.05,
                 lr_schedule="constant", lr_warmup_pct=0.01, steps=20_000, batch_size=2),
}

TARGET_FLAGS = ("n_features", "n_hidden", "n_hidden_layers", "n_layers", "d_embed", "d_mlp")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when present)")
    ap.add_argument("--out", default=None, help="run folder (default runs/<model>_seed<seed>)")
    ap.add_argument("--target_dir", default="runs/targets", help="cache of trained target models")
    ap.add_argument("--retrain_target", action="store_true", help="train the target even if cached")
    ap.add_argument("--target_steps", type=int, help="override the target's training steps")
    ap.add_argument("--target_seed", type=int, help="override the target's training seed")
    ap.add_argument("--log_every", type=int, default=1000)
    ap.add_argument("--save_every", type=int, default=5000, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the killed run in --out from its last checkpoint (give the same flags)")
    ap.add_argument("--evaluate_only", action="store_true",
                    help="reload the finished run in --out (same flags) and recompute its metrics and figures")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    ap.add_argument("--pretrained", default="gpt2", help="gpt2: HF model name or local folder")
    ap.add_argument("--dataset", default=None, help="gpt2: text file, one prompt per line (default: the paper's two sentences)")
    for name in TARGET_FLAGS:
        ap.add_argument(f"--{name}", type=int, help="target size override")
    for f in dataclasses.fields(spd.SPDConfig):  # every hyperparameter is a flag
        kind = typing.get_args(f.type) or (f.type,)
        if f.type in ("bool", bool):
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "targets":
            ap.add_argument("--targets", nargs="+", help="module paths to decompose (globs allowed)")
        else:
            typ = {"int": int, "float": float, "str": str, "float | None": float}.get(str(f.type), str)
            ap.add_argument(f"--{f.name}", type=typ, default=None)
    return ap.parse_args(argv)


def spd_config(args: argparse.Namespace) -> spd.SPDConfig:
    """The preset's SPD settings with every flag given on the command line applied."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(spd.SPDConfig) if getattr(args, f.name) is not None}
    return spd.SPDConfig(**{**PRESETS[args.model], **flags})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no GPU; use --device cpu (or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SystemExit(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def get_gpt2(args, device):
    """GPT-2 from HF (a name, or a local folder when offline) and its fixed prompt batch (tokens, valid)."""
    hf_model, tokenizer = models.load_gpt2(args.pretrained)
    sentences = analysis.PROMPTS if args.dataset is None else [l.strip() for l in open(args.dataset) if l.strip()]
    tokens, valid = analysis.tokenize_prompts(tokenizer, sentences)
    tcfg = {"family": "gpt2", "pretrained": args.pretrained, "sentences": sentences,
            "seq_len": tokens.shape[1]}
    return models.GPT2Logits(hf_model).to(device), tcfg, tokenizer, (tokens.to(device), valid.to(device))


def get_target(args, device) -> tuple[torch.nn.Module, dict]:
    """Build the preset's target, then load it from the cache or train it (and cache it)."""
    overrides = {k: getattr(args, k) for k in TARGET_FLAGS if getattr(args, k) is not None}
    if args.target_steps is not None:
        overrides["steps"] = args.target_steps
    if args.target_seed is not None:
        overrides["seed"] = args.target_seed
    model, tcfg = models.build_target(args.model, **overrides)
    tag = "_".join(f"{k}{v}" for k, v in sorted(tcfg.items()) if k in TARGET_FLAGS + ("steps", "seed"))
    path = Path(args.target_dir) / f"{args.model}_{tag}.pt"
    if path.exists() and not args.retrain_target:
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise SystemExit(f"cached target {path} cannot be loaded ({str(e).splitlines()[0]}); delete it or pass --retrain_target")
        print(f"target: loaded {path}")
        return model.to(device), tcfg
    partial = path.with_name(path.stem + ".partial.pt")  # a killed training's state, continued from here
    print(f"target: training {args.model} ({tcfg['steps']} steps; checkpoints in {partial})")
    model.to(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        metrics = models.train_target(model, tcfg, device=device, progress=not args.no_progress, checkpoint=partial)
    except ValueError as e:  # an unreadable checkpoint of an earlier, killed training
        raise SystemExit(f"target: {e}")
    print(f"target: {metrics}")
    torch.save(model.state_dict(), path)
    return model, tcfg


def train_state(opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """What a checkpoint needs beyond the weights to continue exactly: Adam's moments, both RNGs, and
    the CPU thread count (matmuls round differently with another one)."""
    state = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state(),
             "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def resume(args, dec, run_config: dict, out: Path, gen: torch.Generator) -> tuple[int, dict]:
    """Loads the last checkpoint of the run in `out` into dec and the RNGs; returns (step, optimizer
    state). On the same machine with the same thread count the continued run matches an uninterrupted
    one exactly; with another thread count it continues from the same state, but the rounding of the
    matmuls differs and the trajectories drift apart (it says so)."""
    path = out / "train_state.pt"
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint to resume in {out} (train_state.pt is written every "
                         f"--save_every steps); drop --resume to start afresh")
    saved = same_settings("--resume", out, run_config)
    run_config["command"] = saved.get("command", run_config["command"])  # the command that started the run
    try:
        meta = spd.load(dec, out)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--resume: {e}")
    if state["step"] != meta["step"]:
        raise SystemExit(f"--resume: {out} holds weights of step {meta['step']} but optimizer state of step "
                         f"{state['step']} (killed mid-save); start afresh with another --out")
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["data_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    print(f"resuming {out} at step {state['step']}")
    if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        print(f"note: the run was checkpointed with {state['threads']} CPU threads and continues with "
              f"{torch.get_num_threads()}; matmuls round differently, so it will not match an uninterrupted "
              f"run bit for bit (set OMP_NUM_THREADS={state['threads']} for that)")
    return state["step"], state["optimizer"]


def same_settings(flag: str, out: Path, run_config: dict) -> dict:
    """The saved run config of `out`, after checking that it was made with this model and these SPD
    settings (a field newer than the run counts as its default); else SystemExit naming the flags."""
    if not (out / "config.json").exists():
        raise SystemExit(f"{flag}: {out / 'config.json'} not found; is {out} a run folder written by train.py?")
    try:
        saved = json.loads((out / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{flag}: cannot read {out / 'config.json'} ({e}); start afresh with another --out")
    saved_spd = {**dataclasses.asdict(spd.SPDConfig()), **saved.get("spd", {})}
    if saved.get("model") != run_config["model"] or saved_spd != run_config["spd"]:
        diff = sorted(k for k in run_config["spd"] if saved_spd.get(k) != run_config["spd"][k])
        raise SystemExit(f"{flag}: the run in {out} was made with other settings (model {saved.get('model')}; "
                         f"differing flags: {diff}); use the same flags or another --out")
    return saved


def decompose(args, cfg, dec, sample, gen, run_config: dict, out: Path) -> dict:
    """The training part of a run (fresh or --resume); returns its final losses and timing."""
    start, opt_state = resume(args, dec, run_config, out, gen) if args.resume else (0, None)
    if args.resume:  # keep the loss lines up to the checkpoint: the lines after it are logged again
        kept = [l for l in (out / "losses.jsonl").read_text().splitlines() if l.strip() and json.loads(l)["step"] < start] \
            if (out / "losses.jsonl").exists() else []
        (out / "losses.jsonl").write_text("".join(l + "\n" for l in kept))
    log_file = open(out / "losses.jsonl", "a" if args.resume else "w")

    def log(step, losses):
        log_file.write(json.dumps({"step": step, **losses}) + "\n")
        log_file.flush()
        if args.no_progress or step % (args.log_every * 10) == 0 or step == cfg.steps - 1:
            print(f"step {step:>7d}  " + "  ".join(f"{k} {v:.3g}" for k, v in losses.items()), flush=True)

    t0 = time.time()
    try:
        final = spd.optimize(dec, lambda b: sample(b, gen), cfg, log=log, log_every=args.log_every,
                             checkpoint=lambda step, opt: spd.save(dec, out, run_config, step, train_state(opt, gen)),
                             save_every=args.save_every, progress=not args.no_progress,
                             start_step=start, opt_state=opt_state)
    except FloatingPointError as e:
        raise SystemExit(f"{e}\n{last_checkpoint(out)}")
    except spd.Interrupted as e:
        resume_cmd = run_config["command"] + ("" if "--resume" in run_config["command"].split() else " --resume")
        raise SystemExit(f"interrupted: checkpoint of step {e.step} saved in {out}; continue with:\n  {resume_cmd}")
    seconds = time.time() - t0
    return {"final_losses": final, "seconds": seconds, "ms_per_step": 1000 * seconds / max(cfg.steps - start, 1)}


def last_checkpoint(out: Path) -> str:
    """Where a stopped run can be picked up: its last checkpoint's step, or that there is none."""
    try:
        step = json.loads((out / "config.json").read_text())["step"]
        return f"the last checkpoint, of step {step}, is kept in {out} (continue it with --resume)"
    except (OSError, ValueError, KeyError):
        return f"no checkpoint was written in {out}"


def reload_finished(dec, out: Path, run_config: dict) -> dict:
    """--evaluate_only: loads the finished run in `out` into dec, after checking it was made with
    these settings; returns the training part of its metrics.json unchanged (final losses and
    timing), so only the evaluation is recomputed."""
    same_settings("--evaluate_only", out, run_config)
    try:
        spd.load(dec, out)
        old = json.loads((out / "metrics.json").read_text())
    except (ValueError, OSError) as e:
        raise SystemExit(f"--evaluate_only: {e} (is {out} a finished run? a killed one continues with --resume)")
    return {k: old[k] for k in ("final_losses", "seconds", "ms_per_step")}


def code_version() -> str:
    """The git commit of this code, recorded in each run's config; "+dirty" if one of the modules a
    run executes (spd, models, train, analysis) differs from that commit."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        if git("ls-files", "train.py"):  # untracked e.g. when installed into a venv inside another repository
            dirty = git("status", "--porcelain", "--", "spd.py", "models.py", "train.py", "analysis.py")
            return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown (not a git checkout)"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.model not in PRESETS:
        raise SystemExit(f"unknown --model {args.model!r}; choose one of: {', '.join(PRESETS)}")
    cfg = spd_config(args)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(str(e))
    device = pick_device(args.device)
    out = Path(args.out or f"runs/{args.model}_seed{cfg.seed}")
    if args.resume and (out / "metrics.json").exists():
        raise SystemExit(f"--resume: {out} holds a finished run (metrics.json), there is nothing to continue; "
                         f"add --evaluate_only instead to re-evaluate it, or pass another --out")
    if (out / "config.json").exists() and not (args.resume or args.evaluate_only):  # never overwrite a saved run
        if (out / "metrics.json").exists():
            raise SystemExit(f"{out} holds a finished run; add --evaluate_only to re-evaluate it, or pass another "
                             f"--out (or delete {out}) to start afresh")
        raise SystemExit(f"{out} holds an unfinished run, checkpointed at step "
                         f"{json.loads((out / 'config.json').read_text()).get('step', '?')}; add --resume to continue "
                         f"it, or pass another --out (or delete {out}) to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {out}   device: {device}")

    # --- target
    if args.model == "gpt2":
        target, tcfg, tokenizer, prompts = get_gpt2(args, device)
    else:
        target, tcfg = get_target(args, device)
    if tcfg["family"] == "tms" and not models.tms_target_ok(target):
        print("WARNING: the trained TMS target leaves a feature unrepresented (a column of W near 0);"
              " MMCS/ML2R will measure the target, not SPD. Try another --target_seed.")

    # --- decomposition (seeded, so a run is reproducible on one machine)
    torch.manual_seed(cfg.seed)
    try:
        dec = spd.Decomposition(target, cfg.targets, C=cfg.C, ci_fn=cfg.ci_fn, d_gate=cfg.d_gate, init=cfg.init,
                                max_seq_len=tcfg.get("seq_len"), tied_updates=cfg.tied_updates).to(device)
    except ValueError as e:
        raise SystemExit(str(e))
    sample = (lambda b, g=None: prompts) if args.model == "gpt2" else models.batch_fn(tcfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    run_config = {"model": args.model, "spd": dataclasses.asdict(cfg), "target": tcfg, "code": code_version(),
                  "command": "python train.py " + shlex.join(argv)}
    training = reload_finished(dec, out, run_config) if args.evaluate_only else decompose(args, cfg, dec, sample, gen, run_config, out)

    # --- evaluation, from a fixed RNG state (its stochastic losses draw masks): --evaluate_only repeats it exactly
    torch.manual_seed(12345)
    eval_batch = sample(cfg.batch_size, torch.Generator(device=device).manual_seed(12345))
    metrics = {**training, "device": str(device), **analysis.evaluate_common(dec, eval_batch, cfg)}
    if tcfg["family"] == "tms":
        metrics.update(analysis.evaluate_tms(dec, out))
    elif tcfg["family"] == "resid_mlp":
        metrics.update(analysis.evaluate_resid_mlp(dec, target, out))
    elif tcfg["family"] == "induction":
        metrics.update(analysis.evaluate_induction(dec, target, cfg, out))
    elif tcfg["family"] == "gpt2":
        metrics.update(analysis.evaluate_gpt2(dec, target, tokenizer, out, sentences=tcfg["sentences"]))
    if tcfg["family"] == "tms" and metrics["linear1/n_large_subcomponents"] < tcfg["n_features"]:
        print(f"WARNING: W has {metrics['linear1/n_large_subcomponents']} large subcomponents for "
              f"{tcfg['n_features']} features: SPD merged features into one subcomponent, a local minimum "
              f"some seeds end in (README, Results). Try another --seed.")
    analysis.plot_ci_histograms(dec, spd.split_batch(eval_batch)[0],
                                out / "ci_histograms.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
