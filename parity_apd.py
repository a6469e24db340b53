"""Side by side with the authors' APD code: one step on identical inputs in both codes.

The authors' APD code (github.com/ApolloResearch/apd, main at 4e29d43, 2025-02-05, "Remove redundant
topk masking") is a measuring instrument, as in parity.py: it runs in its own interpreter with its
checkout on PYTHONPATH (its package is also called `spd`), and nothing of it is copied.

    python parity_apd.py step --model tms_5-2 --ref ../ref/apd --ref_python ../ref/venv/bin/python \\
        --fixture fixtures/apd_parity_tms_5-2.json --report results/parity/apd_step_tms_5-2.json

    python parity_apd.py train --model tms_40-10 --instances 3 --ref ... --ref_python ... --out runs/parity/apd_theirs_tms_40-10

`step` runs one optimisation step of their `optimize` (steps=1) and of our apd.optimize on the same
target, U, V and batch (train.APD_PRESETS' settings), and compares the attributions, the batch top-k
mask, every loss term, every gradient and the parameters after the Adam step. Their models are built
with n_instances = 1. `train` runs their `optimize` for the preset's steps on our target copied into
`--instances` parallel instances (as their own TMS runs: 12 for 5-2, 3 for 40-10), with their own
init (seeded as their main scripts) and data, and writes each instance as a run folder of ours,
<out>_i<k>, for `train.py --method apd --evaluate_only`.

Name and layout mapping (theirs -> ours), for decomposed matrix `name`:
    <name>.A [1, C, d_in, m]  = V^T   (V [C, m, d_in]; their layer computes Σ_c (x A_c) B_c)
    <name>.B [1, C, m, d_out] = U^T   (U [C, d_out, m])
    TMS linear2 (their TransposedLinearComponent) reads linear1's A, B, as ours reads linear1's U, V.
Targets: their TMSModel's linear1.weight [1, d_in, d_out] = our linear1.weight^T, b_final = our
linear2.bias, hidden_layers.i.weight = ours^T; ResidualMLPModel's W_E = ours, W_U = W_E^T,
layers.i.mlp_in / mlp_out.weight = ours^T.
Losses: their param_match_loss, topk_recon_loss, act_recon_loss, schatten_loss = our faithfulness,
minimality, act_recon, simplicity.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

import parity

REF_COMMIT = "4e29d43"
MODELS = ("tms_5-2", "tms_5-2-id", "tms_40-10", "resid_mlp1")
LOSS_NAMES = {"faithfulness": "param_match_loss", "minimality": "topk_recon_loss", "act_recon": "act_recon_loss",
              "simplicity": "schatten_loss", "total": "total"}  # ours: theirs


# ================================================================================================
# Ours: identical inputs from a seed, our step, the mapping to their names
# ================================================================================================


def make_inputs(model: str, seed: int = 0, batch_size: int | None = None) -> dict:
    """The preset's target (untrained, from its preset seed), our initial U, V (from `seed`) and one
    batch of the preset's data; the config of train.py's --method apd with steps = 1."""
    import apd
    import models
    import train

    cfg = apd.APDConfig(**{**train.APD_PRESETS[model], "steps": 1, **({"batch_size": batch_size} if batch_size else {})})
    target, tcfg = models.build_target(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = apd.APDDecomposition.from_config(target, cfg)
    x = models.batch_fn(tcfg)(cfg.batch_size, torch.Generator().manual_seed(seed))
    return {"model": model, "seed": seed, "cfg": cfg, "target": target, "dec": dec, "x": x}


def to_theirs(dec) -> dict[str, torch.Tensor]:
    """Our U, V under their names and layouts (table in the module docstring); tied matrices are theirs too."""
    out = {}
    for name in dec.names:
        if name not in dec.tied:
            U, V = dec.UV(name)
            out |= {f"{name}.A": V.transpose(1, 2)[None], f"{name}.B": U.transpose(1, 2)[None]}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@contextmanager
def recording_adamw(record: dict, model: torch.nn.Module):
    """Within the block torch.optim.AdamW records the gradients it is about to apply (first step only)."""
    names = {id(p): n for n, p in model.named_parameters()}
    original = torch.optim.AdamW

    class Recording(original):
        def step(self, *a, **kw):
            record.setdefault("grads", {names[id(p)]: p.grad.detach().clone() for g in self.param_groups
                                        for p in g["params"] if p.grad is not None})
            return super().step(*a, **kw)

    torch.optim.AdamW = Recording
    try:
        yield
    finally:
        torch.optim.AdamW = original


def our_step(inp: dict) -> dict:
    """Our attributions and batch top-k mask on the starting parameters, then one step of apd.optimize
    itself (its losses at step 0, the gradients Adam applies, the parameters after), under their names."""
    import apd

    dec, cfg, x = copy.deepcopy(inp["dec"]), inp["cfg"], inp["x"]
    start = copy.deepcopy(dec)
    if cfg.unit_norm_V:  # optimize normalises V before each step's forward passes
        apd.normalize_V_(start)
    A = apd.attributions(start, x)[0]
    record = {}
    with recording_adamw(record, dec):
        apd.optimize(dec, lambda n: x, cfg, log=lambda step, losses: record.setdefault("losses", losses),
                     log_every=1, progress=False)
    grads = {}
    for key, g in record["grads"].items():  # "U.<matrix key>" / "V.<matrix key>"
        which, name = key.split(".", 1)
        name = name.replace("/", ".")
        grads[f"{name}.B" if which == "U" else f"{name}.A"] = g.transpose(1, 2)[None]
    return {"attributions": A, "mask": apd.batch_topk_mask(A, cfg.topk), "grads": grads, "params": to_theirs(dec),
            "losses": {k: record["losses"][k] for k in LOSS_NAMES if k in record["losses"]}}


def in_double(inp: dict) -> dict:
    out = copy.deepcopy(inp)
    out["dec"].double()
    out["x"] = out["x"].double()
    return out


def summarise(result: dict) -> dict:
    """A step result as summaries (parity.summary) keyed "attributions", "grad/<param>", "param/<param>";
    the mask as the list of its active (input, component) pairs."""
    out = {"losses": result["losses"], "attributions": parity.summary(result["attributions"], "attributions"),
           "mask": result["mask"].flatten().nonzero().flatten().tolist()}
    for group, tensors in (("grad", result["grads"]), ("param", result["params"])):
        out |= {f"{group}/{k}": parity.summary(t, f"{group}/{k}") for k, t in tensors.items()}
    return out


def compare(a: dict, b: dict) -> dict[str, float]:
    """{quantity: relative difference} for every loss and tensor; "mask": the number of (input,
    component) pairs active in one and not the other."""
    rows = {f"loss {k}": abs(a["losses"][k] - v) / max(abs(v), 1e-30) for k, v in b["losses"].items()}
    rows["mask"] = float(len(set(a["mask"]) ^ set(b["mask"])))
    return rows | {k: parity.compare_summaries(a[k], b[k]) for k in sorted(b) if k not in ("losses", "mask")}


def target_to_theirs(model: str, target, instances: int = 1) -> dict:
    """Our target's weights in their layout, copied into `instances` instances, and their model config."""
    if model.startswith("tms"):
        cfg = {"n_instances": instances, "n_features": target.linear1.in_features, "n_hidden": target.linear1.out_features,
               "n_hidden_layers": len(target.hidden_layers), "device": "cpu"}
        state = {"linear1.weight": target.linear1.weight.T[None], "b_final": target.linear2.bias[None]}
        state |= {f"hidden_layers.{i}.weight": l.weight.T[None] for i, l in enumerate(target.hidden_layers)}
        return {"family": "tms", "config": cfg,
                "state": {k: v.detach().expand(instances, *v.shape[1:]).clone() for k, v in state.items()}}
    assert instances == 1, "residual MLPs: one instance (as their runs)"
    cfg = {"n_instances": 1, "n_features": target.W_E.shape[0], "d_embed": target.W_E.shape[1],
           "d_mlp": target.layers[0].mlp_in.out_features, "n_layers": len(target.layers), "act_fn_name": "relu",
           "apply_output_act_fn": False, "in_bias": False, "out_bias": False}
    state = {"W_E": target.W_E[None], "W_U": target.W_E.T[None]}
    for i, layer in enumerate(target.layers):
        state |= {f"layers.{i}.mlp_in.weight": layer.mlp_in.weight.T[None],
                  f"layers.{i}.mlp_out.weight": layer.mlp_out.weight.T[None]}
    return {"family": "resid_mlp", "config": cfg, "state": {k: v.detach().clone().contiguous() for k, v in state.items()}}


def their_config(inp: dict, steps: int = 1, print_freq: int = 1) -> dict:
    """Their Config for our preset's values; no figures, and no saves but the last."""
    cfg, dec = inp["cfg"], inp["dec"]
    ranks = {U.shape[-1] for U in dec.U.values()}
    assert len(ranks) == 1, f"their models take one m for all matrices, ours has {ranks}"
    task = ({"task_name": "tms", "feature_probability": 0.05, "train_bias": False, "bias_val": 0.0}
            if inp["model"].startswith("tms") else
            {"task_name": "residual_mlp", "feature_probability": 0.01, "init_scale": cfg.init_scale})
    return dict(wandb_project=None, seed=inp["seed"], topk=cfg.topk, batch_topk=True, batch_size=cfg.batch_size,
                steps=steps, print_freq=print_freq, image_freq=None, save_freq=None, lr=cfg.lr, param_match_coeff=cfg.faithfulness,
                topk_recon_coeff=cfg.minimality, act_recon_coeff=cfg.act_recon or None, schatten_coeff=cfg.simplicity,
                schatten_pnorm=cfg.schatten_p, C=cfg.C, m=ranks.pop(), lr_schedule=cfg.lr_schedule,
                lr_warmup_pct=cfg.lr_warmup_pct, unit_norm_matrices=cfg.unit_norm_V, attribution_type="gradient",
                task_config=task | {"data_generation_type": "at_least_zero_active", "pretrained_model_path": "unused"})


def cmd_step(args) -> None:
    import train

    torch.set_num_threads(args.threads)
    inp = make_inputs(args.model, args.seed, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        job = {"target": target_to_theirs(args.model, inp["target"]), "config": their_config(inp),
               "params": to_theirs(inp["dec"]), "x": inp["x"], "result": str(Path(tmp) / "theirs.pt")}
        parity.run_theirs("step", job, args.ref, args.ref_python, script=__file__)
        theirs = torch.load(job["result"], weights_only=True)
    theirs["losses"] = {k: theirs["losses"][v] for k, v in LOSS_NAMES.items() if v in theirs["losses"]}
    their_sum = summarise(theirs)
    ours, exact = summarise(our_step(inp)), summarise(our_step(in_double(inp)))
    rows = {"ours vs theirs": compare(ours, their_sum), "ours vs float64": compare(ours, exact),
            "theirs vs float64": compare(their_sum, exact)}
    report = {"model": args.model, "seed": args.seed, "batch_size": inp["cfg"].batch_size, "code": train.code_version(),
              "ref": "ApolloResearch/apd", "ref_commit": REF_COMMIT, "torch": torch.__version__,
              "command": "python parity_apd.py " + " ".join(sys.argv[1:]), "theirs": their_sum, "rows": rows}
    print(f"\n{args.model} (APD): relative differences (norm-relative for tensors; mask: pairs that differ)")
    print(f"  {'quantity':<36s} {'ours':>14s} " + " ".join(f"{c:>17s}" for c in rows))
    for q in rows["ours vs theirs"]:
        value = (ours["losses"][q[5:]] if q.startswith("loss ") else len(ours["mask"]) if q == "mask"
                 else ours[q]["norm"])
        print(f"  {q:<36s} {value:>14.7g} " + " ".join(f"{rows[c][q]:>17.1e}" for c in rows))
    for path, content in ((args.fixture, {k: v for k, v in report.items() if k != "rows"}),
                          (args.report, {k: v for k, v in report.items() if k != "theirs"})):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(content, indent=1))


def cmd_train(args) -> None:
    """Their optimize on our preset target (trained or loaded by train.py's cache), one run folder of
    ours per instance."""
    import dataclasses
    import time

    import apd
    import spd
    import train

    torch.set_num_threads(args.threads)
    targs = train.parse_args(["--model", args.model, "--method", "apd", "--no_progress"])
    target, tcfg = train.get_target(targs, torch.device("cpu"))
    cfg = dataclasses.replace(train.spd_config(targs), seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    outs = [Path(f"{args.out}_i{k}") for k in range(args.instances)]
    if any((o / "metrics.json").exists() for o in outs):
        raise SystemExit(f"{args.out}_i* holds a finished run; pass another --out")
    dec = apd.APDDecomposition.from_config(target, cfg)
    inp = {"model": args.model, "seed": args.seed, "cfg": cfg, "dec": dec}
    with tempfile.TemporaryDirectory() as tmp:
        job = {"target": target_to_theirs(args.model, target, args.instances),
               "config": their_config(inp, cfg.steps, print_freq=1000), "out_dir": tmp}
        t0 = time.time()
        parity.run_theirs("train", job, args.ref, args.ref_python, script=__file__)
        seconds = time.time() - t0
        state = torch.load(Path(tmp) / f"spd_model_{cfg.steps}.pth", weights_only=True)
    command = "python parity_apd.py " + " ".join(sys.argv[1:])
    for k, out in enumerate(outs):
        with torch.no_grad():
            for name in dec.names:
                if name not in dec.tied:
                    dec.V[spd._key(name)].copy_(state[f"{name}.A"][k].transpose(1, 2))
                    dec.U[spd._key(name)].copy_(state[f"{name}.B"][k].transpose(1, 2))
        run_config = {"model": args.model, "method": "apd", "apd": dataclasses.asdict(cfg), "target": tcfg,
                      "code": train.code_version(), "command": command,
                      "theirs": {"repo": "ApolloResearch/apd", "commit": REF_COMMIT, "config": job["config"],
                                 "instance": k, "instances": args.instances}}
        apd.save(dec, out, run_config, cfg.steps)
        (out / "metrics.json").write_text(json.dumps({"final_losses": {}, "seconds": seconds,
                                                      "ms_per_step": 1000 * seconds / cfg.steps}))
        print(f"instance {k}: {out}; evaluate it with\n  python train.py --model {args.model} --method apd "
              f"--seed {args.seed} --steps {cfg.steps} --out {out} --evaluate_only")


# ================================================================================================
# Theirs: runs in the authors' environment only (their `spd` package on PYTHONPATH)
# ================================================================================================


def _theirs_step(job: dict) -> None:
    """Their optimize for one step on the job's target, parameters and batch; records the attributions,
    the top-k mask and every loss term of step 0 (by wrapping their functions), the gradients at
    optimizer.step, and the parameters of their final checkpoint spd_model_1.pth."""
    import spd.run_spd as run_spd

    t, cfg = job["target"], run_spd.Config(**job["config"])
    if t["family"] == "tms":
        from spd.experiments.tms.models import TMSModel, TMSModelConfig, TMSSPDModel, TMSSPDModelConfig

        target = TMSModel(TMSModelConfig(**t["config"]))
        model = TMSSPDModel(TMSSPDModelConfig(**t["config"], C=cfg.C, m=cfg.m, bias_val=0.0))
        target.load_state_dict(t["state"])
        model.b_final.data[:] = target.b_final.data  # as their tms_decomposition.main
        model.b_final.requires_grad = False
        param_names = ["linear1", "linear2"] + [f"hidden_layers.{i}" for i in range(t["config"]["n_hidden_layers"])]
    else:
        from spd.experiments.resid_mlp.models import (ResidualMLPConfig, ResidualMLPModel, ResidualMLPSPDConfig,
                                                      ResidualMLPSPDModel)

        target = ResidualMLPModel(ResidualMLPConfig(**t["config"]))
        model = ResidualMLPSPDModel(ResidualMLPSPDConfig(**t["config"], init_scale=cfg.task_config.init_scale,
                                                         C=cfg.C, m=cfg.m))
        target.load_state_dict(t["state"])
        for name in ("W_E", "W_U"):  # as their resid_mlp_decomposition.main
            getattr(model, name).data[:] = getattr(target, name).data
            getattr(model, name).requires_grad = False
        param_names = [f"layers.{i}.{m}" for i in range(t["config"]["n_layers"]) for m in ("mlp_in", "mlp_out")]
    target.eval()
    state = model.state_dict()
    for k, v in job["params"].items():
        state[k].copy_(v)

    record: dict = {"losses": {}}

    def first(key, fn, losses=False):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            if losses:
                record["losses"].setdefault(key, out.mean().item())
            else:
                record.setdefault(key, out.detach().clone())
            return out
        return wrapped

    recon_calls = []

    def recon(*a, **kw):  # called for the full model's output, then for the top-k forward's
        out = calc_recon(*a, **kw)
        recon_calls.append(out.mean().item())
        return out

    class Tqdm(run_spd.tqdm):
        @classmethod
        def write(cls, s, *a, **kw):
            if s.startswith("Total loss: "):
                record["losses"].setdefault("total", float(s.removeprefix("Total loss: ")))

    calc_recon = run_spd.calc_recon_mse
    run_spd.calc_recon_mse = recon
    run_spd.calculate_attributions = first("attributions", run_spd.calculate_attributions)
    run_spd.calc_topk_mask = first("mask", run_spd.calc_topk_mask)
    for key, fn in (("param_match_loss", "calc_param_match_loss"), ("schatten_loss", "calc_schatten_loss"),
                    ("act_recon_loss", "calc_act_recon")):
        setattr(run_spd, fn, first(key, getattr(run_spd, fn), losses=True))
    run_spd.tqdm = Tqdm
    x = job["x"][:, None, :]  # [batch, n_instances = 1, n_features]
    out_dir = Path(job["result"]).parent
    with recording_adamw(record, model):
        run_spd.optimize(model=model, config=cfg, device="cpu", dataloader=[(x, x), (x, x)], target_model=target,
                         param_names=param_names, out_dir=out_dir)
    record["losses"]["topk_recon_loss"] = recon_calls[1]
    final = torch.load(out_dir / "spd_model_1.pth", weights_only=True)
    torch.save({"attributions": record["attributions"][:, 0], "mask": record["mask"][:, 0], "losses": record["losses"],
                "grads": {k: g for k, g in record["grads"].items()},
                "params": {k: v for k, v in final.items() if k in job["params"]}}, job["result"])


def _theirs_train(job: dict) -> None:
    """Their tms_decomposition.main without wandb and figures: seed, model (their init), frozen bias,
    their data, their optimize; writes spd_model_<steps>.pth into job["out_dir"]."""
    import spd.run_spd as run_spd
    from spd.experiments.tms.models import TMSModel, TMSModelConfig, TMSSPDModel, TMSSPDModelConfig
    from spd.utils import DatasetGeneratedDataLoader, SparseFeatureDataset, set_seed

    t, cfg = job["target"], run_spd.Config(**job["config"])
    assert t["family"] == "tms", "train: TMS models only"
    set_seed(cfg.seed)
    target = TMSModel(TMSModelConfig(**t["config"]))
    target.load_state_dict(t["state"])
    target.eval()
    model = TMSSPDModel(TMSSPDModelConfig(**t["config"], C=cfg.C, m=cfg.m, bias_val=0.0))
    model.b_final.data[:] = target.b_final.data
    model.b_final.requires_grad = False
    param_names = ["linear1", "linear2"] + [f"hidden_layers.{i}" for i in range(t["config"]["n_hidden_layers"])]
    dataset = SparseFeatureDataset(n_instances=t["config"]["n_instances"], n_features=t["config"]["n_features"],
                                   feature_probability=cfg.task_config.feature_probability, device="cpu",
                                   data_generation_type="at_least_zero_active", value_range=(0.0, 1.0))
    run_spd.optimize(model=model, config=cfg, device="cpu", dataloader=DatasetGeneratedDataLoader(dataset, cfg.batch_size),
                     target_model=target, param_names=param_names, out_dir=Path(job["out_dir"]))


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["_theirs"]:  # the authors' environment: our spd.py off the path
        sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
        job = torch.load(sys.argv[3], weights_only=True)
        return {"step": _theirs_step, "train": _theirs_train}[sys.argv[2]](job)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step")
    step.add_argument("--model", required=True, choices=MODELS)
    step.add_argument("--ref", required=True, help="checkout of ApolloResearch/apd at 4e29d43")
    step.add_argument("--ref_python", required=True, help="python of the virtual environment their code runs in")
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--threads", type=int, default=1)
    step.add_argument("--batch_size", type=int)
    step.add_argument("--fixture", help="write the authors' numbers here (a JSON file for test_parity.py: fixtures/apd_parity_<model>.json)")
    step.add_argument("--report", help="write the side-by-side rows here (JSON)")
    tr = sub.add_parser("train")
    tr.add_argument("--model", required=True, choices=[m for m in MODELS if m.startswith("tms")])
    tr.add_argument("--ref", required=True)
    tr.add_argument("--ref_python", required=True)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--steps", type=int, help="default: the preset's")
    tr.add_argument("--instances", type=int, default=1, help="parallel instances of the target in their run")
    tr.add_argument("--out", required=True, help="run folders <out>_i0, <out>_i1, ...")
    args = ap.parse_args(argv)
    (cmd_step if args.command == "step" else cmd_train)(args)


if __name__ == "__main__":
    main()
