"""Mutation check of the test suite: break one line of spd.py at a time and see whether the tests fail.

    python mutations.py                      # every mutation below against the fast tests
    python mutations.py test_spd.py -k "not recovers"   # another test selection (pytest arguments)

Each mutation is a one-line bug a reader of the paper could plausibly write. spd.py is restored after
each run (and if the script is interrupted or terminated); while it runs, the checkout's spd.py is
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
    ("compiled Γ (section L) cut off from its input's gradient",
     "ci_fn.forward = functools.partial(lambda m, x: _compiled_forward(type(m))(m, x), ci_fn)",
     "ci_fn.forward = functools.partial(lambda m, x: _compiled_forward(type(m))(m, x.detach()), ci_fn)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", nargs=argparse.REMAINDER, help=f"pytest arguments (default: {' '.join(FAST_TESTS)})")
    args = ap.parse_args()
    args.tests = args.tests or FAST_TESTS
    path = HERE / "spd.py"
    original = path.read_text()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that `finally` restores spd.py
    caught = 0
    try:
        for name, line, bug in MUTATIONS:
            if original.count(line) != 1:
                raise SystemExit(f"mutation {name!r}: its line is no longer in spd.py once; update mutations.py")
            path.write_text(original.replace(line, bug))
            res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *args.tests],
                                 cwd=HERE, capture_output=True, text=True)
            failed = res.returncode != 0
            caught += failed
            print(f"{'caught' if failed else 'MISSED'}  {name}: {res.stdout.strip().splitlines()[-1]}", flush=True)
    finally:
        path.write_text(original)
    print(f"{caught} of {len(MUTATIONS)} caught by {' '.join(args.tests)}")


if __name__ == "__main__":
    main()
