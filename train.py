"""Train a target model (or reload it) and decompose it with SPD, in one command.

    python train.py --model tms_5-2
    python train.py --model resid_mlp3 --steps 200000 --device cuda
    python train.py --model tms_40-10 --C 100 --importance_minimality 3e-4 --out runs/my_run
    python train.py --model tms_5-2 --method apd       # the APD baseline (apd.py), its paper's settings

Reads top to bottom: parse args, build the config, seed and device, target model, decomposition,
training loop (progress bar and periodic loss lines), evaluation, save. Every field of
spd.SPDConfig is a flag; each preset's defaults are the paper's appendix values (PRESETS below).
--method apd runs the APD baseline (apd.py) instead, with the APD paper's values (APD_PRESETS) and
the same run folder, resume and errors.
The run folder gets decomposition.pt + config.json (reload with spd.load), metrics.json,
losses.jsonl and PNG figures; the trained target is cached under --target_dir.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import torch

import analysis
import apd
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

# APD hyperparameters per preset (--method apd): overrides of apd.APDConfig's defaults (APD D.1.1,
# TMS 5-2), from the APD paper's appendix D; where the authors' configs differ, the comment says so.
_APD_TMS = dict(targets=["linear1", "linear2"], steps=20_000, batch_size=2048, lr_warmup_pct=0.05, init="xavier_normal")
# init_instances: the instances of the authors' runs (their train_tms.py: 12 for TMS 5-2, 3 for 40-10; residual MLPs 1),
# which set their initial scale (apd.init_components_); 5-2+ID, not an APD model, takes 5-2's.
_APD_RESID = dict(targets=["layers.*.mlp_in", "layers.*.mlp_out"], act_recon=1.0, act_recon_targets=["layers.*.mlp_in"],
                  schatten_p=0.9, topk=1.28, batch_size=2048, lr=1e-3, lr_schedule="cosine", lr_warmup_pct=0.01,
                  init="xavier_normal", init_scale=2.0, init_instances=1)
APD_PRESETS: dict[str, dict] = {
    # APD D.1.1. The authors' code makes each matrix rank min(d_in, d_out) + 1 = 3; the paper's (and our) default is 2.
    "tms_5-2": dict(_APD_TMS, init_instances=12, C=5, topk=0.211, minimality=1.0, simplicity=0.7, schatten_p=1.0, lr=0.03, lr_schedule="constant"),
    # Not in the APD paper (the SPD paper: "APD fails"); TMS 5-2's settings.
    "tms_5-2-id": dict(_APD_TMS, init_instances=12, targets=["linear1", "linear2", "hidden_layers.0"], C=5, topk=0.211, minimality=1.0,
                       simplicity=0.7, schatten_p=1.0, lr=0.03, lr_schedule="constant"),
    # APD D.1.2. The authors' config: C 40, topk 2, simplicity 15.
    "tms_40-10": dict(_APD_TMS, init_instances=3, C=50, topk=1.0, minimality=10.0, simplicity=20.0, schatten_p=0.9, lr=1e-3, lr_schedule="cosine"),
    "tms_40-10-id": dict(_APD_TMS, init_instances=3, targets=["linear1", "linear2", "hidden_layers.0"], C=50, topk=1.0, minimality=10.0,
                         simplicity=20.0, schatten_p=0.9, lr=1e-3, lr_schedule="cosine"),
    # APD D.2. The authors' configs: batch 256, 10k steps (resid_mlp1); resid_mlp2 without unit-norm V.
    "resid_mlp1": dict(_APD_RESID, C=130, minimality=1.0, simplicity=10.0, steps=40_000, unit_norm_V=True),
    "resid_mlp2": dict(_APD_RESID, C=200, minimality=2.0, simplicity=7.0, steps=10_000),
}
METHODS = {"spd": (spd, spd.SPDConfig, PRESETS), "apd": (apd, apd.APDConfig, APD_PRESETS)}

# One line per SPD flag for --help (the defaults shown are the chosen preset's).
SPD_HELP = {
    "targets": "module paths of the matrices to decompose (fnmatch globs allowed)",
    "C": "subcomponents per matrix",
    "ci_fn": "causal-importance function: scalar (SPD eq. 13), vector or attention (TP §4.1)",
    "d_gate": "hidden width of each causal-importance MLP",
    "faithfulness": "coefficient of the faithfulness loss (SPD eq. 2)",
    "stochastic_recon": "β1: stochastic reconstruction loss, all matrices masked (SPD eq. 4)",
    "stochastic_recon_layerwise": "β2: stochastic reconstruction, one matrix masked at a time (SPD eq. 5)",
    "importance_minimality": "β3: importance-minimality loss (SPD eq. 7)",
    "recon": "CI-masked reconstruction (masks = causal importances, no noise; TP §4)",
    "recon_layerwise": "CI-masked reconstruction, one matrix at a time",
    "stochastic_recon_partial": "stochastic reconstruction on a random subset of matrices (TP eq. 6)",
    "recon_partial": "CI-masked reconstruction on a random subset of matrices (TP eq. 5)",
    "partial_routing": "the partial losses' subset: pass (one per forward pass) or position (one per position)",
    "p": "p of the importance-minimality p-norm (the start of the anneal when --p_final is set)",
    "p_final": "anneal p linearly to this value over the run",
    "n_mask_samples": "S: mask samples per input in the stochastic losses",
    "output_loss": "divergence D between outputs: mse (toy models) or kl (language models)",
    "last_token_only": "D on the final position only (causal importances at every position)",
    "steps": "optimisation steps",
    "batch_size": "inputs per step",
    "lr": "peak learning rate (AdamW)",
    "lr_schedule": "constant, cosine (quarter period to 0) or linear (to 0)",
    "lr_warmup_pct": "fraction of the steps spent warming the learning rate up from 0",
    "weight_decay": "AdamW weight decay (0: the paper's Adam)",
    "init": "U, V initialisation: projection (authors' code) or normal",
    "tied_updates": "tied matrices (TMS): shared (one update per step) or separate (one per use, authors' code)",
    "seed": "seed of the decomposition's initialisation and mask draws",
}
# The APD-only flags (--method apd); the others (C, targets, steps, lr, ...) mean the same in both.
APD_HELP = {
    "m": "APD: rank of each matrix of a component (default: min(d_in, d_out), full rank)",
    "init_scale": "APD: scale of the initialisation (--init xavier_normal or kaiming_uniform for APD)",
    "init_instances": "APD: instances n of the authors' runs, in the init's fans (apd.init_components_)",
    "minimality": "APD β: top-k forward's output against the target's (APD eq. 17)",
    "act_recon": "APD: minimality's hidden-activation term (MLP activations after the ReLU)",
    "act_recon_targets": "APD: modules whose ReLU'd outputs --act_recon compares",
    "simplicity": "APD α: Schatten-p proxy of the active components' ranks (APD eq. 22)",
    "schatten_p": "APD: p of the Schatten norm",
    "topk": "APD: batch top-k, active components per input on average (int(topk * batch) per batch)",
    "unit_norm_V": "APD: keep each row of V at unit norm (APD D.2)",
}
SPD_ONLY = [f.name for f in dataclasses.fields(spd.SPDConfig) if f.name not in {g.name for g in dataclasses.fields(apd.APDConfig)}]

TARGET_FLAGS = ("n_features", "n_hidden", "n_hidden_layers", "n_layers", "d_embed", "d_mlp")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--method", default="spd", choices=list(METHODS),
                    help=f"spd (default) or apd, the baseline (presets: {', '.join(APD_PRESETS)})")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when present)")
    ap.add_argument("--out", default=None, help="run folder (default runs/<model>_seed<seed>)")
    ap.add_argument("--target_dir", default="runs/targets", help="cache of trained target models")
    ap.add_argument("--retrain_target", action="store_true", help="train the target even if cached")
    ap.add_argument("--target_steps", type=int, help="override the target's training steps")
    ap.add_argument("--target_seed", type=int, help="override the target's training seed")
    ap.add_argument("--log_every", type=int, default=1000, help="write a line to losses.jsonl every N steps")
    ap.add_argument("--save_every", type=int, default=5000, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the killed run in --out from its last checkpoint (give the same flags)")
    ap.add_argument("--evaluate_only", action="store_true",
                    help="reload the finished run in --out (same flags) and recompute its metrics and figures")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    ap.add_argument("--shard_optimizer", action="store_true",
                    help="torchrun: each process keeps Adam's moments for 1/N of the parameters only (ZeRO stage 1)")
    ap.add_argument("--compile_ci", action="store_true",
                    help="run the CI functions under torch.compile (spd.py section L; for GPUs, see README)")
    ap.add_argument("--wandb", default=None, metavar="PROJECT",
                    help="also log the loss lines, metrics and figures to this Weights & Biases project (pip install wandb)")
    ap.add_argument("--pretrained", default="gpt2", help="gpt2: HF model name or local folder")
    ap.add_argument("--dataset", default=None, help="gpt2: text file, one prompt per line (default: the paper's two sentences)")
    pre = argparse.ArgumentParser(add_help=False)  # the chosen preset, for the defaults --help shows
    pre.add_argument("--model")
    model = pre.parse_known_args(argv)[0].model
    defaults = {**dataclasses.asdict(spd.SPDConfig()), **PRESETS.get(model, {})}
    where = f"{model}'s" if model in PRESETS else "without --model"
    target = models.TARGET_PRESETS.get(model, {})
    for name in TARGET_FLAGS:
        ap.add_argument(f"--{name}", type=int, help="target size" + (f" ({where} default: {target[name]})" if name in target else ""))
    apd_defaults = {**dataclasses.asdict(apd.APDConfig()), **APD_PRESETS.get(model, {})}
    for f in dataclasses.fields(spd.SPDConfig):  # every hyperparameter is a flag
        text = f"{SPD_HELP[f.name]} ({where} default: {defaults[f.name]}"
        if f.name not in SPD_ONLY and model in APD_PRESETS:  # a flag of both methods
            text += f"; with --method apd: {apd_defaults[f.name]}"
        text = (text + ")").replace("%", "%%")
        if f.type in ("bool", bool):
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "targets":
            ap.add_argument("--targets", nargs="+", help=text)
        else:
            typ = {"int": int, "float": float, "str": str, "float | None": float}.get(str(f.type), str)
            ap.add_argument(f"--{f.name}", type=typ, default=None, help=text)
    for f in dataclasses.fields(apd.APDConfig):
        if f.name in APD_HELP:
            text = f"{APD_HELP[f.name]} ({where} default: {apd_defaults[f.name]})".replace("%", "%%")
            if f.type in ("bool", bool):
                ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=text)
            elif f.name == "act_recon_targets":
                ap.add_argument(f"--{f.name}", nargs="+", help=text)
            else:
                ap.add_argument(f"--{f.name}", type={"float": float, "int | None": int}.get(str(f.type), str),
                                default=None, help=text)
    return ap.parse_args(argv)


def spd_config(args: argparse.Namespace) -> spd.SPDConfig | apd.APDConfig:
    """The preset's settings of the chosen --method with every flag given on the command line applied;
    SystemExit for a flag of the other method."""
    _, Config, presets = METHODS[args.method]
    other = SPD_ONLY if args.method == "apd" else list(APD_HELP)
    given = [name for name in other if getattr(args, name) is not None]
    if given:
        raise SystemExit(f"--{given[0]} is {'an SPD' if args.method == 'apd' else 'an APD'} flag; "
                         f"{'drop it' if args.method == 'apd' else 'add --method apd'} (this run is --method {args.method})")
    if args.model not in presets:
        raise SystemExit(f"--method {args.method} has no preset for --model {args.model}; "
                         f"its presets: {', '.join(presets)}")
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return Config(**{**presets[args.model], **flags})


def check_run_flags(args: argparse.Namespace, out: Path) -> None:
    """train.py's own flags (the SPD ones are spd.SPDConfig.validate's, the loop's spd.check_loop's), checked
    before anything is written: SystemExit naming the bad one."""
    try:
        spd.check_loop(args.log_every, args.save_every)
    except ValueError as e:
        raise SystemExit(str(e))
    for name, lowest in (("target_steps", 1), ("target_seed", 0)):
        v = getattr(args, name)
        if v is not None and v < lowest:
            raise SystemExit(f"--{name} must be >= {lowest}, got {v}")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder; pass a folder path")
    parent = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    try:  # can the folder be made? (made for real only once the run has started)
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create a folder in {parent} ({e.strerror}); pass a folder path you can write to")
    if args.compile_ci and args.method != "spd":
        raise SystemExit(f"--compile_ci compiles SPD's CI functions; --method {args.method} has none: drop the flag")
    if args.wandb is not None:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise SystemExit("--wandb needs the wandb package: pip install wandb (or drop --wandb)")
        if not args.wandb.strip():
            raise SystemExit("--wandb needs a project name, got an empty one")
    if args.model == "gpt2" and args.dataset is not None:
        path = Path(args.dataset)
        if not path.is_file():
            raise SystemExit(f"--dataset {path} not found; pass a text file with one prompt per line")
        if not any(line.strip() for line in path.read_text(errors="replace").splitlines()):
            raise SystemExit(f"--dataset {path} has no non-empty line; pass a text file with one prompt per line")


def process_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", 0)) if spd.world_size() > 1 else 0


def launcher() -> str:
    """How this run was started: 'torchrun --standalone --nproc_per_node N ' or 'python '."""
    world = spd.world_size()
    return f"torchrun --standalone --nproc_per_node {world} " if world > 1 else "python "


def started_processes() -> int:
    """The processes torchrun started (its WORLD_SIZE; 1 under plain python), before any group is joined."""
    return int(os.environ.get("WORLD_SIZE", 1))


def start_processes(args) -> None:
    """Under torchrun (WORLD_SIZE > 1): joins the process group (nccl on GPUs, gloo on CPU) and
    picks this process's GPU. SystemExit for what data parallelism does not cover."""
    world = started_processes()
    if world == 1:
        return
    if args.method != "spd":
        raise SystemExit(f"--method {args.method} runs in one process only; start it with python, not torchrun")
    import torch.distributed as dist
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    spd.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() > 0:  # process 0 alone prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")


@contextlib.contextmanager
def first_process_first():
    """Under torchrun, process 0 runs the block before the others do."""
    import torch.distributed as dist
    world = spd.world_size()
    if world > 1 and dist.get_rank() > 0:
        dist.barrier()
    yield
    if world > 1 and dist.get_rank() == 0:
        dist.barrier()


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
    try:
        hf_model, tokenizer = models.load_gpt2(args.pretrained)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e))
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
    try:
        model, tcfg = models.build_target(args.model, **overrides)
    except ValueError as e:
        raise SystemExit(f"target: {e}")
    tag = "_".join(f"{k}{v}" for k, v in sorted(tcfg.items()) if k in TARGET_FLAGS + ("steps", "seed"))
    path = Path(args.target_dir) / f"{args.model}_{tag}.pt"
    if path.exists() and not args.retrain_target:
        try:
            model.load_state_dict(spd.read_tensors(path))
        except (ValueError, RuntimeError) as e:
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


def check_target(target, tcfg: dict, device) -> None:
    """Warns before decomposing a target that did not learn its task (SPD would measure the target)."""
    if tcfg["family"] == "tms" and not models.tms_target_ok(target):
        print("WARNING: the trained TMS target leaves a feature unrepresented (a column of W near 0);"
              " MMCS/ML2R will measure the target, not SPD. Try another --target_seed.")
    if tcfg["family"] == "induction":
        acc = models.induction_metrics(target, n=2_000, generator=torch.Generator(device).manual_seed(0), device=device)["acc"]
        print(f"target: induction accuracy {acc:.3f} at the last position (chance {1 / tcfg['vocab']:.3f})")
        if acc < INDUCTION_MIN_ACC:
            print(f"WARNING: the induction target predicts the induction token {acc:.1%} of the time: it has not "
                  f"learned the task, so no induction mechanism is there to find. Train it longer (--target_steps; "
                  f"the preset's {models.TARGET_PRESETS['induction']['steps']} steps) or try another --target_seed.")


PROCESS_SEED_STRIDE = 1_000_003  # torchrun: process r seeds its data and masks this far from process 0
INDUCTION_MIN_ACC = 0.5  # below: the target has not learned induction (chance is 1/vocab)


def rng_states(gen: torch.Generator) -> dict:
    state = {"torch_rng": torch.get_rng_state(), "data_rng": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def train_state(opt: torch.optim.Optimizer, gen: torch.Generator) -> dict | None:
    """What a checkpoint needs beyond the weights to continue exactly: Adam's moments, both RNGs, and
    the CPU thread count (matmuls round differently with another one). Data parallel: called by every
    process; process 0 gets every process's RNGs ("process_rngs") and the others None."""
    rngs = rng_states(gen)
    if spd.world_size() == 1:
        return {"optimizer": opt.state_dict(), **rngs, "threads": torch.get_num_threads()}
    import torch.distributed as dist
    if hasattr(opt, "consolidate_state_dict"):  # --shard_optimizer: process 0 gathers the shards of Adam's state
        opt.consolidate_state_dict(to=0)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rngs, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return {"optimizer": opt.state_dict(), **rngs, "threads": torch.get_num_threads(), "process_rngs": gathered}


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
        meta = METHODS[run_config["method"]][0].load(dec, out)
        state = spd.read_tensors(path)
        if not isinstance(state, dict) or any(k not in state for k in ("step", "optimizer", "torch_rng", "data_rng")):
            raise ValueError(f"{path} is not a train state written by train.py; start afresh with another --out")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--resume: {e}")
    if state["step"] != meta["step"]:
        raise SystemExit(f"--resume: {out} holds weights of step {meta['step']} but optimizer state of step "
                         f"{state['step']} (killed mid-save); start afresh with another --out")
    world, rank = spd.world_size(), process_rank()
    saved_world = len(state.get("process_rngs", [None]))
    if saved_world != world:
        raise SystemExit(f"--resume: {out} was checkpointed by {saved_world} process(es) and this is {world}; "
                         f"resume it with {'torchrun --nproc_per_node ' + str(saved_world) if saved_world > 1 else 'plain python (no torchrun)'}")
    rngs = state["process_rngs"][rank] if world > 1 else state
    torch.set_rng_state(rngs["torch_rng"])
    gen.set_state(rngs["data_rng"])
    if "cuda_rng" in rngs and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda_rng"])
    print(f"resuming {out} at step {state['step']}")
    if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        print(f"note: the run was checkpointed with {state['threads']} CPU threads and continues with "
              f"{torch.get_num_threads()}; matmuls round differently, so it will not match an uninterrupted "
              f"run bit for bit (set OMP_NUM_THREADS={state['threads']} for that)")
    return state["step"], state["optimizer"]


def same_settings(flag: str, out: Path, run_config: dict) -> dict:
    """The saved run config of `out`, after checking that it was made with this model and these SPD
    settings (a field newer than the run counts as its default); else SystemExit naming the flags."""
    try:
        saved = spd.read_config(out)["config"]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{flag}: {e}")
    method = run_config["method"]
    if saved.get("method", "spd") != method:
        raise SystemExit(f"{flag}: the run in {out} is an {saved.get('method', 'spd').upper()} run; "
                         f"pass --method {saved.get('method', 'spd')}, or another --out")
    if not isinstance(saved.get(method, {}), dict):
        raise SystemExit(f"{flag}: {out / 'config.json'} has no {method.upper()} settings (config.{method}); is it a run of train.py?")
    saved_cfg = {**dataclasses.asdict(METHODS[method][1]()), **saved.get(method, {})}
    if saved.get("model") != run_config["model"] or saved_cfg != run_config[method]:
        diff = sorted(k for k in run_config[method] if saved_cfg.get(k) != run_config[method][k])
        raise SystemExit(f"{flag}: the run in {out} was made with other settings (model {saved.get('model')}; "
                         f"differing flags: {diff}); use the same flags or another --out")
    return saved


def decompose(args, cfg, dec, sample, gen, run_config: dict, out: Path, wb=None) -> dict:
    """The training part of a run (fresh or --resume); returns its final losses and timing. wb: the
    --wandb run, which gets the loss lines too (as loss/NAME)."""
    start, opt_state = resume(args, dec, run_config, out, gen) if args.resume else (0, None)
    first = process_rank() == 0  # data parallel: process 0 alone writes the run folder and logs
    if args.resume and first:  # keep the loss lines up to the checkpoint: the lines after it are logged again
        lines = (out / "losses.jsonl").read_text().splitlines() if (out / "losses.jsonl").exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] < start]
        (out / "losses.jsonl").write_text("".join(line + "\n" for line in kept))
    log_file = open(out / "losses.jsonl", "a" if args.resume else "w") if first else None

    def log(step, losses):
        log_file.write(json.dumps({"step": step, **losses}) + "\n")
        log_file.flush()
        if wb is not None:
            wb.log({f"loss/{k}": v for k, v in losses.items()}, step=step)
        if args.no_progress or step % (args.log_every * 10) == 0 or step == cfg.steps - 1:
            print(f"step {step:>7d}  " + "  ".join(f"{k} {v:.3g}" for k, v in losses.items()), flush=True)

    t0 = time.time()
    try:
        method = METHODS[run_config["method"]][0]
        def checkpoint(step, opt):
            state = train_state(opt, gen)  # on every process (it gathers their RNGs)
            if first:
                method.save(dec, out, run_config, step, state)

        with spd.compiled_ci(dec) if args.compile_ci else contextlib.nullcontext():
            final = method.optimize(dec, lambda b: sample(b, gen), cfg, log=log if first else None,
                                    log_every=args.log_every, checkpoint=checkpoint, save_every=args.save_every,
                                    progress=first and not args.no_progress, start_step=start, opt_state=opt_state,
                                    **({"shard_optimizer": True} if args.shard_optimizer else {}))
    except FloatingPointError as e:
        raise SystemExit(f"{e}\n{last_checkpoint(out)}")
    except spd.Interrupted as e:
        resume_cmd = launcher() + run_config["command"].removeprefix("python ") + (
            "" if "--resume" in run_config["command"].split() else " --resume")
        raise SystemExit(f"interrupted: checkpoint of step {e.step} saved in {out}; continue with:\n  {resume_cmd}")
    seconds = time.time() - t0
    return {"final_losses": final, "seconds": seconds, "ms_per_step": 1000 * seconds / max(cfg.steps - start, 1)}


def last_checkpoint(out: Path) -> str:
    """Where a stopped run can be picked up: its last checkpoint's step, or that there is none."""
    try:
        step = spd.read_config(out)["step"]
        return f"the last checkpoint, of step {step}, is kept in {out} (continue it with --resume)"
    except (OSError, ValueError):
        return f"no checkpoint was written in {out}"


def reload_finished(dec, out: Path, run_config: dict) -> dict:
    """--evaluate_only: loads the finished run in `out` into dec, after checking it was made with
    these settings; returns the training part of its metrics.json unchanged (final losses and
    timing), so only the evaluation is recomputed."""
    same_settings("--evaluate_only", out, run_config)
    try:
        METHODS[run_config["method"]][0].load(dec, out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--evaluate_only: {e}")
    keys = ("final_losses", "seconds", "ms_per_step")
    try:
        old = json.loads((out / "metrics.json").read_text())
        return {k: old[k] for k in keys}
    except OSError:
        raise SystemExit(f"--evaluate_only: {out / 'metrics.json'} not found: {out} is not a finished run "
                         f"(a killed one continues with --resume)") from None
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"--evaluate_only: {out / 'metrics.json'} is damaged (not JSON with {list(keys)}); "
                         f"it cannot be re-evaluated without losing its training record: restore it") from None


def load_run(run_dir: str | os.PathLike, device: str = "cpu", target_dir: str | None = None) -> tuple:
    """A finished SPD run folder, rebuilt from the command in its config.json: (dec, target, tcfg,
    cfg, sample), sample(batch, generator) drawing the run's inputs. The target comes from the cache
    (the run's --target_dir, relative to where it was made, unless target_dir is given) or is
    retrained the same way. SystemExit with one line when the folder is not a finished SPD run."""
    out = Path(run_dir)
    try:
        meta = spd.read_config(out)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e))
    run_config = meta["config"]
    if run_config.get("method", "spd") != "spd" or "command" not in run_config:
        raise SystemExit(f"{out} holds {'an ' + run_config['method'].upper() if 'method' in run_config else 'no train.py'}"
                         f" run; this needs an SPD run folder written by train.py")
    if not (out / "metrics.json").exists():
        raise SystemExit(f"{out} is not a finished run (no metrics.json); finish it with train.py ... --resume first")
    args = parse_args(shlex.split(run_config["command"])[2:])
    args.device = device
    if target_dir is not None:
        args.target_dir = target_dir
    dev = pick_device(device)
    if args.model == "gpt2":
        target, tcfg, _, prompts = get_gpt2(args, dev)
        sample = lambda b, g=None: prompts
    else:
        target, tcfg = get_target(args, dev)
        sample = models.batch_fn(tcfg, dev)
    cfg = spd_config(args)
    dec = spd.Decomposition.from_config(target, cfg, max_seq_len=tcfg.get("seq_len")).to(dev)
    try:
        spd.load(dec, out)
    except (ValueError, OSError) as e:
        raise SystemExit(str(e))
    return dec, target, tcfg, cfg, sample


def start_wandb(project: str, run_config: dict, out: Path):
    """A Weights & Biases run for --wandb (imported only then); WANDB_MODE=offline works without network."""
    import wandb
    return wandb.init(project=project, name=out.name, dir=str(out), config=run_config)


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict, keyed by slash paths ("eval_losses/faithfulness")."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def log_to_wandb(wb, metrics: dict, out: Path, step: int) -> None:
    """The final metrics (as metrics/...) and the run folder's figures (as figures/NAME)."""
    import wandb
    wb.log({**{f"metrics/{k}": v for k, v in flat_numbers(metrics).items()},
            **{f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}}, step=step)
    wb.finish()


RUN_MODULES = ("spd.py", "apd.py", "models.py", "train.py", "analysis.py")  # what a run executes


def code_version() -> str:
    """The git commit of this code, recorded in each run's config; "+dirty" if one of the modules a
    run executes (spd, apd, models, train, analysis) differs from that commit."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        if git("ls-files", "train.py"):  # untracked e.g. when installed into a venv inside another repository
            dirty = git("status", "--porcelain", "--", *RUN_MODULES)
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
    out = Path(args.out or f"runs/{args.model}{'_apd' if args.method == 'apd' else ''}_seed{cfg.seed}")
    check_run_flags(args, out)
    if args.resume and not (out / "config.json").exists():
        raise SystemExit(f"--resume: no checkpoint to resume in {out} (no config.json; a run writes one every "
                         f"--save_every steps); drop --resume to start afresh")
    if args.evaluate_only and not (out / "config.json").exists():
        raise SystemExit(f"--evaluate_only: {out / 'config.json'} not found; is {out} a run folder written by train.py?")
    if args.resume and (out / "metrics.json").exists():
        raise SystemExit(f"--resume: {out} holds a finished run (metrics.json), there is nothing to continue; "
                         f"add --evaluate_only instead to re-evaluate it, or pass another --out")
    world = started_processes()
    if cfg.batch_size % world:
        raise SystemExit(f"--batch_size {cfg.batch_size} does not split evenly over {world} processes; use a multiple of {world}")
    if world > 1 and args.evaluate_only:
        raise SystemExit("--evaluate_only runs in one process; start it with python, not torchrun")
    if args.shard_optimizer and world == 1:
        raise SystemExit("--shard_optimizer shards Adam's state over torchrun's processes; this is one process: start "
                         "it with torchrun --standalone --nproc_per_node N (N >= 2), or drop the flag")
    if args.shard_optimizer and getattr(cfg, "tied_updates", None) == "separate":
        raise SystemExit("--shard_optimizer cannot split tied matrices updated one after the other; "
                         "use --tied_updates shared, or drop --shard_optimizer")
    if (out / "config.json").exists() and not (args.resume or args.evaluate_only):  # never overwrite a saved run
        if (out / "metrics.json").exists():
            raise SystemExit(f"{out} holds a finished run; add --evaluate_only to re-evaluate it, or pass another "
                             f"--out (or delete {out}) to start afresh")
        try:
            step = spd.read_config(out)["step"]
        except (OSError, ValueError):
            step = "? (its config.json is damaged)"
        raise SystemExit(f"{out} holds an unfinished run, checkpointed at step {step}; add --resume to continue "
                         f"it, or pass another --out (or delete {out}) to start afresh")

    start_processes(args)
    device = pick_device(args.device)  # again: under torchrun, this process's GPU
    # --- target
    if args.model == "gpt2":
        target, tcfg, tokenizer, prompts = get_gpt2(args, device)
    else:
        with first_process_first():  # one process trains and caches the target, the others load it
            target, tcfg = get_target(args, device)
    check_target(target, tcfg, device)

    # --- decomposition (seeded, so a run is reproducible on one machine)
    torch.manual_seed(cfg.seed)
    try:
        if args.method == "apd":
            dec = apd.APDDecomposition.from_config(target, cfg).to(device)
        else:
            dec = spd.Decomposition.from_config(target, cfg, max_seq_len=tcfg.get("seq_len")).to(device)
    except ValueError as e:
        raise SystemExit(str(e))
    rank = process_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)  # only now: a start that failed above leaves no empty folder
    print(f"run folder: {out}   device: {device}" + (f"   {world} processes (torchrun)" if world > 1 else ""))
    sample = (lambda b, g=None: prompts) if args.model == "gpt2" else models.batch_fn(tcfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + PROCESS_SEED_STRIDE * rank)  # data: its own share
    if rank > 0:
        torch.manual_seed(cfg.seed + PROCESS_SEED_STRIDE * rank)  # masks: its own draws
    run_config = {"model": args.model, "method": args.method, args.method: dataclasses.asdict(cfg), "target": tcfg,
                  "code": code_version(), "command": "python train.py " + shlex.join(argv), "processes": world}
    wb = start_wandb(args.wandb, run_config, out) if args.wandb and rank == 0 else None
    training = reload_finished(dec, out, run_config) if args.evaluate_only else decompose(args, cfg, dec, sample, gen,
                                                                                         run_config, out, wb)
    if world > 1:  # process 0 evaluates alone
        import torch.distributed as dist
        dist.barrier()  # every process's last messages (the final checkpoint's gather) delivered before teardown
        dist.destroy_process_group()
        if rank > 0:
            return {}

    # --- evaluation, from a fixed RNG state (its stochastic losses draw masks): --evaluate_only repeats it exactly
    torch.manual_seed(12345)
    eval_batch = sample(cfg.batch_size, torch.Generator(device=device).manual_seed(12345))
    if args.method == "apd":
        metrics = {**training, "device": str(device), **analysis.evaluate_apd(dec, target, tcfg, eval_batch, cfg, out)}
    else:
        metrics = {**training, "device": str(device), **analysis.evaluate_spd(dec, target, tcfg, eval_batch, cfg, out,
                                                                              tokenizer if args.model == "gpt2" else None,
                                                                              progress=not args.no_progress)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if wb is not None:
        log_to_wandb(wb, metrics, out, cfg.steps)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, indent=1))
    for warning in convergence_warnings(args.model, tcfg, cfg, metrics, args.method):
        print("WARNING: " + warning)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".md"))
    print(f"wrote in {out}: metrics.json, {', '.join(written)}")
    return metrics


def convergence_warnings(model: str, tcfg: dict, cfg, metrics: dict, method: str = "spd") -> list[str]:
    """The signs, per target family, of a decomposition that has not found the target's mechanisms,
    with the preset's paper step count when the run had fewer steps."""
    signs = []
    if method == "apd":
        n, own = tcfg.get("n_features"), metrics.get("features_with_own_component")
        if own is not None and own < n:
            signs.append(f"{n - own} of {n} features have no component of their own (cosine >= {analysis.RECOVERED_COS} "
                         f"and no other feature's best match): APD merged or missed them")
        mono = metrics.get("in_monosemantic_fraction")
        if mono is not None and mono < MIN_MONOSEMANTIC:
            signs.append(f"only {mono:.0%} of the input features have a most attributed component of their own: "
                         f"not converged, or APD merged them")
    elif tcfg["family"] == "tms":
        n, large, ml2r = tcfg["n_features"], metrics["linear1/n_large_subcomponents"], metrics["ml2r_large"]
        if large < n:
            signs.append(f"W has {large} large subcomponents for {n} features: SPD merged features into one "
                         f"subcomponent, a local minimum some seeds end in (README, Results); try another --seed")
        if large > n:
            signs.append(f"W has {large} large subcomponents for {n} features: not converged")
        if abs(ml2r - 1) > ML2R_OFF:
            signs.append(f"ML2R of the large subcomponents is {ml2r:.3f}, far from 1: their norms do not match "
                         f"the target's features")
    elif tcfg["family"] == "resid_mlp":
        if metrics["in_monosemantic_fraction"] < MIN_MONOSEMANTIC:
            signs.append(f"only {metrics['in_monosemantic_fraction']:.0%} of the input features have one W_in "
                         f"subcomponent of their own (paper: all): not converged")
    elif tcfg["family"] == "induction":
        total = metrics["table1_t0"]["total_unique_sum"]
        if total > INDUCTION_MAX_UNIQUE:
            signs.append(f"{total} subcomponents are active somewhere (paper: {analysis.PAPER_TOTAL_UNIQUE}): "
                         f"not converged")
    steps = METHODS[method][2][model]["steps"]
    if signs and cfg.steps < steps:
        signs.append(f"this run had {cfg.steps} steps; the paper's setting for {model} is --steps {steps}")
    return signs


ML2R_OFF = 0.1  # TMS: |ML2R - 1| above this counts as far from 1 (converged runs: within 0.01)
MIN_MONOSEMANTIC = 0.9  # residual MLPs: converged runs here and in the authors' code have 0.97-1.0
INDUCTION_MAX_UNIQUE = 50  # induction: the paper has 16 active subcomponents in all


if __name__ == "__main__":
    main()
