"""Mutation check of the test suite: break one line of spd.py, models.py, apd.py, cluster.py,
analysis.py or (data parallelism) train.py at a time and see whether the tests fail.

    python mutations.py                      # every mutation below, each set against its fast tests
    python mutations.py --sets apd.py        # one set's mutations only
    python mutations.py --sets spd.py -- test_spd.py -k "not recovers"   # another test selection (pytest arguments)

Each mutation is a one-line bug a reader of the paper could plausibly write. The file is restored after
each run (and if the script is interrupted or terminated); while it runs, the checkout's file is
broken, so run it in a copy if anything else uses this one. A mutation the tests do not catch is a
missing test.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SELF_TEST = "test_spd.py::test_every_mutation_still_finds_its_line"  # fails on any mutation: not a catch
FAST_TESTS = ["test_spd.py", "test_parity.py", "-k", "not recovers and not short_induction"]  # the minutes-long
# ground-truth recovery runs left out

MUTATIONS = [  # (name, the line as it is in spd.py, the bug)
    ("layerwise loss replaces every matrix at once",
     "total = total + sum(D(dec(x, {n: masks[n]}), target_out) for n in dec.names)",
     "total = total + len(dec.names) * D(dec(x, masks), target_out)"),
    ("layerwise loss normalised by S, not S L",
     "return total / (S * len(dec.names))", "return total / S"),
    ("stochastic recon missing its 1/S",
     "return sum(D(dec(x, sample_masks(ci)), target_out) for _ in range(S)) / S",
     "return sum(D(dec(x, sample_masks(ci)), target_out) for _ in range(S))"),
    ("one mask sample reused for all S",
     "return sum(D(dec(x, sample_masks(ci)), target_out) for _ in range(S)) / S",
     "return S * D(dec(x, sample_masks(ci)), target_out) / S"),
    ("recon losses fed the upper sigmoid",
     "losses[\"stochastic_recon\"] = stochastic_recon_loss(dec, x, target_out, ci_lower, D, S)",
     "losses[\"stochastic_recon\"] = stochastic_recon_loss(dec, x, target_out, ci_upper, D, S)"),
    ("CI input detached (no gradient to V through Γ)",
     "return ci_fn(self.inner(name, a)) if self.ci_fn == \"scalar\" else ci_fn(a)",
     "return ci_fn(self.inner(name, a).detach()) if self.ci_fn == \"scalar\" else ci_fn(a)"),
    ("projection init loses its sign",
     "comp.U.copy_(U * s)", "comp.U.copy_(U * s.abs())"),
    ("mask m = g r instead of g + (1 - g) r",
     "return {name: g + (1 - g) * torch.rand_like(g) for name, g in ci.items()}",
     "return {name: g * torch.rand_like(g) for name, g in ci.items()}"),
    ("lower sigmoid without its leak",
     "return torch.where(x <= 0, LEAK * x, x.clamp(max=1.0))", "return torch.where(x <= 0, 0 * x, x.clamp(max=1.0))"),
    ("upper sigmoid with slope 1 above 1",
     "return torch.where(x <= 1, F.relu(x), 1 + LEAK * (x - 1))", "return torch.where(x <= 1, F.relu(x), 1 + (x - 1))"),
    ("upper sigmoid with slope 1 at its kink at 0 (the authors' code: 0)",
     "return torch.where(x <= 1, F.relu(x), 1 + LEAK * (x - 1))",
     "return torch.where(x <= 1, x.clamp(min=0.0), 1 + LEAK * (x - 1))"),
    ("Γ's hidden layer without its bias",
     "hidden = F.gelu(h[..., None] * self.w_in + self.b_in)  # [..., C, d_gate]",
     "hidden = F.gelu(h[..., None] * self.w_in)  # [..., C, d_gate]"),
    ("Γ with ReLU instead of GELU",
     "hidden = F.gelu(h[..., None] * self.w_in + self.b_in)  # [..., C, d_gate]",
     "hidden = F.relu(h[..., None] * self.w_in + self.b_in)  # [..., C, d_gate]"),
    ("faithfulness over the number of matrices",
     "return sq / sum(w.numel() for w in target_weights.values())", "return sq / len(target_weights)"),
    ("importance minimality summed over the batch",
     "return sum(l.mean() for l in per_input)", "return sum(l.sum() for l in per_input)"),
    ("importance minimality without its p",
     "per_input = [((g + eps) ** p).sum(-1) for g in ci_upper.values()]  # each [B] or [B, S]",
     "per_input = [(g + eps).sum(-1) for g in ci_upper.values()]  # each [B] or [B, S]"),
    ("importance minimality averaged over padding positions too",
     "return sum((l * valid).sum() for l in per_input) / valid.sum()",
     "return sum((l * valid).sum() for l in per_input) / valid.numel()"),
    ("β2 multiplies the wrong term",
     "+ cfg.stochastic_recon_layerwise * L(\"stochastic_recon_layerwise\")  # β2",
     "+ cfg.stochastic_recon_layerwise * L(\"stochastic_recon\")  # β2"),
    ("component forward without the target's bias",
     "return out if bias is None else out + bias", "return out"),
    ("KL in the other direction",
     "per_position = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B] or [B, S]",
     "per_position = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B] or [B, S]"),
    ("half-period instead of quarter-period cosine",
     "return cfg.lr * (math.cos(math.pi / 2 * s / (S - 1)) if S > 1 else 1.0)",
     "return cfg.lr * (0.5 * (1 + math.cos(math.pi * s / (S - 1))) if S > 1 else 1.0)"),
    ("fast path: dead rows' importance weighted by the live count",
     "\"importance_minimality\": (losses[\"importance_minimality\"] * n + dead * (B - n)) / B}",
     "\"importance_minimality\": (losses[\"importance_minimality\"] * n + dead * n) / B}"),
    ("fast path: recon terms not rescaled to all B rows",
     "out |= {k: v * (n / B) for k, v in losses.items() if k not in (\"faithfulness\", \"importance_minimality\", \"total\")}",
     "out |= {k: v for k, v in losses.items() if k not in (\"faithfulness\", \"importance_minimality\", \"total\")}"),
    ("fast path: h reused for an input that only has the same shape",
     "if a is a0 or (a.shape == a0.shape and torch.equal(a, a0)):", "if a.shape == a0.shape:"),
    ("ML2R from the longest subcomponent, not the best-aligned one",
     "return best, norms.gather(0, idx[None])[0] / W_norms", "return best, norms.max(0).values / W_norms"),
    ("MMCS's cosine not normalised by the subcomponent's length",
     "cos = torch.einsum(\"coj,oj->cj\", sub, W) / ((norms + 1e-12) * (W_norms + 1e-12))  # [C, d_in]",
     "cos = torch.einsum(\"coj,oj->cj\", sub, W) / (W_norms + 1e-12) ** 2  # [C, d_in]"),
    ("compiled Γ (section L) cut off from its input's gradient",
     "ci_fn.forward = functools.partial(lambda m, x: _compiled_forward(type(m))(m, x), ci_fn)",
     "ci_fn.forward = functools.partial(lambda m, x: _compiled_forward(type(m))(m, x.detach()), ci_fn)"),
]


APD_MUTATIONS = [
    ("attributions: outputs summed before squaring (eq. 8 squares per output)",
     "A = t.square().sum(0)  # [B, C]", "A = t.sum(0).square()  # [B, C]"),
    ("attributions: the output gradients' signs dropped",
     "t = t + torch.einsum(\"obk,bck->obc\", g, comp_out)", "t = t + torch.einsum(\"obk,bck->obc\", g.abs(), comp_out)"),
    ("batch top-k keeps k attributions, not k B", "n = int(k * B)", "n = max(1, int(k))"),
    ("simplicity: λ^p taken as (λ²)^p", "per_component = per_component + ((lam_sq + eps) ** (p / 2)).sum(-1)  # [C]",
     "per_component = per_component + ((lam_sq + eps) ** p).sum(-1)  # [C]"),
    ("simplicity: inactive components counted too",
     "return (mask.to(per_component.dtype) * per_component).sum() / (N * mask.shape[0])",
     "return per_component.sum() * mask.shape[0] / (N * mask.shape[0])"),
    ("hidden-activation recon before the ReLU",
     "sq = sum(((F.relu(acts_topk[n]) - F.relu(acts_target[n])) ** 2).sum(-1) for n in acts_target)",
     "sq = sum(((acts_topk[n] - acts_target[n]) ** 2).sum(-1) for n in acts_target)"),
    ("V normalised over the wrong axis", "V.div_(V.norm(dim=-1, keepdim=True))", "V.div_(V.norm(dim=-2, keepdim=True))"),
    ("gradient projection adds the radial part instead of removing it",
     "V.grad -= (V.grad * V).sum(-1, keepdim=True) * V", "V.grad += (V.grad * V).sum(-1, keepdim=True) * V"),
]

CLUSTER_MUTATIONS = [
    ("description length without the index bits log2 G",
     "return float(np.sum(f * (math.log2(G) + alpha * r))) if G else 0.0",
     "return float(np.sum(f * alpha * r)) if G else 0.0"),
    ("merge cost without the other groups' cheaper index",
     "+ (S - f_a - f_b) * (L1 - L))", "+ 0 * (L1 - L))"),
    ("a merged group active where both are (AND), not either (OR)",
     "act[:, i] = np.maximum(act[:, i], act[:, j])", "act[:, i] = np.minimum(act[:, i], act[:, j])"),
    ("a merged group's rank the larger one's, not the sum", "r[i] += r[j]", "r[i] = max(r[i], r[j])"),
    ("Jaccard over the sum of counts, not the union",
     "either = A.sum(0)[:, None] + A.sum(0)[None, :] - both", "either = A.sum(0)[:, None] + A.sum(0)[None, :]"),
    ("ARI's chance term over n, not C(n, 2)",
     "expected = sum_a * sum_b / pairs(len(a)) if len(a) > 1 else 0.0",
     "expected = sum_a * sum_b / len(a) if len(a) > 1 else 0.0"),
]

MODELS_MUTATIONS = [
    ("TMS without its output ReLU", "return F.relu(self.linear2(h))  # [B, n]", "return self.linear2(h)  # [B, n]"),
    ("residual block without its residual", "return r + self.mlp_out(F.relu(self.mlp_in(r)))",
     "return self.mlp_out(F.relu(self.mlp_in(r)))"),
    ("W_E normalised over columns, not rows", "self.register_buffer(\"W_E\", W_E / W_E.norm(dim=1, keepdim=True))",
     "self.register_buffer(\"W_E\", W_E / W_E.norm(dim=0, keepdim=True))"),
    ("residual MLP labels without the ReLU", "return x + F.relu(x)", "return x + x"),
    ("sparse feature values off their range",
     "values = lo + (hi - lo) * torch.rand(shape, generator=generator, device=device)  # [B, n]",
     "values = lo + hi * torch.rand(shape, generator=generator, device=device)  # [B, n]"),
    ("induction task: m placed before the first S, not after it",
     "t.scatter_(1, l + 1, m[:, None])", "t.scatter_(1, l - 1, m[:, None])"),
    ("sinusoidal positions: sine in the cosine columns",
     "P[:, 1::2] = torch.cos(pos * freq)", "P[:, 1::2] = torch.sin(pos * freq)"),
]

ANALYSIS_MUTATIONS = [
    ("a feature whose best match is shared still counted as recovered",
     "return int(((best >= cos_min) & ~shared).sum())", "return int((best >= cos_min).sum())"),
    ("monosemantic W_in: a subcomponent shared between features allowed",
     "unshared = (active & (active.sum(0, keepdim=True) == 1)).any(1)", "unshared = active.any(1)"),
    ("dense W_out: active on some input instead of half of them",
     "return sum(int(((g > threshold).float().mean(0) >= 0.5).sum()) for n, g in ci.items() if n.endswith(\"mlp_out\"))",
     "return sum(int(((g > threshold).float().mean(0) > 0).sum()) for n, g in ci.items() if n.endswith(\"mlp_out\"))"),
    ("W_out activity averaged over every column, not the ones ever active",
     "return int(used.sum()), float(active[:, used].float().mean()) if used.any() else 0.0",
     "return int(used.sum()), float(active.float().mean()) if used.any() else 0.0"),
    ("neuron contributions read through W_in twice",
     "target = (W_E @ W_out) * (W_E @ W_in.T)  # W_U[i] = W_E[i]                       [n, d_mlp]",
     "target = (W_E @ W_in.T) * (W_E @ W_in.T)  # W_U[i] = W_E[i]                       [n, d_mlp]"),
    ("Table 1: m taken at s1 - 1, not s1 + 1", "s1, m = n == s1_pos[:, None], n == s1_pos[:, None] + 1  # [B, S]",
     "s1, m = n == s1_pos[:, None], n == s1_pos[:, None] - 1  # [B, S]"),
    ("attention KL in the other direction", "terms = torch.where(keep, A_target * (log_t - log_m), 0.0)  # [B, S, S]",
     "terms = torch.where(keep, A_model * (log_m - log_t), 0.0)  # [B, S, S]"),
    ("SVD truncation keeps one triple too many", "return (U[:, :r] * S[:r]) @ Vh[:r]",
     "return (U[:, :r + 1] * S[:r + 1]) @ Vh[:r + 1]"),
    ("SVD pruning picks the worst matrix, not the best", "j = min(losses, key=losses.get)",
     "j = max(losses, key=losses.get)"),
    ("suppression edit without normalising the read vectors",
     "u_hat, v_hat = F.normalize(u, dim=0), F.normalize(v, dim=1)  # [d_out, K], [K, d_in]",
     "u_hat, v_hat = F.normalize(u, dim=0), v  # [d_out, K], [K, d_in]"),
]

TORCHRUN_SPD_MUTATIONS = [  # data parallelism, spd.py section H
    ("gradients summed over the processes, not averaged", "flat /= dist.get_world_size()", "flat /= 1"),
    ("no gradient averaging (each process steps on its own share)", "                average_gradients_(params)",
     "                pass"),
    ("replicas not started from process 0's values", "        broadcast_from_first_process_(params)", "        pass"),
    ("checked and logged losses process 0's share, not the whole batch's",
     "                average_over_processes_(list(shown.values()))", "                pass"),
]

TORCHRUN_TRAIN_MUTATIONS = [  # data parallelism, train.py
    ("every process draws process 0's data",
     "gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + PROCESS_SEED_STRIDE * rank)",
     "gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)"),
    ("every process draws process 0's masks (no reseed after the shared initialisation)",
     "torch.manual_seed(cfg.seed + PROCESS_SEED_STRIDE * rank)  # masks", "pass  # masks"),
    ("a resumed process gets process 0's random state", 'rngs = state["process_rngs"][rank] if world > 1 else state',
     'rngs = state["process_rngs"][0] if world > 1 else state'),
]

SETS = {  # name: (the file it breaks, its mutations, its fast tests)
    "spd.py": ("spd.py", MUTATIONS, FAST_TESTS),
    "models.py": ("models.py", MODELS_MUTATIONS, ["test_models.py", "-k", "not cli and not gpt2"]),
    "apd.py": ("apd.py", APD_MUTATIONS, ["test_apd.py", "-k", "not recovers"]),
    "cluster.py": ("cluster.py", CLUSTER_MUTATIONS, ["test_cluster.py"]),
    "analysis.py": ("analysis.py", ANALYSIS_MUTATIONS, ["test_spd.py", "test_apd.py", "-k", "not recovers and not short_induction"]),
    "torchrun-spd.py": ("spd.py", TORCHRUN_SPD_MUTATIONS, ["test_distributed.py"]),
    "torchrun-train.py": ("train.py", TORCHRUN_TRAIN_MUTATIONS, ["test_distributed.py"]),
}


def stale(file: str, mutations: list) -> list[str]:
    """The names of `file`'s mutations whose line is not in it exactly once (after a rewrite)."""
    source = (HERE / file).read_text()
    return [name for name, line, _ in mutations if source.count(line) != 1]


def run(file: str, mutations: list, tests: list[str]) -> int:
    """Each mutation of `file` in turn against `tests`; prints one line each; returns how many were caught."""
    missing = stale(file, mutations)
    if missing:
        raise SystemExit(f"mutations {missing}: their lines are no longer in {file} once; update mutations.py")
    path = HERE / file
    original = path.read_text()
    caught = 0
    try:
        for name, line, bug in mutations:
            path.write_text(original.replace(line, bug))
            res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", f"--deselect={SELF_TEST}", *tests],
                                 cwd=HERE, capture_output=True, text=True)
            failed = res.returncode != 0
            caught += failed
            by = [l.split()[1] for l in res.stdout.splitlines() if l.startswith(("FAILED ", "ERROR "))][:1]
            print(f"{'caught' if failed else 'MISSED'}  {file}: {name}: {res.stdout.strip().splitlines()[-1]}"
                  + (f" (by {by[0]})" if by else ""), flush=True)
    finally:
        path.write_text(original)
    print(f"{caught} of {len(mutations)} mutations of {file} caught by {' '.join(tests)}", flush=True)
    return caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), help="which mutations to run")
    ap.add_argument("tests", nargs=argparse.REMAINDER, help="pytest arguments (default: each set's fast tests)")
    args = ap.parse_args()
    tests = args.tests[1:] if args.tests[:1] == ["--"] else args.tests
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that `finally` restores the file
    missed = 0
    for name in args.sets:
        file, mutations, default = SETS[name]
        missed += len(mutations) - run(file, mutations, tests or default)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
