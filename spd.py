"""Stochastic Parameter Decomposition (SPD) in one file.

Bushnaq, Braun & Sharkey (2025), "Stochastic Parameter Decomposition", arXiv 2506.20790,
SPD Algorithm 1 ("SPD Pseudocode"), with the transformer extensions of Christensen & Riggs Smith,
"Decomposition of Small Transformer Models" (attention causal-importance function, CI-masked and
partial reconstruction losses, p annealing, KL divergence, last-token-only).

Every decomposed weight matrix W^l [d_out, d_in] (nn.Linear layout) is written as a sum of C
rank-one subcomponents W^l = U^l V^l. For each input a causal-importance function predicts how
much each subcomponent may be ablated, and the losses train the subcomponents to be faithful,
ablatable wherever they are unimportant, and unimportant as often as possible.

Citations: "SPD eq. N" and "SPD Algorithm 1" are the SPD paper's (arXiv numbering; Algorithm 1 is
its appendix A.6); "TP eq. N", "TP Algorithm 1" and "TP §N" are the transformer paper's.

Sections, in the order of SPD Algorithm 1 (readers cite them by letter):
  A  Config                         SPDConfig, the paper's defaults (SPD appendix A.4)
  B  Leaky hard sigmoids            SPD eq. 14
  C  Subcomponents                  U, V (SPD eq. 1) and their initialisation
  D  Causal-importance functions    Γ: scalar (SPD eqs. 6, 13), vector and attention (TP §4.1)
  E  Masks                          SPD eq. 3: m = g + (1 - g) r, r ~ U(0, 1)
  F  Decomposition                  target pass, pre-weight activations, masked forward passes
  G  Losses                         faithfulness (SPD eq. 2), stochastic recon (SPD eq. 4), layerwise
                                    (SPD eq. 5), CI-masked and partial recon (TP eqs. 5, 6),
                                    importance minimality (SPD eq. 7), total (SPD eq. 8); divergences D
  H  Optimisation                   LR schedule, p annealing, the loop
  I  Metrics                        MMCS, ML2R (SPD eqs. 9, 10), CI L0, alive subcomponents
  J  Save and load
  K  Speed on a CPU                 the same values and gradients in less time: dead rows skipped,
                                    h = a V^T shared, a fused scalar Γ (optimize uses it on a CPU)
  L  Γ under torch.compile          opt-in (train.py --compile_ci), for GPUs: the same Γ, fused kernels

Deliberately not supported: embedding matrices, adversarial (PGD) masks, the "delta component"
and faithfulness warm-up of the authors' later code, sharding U, V and their gradients over GPUs
(FSDP; README says why). Data parallelism over processes (torchrun) is in section H: each process
takes an equal share of the batch and the gradients are averaged, which is the one-process step on
the whole batch; Adam's moments can be split over the processes (make_optimizer's shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1

# ================================================================================================
# A. Config
# ================================================================================================


@dataclass
class SPDConfig:
    """Hyperparameters of one decomposition. Defaults are the paper's TMS values (appendix A.4)."""

    # --- what to decompose
    targets: list[str] = field(default_factory=lambda: ["*"])  # dotted module paths, globs allowed
    C: int = 20  # subcomponents per matrix (a dict {pattern: C} is accepted from Python)
    # --- causal-importance function Γ
    ci_fn: str = "scalar"  # scalar (SPD paper) | vector | attention (TP)
    d_gate: int = 16  # hidden width of each subcomponent's MLP γ_c
    # --- loss coefficients (0 switches a term off and skips its computation)
    faithfulness: float = 1.0
    stochastic_recon: float = 1.0  # β1
    stochastic_recon_layerwise: float = 1.0  # β2
    importance_minimality: float = 3e-3  # β3
    recon: float = 0.0  # CI-masked recon (masks = g, no noise); TP §4
    recon_layerwise: float = 0.0
    stochastic_recon_partial: float = 0.0  # TP eq. 6
    recon_partial: float = 0.0  # TP eq. 5
    partial_routing: str = "pass"  # pass: one random subset per forward pass | position: one per position
    # --- importance minimality
    p: float = 1.0  # p-norm; with p_final set, the starting value of a linear anneal
    p_final: float | None = None  # anneal p linearly to this value over the run (None: fixed p)
    # --- sampling and divergence
    n_mask_samples: int = 1  # S
    output_loss: str = "mse"  # D: mse (toy models) | kl (language models)
    last_token_only: bool = False  # D on the final position only; CI lives at every position
    # --- optimisation
    steps: int = 40_000
    batch_size: int = 4096
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # constant | cosine (quarter period, to 0) | linear
    lr_warmup_pct: float = 0.0
    weight_decay: float = 0.0  # AdamW; 0 is the paper's Adam
    init: str = "projection"  # projection (authors' code) | normal
    tied_updates: str = "shared"  # tied matrices (TMS): shared = one update per step | separate = one per use
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the first bad field and its value (optimize calls it too)."""
        def bad(name, what):
            raise ValueError(f"--{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "d_gate", "n_mask_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, "a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "an integer >= 0")
        Cs = self.C.values() if isinstance(self.C, dict) else [self.C]
        if not Cs or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in Cs):
            bad("C", "a positive integer (or from Python a non-empty dict {pattern: positive integer})")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            bad("targets", "a non-empty list of module paths")
        floats = {name: (0.0, False) for name in LOSS_COEFFICIENTS}  # name: (lowest allowed, lowest excluded)
        floats.update(lr=(0.0, True), p=(0.0, True), p_final=(0.0, True), weight_decay=(0.0, False),
                      lr_warmup_pct=(0.0, False))
        for name, (lowest, excluded) in floats.items():
            v = getattr(self, name)
            if v is None and name == "p_final":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lowest or (excluded and v == lowest):
                bad(name, f"a finite number {'>' if excluded else '>='} {lowest:g}")
        if self.lr_warmup_pct >= 1:
            bad("lr_warmup_pct", "in [0, 1)")
        choices = {"ci_fn": CI_FNS, "output_loss": ("mse", "kl"), "init": ("projection", "normal"),
                   "lr_schedule": ("constant", "cosine", "linear"), "partial_routing": ("pass", "position"),
                   "tied_updates": TIED_UPDATES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"one of {sorted(allowed)}")


# The SPDConfig fields that build a Decomposition (Decomposition.from_config); optimize checks that
# the Decomposition it trains was built with them, so a saved config never contradicts its weights.
ARCHITECTURE = ("targets", "C", "ci_fn", "d_gate", "init", "tied_updates")
LOSS_COEFFICIENTS = ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise", "importance_minimality",
                     "recon", "recon_layerwise", "stochastic_recon_partial", "recon_partial")


# ================================================================================================
# B. Leaky hard sigmoids (SPD eq. 14)
# ================================================================================================

LEAK = 0.01


def lower_leaky_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """SPD eq. 14: σ_H,lower(x) = 0.01 x for x <= 0, x on [0, 1], 1 for x >= 1. Gives the CI g used
    in the masks (SPD eq. 3)."""
    return torch.where(x <= 0, LEAK * x, x.clamp(max=1.0))


def upper_leaky_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """SPD eq. 14: σ_H,upper(x) = 0 for x <= 0, x on [0, 1], 1 + 0.01 (x - 1) for x >= 1. Used in
    importance minimality (SPD eq. 7) only.
    Fidelity: the paper leaves the slope at the kinks open; the authors' code has slope 0 at x = 0
    and 1 at x = 1, and so does this. It matters: at the initialisation (zero CI biases) every zero
    input's Γ(0) is exactly 0, so slope 1 there changed the first step (results/parity.md §5)."""
    return torch.where(x <= 1, F.relu(x), 1 + LEAK * (x - 1))


# ================================================================================================
# C. Subcomponents (SPD eq. 1)
# ================================================================================================


class Components(nn.Module):
    """C rank-one subcomponents of one matrix: W ≈ U V = Σ_c U[:, c] V[c, :] (SPD eq. 1).

    U [d_out, C] holds the write vectors u_c, V [C, d_in] the read vectors v_c. The masked layer
    computes ((a V^T) * m) U^T: the per-example W' = U diag(m) V is never built.
    """

    def __init__(self, d_in: int, d_out: int, C: int):
        super().__init__()
        self.U = nn.Parameter(torch.empty(d_out, C))
        self.V = nn.Parameter(torch.empty(C, d_in))

    @property
    def weight(self) -> torch.Tensor:
        return self.U @ self.V  # [d_out, d_in]


@torch.no_grad()
def init_components_(comp: Components, W: torch.Tensor, how: str = "projection") -> None:
    """Initialise U, V for target weight W [d_out, d_in].

    The paper does not state an initialisation; "projection" is what the authors' code did for the
    paper's runs: u_c, v_c random unit vectors, then u_c <- (u_c^T W v_c) u_c, so each subcomponent
    starts as W's orthogonal projection onto u_c v_c^T. "normal" is their later default:
    V ~ N(0, 1/d_in), U ~ N(0, 1/C). Both draw from the global torch RNG.
    """
    C, d_in = comp.U.shape[1], comp.V.shape[1]
    if how == "normal":
        comp.V.normal_(0, d_in**-0.5)
        comp.U.normal_(0, C**-0.5)
        return
    V = F.normalize(torch.randn_like(comp.V), dim=1)  # rows v_c unit norm      [C, d_in]
    U = F.normalize(torch.randn_like(comp.U), dim=0)  # columns u_c unit norm   [d_out, C]
    s = torch.einsum("oc,oi,ci->c", U, W.to(U), V)  # s_c = u_c^T W v_c          [C]
    comp.U.copy_(U * s)
    comp.V.copy_(V)


# ================================================================================================
# D. Causal-importance functions Γ (SPD eqs. 6, 13; TP §4.1, appendix A.1 and TP Algorithm 1)
# ================================================================================================
# Each returns the *pre-sigmoid* scores [..., C]; section F applies σ_H,lower and σ_H,upper.

class ScalarCI(nn.Module):
    """The SPD paper's Γ: one MLP γ_c: 1 -> d_gate (GELU) -> 1 per subcomponent c, on its own inner
    activation h_c = v_c · a (SPD eq. 6, its MLP in SPD eq. 13). Init as the authors' code: w_in ~ N(0, 2),
    w_out ~ N(0, 1/d_gate), biases 0."""

    def __init__(self, C: int, d_gate: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(C, d_gate) * 2**0.5)
        self.b_in = nn.Parameter(torch.zeros(C, d_gate))
        self.w_out = nn.Parameter(torch.randn(C, d_gate) * d_gate**-0.5)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h [..., C] -> [..., C]
        """SPD eq. 13 before its σ_H: γ_c(h_c) = Σ_k w_out[c, k] GELU(w_in[c, k] h_c + b_in[c, k]) + b_out[c]."""
        hidden = F.gelu(h[..., None] * self.w_in + self.b_in)  # [..., C, d_gate]
        return (hidden * self.w_out).sum(-1) + self.b_out  # [..., C]


class VectorCI(nn.Module):
    """Transformer paper's "vector" Γ: an independent MLP γ_c: d_in -> d_gate (GELU) -> 1 per
    subcomponent, each reading the layer's whole input vector a. Init: w_in std sqrt(2/d_in),
    w_out std 1/sqrt(d_gate), biases 0 (authors' later code)."""

    def __init__(self, d_in: int, C: int, d_gate: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d_in, C, d_gate) * (2 / d_in) ** 0.5)
        self.b_in = nn.Parameter(torch.zeros(C, d_gate))
        self.w_out = nn.Parameter(torch.randn(C, d_gate) * d_gate**-0.5)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # a [..., d_in] -> [..., C]
        d_in, C, k = self.w_in.shape
        hidden = F.gelu((a @ self.w_in.reshape(d_in, C * k)).unflatten(-1, (C, k)) + self.b_in)  # [..., C, k]
        return (hidden * self.w_out).sum(-1) + self.b_out


class AttentionCI(nn.Module):
    """The transformer paper's attention Γ (TP appendix A.1, TP Algorithm 1) for inputs x [B, S, d]:

        x_pos = x + AbsPos[:S];  q = x Q;  k = x K;  v = x_pos V
        a     = softmax((q k^T + r) / sqrt(d)) v,   r[n, j] = q_n · RelPos[j - n]  (Shaw-style)
        Γ(x)  = (γ_1 ... γ_C)(a ⊕ x_pos)          with γ_c the vector MLPs above, on 2d inputs

    One head, one layer, Q/K/V only (no biases, no output projection). Readings chosen where the
    paper is silent: the relative table's d-dimensional rows are Shaw-style keys (q_n · R[j - n]);
    attention is bidirectional unless causal=True; positional tables start at N(0, 0.02^2).
    """

    def __init__(self, d: int, C: int, d_gate: int, max_seq_len: int, causal: bool = False):
        super().__init__()
        self.Q, self.K, self.V = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.abs_pos = nn.Parameter(torch.randn(max_seq_len, d) * 0.02)  # AbsPosEnc [s, d]
        self.rel_pos = nn.Parameter(torch.randn(2 * max_seq_len, d) * 0.02)  # RelPosEnc [2s, d]
        self.gamma = VectorCI(2 * d, C, d_gate)
        self.max_seq_len, self.causal = max_seq_len, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, d] -> [B, S, C]
        if x.dim() != 3:
            raise ValueError(f"the attention CI function needs inputs [B, S, d], got shape {tuple(x.shape)}")
        B, S, d = x.shape
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds the CI function's max_seq_len {self.max_seq_len}")
        x_pos = x + self.abs_pos[:S]
        q, k, v = self.Q(x), self.K(x), self.V(x_pos)  # [B, S, d] each
        offsets = torch.arange(S, device=x.device)[None, :] - torch.arange(S, device=x.device)[:, None]  # j - n
        R = self.rel_pos[offsets + self.max_seq_len]  # [S, S, d]
        scores = (q @ k.transpose(1, 2) + torch.einsum("bnd,njd->bnj", q, R)) / d**0.5  # [B, S, S]
        if self.causal:
            scores = scores.masked_fill(offsets > 0, float("-inf"))
        a = scores.softmax(-1) @ v  # [B, S, d]
        return self.gamma(torch.cat([a, x_pos], dim=-1))  # [B, S, C]


CI_FNS = ("scalar", "vector", "attention")


# ================================================================================================
# E. Masks
# ================================================================================================


def sample_masks(ci: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SPD eq. 3: m = g + (1 - g) r with r ~ U(0, 1) per entry, a reparametrised sample of U(g, 1):
    the gradient reaches g through (1 - r). One call draws one independent set of masks."""
    return {name: g + (1 - g) * torch.rand_like(g) for name, g in ci.items()}


# ================================================================================================
# F. Decomposition
# ================================================================================================


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A module's weight in nn.Linear layout [d_out, d_in]. The one layout boundary: HF GPT-2's
    Conv1D computes x W + b and stores W as [d_in, d_out], so it is transposed here."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def _key(name: str) -> str:  # nn.ModuleDict keys may not contain "."
    return name.replace(".", "/")


TIED_UPDATES = ("shared", "separate")


class Decomposition(nn.Module):
    """A frozen target model plus the subcomponents and CI functions of its chosen matrices.

    Matrices are chosen by dotted module path (fnmatch globs) among nn.Linear and HF Conv1D
    modules. A target may declare `tied_weights = {"linear2": "linear1"}` (TMS): linear2's weight is
    linear1's transposed, so one (U, V) serves both uses, with a separate CI function per use.
    tied_updates="shared": autograd sums the two uses' gradients and the optimizer makes one update
    per step. "separate": the partner reads U, V through its own Parameters that alias linear1's
    storage, so each use's gradient gets its own Adam update (two per step), as the authors' code did.
    Masked forward passes swap a module's `forward` for the subcomponent forward for the duration
    of one call; the other modules run the target's own weights.
    """

    def __init__(self, target: nn.Module, targets: list[str], C: int | dict[str, int] = 20,
                 ci_fn: str = "scalar", d_gate: int = 16, init: str = "projection",
                 max_seq_len: int | None = None, tied: dict[str, str] | None = None,
                 tied_updates: str = "shared"):
        super().__init__()
        if ci_fn not in CI_FNS:
            raise ValueError(f"unknown ci_fn {ci_fn!r}; choose one of {CI_FNS}")
        if tied_updates not in TIED_UPDATES:
            raise ValueError(f"unknown tied_updates {tied_updates!r}; choose one of {TIED_UPDATES}")
        self.target = target.requires_grad_(False).eval()
        self.names = _resolve(target, targets)
        self.tied = {s: t for s, t in (getattr(target, "tied_weights", {}) if tied is None else tied).items()
                     if s in self.names}
        self.ci_fn = ci_fn
        self.C = {n: _pick_C(n, C) for n in self.names}
        unused = [pat for pat in (C if isinstance(C, dict) else {})
                  if not any(fnmatch.fnmatchcase(n, pat) for n in self.names)]
        if unused:
            raise ValueError(f"C has keys {unused} that match no decomposed matrix (the matrices are {self.names})")
        # what it was built with, in SPDConfig's terms (ARCHITECTURE): saved, and checked by optimize
        self.settings = dict(targets=list(targets), C=C, ci_fn=ci_fn, d_gate=d_gate, init=init,
                             tied_updates=tied_updates)
        for s, t in self.tied.items():
            if t not in self.names:
                raise ValueError(f"{s} is tied to {t}, so {t} must be decomposed too (add it to --targets)")
            if self.C[s] != self.C[t]:
                raise ValueError(f"tied matrices {s} and {t} need the same C, got {self.C[s]} and {self.C[t]}")
        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        for name in self.names:
            d_out, d_in = linear_weight(self.module(name)).shape
            C_l = self.C[name]
            if name not in self.tied:
                self.components[_key(name)] = comp = Components(d_in, d_out, C_l)
                init_components_(comp, linear_weight(self.module(name)), init)
            if ci_fn == "scalar":
                self.ci_fns[_key(name)] = ScalarCI(C_l, d_gate)
            elif ci_fn == "vector":
                self.ci_fns[_key(name)] = VectorCI(d_in, C_l, d_gate)
            else:
                if max_seq_len is None:
                    raise ValueError("the attention CI function needs max_seq_len")
                self.ci_fns[_key(name)] = AttentionCI(d_in, C_l, d_gate, max_seq_len)
        # "separate" tied updates: (U, V) leaves per tied use, pointed at the partner's storage by UV
        # (plain dict: not in state_dict, so checkpoints are the same in both modes)
        self._aliases = {s: (nn.Parameter(torch.empty(0)), nn.Parameter(torch.empty(0)))
                         for s in self.tied} if tied_updates == "separate" else {}

    @classmethod
    def from_config(cls, target: nn.Module, cfg: SPDConfig, max_seq_len: int | None = None) -> "Decomposition":
        """The Decomposition that cfg's ARCHITECTURE fields describe (targets, C, ci_fn, d_gate, ...)."""
        return cls(target, **{f: getattr(cfg, f) for f in ARCHITECTURE}, max_seq_len=max_seq_len)

    def module(self, name: str) -> nn.Module:
        return self.target.get_submodule(name)

    def UV(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d_out, C], V [C, d_in]) of one matrix; a tied matrix uses its partner's, transposed."""
        if name in self.tied:
            comp = self.components[_key(self.tied[name])]
            if name not in self._aliases:
                return comp.V.T, comp.U.T
            U, V = self._aliases[name]
            if U.data_ptr() != comp.V.data_ptr() or V.data_ptr() != comp.U.data_ptr():  # first use, or after .to()
                U.data, V.data = comp.V.data.T, comp.U.data.T  # views: an update of U is one of comp.V
            return U, V
        comp = self.components[_key(name)]
        return comp.U, comp.V

    def target_weights(self) -> dict[str, torch.Tensor]:
        return {n: linear_weight(self.module(n)) for n in self.names}

    def component_weights(self) -> dict[str, torch.Tensor]:
        return {n: U @ V for n, (U, V) in ((n, self.UV(n)) for n in self.names)}

    def parameters_to_train(self) -> list[nn.Parameter]:
        aliases = [p for s in self._aliases for p in self.UV(s)]
        return [*self.components.parameters(), *aliases, *self.ci_fns.parameters()]

    # --- SPD Algorithm 1, step 2: target outputs and pre-weight activations a^l
    @torch.no_grad()
    def target_forward(self, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acts: dict[str, torch.Tensor] = {}
        hooks = [self.module(n).register_forward_pre_hook(functools.partial(_store_input, acts, n))
                 for n in self.names]
        try:
            out = self.target(x)
        finally:
            for h in hooks:
                h.remove()
        return out, acts

    # --- SPD Algorithm 1, the layer loop: h^l = V^l a^l, G^l_raw = Γ^l(h^l); then g = σ_H(G_raw)
    def causal_importance(self, acts: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(ci_lower, ci_upper): dicts name -> [..., C], σ_H,lower and σ_H,upper of Γ's output (SPD eq.
        6). Inputs are not detached, so the CI losses also train V through h (as the authors' code)."""
        lower, upper = {}, {}
        for name in self.names:
            pre = self.ci_raw(name, acts[name])  # G_raw = Γ(h)                      [..., C]
            lower[name], upper[name] = lower_leaky_hard_sigmoid(pre), upper_leaky_hard_sigmoid(pre)
        return lower, upper

    def ci_raw(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """Γ's raw output [..., C] for matrix `name`'s input a: the scalar Γ reads h = a V^T, the
        vector and attention Γ read a itself."""
        ci_fn = self.ci_fns[_key(name)]
        return ci_fn(self.inner(name, a)) if self.ci_fn == "scalar" else ci_fn(a)

    def component_forward(self, name: str, a: torch.Tensor, mask: torch.Tensor | None = None,
                          route: torch.Tensor | None = None) -> torch.Tensor:
        """One matrix replaced by its subcomponents: ((a V^T) * m) U^T + b, b the target's frozen bias.
        route [...] (optional, bool): replace only at these positions; elsewhere a W^T + b."""
        U = self.UV(name)[0]
        h = self.inner(name, a)  # [..., C]
        if mask is not None:
            h = h * mask
        out = h @ U.T  # [..., d_out]
        if route is not None:
            out = torch.where(route[..., None], out, a @ linear_weight(self.module(name)).T)
        bias = getattr(self.module(name), "bias", None)
        return out if bias is None else out + bias

    def inner(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """h = a V^T [..., C], the subcomponents' inner activations h_c = v_c · a."""
        return a @ self.UV(name)[1].T

    @contextmanager
    def replaced(self, masks: dict[str, torch.Tensor | None], routes: dict[str, torch.Tensor] | None = None):
        """Within the block, each module named in `masks` runs component_forward with its mask (None:
        unmasked U V), at the positions its route marks if `routes` names it (else everywhere);
        every other module keeps the target's weights."""
        for name in masks:
            if name not in self.C:
                raise KeyError(f"{name!r} is not a decomposed matrix; decomposed: {self.names}")
        routes = routes or {}
        try:
            for name, mask in masks.items():
                self.module(name).forward = functools.partial(self.component_forward, name, mask=mask,
                                                              route=routes.get(name))
            yield
        finally:
            for name in masks:
                self.module(name).__dict__.pop("forward", None)

    def forward(self, x, masks: dict[str, torch.Tensor | None], routes: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        with self.replaced(masks, routes):
            return self.target(x)


def _store_input(store: dict, name: str, module: nn.Module, args: tuple) -> None:
    store[name] = args[0]


def _resolve(target: nn.Module, patterns: list[str]) -> list[str]:
    modules = dict(target.named_modules())
    names = []
    for pat in patterns:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, pat) and n not in names]
        if not hits and pat not in names:
            raise ValueError(f"pattern {pat!r} matches no module of {type(target).__name__}; "
                             f"modules are e.g. {[n for n in modules if n][:12]}")
        names += hits
    # A glob like "*" also matches containers; keep only the matrices, but reject an explicit non-matrix.
    for n in names:
        if n in patterns and not _is_linear(modules[n]):
            raise ValueError(f"{n} is a {type(modules[n]).__name__}; only nn.Linear and Conv1D can be decomposed")
    linearish = [n for n in names if _is_linear(modules[n])]
    if not linearish:
        raise ValueError(f"patterns {patterns} match no nn.Linear / Conv1D module (matched {names})")
    return linearish


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "TiedTranspose")


def _pick_C(name: str, C: int | dict[str, int]) -> int:
    hits = [C] if isinstance(C, int) else [c for pat, c in C.items() if fnmatch.fnmatchcase(name, pat)]
    if not hits:
        raise ValueError(f"no entry of C {C} matches matrix {name}")
    if not isinstance(hits[0], int) or hits[0] <= 0:
        raise ValueError(f"C must be a positive integer, got {hits[0]} for {name}")
    return hits[0]


# ================================================================================================
# G. Losses
# ================================================================================================


def faithfulness_loss(target_weights: dict[str, torch.Tensor], component_weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """SPD eq. 2: L_faithfulness = 1/N Σ_l Σ_ij (W^l_ij - Σ_c U^l_ic V^l_cj)^2.
    Note: N counts the entries of the decomposed matrices only (as the authors' code), not every
    parameter of the target as the paper's text says; tied matrices count twice."""
    sq = sum(((target_weights[n] - component_weights[n]) ** 2).sum() for n in target_weights)
    return sq / sum(w.numel() for w in target_weights.values())


def importance_minimality_loss(ci_upper: dict[str, torch.Tensor], p: float, eps: float = 1e-12,
                               valid: torch.Tensor | None = None) -> torch.Tensor:
    """SPD eq. 7: L_importance-minimality = Σ_l Σ_c |g^l_c(x)|^p, averaged over every leading batch and
    position dimension (over the `valid` positions [B, S] only, if given). eps (from the authors' later
    code) keeps the gradient finite for p < 1."""
    per_input = [((g + eps) ** p).sum(-1) for g in ci_upper.values()]  # each [B] or [B, S]
    if valid is None:
        return sum(l.mean() for l in per_input)
    return sum((l * valid).sum() for l in per_input) / valid.sum()  # a weighted mean: no data-dependent shape


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D for the toy models: mean over batch *and* output features (as the authors' code)."""
    return F.mse_loss(out, target)  # ((out - target) ** 2).mean(), in one op


def kl(logits: torch.Tensor, target_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """D for language models: KL(target || model), summed over the vocabulary and averaged over
    batch and positions (only the `valid` ones [B, S], e.g. not padding, if given).
    Note: the paper writes D(f', f); the target distribution comes first."""
    log_p, log_q = target_logits.log_softmax(-1), logits.log_softmax(-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B] or [B, S]
    return per_position.mean() if valid is None else (per_position * valid).sum() / valid.sum()  # no sync: no [valid]


def make_divergence(output_loss: str, last_token_only: bool = False, valid: torch.Tensor | None = None) -> Callable:
    """D(out, target). last_token_only compares the final position [:, -1] only (TP §4);
    valid [B, S] restricts a KL to real (non-padding) positions."""
    if output_loss == "mse":
        return (lambda out, target: mse(out[:, -1], target[:, -1])) if last_token_only else mse
    if last_token_only:
        return lambda out, target: kl(out[:, -1], target[:, -1])
    return lambda out, target: kl(out, target, valid)


def stochastic_recon_loss(dec: Decomposition, x, target_out, ci: dict, D: Callable, S: int = 1) -> torch.Tensor:
    """SPD eq. 4: 1/S Σ_s D(f(x | W'(x, r^(s))), f(x | W)), every decomposed matrix stochastically masked."""
    return sum(D(dec(x, sample_masks(ci)), target_out) for _ in range(S)) / S


def stochastic_recon_layerwise_loss(dec: Decomposition, x, target_out, ci: dict, D: Callable, S: int = 1) -> torch.Tensor:
    """SPD eq. 5: 1/(LS) Σ_s Σ_l D(f(x | W^1, ..., W'^l(x, r^(l,s)), ..., W^L), f(x | W)).
    Note: the other matrices keep the target's weights (the paper's main text and code; its
    pseudocode says U diag(1) V), and the masks are drawn afresh, independent of SPD eq. 4's."""
    total = 0.0
    for _ in range(S):
        masks = sample_masks(ci)
        total = total + sum(D(dec(x, {n: masks[n]}), target_out) for n in dec.names)
    return total / (S * len(dec.names))


def recon_loss(dec: Decomposition, x, target_out, ci: dict, D: Callable) -> torch.Tensor:
    """CI-masked recon (TP §4): D with every mask set to exactly g, no sampling."""
    return D(dec(x, ci), target_out)


def recon_layerwise_loss(dec: Decomposition, x, target_out, ci: dict, D: Callable) -> torch.Tensor:
    """Layerwise CI-masked recon: mean over matrices l of D with only matrix l masked by g."""
    return sum(D(dec(x, {n: ci[n]}), target_out) for n in dec.names) / len(dec.names)


def random_subset(names: list[str], generator: torch.Generator | None = None) -> list[str]:
    """A subset M of the decomposed matrices: k ~ U{1..L}, then a uniformly random k-subset. The
    transformer paper does not give the distribution; this is the authors' later code's. Drawn once
    per forward pass by default (TP eqs. 5-6 read literally); partial_routing="position" draws one per
    position instead (random_subset_per_position), as the authors' later code does."""
    L = len(names)
    k = int(torch.randint(1, L + 1, (1,), generator=generator))
    return [names[i] for i in torch.randperm(L, generator=generator)[:k].tolist()]


def random_subset_per_position(names: list[str], shape: torch.Size, device=None,
                               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """`random_subset` drawn independently at every position: {name: bool [*shape]}, True where
    the matrix belongs to that position's subset (the reading of the authors' later code)."""
    L = len(names)
    k = torch.randint(1, L + 1, (*shape, 1), generator=generator, device=device)  # subset size per position
    ranks = torch.rand(*shape, L, generator=generator, device=device).argsort(-1).argsort(-1)  # a random permutation
    chosen = ranks < k  # the first k matrices of that permutation                      [*shape, L]
    return {n: chosen[..., i] for i, n in enumerate(names)}


def _partial_pass(dec: Decomposition, x, masks: dict, per_position: bool) -> torch.Tensor:
    """One forward pass with a random subset of the matrices replaced (per pass or per position)."""
    if not per_position:
        return dec(x, {n: masks[n] for n in random_subset(dec.names)})
    some = next(iter(masks.values()))
    return dec(x, masks, random_subset_per_position(dec.names, some.shape[:-1], some.device))


def recon_partial_loss(dec: Decomposition, x, target_out, ci: dict, D: Callable, per_position: bool = False) -> torch.Tensor:
    """TP eq. 5: D(f(x | W^l(x, g^l) for l in M, target W elsewhere), f(x | W)).
    per_position: a subset M per position instead of one per forward pass (the paper is silent)."""
    return D(_partial_pass(dec, x, ci, per_position), target_out)


def stochastic_recon_partial_loss(dec: Decomposition, x, target_out, ci: dict, D: Callable, S: int = 1,
                                  per_position: bool = False) -> torch.Tensor:
    """TP eq. 6: 1/S Σ_s D(f(x | W^l(x, r^(l,s)) for l in M^(s), target W elsewhere),
    f(x | W)), with a fresh subset M^(s) (per pass, or per position) and fresh masks per sample."""
    return sum(D(_partial_pass(dec, x, sample_masks(ci), per_position), target_out) for _ in range(S)) / S


def spd_losses(dec: Decomposition, x, cfg: SPDConfig, p: float, valid: torch.Tensor | None = None,
               target: tuple | None = None) -> dict[str, torch.Tensor]:
    """SPD Algorithm 1: one step's losses, each term whose coefficient is nonzero, and "total"
    (SPD eq. 8). valid [B, S] marks the real (non-padding) positions of a language-
    model batch: D and importance minimality then ignore the others. target: (f(x | W), a^l) if the
    caller has already run the target pass on x."""
    target_out, acts = dec.target_forward(x) if target is None else target  # step 2: f(x | W), a^l
    D = make_divergence(cfg.output_loss, cfg.last_token_only, valid)
    ci_lower, ci_upper = dec.causal_importance(acts)  # layer loop: h = V a, Γ(h); step 7: g = σ_H,lower
    S = cfg.n_mask_samples
    losses = {"faithfulness": faithfulness_loss(dec.target_weights(), dec.component_weights()),  # step 3
              "importance_minimality": importance_minimality_loss(ci_upper, p, valid=valid)}  # step 4
    if cfg.stochastic_recon:  # steps 5, 8: every matrix masked by m = g + (1 - g) r
        losses["stochastic_recon"] = stochastic_recon_loss(dec, x, target_out, ci_lower, D, S)
    if cfg.stochastic_recon_layerwise:  # steps 6, 9: one matrix at a time
        losses["stochastic_recon_layerwise"] = stochastic_recon_layerwise_loss(dec, x, target_out, ci_lower, D, S)
    # the transformer paper's terms
    if cfg.recon:
        losses["recon"] = recon_loss(dec, x, target_out, ci_lower, D)
    if cfg.recon_layerwise:
        losses["recon_layerwise"] = recon_layerwise_loss(dec, x, target_out, ci_lower, D)
    per_position = cfg.partial_routing == "position"
    if cfg.stochastic_recon_partial:
        losses["stochastic_recon_partial"] = stochastic_recon_partial_loss(dec, x, target_out, ci_lower, D, S,
                                                                           per_position)
    if cfg.recon_partial:
        losses["recon_partial"] = recon_partial_loss(dec, x, target_out, ci_lower, D, per_position)
    losses["total"] = total_loss(losses, cfg)  # step 10
    return losses


def total_loss(losses: dict[str, torch.Tensor], cfg: SPDConfig) -> torch.Tensor:
    """SPD eq. 8: L = L_faithfulness + β1 L_stochastic-recon + β2 L_stochastic-recon-layerwise
    + β3 L_importance-minimality, with a coefficient on faithfulness too (1 in the SPD paper) and the
    transformer paper's terms. A term whose coefficient is 0 was not computed and counts 0."""
    L = lambda name: losses.get(name, 0.0)  # noqa: E731
    return (cfg.faithfulness * L("faithfulness")
            + cfg.stochastic_recon * L("stochastic_recon")  # β1
            + cfg.stochastic_recon_layerwise * L("stochastic_recon_layerwise")  # β2
            + cfg.importance_minimality * L("importance_minimality")  # β3
            + cfg.recon * L("recon") + cfg.recon_layerwise * L("recon_layerwise")
            + cfg.stochastic_recon_partial * L("stochastic_recon_partial") + cfg.recon_partial * L("recon_partial"))


# ================================================================================================
# H. Optimisation
# ================================================================================================


def lr_at(step: int, cfg: SPDConfig) -> float:
    """Linear warm-up from 0 over lr_warmup_pct of the steps, then the schedule. "cosine" is the
    authors' quarter period lr cos(π/2 · s/(S-1)), which ends at 0 (the paper says only "cosine")."""
    warmup = int(cfg.steps * cfg.lr_warmup_pct)
    if step < warmup:
        return cfg.lr * step / warmup
    s, S = step - warmup, cfg.steps - warmup
    if cfg.lr_schedule == "cosine":
        return cfg.lr * (math.cos(math.pi / 2 * s / (S - 1)) if S > 1 else 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - s / S)
    return cfg.lr


def p_at(step: int, cfg: SPDConfig) -> float:
    """Importance-minimality p, annealed linearly from p to p_final over the whole run (transformer
    paper: 0.9 -> 0.1; the start and end fractions are not given, so the whole run is used)."""
    if cfg.p_final is None:
        return cfg.p
    return cfg.p + (cfg.p_final - cfg.p) * step / max(cfg.steps - 1, 1)


def split_batch(batch) -> tuple[object, torch.Tensor | None]:
    """A batch is inputs x, or (x, valid) with valid [B, S] marking real (non-padding) positions."""
    return batch if isinstance(batch, tuple) else (batch, None)


def make_optimizer(dec: Decomposition, cfg: SPDConfig, shard: bool = False,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW over U, V and Γ (weight decay 0 = the paper's Adam), in one fused kernel on CPU and
    CUDA; aliased parameters (tied_updates="separate") are updated one after the other instead.
    capturable: torch's AdamW option that keeps its state on the GPU so that a CUDA graph can
    capture the step (benchmark.py --cuda_graph).
    shard (data parallel only): torch's ZeroRedundancyOptimizer (ZeRO stage 1), the same AdamW
    update, but each process keeps Adam's moments for its share of the parameters only, updates that
    share and broadcasts it: 8 + 8/N bytes of training state per parameter instead of 16."""
    params = dec.parameters_to_train()
    kernel = {"foreach": False} if dec._aliases else {"fused": params[0].device.type in ("cpu", "cuda")}
    kernel["capturable"] = capturable
    if not shard:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    if world_size() == 1:
        raise ValueError("shard_optimizer shards Adam's state over the processes of a torch.distributed job; this "
                         "is one process: start it with torchrun --nproc_per_node N (N >= 2), or drop the flag")
    if dec._aliases:
        raise ValueError("shard_optimizer cannot split tied matrices updated one after the other "
                         "(tied_updates='separate'); use tied_updates='shared', or drop the flag")
    from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, **kernel)


def check_config(dec: Decomposition, cfg: SPDConfig | dict, Config=SPDConfig, architecture=ARCHITECTURE) -> None:
    """cfg.validate(), and that dec was built with cfg's `architecture` fields; else ValueError.
    apd.py passes its own Config and architecture."""
    cfg = cfg if isinstance(cfg, Config) else Config(**{**dataclasses.asdict(Config()), **cfg})
    cfg.validate()
    for f in architecture:
        if getattr(cfg, f) != dec.settings[f]:
            raise ValueError(f"the config has {f} = {getattr(cfg, f)!r} but the {type(dec).__name__} was built with "
                             f"{dec.settings[f]!r}; build it with {type(dec).__module__}.{type(dec).__name__}"
                             f".from_config(target, cfg)")


def check_loop(log_every: int = 1000, save_every: int = 0, start_step: int = 0) -> None:
    """optimize's own arguments: ValueError naming the first bad one."""
    for name, v, lowest in (("log_every", log_every, 1), ("save_every", save_every, 0), ("start_step", start_step, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
            raise ValueError(f"--{name} must be an integer >= {lowest}, got {v!r}")


DIVERGED = 1e4  # a total loss this many times the lowest one seen in the run counts as diverged


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during optimize: the step it stopped after (a checkpoint of it was written if asked for)."""

    def __init__(self, step: int):
        super().__init__(f"interrupted after step {step}")
        self.step = step


def init_process_group(backend: str, **kwargs) -> None:
    """torch.distributed.init_process_group, after importing torch.distributed.optim (and with it
    torch.distributed.nn). Their modules bind `group.WORLD` as a default argument when first imported
    (torch 2.13: the first optimizer imports .nn through torch._dynamo, shard_optimizer imports
    .optim). Imported while a group is live, they keep it alive past destroy_process_group, and gloo's
    threads, torn down at interpreter exit instead, aborted 3 of 28 two-process runs here ("terminate
    called without an active exception"). Imported before, they bind None: the default group at call time."""
    import torch.distributed as dist
    import torch.distributed.optim  # noqa: F401
    dist.init_process_group(backend, **kwargs)


def world_size() -> int:
    """Processes of the torch.distributed job this runs in (torchrun), 1 outside one."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_over_processes_(tensors: list[torch.Tensor], bucket: int = 2**25) -> None:
    """Data parallelism: replaces each tensor, in place, by its mean over the processes. Every loss
    is a mean over the batch (faithfulness does not depend on it), so the mean of the processes'
    gradients on equal shares of a batch is the gradient on the whole batch. One all-reduce per
    bucket of tensors flattened together, of up to `bucket` numbers (128 MB in float32; a larger
    tensor is reduced alone, in place): few messages, and no copy of all the gradients at once."""
    import torch.distributed as dist
    groups, size = [[]], 0
    for t in tensors:
        if groups[-1] and size + t.numel() > bucket:
            groups, size = groups + [[]], 0
        groups[-1].append(t)
        size += t.numel()
    for group in groups:
        alone = len(group) == 1 and group[0].is_contiguous()
        flat = group[0] if alone else torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        if not alone:
            for t, v in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(v.view_as(t))


def average_gradients_(params: list[torch.Tensor]) -> None:
    """Data parallelism, after the backward: every parameter's gradient replaced by its mean over the
    processes (a parameter this process gave no gradient may have one in another: it counts as 0)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average_over_processes_([p.grad for p in params])


def broadcast_from_first_process_(tensors: list[torch.Tensor]) -> None:
    """Every process starts from process 0's values (the same seed should give them anyway)."""
    import torch.distributed as dist
    for t in tensors:
        dist.broadcast(t.data, src=0)


def optimize(dec: Decomposition, batch_fn: Callable[[int], torch.Tensor | tuple], cfg: SPDConfig,
             log: Callable[[int, dict], None] | None = None, log_every: int = 1000,
             checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None, save_every: int = 0,
             progress: bool = True, start_step: int = 0, opt_state: dict | None = None,
             shard_optimizer: bool = False) -> dict[str, float]:
    """SPD Algorithm 1's training loop: AdamW (make_optimizer) over U, V and Γ.
    batch_fn(batch_size) returns inputs x, or (x, valid) with valid [B, S] marking real positions.
    Calls log(step, losses) every log_every steps and checkpoint(step, optimizer) every save_every
    steps and at the end. A resumed run passes start_step and the optimizer's saved state_dict.
    Raises ValueError before the first step on a bad setting (check_config, check_loop).
    Raises FloatingPointError on a non-finite total loss or one DIVERGED times the lowest seen (checked
    every step on a CPU, every log_every steps and before each checkpoint on a GPU, where the check
    costs a host-device sync); a checkpoint is written only after a step whose loss passed it.
    Ctrl-C finishes the current step, checkpoints it and raises Interrupted (a second one stops at once).
    Under torch.distributed (torchrun, N processes): each process calls optimize, batch_fn(batch_size
    / N) draws its own share (seed it per process), gradients and the checked and logged losses are
    averaged over the processes; log, checkpoint and progress are the caller's to give to one process
    only (checkpoint is called on every process). Ctrl-C is left to torchrun (it stops every process).
    shard_optimizer: each process keeps Adam's moments of its share of the parameters only (see
    make_optimizer); checkpoint's optimizer then needs consolidate_state_dict() on every process before
    state_dict() on process 0, which gives AdamW's own format: a run resumes with or without sharding."""
    from tqdm import tqdm

    check_config(dec, cfg)
    check_loop(log_every, save_every, start_step)
    world = world_size()
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} does not split evenly over {world} processes; "
                         f"use a multiple of {world}")
    opt = make_optimizer(dec, cfg, shard=shard_optimizer)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    params = dec.parameters_to_train()
    if world > 1:
        broadcast_from_first_process_(params)
    losses_fn = spd_losses_fast if fast_path(dec) else spd_losses  # section K: same values, faster on a CPU
    check_every = 1 if next(dec.parameters()).device.type == "cpu" else log_every
    losses, lowest, stop = {}, math.inf, []
    shown = losses
    bar = tqdm(range(start_step, cfg.steps), disable=not progress, desc="SPD", dynamic_ncols=True, mininterval=1.0,
               initial=start_step, total=cfg.steps)
    with _first_ctrl_c_sets(stop) if world == 1 else contextlib.nullcontext():
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            x, valid = split_batch(batch_fn(cfg.batch_size // world))
            losses = losses_fn(dec, x, cfg, p_at(step, cfg), valid)
            saving = checkpoint is not None and save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps
            logging = step % log_every == 0 or step == cfg.steps - 1
            shown = losses  # what is checked and logged: data parallel, the whole batch's (the mean)
            if world > 1 and (step % check_every == 0 or saving or logging):
                shown = {k: v.detach().clone() for k, v in losses.items()}
                average_over_processes_(list(shown.values()))
            if step % check_every == 0 or saving or stop:
                lowest = _check_finite_and_not_diverged(shown, step, lowest, cfg)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if world > 1:
                average_gradients_(params)
            opt.step()
            if log is not None and logging:
                log(step, {k: v.item() for k, v in shown.items()})
                bar.set_postfix(total=f"{shown['total'].item():.3g}")
            if saving or (stop and checkpoint is not None):
                checkpoint(step + 1, opt)
            if stop:
                raise Interrupted(step + 1)
    if checkpoint is not None:
        checkpoint(cfg.steps, opt)
    return {k: v.item() for k, v in shown.items()}


def _check_finite_and_not_diverged(losses: dict, step: int, lowest: float, cfg: SPDConfig) -> float:
    """The lowest total so far, or FloatingPointError naming the step and the losses."""
    total = losses["total"].item()
    if math.isfinite(total) and total <= DIVERGED * lowest:
        return min(lowest, total)
    values = {k: f"{v.item():.3g}" for k, v in losses.items()}
    what = "non-finite loss" if not math.isfinite(total) else f"loss diverged ({DIVERGED:g} x its lowest, {lowest:.3g})"
    raise FloatingPointError(f"{what} at step {step}: {values}; try a lower --lr (was {cfg.lr}) or check the "
                             f"target model's outputs")


@contextmanager
def _first_ctrl_c_sets(stop: list):
    """Within the block, a first SIGINT (Ctrl-C) appends to `stop` instead of raising; a second one
    raises KeyboardInterrupt at once. Only in the main thread (signals cannot be caught elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ================================================================================================
# I. Metrics
# ================================================================================================


def mmcs_ml2r(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
    """SPD eqs. 9, 10 for W [d_out, d_in] with columns W[:, j] (TMS: feature j's embedding).

    MMCS = 1/d_in Σ_j max_c cos(U[:, c] V[c, j], W[:, j]);
    ML2R = 1/d_in Σ_j |U[:, mcs(j)] V[mcs(j), j]| / |W[:, j]|, mcs(j) the argmax of the cosine.
    """
    return mmcs_ml2r_matrices(W, U.detach().T[:, :, None] * V.detach()[:, None, :])  # u_c v_c^T   [C, d_out, d_in]


def mmcs_ml2r_matrices(W: torch.Tensor, sub: torch.Tensor) -> tuple[float, float]:
    """mmcs_ml2r for any matrices sub [C, d_out, d_in] (APD eq. 3 and the ML2R after it: its full-rank
    parameter components), compared column by column with W [d_out, d_in]."""
    best, ratio = max_cos_and_l2_ratio(W, sub)
    return best.mean().item(), ratio.mean().item()


def max_cos_and_l2_ratio(W: torch.Tensor, sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms that MMCS and ML2R average, one per column j of W [d_out, d_in]:
    max_c cos(sub[c, :, j], W[:, j]) and |sub[mcs(j), :, j]| / |W[:, j]|.   [d_in], [d_in]"""
    sub = sub.detach()
    norms = sub.norm(dim=1)  # [C, d_in]
    W_norms = W.norm(dim=0)  # [d_in]
    cos = torch.einsum("coj,oj->cj", sub, W) / ((norms + 1e-12) * (W_norms + 1e-12))  # [C, d_in]
    best, idx = cos.max(dim=0)  # [d_in]
    return best, norms.gather(0, idx[None])[0] / W_norms


def ci_l0(ci: dict[str, torch.Tensor], threshold: float = 0.0) -> dict[str, float]:
    """Mean number of subcomponents per example (and position) with g > threshold, per matrix."""
    return {n: float((g > threshold).float().sum(-1).mean()) for n, g in ci.items()}


def alive(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> dict[str, int]:
    """Subcomponents with g > threshold on at least one example (and position), per matrix."""
    return {n: int((g > threshold).reshape(-1, g.shape[-1]).any(0).sum()) for n, g in ci.items()}


def permute_to_identity(ci: torch.Tensor) -> torch.Tensor:
    """Column order for a [n_inputs, C] CI matrix: for each input in turn, its highest unused
    column; unused columns follow in index order (the paper's Figures 8, 12, 13)."""
    used: list[int] = []
    for row in ci[: ci.shape[1]]:
        free = [c for c in row.argsort(descending=True).tolist() if c not in used]
        used.append(free[0])
    return torch.tensor(used + [c for c in range(ci.shape[1]) if c not in used])


# ================================================================================================
# J. Save and load
# ================================================================================================


def save(dec: Decomposition, out_dir: str | os.PathLike, config: dict | None = None, step: int | None = None,
         train_state: dict | None = None) -> None:
    """Writes decomposition.pt (U, V and Γ parameters only; loadable with weights_only=True) and
    config.json (format version, matrices, C, the run's config), and train_state.pt if given
    (tensors and numbers to resume from: optimizer state, RNG states). Each file is written to a
    temporary name and renamed, so a run killed mid-save keeps the previous checkpoint."""
    if config and "spd" in config:
        check_config(dec, config["spd"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "step": step, "names": dec.names, "C": dec.C,
            "ci_fn": dec.ci_fn, "tied": dec.tied,
            "shapes": {n: list(linear_weight(dec.module(n)).shape) for n in dec.names},
            "config": config or {}}
    if train_state is not None:  # first, so that config.json's step never runs ahead of it
        _write_atomic(out / "train_state.pt", lambda tmp: torch.save({**train_state, "step": step}, tmp))
    state = {k: v for k, v in dec.state_dict().items() if not k.startswith("target.")}
    _write_atomic(out / "decomposition.pt", lambda tmp: torch.save(state, tmp))
    _write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=_jsonable)))


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) to a temporary name beside `path`, then rename: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def load(dec: Decomposition, run_dir: str | os.PathLike) -> dict:
    """Loads decomposition.pt into `dec` (built for the same target and settings) and returns the
    saved config.json. Raises ValueError naming what does not match."""
    run = Path(run_dir)
    meta, meta_path = read_config(run), run / "config.json"
    if meta.get("method", "spd") != "spd":
        raise ValueError(f"{run} holds an {str(meta['method']).upper()} run, not an SPD one; load it with "
                         f"{meta['method']}.load (train.py: --method {meta['method']})")
    state = read_tensors(run / "decomposition.pt")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{run / 'decomposition.pt'} holds no state dict of tensors; is it a file written by spd.save?")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    shapes = {n: list(linear_weight(dec.module(n)).shape) for n in dec.names}
    for what, saved, ours in (("matrices", meta["names"], dec.names), ("C", meta["C"], dec.C),
                              ("ci_fn", meta["ci_fn"], dec.ci_fn), ("weight shapes", meta["shapes"], shapes)):
        if saved != ours:
            raise ValueError(f"checkpoint {run} does not match this model: its {what} are {saved}, "
                             f"the model's are {ours}")
    ours = {k: v for k, v in dec.state_dict().items() if not k.startswith("target.")}
    bad = {k for k in ours if k not in state or state[k].shape != ours[k].shape} | (state.keys() - ours.keys())
    if bad:
        raise ValueError(f"checkpoint {run} does not match this decomposition; mismatched tensors: {sorted(bad)[:8]}")
    dec.load_state_dict(state, strict=False)
    return meta


META_KEYS = ("format_version", "step", "names", "C", "ci_fn", "tied", "shapes", "config")


def read_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run folder written by save; FileNotFoundError or ValueError naming the file."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {Path(run_dir)} a run folder written by spd.save (or train.py)?")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is damaged: restore it or start afresh in another folder") from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing or not isinstance(meta["config"], dict):
        raise ValueError(f"{path} is not a run config written by spd.save (missing or malformed: "
                         f"{missing or ['config']}); restore it or start afresh in another folder")
    return meta


def read_tensors(path: str | os.PathLike) -> dict:
    """torch.load(path, weights_only=True), or ValueError naming the file if it is damaged."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {path.parent} a run folder written by spd.save (or train.py)?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message may advise weights_only=False, which runs arbitrary code: never pass it on
        raise ValueError(f"{path} cannot be read: it is truncated or not a file written by this code "
                         f"({path.stat().st_size} bytes); restore it or start afresh in another folder") from None


def _jsonable(o):
    return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)


# ================================================================================================
# K. Speed on a CPU: the same values and gradients as sections D-G, in less time
# ================================================================================================
# `optimize` uses spd_losses_fast on a CPU, where each piece was measured to pay (results/benchmark.md);
# on a GPU it runs the plain spd_losses: these were not measured there, and the row skip needs
# host-device syncs and data-dependent shapes. test_spd.py checks every piece against the plain form.
# Same values for the same masks: the row skip draws masks for the live rows only, so from one seed
# it draws other (equally distributed) masks than the plain form, and how many depends on the data.

FAST_CPU = True  # False: optimize runs the plain spd_losses on a CPU too


def fast_path(dec: Decomposition) -> bool:
    return FAST_CPU and next(dec.parameters()).device.type == "cpu"


def spd_losses_fast(dec: Decomposition, x, cfg: SPDConfig, p: float, valid: torch.Tensor | None = None) -> dict:
    """spd_losses(dec, x, cfg, p, valid) with the same values and gradients, faster on a CPU:
    1. batch rows in which every decomposed matrix sees a = 0 (77% of a TMS 5-2 batch, 37% of a
       residual MLP's) are left out of every pass (live_rows): their importances are Γ(0)
       (importance_at_zero), and each recon term, a mean over the live rows, is rescaled to the mean
       over all B rows (a dead row's D is 0);
    2. within the step, h = a V^T is computed once per input a^l, and the scalar Γ runs as the fused
       _ScalarGamma with Γ(0) shared by the zero inputs (cpu_fast_paths)."""
    with cpu_fast_paths(dec):
        target_out, acts = dec.target_forward(x)
        live = live_rows(acts) if valid is None and isinstance(x, torch.Tensor) else None
        if live is None:
            return spd_losses(dec, x, cfg, p, valid, target=(target_out, acts))
        losses = spd_losses(dec, x[live], cfg, p, target=(target_out[live], {n: a[live] for n, a in acts.items()}))
        dead = importance_minimality_loss(importance_at_zero(dec, acts), p)
    B, n = len(live), int(live.sum())
    out = {"faithfulness": losses["faithfulness"],
           "importance_minimality": (losses["importance_minimality"] * n + dead * (B - n)) / B}
    out |= {k: v * (n / B) for k, v in losses.items() if k not in ("faithfulness", "importance_minimality", "total")}
    out["total"] = total_loss(out, cfg)
    return out


def nonzero_rows(a: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [...] bool: whether any entry of the last dimension is nonzero (NaN counts), as
    a.any(-1), but as two float reductions, which a CPU does several times faster than a bool one."""
    return (a.amax(-1) != 0) | (a.amin(-1) != 0)


def live_rows(acts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """[B] bool: the batch rows where some decomposed matrix's input is nonzero; None when that is
    every row (or none). A dead row drops out of every reconstruction loss exactly: its first
    decomposed matrix sees a = 0 in any pass, where ((0 V^T) * m) U^T + b = b = 0 W^T + b, so by
    induction over the layers every pass reproduces the target's output and D is 0 there, with no
    gradient. Assumes the target treats batch rows independently (any usual network in eval mode)."""
    live = torch.stack([nonzero_rows(a.reshape(a.shape[0], -1)) for a in acts.values()]).any(0)  # [B]
    return None if live.all() or not live.any() else live



def importance_at_zero(dec: Decomposition, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """σ_H,upper(Γ(0)) per matrix: the importances of an all-zero input, whose mean over leading
    dimensions is a zero row's. The scalar Γ gives it in closed form ([1, C]: h = 0 V^T = 0), the
    others run on a zero row shaped like one row of acts ([1, ..., C])."""
    upper = {}
    for name in dec.names:
        ci_fn, a = dec.ci_fns[_key(name)], acts[name]
        pre = scalar_gamma_at_zero(ci_fn)[None] if dec.ci_fn == "scalar" else ci_fn(a.new_zeros(1, *a.shape[1:]))
        upper[name] = upper_leaky_hard_sigmoid(pre)
    return upper


@contextmanager
def cpu_fast_paths(dec: Decomposition):
    """Within the block, `dec.inner` returns the h it computed the first time for an input equal to
    the first one it saw for that matrix (the CI input a^l; the recon passes recompute the first
    decomposed matrix's input from x, with the same value), so one matmul and one gradient matmul
    serve every pass; and `dec.causal_importance` runs the scalar Γ as scalar_gamma and the sigmoids
    in their fast forms. Both are instance attributes that shadow the plain methods for the block only."""
    plain_inner, plain_ci_raw, seen = dec.inner, dec.ci_raw, {}

    def inner(name, a):
        if name in seen:
            a0, h0 = seen[name]
            if a is a0 or (a.shape == a0.shape and torch.equal(a, a0)):
                return h0
        h = plain_inner(name, a)
        seen.setdefault(name, (a, h))
        return h

    def ci_raw(name, a):
        if dec.ci_fn != "scalar":
            return plain_ci_raw(name, a)
        return scalar_gamma(dec.ci_fns[_key(name)], inner(name, a), nonzero_rows(a))

    def causal_importance(acts):  # section F's, with the fast pieces
        pre = {name: ci_raw(name, acts[name]) for name in dec.names}
        return ({n: lower_leaky_hard_sigmoid_fast(g) for n, g in pre.items()},
                {n: upper_leaky_hard_sigmoid_fast(g) for n, g in pre.items()})

    dec.inner, dec.causal_importance = inner, causal_importance
    try:
        yield
    finally:
        dec.__dict__.pop("inner", None), dec.__dict__.pop("causal_importance", None)


def lower_leaky_hard_sigmoid_fast(x: torch.Tensor) -> torch.Tensor:
    """lower_leaky_hard_sigmoid as a leaky ReLU capped at 1: the same values and gradients (slope 0.01
    at x = 0, 1 at x = 1), without the bool tensors of torch.where, which are slow on a CPU (about 5%
    of a TMS step, measured)."""
    return F.leaky_relu(x, LEAK).clamp(max=1.0)


def upper_leaky_hard_sigmoid_fast(x: torch.Tensor) -> torch.Tensor:
    """upper_leaky_hard_sigmoid as a ReLU capped at 1 plus the leak above 1: the same values and
    gradients (slope 0 at x = 0: ReLU's; 1 at x = 1: clamp's at its bound, and the leak's ReLU 0)."""
    return F.relu(x).clamp(max=1.0) + LEAK * F.relu(x - 1)


def scalar_gamma(ci: ScalarCI, h: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    """ci(h) (SPD eq. 13) for h [..., C], by _ScalarGamma; inputs a = 0 (nonzero [...] False) have
    h = 0, so their γ(0) is computed once, and no gradient reaches V from them (dh/dV = a = 0): the
    result and the parameter gradients are exactly those of ci(h)."""
    flat = h.reshape(-1, h.shape[-1])  # [N, C]
    rows = nonzero.reshape(-1).nonzero()[:, 0]
    fused = lambda t: _ScalarGamma.apply(t, ci.w_in, ci.b_in, ci.w_out, ci.b_out)  # noqa: E731
    if len(rows) == len(flat):
        return fused(flat).reshape(h.shape)
    zero = scalar_gamma_at_zero(ci).expand_as(flat)  # [N, C]
    return (zero if len(rows) == 0 else zero.index_put((rows,), fused(flat[rows]))).reshape(h.shape)


def scalar_gamma_at_zero(ci: ScalarCI) -> torch.Tensor:  # γ(0) [C]
    return (F.gelu(ci.b_in) * ci.w_out).sum(-1) + ci.b_out


_CHUNK_ELEMS = 1 << 20  # hidden elements per chunk (4 MB): measured fastest for resid_mlp3
_KEEP_ELEMS = 1 << 20  # a hidden tensor up to this size (4 MB) is kept for the backward; a larger one is recomputed


class _ScalarGamma(torch.autograd.Function):
    """γ_c(h_c) = Σ_k w_out[c,k] GELU(w_in[c,k] h_c + b_in[c,k]) + b_out[c] for all c at once.

    The hidden tensor [C, N, d_gate] dominates SPD's cost on the residual MLPs (500 x 2048 x 128
    per matrix for resid_mlp3). A large one is never materialised whole: forward and backward walk
    over chunks of subcomponents in two reused buffers, and the backward recomputes each chunk
    instead of storing it; a small one (up to _KEEP_ELEMS) is kept from the forward pass. Every op
    writes into preallocated memory (`out=`), because on a CPU allocating fresh megabytes per op
    costs more than the op. The sums over k and over n are batched row-vector-times-matrix
    products (bmm of [c, 1, .] by [c, ., .]), which a CPU does several times faster than mul + sum
    or matrix-times-column-vector. Same math as plain autograd (test_spd.py compares the two).
    """

    @staticmethod
    def forward(ctx, h, w_in, b_in, w_out, b_out):
        (N, C), k = h.shape, w_in.shape[1]
        hT = h.T.contiguous()  # [C, N]: chunks over C become contiguous blocks
        kept = _buffer((2, C, N, k), h) if C * N * k <= _KEEP_ELEMS else None
        out = h.new_empty(C, 1, N)
        for sl, pre, act in _chunks(hT, k, kept):  # pre, act: [c, N, k]
            _hidden(hT[sl], w_in[sl], b_in[sl], pre, act)
            torch.bmm(w_out[sl, None, :], act.transpose(1, 2), out=out[sl])  # Σ_k w_out GELU(pre)  [c, 1, N]
        ctx.save_for_backward(hT, w_in, b_in, w_out, *([] if kept is None else [kept]))
        return (out[:, 0].T + b_out).contiguous()  # [N, C]; contiguous: rand_like draws masks in the plain layout

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [N, C]
        hT, w_in, b_in, w_out, *kept = ctx.saved_tensors
        (C, N), k = hT.shape, w_in.shape[1]
        goT = grad_out.T.contiguous()  # [C, N]
        h1 = torch.stack([hT, torch.ones_like(hT)], 1)  # [C, 2, N]: rows h and 1, for Σ_n h d_pre and Σ_n d_pre
        g_h, g_w_out, g_in = hT.new_empty(C, 1, N), w_out.new_empty(C, 1, k), w_in.new_empty(C, 2, k)
        for sl, pre, act in _chunks(hT, k, kept[0] if kept else None):
            if not kept:
                _hidden(hT[sl], w_in[sl], b_in[sl], pre, act)
            torch.bmm(goT[sl, None, :], act, out=g_w_out[sl])  # Σ_n go GELU(pre)          [c, 1, k]
            d_pre = _buffer(pre.shape, pre) if kept else act  # a kept act stays intact (one chunk)
            torch.mul(goT[sl, :, None], w_out[sl, None, :], out=d_pre)  # dL/dGELU         [c, N, k]
            torch.ops.aten.gelu_backward.grad_input(d_pre, pre, grad_input=d_pre)  # dL/dpre
            torch.bmm(w_in[sl, None, :], d_pre.transpose(1, 2), out=g_h[sl])  # Σ_k w_in d_pre  [c, 1, N]
            torch.bmm(h1[sl], d_pre, out=g_in[sl])  # Σ_n h d_pre, Σ_n d_pre                 [c, 2, k]
        return g_h[:, 0].T, g_in[:, 0], g_in[:, 1], g_w_out[:, 0], grad_out.sum(0)


_SPARE: list[torch.Tensor] = []  # flat buffers for _buffer to hand out again


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` for Γ's hidden activations, in the memory of an earlier
    call's buffer once nothing else holds it (no autograd graph saved it: `_use_count` is 1). On a
    CPU, fresh megabytes on every step cost page faults, and those cost more than the ops that
    fill them (TMS 5-2)."""
    n = math.prod(shape)
    free = [b for b in _SPARE if b._use_count() == 1 and b.device == like.device and b.dtype == like.dtype]
    fits = [b for b in free if b.numel() >= n]
    if not fits:  # the free ones are too small for this size: let them go
        _SPARE[:] = [b for b in _SPARE if all(b is not f for f in free)] + [like.new_empty(n + n // 4)]
        fits = _SPARE[-1:]  # (the n // 4 leaves room for the number of live rows to grow)
    return fits[0][:n].view(shape)


def _hidden(hT, w_in, b_in, pre, act) -> None:
    """pre = w_in h + b_in and act = GELU(pre), written into the [c, N, k] buffers."""
    torch.addcmul(b_in[:, None, :], hT[:, :, None], w_in[:, None, :], out=pre)
    torch.ops.aten.gelu.out(pre, out=act)


def _chunks(hT: torch.Tensor, k: int, kept: torch.Tensor | None = None):
    """Yields (slice of subcomponents, pre, act) [c, N, k]: slices of `kept` [2, C, N, k] if given
    (one chunk), else two buffers shared by all chunks."""
    C, N = hT.shape
    if kept is not None:
        yield slice(0, C), kept[0], kept[1]
        return
    step = min(C, max(1, _CHUNK_ELEMS // max(N * k, 1)))
    buffers = hT.new_empty(2, step, N, k)
    for i in range(0, C, step):
        n = min(step, C - i)
        yield slice(i, i + n), buffers[0, :n], buffers[1, :n]


# ================================================================================================
# L. Γ under torch.compile (opt-in: `with compiled_ci(dec): optimize(...)`, train.py --compile_ci)
# ================================================================================================
# Section D's own Γ forward, traced by torch.compile into fused kernels: the scalar and vector Γ's
# [..., C, d_gate] hidden tensor is then recomputed in the backward instead of being written, read
# back and kept. Meant for GPUs, where optimize runs the plain path; on that path on a CPU it made a
# resid_mlp3 step 4x faster with 4.5x less memory (results/benchmark.md); on a GPU not yet measured.
# One compiled forward per Γ class serves every matrix; test_spd.py checks it against the plain Γ.
# Inside section K (a CPU) the scalar Γ stays section K's fused one.


@functools.cache
def _compiled_forward(cls: type) -> Callable:
    return torch.compile(cls.forward)


@contextmanager
def compiled_ci(dec: Decomposition):
    """Within the block, each CI function's `forward` runs under torch.compile (the first calls
    compile): an instance attribute that shadows the class's forward for the block only."""
    for ci_fn in dec.ci_fns.values():
        ci_fn.forward = functools.partial(lambda m, x: _compiled_forward(type(m))(m, x), ci_fn)
    try:
        yield
    finally:
        for ci_fn in dec.ci_fns.values():
            ci_fn.__dict__.pop("forward", None)
