"""Attribution-based Parameter Decomposition (APD) in one file: the method SPD replaced, as a baseline.

Braun, Bushnaq, Heimersheim, Mendel & Sharkey (2025), "Interpretability in Parameter Space: Minimizing
Mechanistic Description Length with Attribution-based Parameter Decomposition" (arXiv 2501.14926),
its top-k formulation (appendix A.2.2), which produced its results. "APD eq. N" is that paper's
numbering; "APD D.1" its appendix D (training settings, the presets in train.py).

APD writes the target's parameters as a sum of C parameter components, θ* ≈ Σ_c P_c. Unlike SPD's
rank-one subcomponents of single matrices, a component spans every decomposed matrix (one index c
shared by all layers), and each of its matrices P_{c,l} = U_{c,l} V_{c,l} has rank up to m. For each
batch, gradient attributions (eq. 8) estimate how much each component matters on each input; the
top-k of them over the batch (batch top-k) are summed into κ(x) and trained to reproduce the
target's output (minimality), all components together to sum to θ* (faithfulness), and the active
ones to have low rank (simplicity, a Schatten-p proxy).

Sections (readers cite them by letter):
  A  Config                  APDConfig (defaults: APD D.1.1, TMS 5-2)
  B  Parameter components    P_{c,l} = U_{c,l} V_{c,l} (APD eqs. 20, 24) and their initialisation
  C  Gradient attributions   APD eq. 8
  D  Batch top-k             APD eqs. 16, 25 and §2
  E  Losses                  faithfulness (eq. 14), minimality (eq. 17, with the hidden-activation
                             term of §3.2), simplicity (eq. 22), total (eq. 23)
  F  Optimisation            the loop, unit-norm V (APD D.2)
  G  Metrics, save and load

Layouts follow spd.py: a matrix W^l is [d_out, d_in] (nn.Linear), so U_{c,l} is [d_out, m] and
V_{c,l} is [m, d_in]; the authors' A = V^T, B = U^T (their layer computes x A B). Normalisations of
the losses are the authors' code's (ApolloResearch/apd), with which the paper's coefficients were set.
"""

from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import spd

FORMAT_VERSION = 1

# ================================================================================================
# A. Config
# ================================================================================================


@dataclass
class APDConfig:
    """Hyperparameters of one APD decomposition. Defaults are the paper's TMS 5-2 values (APD D.1.1)."""

    # --- what to decompose
    targets: list[str] = field(default_factory=lambda: ["*"])  # dotted module paths, globs allowed
    C: int = 5  # parameter components (each spans every decomposed matrix)
    m: int | None = None  # rank of each matrix of a component; None: min(d_in, d_out), so full rank is possible
    init: str = "xavier_normal"  # xavier_normal (every one of the authors' APD runs) | kaiming_uniform
    init_scale: float = 1.0
    init_instances: int = 1  # n of the authors' [n, C, d_in, m] tensors, whose fans the init uses (B, init_components_)
    # --- loss coefficients (APD eq. 23: faithfulness + β minimality + α simplicity)
    faithfulness: float = 1.0
    minimality: float = 1.0  # β: output of the top-k forward against the target's
    act_recon: float = 0.0  # the minimality's hidden-activation term (residual MLPs: 1)
    act_recon_targets: list[str] = field(default_factory=list)  # modules whose ReLU'd outputs it compares
    simplicity: float = 0.7  # α
    schatten_p: float = 1.0  # p of the Schatten-p proxy (the paper's "L_p norm" of D.1)
    topk: float = 0.211  # batch top-k: int(topk * batch_size) (input, component) pairs are active per batch
    unit_norm_V: bool = False  # APD D.2 (1-layer residual MLP): rows of V kept at unit norm
    # --- optimisation (Adam = AdamW with weight decay 0)
    steps: int = 20_000
    batch_size: int = 2048
    lr: float = 0.03
    lr_schedule: str = "constant"  # constant | cosine (quarter period, to 0) | linear
    lr_warmup_pct: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the first bad field and its value."""
        def bad(name, what):
            raise ValueError(f"--{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("C", "steps", "batch_size", "init_instances"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, "a positive integer")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m <= 0):
            bad("m", "a positive integer (or unset: full rank)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "an integer >= 0")
        for name in ("targets", "act_recon_targets"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(t, str) for t in v) \
                    or (name == "targets" and not v):
                bad(name, "a non-empty list of module paths" if name == "targets" else "a list of module paths")
        floats = dict(faithfulness=(0.0, False), minimality=(0.0, False), act_recon=(0.0, False),
                      simplicity=(0.0, False), schatten_p=(0.0, True), topk=(0.0, True), lr=(0.0, True),
                      lr_warmup_pct=(0.0, False), init_scale=(0.0, True))
        for name, (lowest, excluded) in floats.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lowest or (excluded and v == lowest):
                bad(name, f"a finite number {'>' if excluded else '>='} {lowest:g}")
        if self.lr_warmup_pct >= 1:
            bad("lr_warmup_pct", "in [0, 1)")
        if self.topk > self.C:
            bad("topk", f"at most C = {self.C} (active components per input, on average)")
        if int(self.topk * self.batch_size) < 1:
            bad("topk", f"at least 1 / batch_size = {1 / self.batch_size:.3g} (int(topk * batch_size) components must be active)")
        if self.act_recon and not self.act_recon_targets:
            bad("act_recon_targets", "set when --act_recon > 0 (the modules whose ReLU'd outputs it compares)")
        choices = {"init": INITS, "lr_schedule": ("constant", "cosine", "linear")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"one of {sorted(allowed)}")


ARCHITECTURE = ("targets", "C", "m", "init", "init_scale", "init_instances")

# ================================================================================================
# B. Parameter components (APD eqs. 20, 24)
# ================================================================================================

INITS = ("xavier_normal", "kaiming_uniform")


def init_components_(U: torch.Tensor, V: torch.Tensor, how: str, scale: float, instances: int = 1) -> None:
    """The authors' code's initialisation (the paper states none). Their A = V^T and B = U^T are
    [n, C, d_in, m] and [n, C, m, d_out] tensors, n parallel instances of the target (their TMS 5-2
    runs: 12, TMS 40-10: 3, residual MLPs: 1), and torch's fans of a 4-d tensor count n and C:
    fan_in = C · d_in · m, fan_out = n · d_in · m for A (d_in -> d_out for B). So, with s = scale:
      xavier_normal:   V ~ N(0, 2 s² / ((C + n) d_in m)),  U ~ N(0, 2 s² / ((C + n) m d_out));
      kaiming_uniform: V ~ s · U(±√(6 / (C d_in m))),      U ~ s · U(±√(6 / (C m d_out))).
    U [C, d_out, m], V [C, m, d_in]; n = instances."""
    C, d_out, m = U.shape
    d_in, n = V.shape[2], instances
    with torch.no_grad():
        if how == "xavier_normal":
            V.normal_(0.0, scale * math.sqrt(2 / ((C + n) * d_in * m)))
            U.normal_(0.0, scale * math.sqrt(2 / ((C + n) * m * d_out)))
        elif how == "kaiming_uniform":
            V.uniform_(-1, 1).mul_(scale * math.sqrt(6 / (C * d_in * m)))
            U.uniform_(-1, 1).mul_(scale * math.sqrt(6 / (C * m * d_out)))
        else:
            raise ValueError(f"unknown init {how!r}; choose one of {INITS}")


class APDDecomposition(nn.Module):
    """A frozen target model plus C parameter components over its chosen matrices.

    Matrices are chosen as in spd.Decomposition (dotted paths, globs; nn.Linear). Component c's
    matrix l is P_{c,l} = U[l][c] V[l][c] (APD eq. 24), U[l] [C, d_out, m], V[l] [C, m, d_in].
    A target's `tied_weights` (TMS: linear2 = linear1^T) are kept: linear2's P_{c} is linear1's
    P_c^T, read from linear1's U, V, so one Adam update of the summed gradient (as the authors' code).
    """

    def __init__(self, target: nn.Module, targets: list[str], C: int = 5, m: int | None = None,
                 init: str = "xavier_normal", init_scale: float = 1.0, init_instances: int = 1):
        super().__init__()
        self.target = target.requires_grad_(False).eval()
        self.names = spd._resolve(target, targets)
        self.tied = {s: t for s, t in getattr(target, "tied_weights", {}).items() if s in self.names}
        for s, t in self.tied.items():
            if t not in self.names:
                raise ValueError(f"{s} is tied to {t}, so {t} must be decomposed too (add it to --targets)")
        self.C = C
        self.settings = dict(targets=list(targets), C=C, m=m, init=init, init_scale=init_scale,
                             init_instances=init_instances)
        self.U, self.V = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            if name in self.tied:
                continue
            d_out, d_in = spd.linear_weight(self.module(name)).shape
            rank = min(d_in, d_out) if m is None else m
            U, V = torch.empty(C, d_out, rank), torch.empty(C, rank, d_in)
            init_components_(U, V, init, init_scale, init_instances)
            self.U[spd._key(name)], self.V[spd._key(name)] = nn.Parameter(U), nn.Parameter(V)

    @classmethod
    def from_config(cls, target: nn.Module, cfg: APDConfig) -> "APDDecomposition":
        return cls(target, **{f: getattr(cfg, f) for f in ARCHITECTURE})

    def module(self, name: str) -> nn.Module:
        return self.target.get_submodule(name)

    def UV(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [C, d_out, m], V [C, m, d_in]) of one matrix; a tied matrix uses its partner's, transposed."""
        if name in self.tied:
            k = spd._key(self.tied[name])
            return self.V[k].transpose(1, 2), self.U[k].transpose(1, 2)
        return self.U[spd._key(name)], self.V[spd._key(name)]

    def component_matrices(self) -> dict[str, torch.Tensor]:
        """P_{c,l} = U_{c,l} V_{c,l} for every matrix l: name -> [C, d_out, d_in]."""
        return {n: U @ V for n, (U, V) in ((n, self.UV(n)) for n in self.names)}

    def target_weights(self) -> dict[str, torch.Tensor]:
        return {n: spd.linear_weight(self.module(n)) for n in self.names}

    def component_weights(self) -> dict[str, torch.Tensor]:
        """Σ_c P_{c,l} per matrix: what faithfulness compares with θ*."""
        return {n: P.sum(0) for n, P in self.component_matrices().items()}

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [*self.U.values(), *self.V.values()]

    def component_forward(self, name: str, a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Matrix `name` replaced by the sum of the components `mask` keeps: Σ_c s_c (a V_c^T) U_c^T + b.
        a [..., d_in], mask [..., C] (bool or 0/1; None: every component)."""
        U, V = self.UV(name)
        h = torch.einsum("...i,cmi->...cm", a, V)  # [..., C, m]
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)
        out = torch.einsum("...cm,com->...o", h, U)  # [..., d_out]
        bias = getattr(self.module(name), "bias", None)
        return out if bias is None else out + bias

    @contextmanager
    def replaced(self, mask: torch.Tensor | None):
        """Within the block every decomposed matrix runs component_forward with the same mask."""
        try:
            for name in self.names:
                self.module(name).forward = functools.partial(self.component_forward, name, mask=mask)
            yield
        finally:
            for name in self.names:
                self.module(name).__dict__.pop("forward", None)

    def forward(self, x, mask: torch.Tensor | None = None, record: list[str] = ()) -> tuple[torch.Tensor, dict]:
        """f(x | Σ_c s_c P_c) and the outputs of the modules named in `record`."""
        with self.replaced(mask):
            return run_recording(self.target, x, record)


def run_recording(model: nn.Module, x, record: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """model(x) and the outputs of the modules named in `record`."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(functools.partial(_store_output, outs, n)) for n in record]
    try:
        return model(x), outs
    finally:
        for h in hooks:
            h.remove()


def _store_output(store: dict, name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    store[name] = out


# ================================================================================================
# C. Gradient attributions (APD eq. 8)
# ================================================================================================


def attributions(dec: APDDecomposition, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """APD eq. 8: how much each component matters for each input,
        A_c(x) = Σ_o ( Σ_l Σ_k ∂f_o/∂y^l_k · (P_{c,l} a^l)_k )²,
    y^l = W^l a^l the target's output of matrix l (∂f_o/∂y^l through everything downstream), a^l its
    input: the chain rule's form of Σ_{l,i,j} ∂f_o/∂θ_{l,i,j} P_{c,l,i,j}. A tied matrix counts once
    per use, as its gradient does. Returns (A [B, C], f(x | θ*) [B, d_L], {name: y^l}).
    Note: eq. 8 takes the square root of the mean over o; a monotone map of every A_c(x) alike, so
    batch top-k picks the same components (the authors' code also uses the sum of squares)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name, module, args, out):
        inputs[name] = args[0].detach()
        if not out.requires_grad:  # the first matrix: upstream of it nothing depends on θ
            out = out.detach().requires_grad_(True)
        outputs[name] = out
        return out

    hooks = [dec.module(n).register_forward_hook(functools.partial(keep, n)) for n in dec.names]
    try:
        with torch.enable_grad():
            f = dec.target(x)  # [B, d_L]
            d_L = f.shape[-1]
            eye = torch.eye(d_L, device=f.device, dtype=f.dtype)
            seeds = eye.reshape(d_L, *([1] * (f.dim() - 1)), d_L).expand(d_L, *f.shape)
            grads = torch.autograd.grad(f, [outputs[n] for n in dec.names], seeds, is_grads_batched=True)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        t = 0.0  # t[o, b, c] = Σ_l ∂f_o/∂y^l · P_{c,l} a^l
        for n, g in zip(dec.names, grads):  # g [d_L, B, d_out]
            U, V = dec.UV(n)
            h = torch.einsum("bi,cmi->bcm", inputs[n], V)  # V_{c,l} a^l   [B, C, m]
            comp_out = torch.einsum("bcm,com->bco", h, U)  # P_{c,l} a^l   [B, C, d_out]
            t = t + torch.einsum("obk,bck->obc", g, comp_out)
        A = t.square().sum(0)  # [B, C]
    return A, f.detach(), {n: y.detach() for n, y in outputs.items()}


# ================================================================================================
# D. Batch top-k (APD eqs. 16, 25; Bussmann et al. 2024)
# ================================================================================================


def batch_topk_mask(A: torch.Tensor, k: float) -> torch.Tensor:
    """s_c(x) ∈ {0, 1}: the int(k · B) largest attributions over the whole batch x components are
    active (so k components per input on average, but any number on any one input). A [B, C] -> bool [B, C]."""
    B, C = A.shape
    n = int(k * B)
    if not 1 <= n <= B * C:
        raise ValueError(f"batch top-k keeps int(topk * batch) = {n} of {B} x {C} attributions; "
                         f"choose topk in [1/{B}, {C}]")
    mask = torch.zeros(B * C, dtype=torch.bool, device=A.device)
    mask[A.flatten().topk(n).indices] = True
    return mask.view(B, C)


# ================================================================================================
# E. Losses (APD eq. 23)
# ================================================================================================


def faithfulness_loss(target_weights: dict[str, torch.Tensor], component_weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """APD eq. 14, L_faithfulness = Σ_{l,i,j} (θ*_{l,i,j} - Σ_c P_{c,l,i,j})², over the number of
    parameters N (the authors' code; tied matrices count twice): SPD's eq. 2, the same function."""
    return spd.faithfulness_loss(target_weights, component_weights)


def minimality_loss(out_topk: torch.Tensor, target_out: torch.Tensor) -> torch.Tensor:
    """APD eq. 17 with D = MSE: mean over batch and outputs of (f(x | κ(x)) - f(x | θ*))²."""
    return ((out_topk - target_out) ** 2).mean()


def act_recon_loss(acts_topk: dict[str, torch.Tensor], acts_target: dict[str, torch.Tensor]) -> torch.Tensor:
    """APD §3.2 and D.2, minimality's hidden-activation term: the MLP activations after the ReLU of the
    top-k forward against the target's, Σ_l Σ_k (ReLU(y^l_k) - ReLU(ŷ^l_k))² / Σ_l d_l, mean over the batch."""
    sq = sum(((F.relu(acts_topk[n]) - F.relu(acts_target[n])) ** 2).sum(-1) for n in acts_target)
    return (sq / sum(a.shape[-1] for a in acts_target.values())).mean()


def simplicity_loss(dec: APDDecomposition, mask: torch.Tensor, p: float, eps: float = 1e-16) -> torch.Tensor:
    """APD eq. 22, the Schatten-p proxy of the active components' ranks:
        L_simplicity = 1/(N B) Σ_b Σ_c s_c(x_b) Σ_l Σ_m (|U_{c,l,:,m}|² |V_{c,l,m,:}|²)^(p/2),
    λ_{c,l,m} = |U_{c,l,:,m}| |V_{c,l,m,:}| standing in for the singular values (eq. 21). N = the number
    of decomposed parameters, B the batch (the authors' normalisation; tied matrices count twice);
    eps keeps the gradient finite for p < 1 (their code)."""
    N = sum(w.numel() for w in dec.target_weights().values())
    per_component = 0.0
    for n in dec.names:
        U, V = dec.UV(n)
        lam_sq = (U ** 2).sum(1) * (V ** 2).sum(2)  # λ² [C, m]
        per_component = per_component + ((lam_sq + eps) ** (p / 2)).sum(-1)  # [C]
    return (mask.to(per_component.dtype) * per_component).sum() / (N * mask.shape[0])


def apd_losses(dec: APDDecomposition, x: torch.Tensor, cfg: APDConfig) -> dict[str, torch.Tensor]:
    """One step's losses and "total" (APD eq. 23): faithfulness + β (minimality + act_recon) + α simplicity,
    each with its own coefficient here."""
    A, target_out, target_acts = attributions(dec, x)
    mask = batch_topk_mask(A, cfg.topk)
    record = [n for n in spd._resolve(dec.target, cfg.act_recon_targets)] if cfg.act_recon else []
    out_topk, acts_topk = dec(x, mask, record)
    losses = {"faithfulness": faithfulness_loss(dec.target_weights(), dec.component_weights()),
              "minimality": minimality_loss(out_topk, target_out),
              "simplicity": simplicity_loss(dec, mask, cfg.schatten_p)}
    if cfg.act_recon:
        _, acts_target = run_recording(dec.target, x, record)
        losses["act_recon"] = act_recon_loss(acts_topk, acts_target)
    losses["total"] = (cfg.faithfulness * losses["faithfulness"] + cfg.minimality * losses["minimality"]
                       + cfg.act_recon * losses.get("act_recon", 0.0) + cfg.simplicity * losses["simplicity"])
    losses["active_per_input"] = mask.sum(1).float().mean().detach()  # = int(topk B) / B, for the log
    return losses


# ================================================================================================
# F. Optimisation
# ================================================================================================


def normalize_V_(dec: APDDecomposition) -> None:
    """APD D.2: each row V_{c,l,m,:} (the authors' A over d_in) set to unit norm, every step."""
    with torch.no_grad():
        for V in dec.V.values():
            V.div_(V.norm(dim=-1, keepdim=True))


def project_V_grads_(dec: APDDecomposition) -> None:
    """With unit-norm rows, the gradient's part along each row (which would change its norm) is removed
    before the Adam step (the authors' code)."""
    for V in dec.V.values():
        if V.grad is not None:
            V.grad -= (V.grad * V).sum(-1, keepdim=True) * V


def check_config(dec: APDDecomposition, cfg: APDConfig | dict) -> None:
    """cfg.validate(), and that dec was built with cfg's ARCHITECTURE fields; else ValueError."""
    spd.check_config(dec, cfg, APDConfig, ARCHITECTURE)


def optimize(dec: APDDecomposition, batch_fn: Callable[[int], torch.Tensor], cfg: APDConfig,
             log: Callable[[int, dict], None] | None = None, log_every: int = 1000,
             checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None, save_every: int = 0,
             progress: bool = True, start_step: int = 0, opt_state: dict | None = None) -> dict[str, float]:
    """APD's training loop: Adam (AdamW, weight decay 0) over U, V; linear warm-up then the schedule
    (spd.lr_at). The same contract as spd.optimize: log, checkpoints, resume, ValueError on bad
    settings, FloatingPointError on a non-finite or diverged loss, Ctrl-C -> spd.Interrupted."""
    from tqdm import tqdm

    check_config(dec, cfg)
    spd.check_loop(log_every, save_every, start_step)
    opt = torch.optim.AdamW(dec.parameters_to_train(), lr=cfg.lr, weight_decay=0.0)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    check_every = 1 if next(dec.parameters()).device.type == "cpu" else log_every
    losses, lowest, stop = {}, math.inf, []
    bar = tqdm(range(start_step, cfg.steps), disable=not progress, desc="APD", dynamic_ncols=True, mininterval=1.0,
               initial=start_step, total=cfg.steps)
    with spd._first_ctrl_c_sets(stop):
        for step in bar:
            if cfg.unit_norm_V:
                normalize_V_(dec)
            for group in opt.param_groups:
                group["lr"] = spd.lr_at(step, cfg)
            losses = apd_losses(dec, batch_fn(cfg.batch_size), cfg)
            saving = checkpoint is not None and save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps
            if step % check_every == 0 or saving or stop:
                lowest = spd._check_finite_and_not_diverged(losses, step, lowest, cfg)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if cfg.unit_norm_V:
                project_V_grads_(dec)
            opt.step()
            if log is not None and (step % log_every == 0 or step == cfg.steps - 1):
                log(step, {k: v.item() for k, v in losses.items()})
                bar.set_postfix(total=f"{losses['total'].item():.3g}")
            if saving or (stop and checkpoint is not None):
                checkpoint(step + 1, opt)
            if stop:
                raise spd.Interrupted(step + 1)
    if cfg.unit_norm_V:
        normalize_V_(dec)
    if checkpoint is not None:
        checkpoint(cfg.steps, opt)
    return {k: v.item() for k, v in losses.items()}


# ================================================================================================
# G. Metrics, save and load
# ================================================================================================


def component_norms(dec: APDDecomposition, name: str) -> torch.Tensor:
    """Frobenius norm of each component's matrix `name`: |P_{c,l}|_F.   [C]"""
    return dec.component_matrices()[name].flatten(1).norm(dim=1)


def save(dec: APDDecomposition, out_dir, config: dict | None = None, step: int | None = None,
         train_state: dict | None = None) -> None:
    """decomposition.pt (U, V), config.json (spd.read_config reads it: method "apd") and train_state.pt
    if given, each written to a temporary name and renamed, as spd.save."""
    if config and "apd" in config:
        check_config(dec, config["apd"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "method": "apd", "step": step, "names": dec.names, "C": dec.C,
            "ci_fn": None, "tied": dec.tied,
            "shapes": {n: list(spd.linear_weight(dec.module(n)).shape) for n in dec.names}, "config": config or {}}
    if train_state is not None:
        spd._write_atomic(out / "train_state.pt", lambda tmp: torch.save({**train_state, "step": step}, tmp))
    state = {k: v for k, v in dec.state_dict().items() if not k.startswith("target.")}
    spd._write_atomic(out / "decomposition.pt", lambda tmp: torch.save(state, tmp))
    spd._write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=spd._jsonable)))


def load(dec: APDDecomposition, run_dir) -> dict:
    """Loads decomposition.pt into `dec` (built for the same target and settings); returns config.json.
    ValueError naming what does not match."""
    run = Path(run_dir)
    meta = spd.read_config(run)
    if meta.get("method") != "apd":
        raise ValueError(f"{run} holds an SPD run, not an APD one; load it with spd.load (train.py: --method spd)")
    state = spd.read_tensors(run / "decomposition.pt")
    ours = {k: v for k, v in dec.state_dict().items() if not k.startswith("target.")}
    if not isinstance(state, dict) or meta["names"] != dec.names or meta["C"] != dec.C \
            or {k for k in ours if k not in state or state[k].shape != ours[k].shape} | (state.keys() - ours.keys()):
        raise ValueError(f"checkpoint {run} does not match this decomposition (matrices {meta['names']}, C {meta['C']}; "
                         f"this one: {dec.names}, C {dec.C})")
    dec.load_state_dict(state, strict=False)
    return meta
