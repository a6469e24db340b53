"""Evaluation and figures of a finished decomposition, per target family.

spd.py holds the method; this file holds what the papers measure on each target:
  A  Every run          final losses, causal-importance L0 and alive subcomponents per matrix
  B  TMS                MMCS / ML2R (SPD paper eqs. 9, 10, Table 1), identity subcomponents, Figures 1-4
  C  Residual MLPs      one-hot causal importances (Figures 8, 12, 13), monosemantic W_in fraction,
                        dense W_out count, neuron contributions (eqs. 11, 12; Figures 7, 10, 11)
  C2 APD baseline       apd.py's runs: TMS MMCS / ML2R of its components (APD Table 1), features with a
                        component of their own; residual MLPs: one-hot attributions, single-component MSE
  D  Induction heads    transformer paper Table 1 (active subcomponents per position class, total
                        unique, losses, attention KL), greedy SVD pruning (Algorithm 2), Figure 2
  E  GPT-2              active and unique subcomponents per prompt, the suppression edit, the fact
                        set (Figures 3, 4), zeroing MLP layers (Figure 9)
  F  Results tables     python analysis.py report RUNS_DIR: results/*.md from finished run folders
  G  APD and robustness python analysis.py apd|robustness RUNS_DIR: APD Table 1; SPD against APD over
                        their main hyperparameter (TMS 5-2), table and figure; python analysis.py
                        record RUNS_DIR --out DIR: a small JSON per finished run, to commit
Each evaluate_* returns a flat dict for metrics.json and writes PNGs into out_dir.
"""

from __future__ import annotations

import fnmatch
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
import spd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


# ================================================================================================
# A. Every run
# ================================================================================================


@torch.no_grad()
def evaluate_common(dec: spd.Decomposition, batch, cfg: spd.SPDConfig) -> dict:
    """Losses at p_final on a fresh batch, CI L0 (g > 0) and alive subcomponents (g > 0.1).
    batch: inputs x, or (x, valid) with valid [B, S] marking real (non-padding) positions."""
    x, valid = spd.split_batch(batch)
    losses = spd.spd_losses(dec, x, cfg, spd.p_at(cfg.steps - 1, cfg), valid)
    ci, _ = dec.causal_importance(dec.target_forward(x)[1])
    if valid is not None:
        ci = {n: g[valid] for n, g in ci.items()}
    return {"eval_losses": {k: v.item() for k, v in losses.items()},
            "ci_l0": spd.ci_l0(ci), "alive_01": spd.alive(ci, 0.1)}


def evaluate_spd(dec: spd.Decomposition, target, tcfg: dict, batch, cfg: spd.SPDConfig, out: Path, tokenizer=None,
                 progress: bool = True) -> dict:
    """Everything train.py measures on a finished SPD run: evaluate_common, the family's evaluate_*,
    and the CI histograms."""
    metrics = evaluate_common(dec, batch, cfg)
    if tcfg["family"] == "tms":
        metrics.update(evaluate_tms(dec, out))
    elif tcfg["family"] == "resid_mlp":
        metrics.update(evaluate_resid_mlp(dec, target, out))
    elif tcfg["family"] == "induction":
        metrics.update(evaluate_induction(dec, target, cfg, out, progress=progress))
    elif tcfg["family"] == "gpt2":
        metrics.update(evaluate_gpt2(dec, target, tokenizer, out, sentences=tcfg["sentences"], progress=progress))
    plot_ci_histograms(dec, spd.split_batch(batch)[0], out / "ci_histograms.png")
    return metrics


def plot_ci_histograms(dec: spd.Decomposition, batch: torch.Tensor, path: Path) -> None:
    plt = _plt()
    with torch.no_grad():
        ci, _ = dec.causal_importance(dec.target_forward(batch)[1])
    fig, axes = plt.subplots(1, len(ci), figsize=(3.2 * len(ci), 2.8), squeeze=False)
    for ax, (name, g) in zip(axes[0], ci.items()):
        ax.hist(g.flatten().cpu().numpy(), bins=100)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("causal importance g")
    _save(fig, path)


# ================================================================================================
# B. Toy models of superposition
# ================================================================================================


def subcomponent_norms(dec: spd.Decomposition, name: str) -> torch.Tensor:
    """Frobenius norm of each rank-one subcomponent u_c v_c^T: |u_c| |v_c|.   [C]"""
    U, V = dec.UV(name)
    return U.norm(dim=0) * V.norm(dim=1)


@torch.no_grad()
def evaluate_tms(dec: spd.Decomposition, out_dir: Path, norm_threshold: float = 0.1) -> dict:
    """MMCS and ML2R of linear1's W (columns = feature embeddings), as the paper's Table 1, and how
    many subcomponents have norm > norm_threshold: of W (expected n_features, one per feature) and,
    for the -id models, of the identity (the paper's Figure 3 expects n_hidden)."""
    U, V = dec.UV("linear1")
    W = dec.target_weights()["linear1"]
    sub = U.T[:, :, None] * V[:, None, :]  # u_c v_c^T   [C, d_out, d_in]
    cos, ratio = spd.max_cos_and_l2_ratio(W, sub)
    mmcs, ml2r = cos.mean().item(), ratio.mean().item()
    # The paper's max over all C subcomponents can pick a dead one (norm ~1e-3) that points along a
    # feature more exactly than that feature's large one: ML2R then counts ~0 for it (seen in a run of
    # the authors' code, results/parity.md). The same metrics over the large subcomponents only:
    large = subcomponent_norms(dec, "linear1") > norm_threshold
    mmcs_large, ml2r_large = spd.mmcs_ml2r_matrices(W, sub[large]) if large.any() else (float("nan"),) * 2
    out = {"mmcs": mmcs, "ml2r": ml2r, "mmcs_large": mmcs_large, "ml2r_large": ml2r_large,
           # the "Std" that the authors' code prints beside MMCS and ML2R: over the features of one run
           # (torch.std, unbiased); the paper does not say whether its Table 1's ± is this or over seeds
           "mmcs_std_over_features": cos.std().item(), "ml2r_std_over_features": ratio.std().item(),
           "features_with_own_component": features_with_own_component(W, sub[large])}
    for name in ["linear1", *(n for n in dec.names if n.startswith("hidden_layers"))]:
        norms = subcomponent_norms(dec, name)
        out[f"{name}/n_large_subcomponents"] = int((norms > norm_threshold).sum())
        out[f"{name}/top_norms"] = sorted(norms.tolist(), reverse=True)[:6]
        if name != "linear1":  # an identity: its n_hidden expected subcomponents and one more (Figure 3)
            plot_tms(dec, out_dir / f"tms_{name}_subcomponents.png", name, n_show=dec.UV(name)[0].shape[0] + 1)
    plot_tms(dec, out_dir / "tms_subcomponents.png")
    plot_tms_networks(dec, out_dir / "tms_networks.png", norm_threshold)
    return out


RECOVERED_COS = 0.98  # a feature counts as recovered by a (sub)component at this cosine or above


def features_with_own_component(W: torch.Tensor, P: torch.Tensor, cos_min: float = RECOVERED_COS) -> int:
    """How many features j (columns of W [d_out, d_in]) have a matrix of P [K, d_out, d_in] of their own:
    the best match of column j by cosine has cos >= cos_min, and is the best match of no other feature.
    Ground truth is recovered when this is d_in (SPD: one rank-one subcomponent per feature; APD: one
    component per feature, not one holding two)."""
    if P.shape[0] == 0:
        return 0
    cos = torch.einsum("koj,oj->kj", P, W) / (P.norm(dim=1) * W.norm(dim=0) + 1e-12)  # [K, d_in]
    best, idx = cos.max(0)
    shared = torch.bincount(idx, minlength=P.shape[0])[idx] > 1
    return int(((best >= cos_min) & ~shared).sum())


def plot_tms(dec: spd.Decomposition, path: Path, name: str = "linear1", n_show: int = 6) -> None:
    """Paper Figures 1 and 2 (name "linear1": the 5-2 columns as arrows, 40-10 as heatmaps) or 3
    (name "hidden_layers.0", the identity): the target matrix, the sum of all subcomponents, and
    the n_show largest subcomponents, ordered by norm."""
    W = dec.target_weights()[name].cpu()
    U, V = (t.detach().cpu() for t in dec.UV(name))
    order = subcomponent_norms(dec, name).cpu().argsort(descending=True)[:n_show]
    panels = [("target W" if name == "linear1" else "target I", W), ("sum of subcomponents", U @ V)]
    panels += [(f"subcomponent {int(c)}", U[:, c, None] * V[c][None]) for c in order]
    plot_matrix_panels(panels, path, arrows=name == "linear1")


def plot_matrix_panels(panels: list, path: Path, arrows: bool) -> None:
    """(title, matrix) panels side by side, the first the target; arrows: a 2-row W's columns drawn
    as arrows in the hidden plane (TMS 5-2), else heatmaps on the target's colour scale."""
    plt = _plt()
    W = panels[0][1].detach().cpu()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6))
    for ax, (title, M) in zip(axes, panels):
        M = M.detach().cpu().numpy()
        if arrows and M.shape[0] == 2:  # TMS 5-2: feature columns as arrows in the hidden plane
            for j in range(M.shape[1]):
                ax.arrow(0, 0, M[0, j], M[1, j], color=f"C{j}", width=0.02, length_includes_head=True)
            lim = max(1.2, W.abs().max().item() * 1.2)
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        else:
            v = W.abs().max().item()
            ax.imshow(M, cmap="RdBu", vmin=-v, vmax=v)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    _save(fig, path)


@torch.no_grad()
def tms_network_panels(dec: spd.Decomposition, norm_threshold: float = 0.1, max_show: int = 8) -> list:
    """The parametrised networks of paper Figures 1 (bottom row) and 4, as (title, {matrix: weight})
    in forward order: the target, the sum of all subcomponents, then each subcomponent of norm >
    norm_threshold alone (the max_show largest). A subcomponent of W sets both of its uses (W in
    linear1, W^T in linear2); the matrices it does not belong to are zero."""
    names = [n for n, _ in dec.target.named_modules() if n in dec.names]  # forward order
    own = {n: dec.tied.get(n, n) for n in names}  # the matrix whose U, V each one uses
    zeros = {n: torch.zeros_like(W) for n, W in dec.target_weights().items()}
    singles = []
    for src in dict.fromkeys(own.values()):
        norms = subcomponent_norms(dec, src)
        for c in (norms > norm_threshold).nonzero().flatten().tolist():
            parts = {n: dec.UV(n)[0][:, c, None] * dec.UV(n)[1][c][None] if own[n] == src else zeros[n] for n in names}
            label = "W" if src == "linear1" else f"I_{src.split('.')[-1]}" if src.startswith("hidden_layers") else src
            singles.append((norms[c].item(), f"{label} subcomponent {c}", parts))
    singles = sorted(singles, key=lambda s: -s[0])[:max_show]
    target, summed = dec.target_weights(), dec.component_weights()
    return [("target", {n: target[n] for n in names}), ("sum of subcomponents", {n: summed[n] for n in names}),
            *((title, parts) for _, title, parts in singles)]


def plot_tms_networks(dec: spd.Decomposition, path: Path, norm_threshold: float = 0.1, max_show: int = 8) -> None:
    """Paper Figures 1 (bottom row) and 4: each panel of tms_network_panels drawn as a network, inputs
    on the left, outputs on the right; line width ~ |weight| (scaled to the target's largest),
    red positive, blue negative."""
    from matplotlib.collections import LineCollection

    plt = _plt()
    panels = tms_network_panels(dec, norm_threshold, max_show)
    vmax = max(W.abs().max().item() for W in panels[0][1].values())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 * len(panels), 2.8), squeeze=False)
    for ax, (title, weights) in zip(axes[0], panels):
        Ws = [W.cpu().numpy() for W in weights.values()]
        sizes = [Ws[0].shape[1], *(W.shape[0] for W in Ws)]
        ys = [(np.arange(k) - (k - 1) / 2) / max(sizes) for k in sizes]  # node heights per column
        for layer, W in enumerate(Ws):
            j, i = np.nonzero(np.abs(W) > 0.02 * vmax)  # edges input i -> output j
            segs = [[(layer, ys[layer][a]), (layer + 1, ys[layer + 1][b])] for b, a in zip(j, i)]
            w = W[j, i] / vmax
            ax.add_collection(LineCollection(segs, linewidths=3 * np.abs(w), colors=np.where(w > 0, "tab:red", "tab:blue")))
        for layer, y in enumerate(ys):
            ax.scatter(np.full(len(y), layer), y, s=12, c="k", zorder=3)
        ax.set_xlim(-0.3, len(Ws) + 0.3), ax.set_ylim(-0.6, 0.6)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    _save(fig, path)


# ================================================================================================
# C. Residual MLPs
# ================================================================================================


@torch.no_grad()
def one_hot_ci(dec: spd.Decomposition, n_features: int, value: float = 0.75) -> dict[str, torch.Tensor]:
    """Upper-leaky CI, clipped to [0, 1], for the inputs x = value * e_i (the paper's figures).  [n, C]"""
    device = next(dec.parameters_to_train().__iter__()).device
    x = torch.eye(n_features, device=device) * value
    _, ci_upper = dec.causal_importance(dec.target_forward(x)[1])
    return {n: g.clamp(0, 1) for n, g in ci_upper.items()}


def monosemantic_in_by_layer(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> dict[str, torch.Tensor]:
    """Per W_in matrix, [n] bool: feature i has exactly one subcomponent with g > threshold on input
    i, and no other feature uses that subcomponent."""
    out = {}
    for name, g in ci.items():
        if name.endswith("mlp_in"):
            active = g > threshold  # [n, C]
            unshared = (active & (active.sum(0, keepdim=True) == 1)).any(1)
            out[name] = (active.sum(1) == 1) & unshared
    return out


def monosemantic_in_fraction(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> float:
    """Fraction of features i that are monosemantic (monosemantic_in_by_layer) in every layer."""
    return float(torch.stack(list(monosemantic_in_by_layer(ci, threshold).values())).all(0).float().mean())


def dense_out_count(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> int:
    """W_out subcomponents (all layers) with g > 0.1 on at least half of the one-hot inputs."""
    return sum(int(((g > threshold).float().mean(0) >= 0.5).sum()) for n, g in ci.items() if n.endswith("mlp_out"))


def out_activity(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> tuple[int, float]:
    """W_out subcomponents (all layers) with g > 0.1 on some one-hot input, and the mean fraction of
    the one-hot inputs on which each of them is (1.0: the paper's single dense component)."""
    active = torch.cat([g > threshold for n, g in ci.items() if n.endswith("mlp_out")], dim=1)  # [n, C_total]
    used = active.any(0)
    return int(used.sum()), float(active[:, used].float().mean()) if used.any() else 0.0


@torch.no_grad()
def neuron_contributions(dec: spd.Decomposition, W_E: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 11, 12 for one layer. Target: NC[i, n] = (W_U[i] W_out)_n (W_in W_E[i])_n.
    SPD: for each feature the W_in subcomponent c* maximising max_n NC_spd[i, c, n], with
    NC_spd[i, c, n] = (W_U[i] Ŵ_out)_n (U_in[:, c] V_in[c] W_E[i])_n and Ŵ_out the sum of all W_out
    subcomponents (authors' code). Returns (target [n_features, d_mlp], spd [n_features, d_mlp])."""
    tw, cw = dec.target_weights(), dec.component_weights()
    W_in, W_out = tw[f"layers.{layer}.mlp_in"], tw[f"layers.{layer}.mlp_out"]  # [d_mlp, d], [d, d_mlp]
    target = (W_E @ W_out) * (W_E @ W_in.T)  # W_U[i] = W_E[i]                       [n, d_mlp]
    U, V = dec.UV(f"layers.{layer}.mlp_in")  # [d_mlp, C], [C, d]
    read = (W_E @ cw[f"layers.{layer}.mlp_out"])  # [n, d_mlp]
    spd_nc = read[:, None, :] * ((W_E @ V.T)[:, :, None] * U.T[None])  # [n, C, d_mlp]
    best = spd_nc.amax(-1).argmax(-1)  # c*(i)                                           [n]
    return target, spd_nc[torch.arange(len(best)), best]


@torch.no_grad()
def evaluate_resid_mlp(dec: spd.Decomposition, target: torch.nn.Module, out_dir: Path) -> dict:
    n_features = target.W_E.shape[0]
    ci = one_hot_ci(dec, n_features)
    out = {"in_monosemantic_fraction": monosemantic_in_fraction(ci), "out_dense_count": dense_out_count(ci)}
    out["out_alive_count"], out["out_active_fraction"] = out_activity(ci)
    out["in_monosemantic_by_layer"] = {n: float(ok.float().mean()) for n, ok in monosemantic_in_by_layer(ci).items()}
    out["in_active_per_input"] = {n: float((g > 0.1).sum(1).float().mean()) for n, g in ci.items() if n.endswith("mlp_in")}
    xs, ys = [], []
    for layer in range(len(target.layers)):
        t, s = neuron_contributions(dec, target.W_E, layer)
        xs.append(t.flatten()), ys.append(s.flatten())
    x, y = torch.cat(xs), torch.cat(ys)
    out["neuron_contribution_corr"] = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    plot_one_hot_ci(ci, out_dir / "ci_one_hot.png")
    plot_neuron_contributions(x, y, out["neuron_contribution_corr"], out_dir / "neuron_contributions.png")
    return out


def plot_one_hot_ci(ci: dict[str, torch.Tensor], path: Path, label: str = "causal importance g",
                    what: str = "subcomponent") -> None:
    """Paper Figures 8, 12, 13: CI of each subcomponent on one-hot inputs, columns permuted greedily."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(ci), figsize=(4 * len(ci), 3.6), squeeze=False)
    for ax, (name, g) in zip(axes[0], ci.items()):
        g = g.cpu()
        alive_cols = int((g > 0.1).any(0).sum())
        perm = spd.permute_to_identity(g)
        im = ax.imshow(g[:, perm][:, : max(alive_cols, g.shape[0])].numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{name} ({alive_cols} {what}s with {'g' if what == 'subcomponent' else 'value'} > 0.1)", fontsize=8)
        ax.set_xlabel(f"{what} (permuted)"), ax.set_ylabel("input feature")
        fig.colorbar(im, ax=ax, label=label)
    _save(fig, path)


def plot_neuron_contributions(x: torch.Tensor, y: torch.Tensor, corr: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x.cpu(), y.cpu(), s=3, alpha=0.5)
    lim = max(x.abs().max().item(), y.abs().max().item())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.5)
    ax.set_xlabel("target neuron contribution (eq. 11)")
    ax.set_ylabel("W_in subcomponent contribution (eq. 12)")
    ax.set_title(f"Pearson r = {corr:.3f}", fontsize=9)
    _save(fig, path)


# ================================================================================================
# C2. The APD baseline (apd.py) on the same targets
# ================================================================================================


def evaluate_apd(dec, target, tcfg: dict, batch, cfg, out_dir: Path, norm_threshold: float = 0.1) -> dict:
    """An APD run's losses on a fresh batch and, per family, APD's own measures: TMS MMCS / ML2R of
    the components (APD eq. 3, Table 1) and whether each feature has a component of its own; for
    residual MLPs the components' attributions on one-hot inputs."""
    import apd

    losses = apd.apd_losses(dec, batch, cfg)
    A, _, _ = apd.attributions(dec, batch)
    active = apd.batch_topk_mask(A, cfg.topk)
    metrics = {"eval_losses": {k: v.item() for k, v in losses.items()},
               "components_ever_active": int(active.any(0).sum())}
    if tcfg["family"] == "tms":
        metrics.update(evaluate_apd_tms(dec, out_dir, norm_threshold))
    elif tcfg["family"] == "resid_mlp":
        metrics.update(evaluate_apd_resid_mlp(dec, target, out_dir))
    return metrics


@torch.no_grad()
def evaluate_apd_tms(dec, out_dir: Path, norm_threshold: float = 0.1) -> dict:
    """MMCS / ML2R of linear1's W against the components' linear1 matrices (over all C, and over those
    of norm > norm_threshold), the number of such large components, features with a component of
    their own, and the figure: W, the sum, the largest components (5-2: columns as arrows)."""
    import apd

    W = dec.target_weights()["linear1"]
    P = dec.component_matrices()["linear1"]  # [C, d_out, d_in]
    norms = apd.component_norms(dec, "linear1")
    large = norms > norm_threshold
    mmcs, ml2r = spd.mmcs_ml2r_matrices(W, P)
    mmcs_large, ml2r_large = spd.mmcs_ml2r_matrices(W, P[large]) if large.any() else (float("nan"),) * 2
    out = {"mmcs": mmcs, "ml2r": ml2r, "mmcs_large": mmcs_large, "ml2r_large": ml2r_large,
           "linear1/n_large_components": int(large.sum()), "linear1/top_norms": sorted(norms.tolist(), reverse=True)[:6],
           "features_with_own_component": features_with_own_component(W, P[large])}
    for name in (n for n in dec.names if n.startswith("hidden_layers")):
        n_norms = apd.component_norms(dec, name)
        out[f"{name}/n_large_components"] = int((n_norms > norm_threshold).sum())
        out[f"{name}/top_norms"] = sorted(n_norms.tolist(), reverse=True)[:6]
    order = norms.argsort(descending=True)[:8]
    panels = [("target W", W), ("sum of components", P.sum(0)), *((f"component {int(c)}", P[c]) for c in order)]
    plot_matrix_panels(panels, out_dir / "tms_components.png", arrows=True)
    return out


def evaluate_apd_resid_mlp(dec, target, out_dir: Path, value: float = 0.75) -> dict:
    """On one-hot inputs x = value e_i: the attributions A_c (normalised per input, figure), the
    fraction of features whose most attributed component is the most attributed of no other feature
    (APD's analogue of one W_in subcomponent per feature), and the MSE of the forward pass with only
    that one component active against the target's (APD paper Figure 16, top)."""
    import apd

    n = target.W_E.shape[0]
    x = torch.eye(n, device=target.W_E.device) * value
    A, target_out, _ = apd.attributions(dec, x)  # [n, C]
    top = A.argmax(1)
    own = torch.bincount(top, minlength=dec.C)[top] == 1
    with torch.no_grad():
        out_top1, _ = dec(x, torch.nn.functional.one_hot(top, dec.C).bool())
        mse = ((out_top1 - target_out) ** 2).mean(1)  # [n]
    A_norm = A / A.max(1, keepdim=True).values.clamp_min(1e-30)
    plot_one_hot_ci({"attribution / its max per input": A_norm}, out_dir / "attributions_one_hot.png",
                    label="attribution (normalised per input)", what="component")
    return {"in_monosemantic_fraction": float(own.float().mean()), "components_top_for_some_feature": int(top.unique().numel()),
            "top1_mse_one_hot": float(mse.mean()), "top1_mse_one_hot_max": float(mse.max())}


# ================================================================================================
# D. Induction-head model (transformer paper §6.1: Table 1, Figure 2, appendix Algorithm 2)
# ================================================================================================
# Matrices are named blocks.{l}.attn.{q,k,v,out}_proj; the paper writes Q_l, K_l, V_l (no O rows).
# "Active" means lower-leaky CI g > threshold (the paper gives no threshold; g has exact zeros, so
# 0 is the natural one, and 0.1 is reported beside it). KLs are KL(target || model) at the last
# position, as the decomposition was trained ("Last Token Only").

# Table 1a (s1, m, s2, random) and 1b (total unique) as printed in the paper.
PAPER_TABLE1 = {
    "Q_0": ((0.000, 1.000, 0.000, 0.001), 1),
    "K_0": ((1.000, 0.050, 0.000, 0.183), 1),
    "V_0": ((1.000, 0.000, 0.000, 0.000), 1),
    "Q_1": ((0.000, 0.000, 1.000, 0.000), 1),
    "K_1": ((0.000, 1.000, 0.000, 0.000), 1),
    "V_1": ((0.000, 5.053, 0.000, 0.000), 11),
}
PAPER_TOTAL_UNIQUE = 16
PAPER_TABLE1C = {"faithfulness": 3e-9, "recon": 1e-4, "recon_layerwise": 1e-4,
                 "attn_kl_layer0": 0.385, "attn_kl_layer1": 0.002, "attn_kl_mean": 0.194}
POSITION_CLASSES = ("s1", "m", "s2", "random")
DEFAULT_TAUS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def paper_label(name: str) -> str:
    """blocks.0.attn.q_proj -> Q_0 (the paper's notation); other names are returned unchanged."""
    hit = re.fullmatch(r"blocks\.(\d+)\.attn\.(q|k|v|out)_proj", name)
    return f"{dict(q='Q', k='K', v='V', out='O')[hit[2]]}_{hit[1]}" if hit else name


def _device(dec: spd.Decomposition) -> torch.device:
    return next(iter(dec.target_weights().values())).device


# --- Table 1a, 1b ----------------------------------------------------------------------------------


def position_classes(s1_pos: torch.Tensor, S: int) -> dict[str, torch.Tensor]:
    """Boolean masks [B, S] of Table 1's position classes: s1, m = s1 + 1, s2 = S - 1 (the last
    position), bos = 0, and random = every other position."""
    if ((s1_pos < 1) | (s1_pos > S - 3)).any():
        raise ValueError(f"s1 positions must lie in [1, {S - 3}] (after BOS, before m and s2), got {s1_pos.tolist()}")
    n = torch.arange(S, device=s1_pos.device)[None, :]  # [1, S]
    s1, m = n == s1_pos[:, None], n == s1_pos[:, None] + 1  # [B, S]
    s2, bos = (n == S - 1).expand_as(s1), (n == 0).expand_as(s1)  # [B, S]
    return {"s1": s1, "m": m, "s2": s2, "random": ~(s1 | m | s2 | bos), "bos": bos}


def table1_counts(ci: dict[str, torch.Tensor], s1_pos: torch.Tensor, threshold: float = 0.0) -> dict:
    """Table 1a and 1b from CIs g [B, S, C] per matrix.

    avg_active[name][cls] = mean over the (example, position) pairs of class cls of
    |{c : g_c > threshold}|: one position per example for s1, m, s2 (and bos, not in the paper), a
    per-position average for random. total_unique[name] = |{c : g_c > threshold at any position of
    any example}| (BOS included); total_unique_sum is their sum (the paper's 16).
    """
    S = next(iter(ci.values())).shape[1]
    classes = position_classes(s1_pos, S)
    avg, unique = {}, {}
    for name, g in ci.items():
        active = g > threshold  # [B, S, C]
        n_active = active.sum(-1).float()  # [B, S]
        avg[name] = {k: float(n_active[mask].mean()) if mask.any() else float("nan") for k, mask in classes.items()}
        unique[name] = int(active.reshape(-1, active.shape[-1]).any(0).sum())
    return {"threshold": threshold, "avg_active": avg, "total_unique": unique,
            "total_unique_sum": sum(unique.values())}


@torch.no_grad()
def induction_table1(dec: spd.Decomposition, tokens: torch.Tensor, s1_pos: torch.Tensor,
                     threshold: float = 0.0) -> dict:
    """Table 1a, 1b of the decomposition on tokens [B, S] (s1_pos [B] from models.induction_batch)."""
    ci, _ = dec.causal_importance(dec.target_forward(tokens)[1])
    return table1_counts(ci, s1_pos, threshold)


def spd_counts(ci: dict[str, torch.Tensor], threshold: float = 0.0) -> dict[str, float]:
    """SPD's size for Figure 2, from g [B, S, C] per matrix. total_unique = Σ_l |{c active anywhere}|;
    mean_per_example = mean over examples b of Σ_l |{c active at some position of b}|."""
    per_example = sum((g > threshold).any(1).sum(-1).float() for g in ci.values())  # [B]
    total = sum(int((g > threshold).reshape(-1, g.shape[-1]).any(0).sum()) for g in ci.values())
    return {"total_unique": total, "mean_per_example": float(per_example.mean())}


# --- Table 1c ----------------------------------------------------------------------------------------


def attention_pattern_kl(A_target: torch.Tensor, A_model: torch.Tensor) -> torch.Tensor:
    """D_KL Attn of one layer: mean over batch and query rows n of
    KL(A_target[n, :] || A_model[n, :]) = Σ_{j <= n} A_t[n, j] (log A_t[n, j] - log A_m[n, j]).
    A_* [B, S, S] causal patterns. Keys j > n are skipped (both are 0 there), 0 log 0 = 0, and A_m
    is floored at the dtype's smallest normal number so a key the model's softmax underflows to 0
    gives a large finite term instead of inf."""
    S = A_target.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=A_target.device).tril()  # [S, S]
    keep = causal & (A_target > 0)  # [B, S, S]
    log_t = torch.where(keep, A_target, 1.0).log()  # [B, S, S]
    log_m = A_model.clamp_min(torch.finfo(A_model.dtype).tiny).log()  # [B, S, S]
    terms = torch.where(keep, A_target * (log_t - log_m), 0.0)  # [B, S, S]
    return terms.sum(-1).mean()


@torch.no_grad()
def attention_kl(dec: spd.Decomposition, tokens: torch.Tensor, ci: dict[str, torch.Tensor]) -> dict[str, float]:
    """Table 1c D_KL Attn: per layer attention_pattern_kl(target, CI-masked model), and their mean.
    The CI-masked model is L_recon's: every decomposed matrix masked by ci (lower-leaky g); the
    target must be called as target(tokens, return_attn=True) -> (logits, [A_l [B, S, S]])."""
    _, A_target = dec.target(tokens, return_attn=True)
    with dec.replaced(ci):
        _, A_model = dec.target(tokens, return_attn=True)
    per_layer = [float(attention_pattern_kl(a, b)) for a, b in zip(A_target, A_model)]
    return {**{f"layer{l}": v for l, v in enumerate(per_layer)}, "mean": sum(per_layer) / len(per_layer)}


@torch.no_grad()
def table1c_losses(dec: spd.Decomposition, tokens: torch.Tensor, ci: dict[str, torch.Tensor]) -> dict[str, float]:
    """Table 1c: L_faithful (eq. 2), L_recon and L_recon_layerwise (CI-masked, D = KL at the last
    position), with spd.py's own loss functions. L_recon_layerwise is the mean of its per-matrix terms
    ("recon_layerwise:NAME": spd.recon_loss with only that matrix masked by g, also returned, since they
    show which matrix fails alone), i.e. spd.recon_layerwise_loss without running its passes twice."""
    D = spd.make_divergence("kl", last_token_only=True)
    target_out = dec.target(tokens)  # [B, S, vocab]
    per = {n: float(spd.recon_loss(dec, tokens, target_out, {n: ci[n]}, D)) for n in dec.names}
    return {"faithfulness": float(spd.faithfulness_loss(dec.target_weights(), dec.component_weights())),
            "recon": float(spd.recon_loss(dec, tokens, target_out, ci, D)),
            "recon_layerwise": sum(per.values()) / len(per),
            **{f"recon_layerwise:{n}": v for n, v in per.items()}}


# --- Appendix Algorithm 2: greedy rank-1 SVD pruning ------------------------------------------------


@contextmanager
def run_with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """Within the block, module `name` of `model` has weight W = weights[name] [d_out, d_in]
    (nn.Linear layout; spd.linear_weight is the view that transposes HF Conv1D storage). The
    original weights are restored on exit, also after an exception."""
    new = {n: W.detach().clone() for n, W in weights.items()}  # no aliasing with what is overwritten
    views = {n: spd.linear_weight(model.get_submodule(n)) for n in new}
    for n, W in new.items():
        if W.shape != views[n].shape:
            raise ValueError(f"weight for {n} has shape {tuple(W.shape)}, the module's is {tuple(views[n].shape)} [d_out, d_in]")
    saved = {n: v.detach().clone() for n, v in views.items()}
    try:
        with torch.no_grad():
            for n, W in new.items():
                views[n].copy_(W)
        yield model
    finally:
        with torch.no_grad():
            for n, W in saved.items():
                views[n].copy_(W)


def truncate_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> torch.Tensor:
    """Rank-r truncation Σ_{k<r} S_k U[:, k] Vh[k] of W = U diag(S) Vh (S descending).  [d_out, d_in]"""
    return (U[:, :r] * S[:r]) @ Vh[:r]


def svd_prune_path(weights: dict[str, torch.Tensor], loss_fn: Callable[[dict[str, torch.Tensor]], float],
                   tau: float = math.inf, progress: bool = False) -> list[dict]:
    """Appendix Algorithm 2, recording each accepted step. Every round, for each matrix i of
    remaining rank > 0 form W'_i by dropping its smallest remaining singular triple, evaluate
    L_i = loss_fn(all current weights with W_i -> W'_i) (cumulative: earlier truncations stay), pick
    j = argmin L_i; accept if L_j <= tau, else stop. Returns one dict per accepted step: matrix,
    ranks (after the step), loss. Ranks start at min(d_out, d_in); untouched matrices keep their
    exact weights. Note: the paper's pseudocode indents "pick j" inside the for loop; it belongs
    after it (otherwise j is not the argmin)."""
    current = {n: W.detach().clone() for n, W in weights.items()}
    svd = {n: torch.linalg.svd(W, full_matrices=False) for n, W in current.items()}
    ranks = {n: int(S.numel()) for n, (_, S, _) in svd.items()}
    steps = []
    bar = tqdm(total=sum(ranks.values()), desc="Figure 2: greedy SVD pruning (ranks dropped)", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    while any(ranks.values()):
        losses = {}
        for n in current:
            if ranks[n] > 0:
                losses[n] = float(loss_fn({**current, n: truncate_svd(*svd[n], ranks[n] - 1)}))
        j = min(losses, key=losses.get)
        if not losses[j] <= tau:
            break
        ranks[j] -= 1
        current[j] = truncate_svd(*svd[j], ranks[j])
        steps.append({"matrix": j, "ranks": dict(ranks), "loss": losses[j]})
        bar.update()
    bar.close()
    return steps


def svd_prune(weights: dict[str, torch.Tensor], loss_fn: Callable[[dict[str, torch.Tensor]], float],
              tau: float) -> tuple[dict[str, int], float]:
    """Algorithm 2 with tolerance tau: (rank kept per matrix, final loss; 0 when nothing is pruned)."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    steps = svd_prune_path(weights, loss_fn, tau)
    if not steps:
        return {n: min(W.shape) for n, W in weights.items()}, 0.0
    return steps[-1]["ranks"], steps[-1]["loss"]


def prune_at(steps: list[dict], weights: dict[str, torch.Tensor], tau: float) -> tuple[dict[str, int], float]:
    """svd_prune's answer for tau, read off a path computed with a larger tolerance: the greedy choices
    do not depend on tau, so the run with tau stops at the first recorded loss above tau."""
    ranks, loss = {n: min(W.shape) for n, W in weights.items()}, 0.0
    for step in steps:
        if step["loss"] > tau:
            break
        ranks, loss = step["ranks"], step["loss"]
    return ranks, loss


def last_token_kl_fn(target: torch.nn.Module, tokens: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], float]:
    """Algorithm 2's L for the induction model: weights -> KL(target || pruned) at the last position."""
    D = spd.make_divergence("kl", last_token_only=True)
    with torch.no_grad():
        target_logits = target(tokens)  # [B, S, vocab]

    @torch.no_grad()
    def loss_fn(weights: dict[str, torch.Tensor]) -> float:
        with run_with_weights(target, weights):
            return float(D(target(tokens), target_logits))

    return loss_fn


# --- Figure 2 ------------------------------------------------------------------------------------------


@torch.no_grad()
def figure2(dec: spd.Decomposition, target: torch.nn.Module, tokens: torch.Tensor, taus=DEFAULT_TAUS,
            out_path: Path | None = None, progress: bool = False) -> dict:
    """Figure 2: greedy SVD pruning (total retained rank Σ_i rank_i vs final-position KL, one point per
    tau) against SPD at two sizes, each with its L_recon KL: the total unique active subcomponents
    (g > 0 anywhere on the batch) and the mean per example. `target` is dec.target."""
    weights = {n: W.detach().clone() for n, W in dec.target_weights().items()}
    steps = svd_prune_path(weights, last_token_kl_fn(target, tokens), max(taus), progress)
    svd = []
    for tau in taus:
        ranks, loss = prune_at(steps, weights, tau)
        svd.append({"tau": tau, "total_rank": sum(ranks.values()), "kl": loss, "ranks": ranks})
    ci, _ = dec.causal_importance(dec.target_forward(tokens)[1])
    counts = spd_counts(ci)
    recon = float(spd.recon_loss(dec, tokens, target(tokens), ci, spd.make_divergence("kl", last_token_only=True)))
    out = {"svd": svd, "svd_path": [(sum(s["ranks"].values()), s["loss"]) for s in steps],
           "full_rank": sum(min(W.shape) for W in weights.values()),
           "spd_total_unique": counts["total_unique"], "spd_mean_per_example": counts["mean_per_example"],
           "spd_recon_kl": recon}
    if out_path is not None:
        plot_figure2(out, out_path)
    return out


def plot_figure2(fig2: dict, path: Path) -> None:
    plt = _plt()
    floor = 1e-12  # log axis: a loss of exactly 0 is drawn at the floor
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if fig2["svd_path"]:
        r, kl = zip(*fig2["svd_path"])
        ax.plot(r, [max(k, floor) for k in kl], "-", color="C0", lw=0.8, alpha=0.6, label="greedy SVD path")
    ax.plot([s["total_rank"] for s in fig2["svd"]], [max(s["kl"], floor) for s in fig2["svd"]], "o", color="C0",
            label="greedy SVD, one point per τ")
    kl = max(fig2["spd_recon_kl"], floor)
    ax.plot([fig2["spd_total_unique"]], [kl], "*", ms=14, color="C3", label="SPD: total unique subcomponents")
    ax.plot([fig2["spd_mean_per_example"]], [kl], "P", ms=10, color="C2", label="SPD: mean active per example")
    ax.set_yscale("log")
    ax.set_xlabel(f"rank-1 pieces kept (full rank {fig2['full_rank']})")
    ax.set_ylabel("KL(target || model), last position")
    ax.legend(fontsize=7)
    ax.set_title("SPD vs greedy SVD pruning (Figure 2)", fontsize=9)
    _save(fig, path)


# --- Figures of Table 1 and the attention patterns -----------------------------------------------------


def plot_table1(table: dict, path: Path) -> None:
    """Table 1a as an annotated heatmap (matrices x position classes) beside Table 1b's counts."""
    plt = _plt()
    names = list(table["avg_active"])
    vals = torch.tensor([[table["avg_active"][n][k] for k in POSITION_CLASSES] for n in names])  # [L, 4]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.5, 0.45 * len(names) + 1.5), gridspec_kw={"width_ratios": [3, 1.3]})
    ax.imshow(vals.numpy(), cmap="Blues", aspect="auto", vmin=0, vmax=max(1.0, float(vals.max())))
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            ax.text(j, i, f"{vals[i, j]:.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(POSITION_CLASSES)), POSITION_CLASSES)
    ax.set_yticks(range(len(names)), [paper_label(n) for n in names])
    ax.set_title(f"average active subcomponents (g > {table['threshold']})", fontsize=9)
    bx.barh(range(len(names)), [table["total_unique"][n] for n in names])
    bx.set_yticks(range(len(names)), [])
    bx.invert_yaxis()
    bx.set_title(f"total unique (sum {table['total_unique_sum']})", fontsize=9)
    _save(fig, path)


@torch.no_grad()
def plot_attention(dec: spd.Decomposition, tokens: torch.Tensor, ci: dict[str, torch.Tensor], s1: int, path: Path) -> None:
    """Attention patterns of one example (tokens [1, S]), target vs CI-masked model, per layer."""
    plt = _plt()
    _, A_t = dec.target(tokens, return_attn=True)
    with dec.replaced(ci):
        _, A_m = dec.target(tokens, return_attn=True)
    L = len(A_t)
    fig, axes = plt.subplots(L, 2, figsize=(7, 3.4 * L), squeeze=False)
    for l in range(L):
        for ax, A, who in ((axes[l, 0], A_t[l], "target"), (axes[l, 1], A_m[l], "CI-masked")):
            ax.imshow(A[0].cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            for pos, lab, side in ((s1, "s1", "right"), (s1 + 1, "m", "left")):  # adjacent: one label each side
                ax.axvline(pos, color="w", lw=0.5, ls=":")
                ax.text(pos + (0.6 if side == "left" else -0.6), -1, lab, ha=side, fontsize=7)
            ax.set_title(f"layer {l} ({who})", fontsize=9)
            ax.set_xlabel("key"), ax.set_ylabel("query")
    _save(fig, path)


# --- All of §6.1 --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_induction(dec: spd.Decomposition, target: torch.nn.Module, cfg: spd.SPDConfig, out_dir: Path,
                       n_eval: int = 1024, seed: int = 0, taus=DEFAULT_TAUS, progress: bool = False) -> dict:
    """Table 1 (a, b at thresholds 0 and 0.1; c), Figure 2 and the attention patterns of the first
    example, on n_eval fresh sequences of the target (a models.InductionTransformer; target is
    dec.target). Table 1c always uses KL at the last position (the paper's setting); cfg (the run's
    SPDConfig) is recorded so a run trained with another D is visible. Writes table1.png,
    attention_patterns.png, figure2.png and table1.md into out_dir."""
    if n_eval < 1:
        raise ValueError(f"n_eval must be positive, got {n_eval}")
    out_dir = Path(out_dir)
    device = _device(dec)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens, _, s1_pos = models.induction_batch(n_eval, target.seq_len, target.vocab_size - 2, gen, device)  # [B, S], [B]
    ci, _ = dec.causal_importance(dec.target_forward(tokens)[1])
    table1c = table1c_losses(dec, tokens, ci)
    table1c.update({f"attn_kl_{k}": v for k, v in attention_kl(dec, tokens, ci).items()})
    out = {"n_eval": n_eval, "trained_with": {"output_loss": cfg.output_loss, "last_token_only": cfg.last_token_only},
           "table1_t0": table1_counts(ci, s1_pos, 0.0), "table1_t0.1": table1_counts(ci, s1_pos, 0.1),
           "table1c": table1c, "figure2": figure2(dec, target, tokens, taus, out_dir / "figure2.png", progress)}
    plot_table1(out["table1_t0"], out_dir / "table1.png")
    plot_attention(dec, tokens[:1], {n: g[:1] for n, g in ci.items()}, int(s1_pos[0]), out_dir / "attention_patterns.png")
    (out_dir / "table1.md").write_text(results_table1_markdown(out))
    return out


def _ours_paper(ours: float, paper: float | None, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(ours)} ({'–' if paper is None else fmt.format(paper)})"


def results_table1_markdown(metrics: dict, key: str = "table1_t0") -> str:
    """The paper's Table 1 as Markdown, each cell "ours (paper)"; metrics from evaluate_induction."""
    table = metrics[key]
    lines = [f"**Table 1a, 1b** (active: g > {table['threshold']}; cells: ours (paper))", "",
             "| Matrix | s1 | m | s2 | random | Total unique |", "|---|---|---|---|---|---|"]
    for name, row in table["avg_active"].items():
        label = paper_label(name)
        paper, paper_unique = PAPER_TABLE1.get(label, ((None,) * 4, None))
        cells = [_ours_paper(row[k], p) for k, p in zip(POSITION_CLASSES, paper)]
        unique = f"{table['total_unique'][name]} ({'–' if paper_unique is None else paper_unique})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {unique} |")
    lines.append(f"| **Total** | | | | | {table['total_unique_sum']} ({PAPER_TOTAL_UNIQUE}) |")
    lines += ["", "**Table 1c**", "", "| Metric | ours | paper |", "|---|---|---|"]
    rows = [("L_faithful", "faithfulness"), ("L_recon", "recon"), ("L_recon_layerwise", "recon_layerwise"),
            ("D_KL Attn (Layer 1)", "attn_kl_layer0"), ("D_KL Attn (Layer 2)", "attn_kl_layer1"),
            ("D_KL Attn (Mean)", "attn_kl_mean")]
    for label, k in rows:
        lines.append(f"| {label} | {metrics['table1c'][k]:.3g} | {PAPER_TABLE1C[k]:.3g} |")
    per = [f"{paper_label(k.split(':', 1)[1])} {v:.3g}" for k, v in metrics["table1c"].items() if k.startswith("recon_layerwise:")]
    if per:
        lines += ["", "L_recon_layerwise per matrix (only that matrix masked by g): " + ", ".join(per)]
    return "\n".join(lines) + "\n"


# ================================================================================================
# E. GPT-2 (transformer paper §5.2, §6.2, appendix A.3)
# ================================================================================================
# The target is models.GPT2Logits (tokens -> logits; matrices model.transformer.h.{i}.{attn.c_attn,
# attn.c_proj, mlp.c_fc, mlp.c_proj}), decomposed over the two PROMPTS. Prompts are right-padded
# with EOS; causal attention keeps real positions unaffected, and `valid` masks the padding out of
# every statistic.

PROMPTS = ["Kobe Bryant plays the sport of basketball", "Tiger Woods plays the sport of golf"]
PAPER_GPT2 = {"n_active_total": 96, "unique_layer0_mlp": [2, 1]}  # §6.2: "obe", "Bryant" / "Woods"

# Appendix A.3.4, Figure 10: the 30 printed facts of the 100-fact GPT-5 set (the other 70 are not
# published). Copied verbatim, including the paper's typo "New City" (for New York City).
FACTS = [
    "Serena Williams is a professional tennis player",
    "The Great Wall of China is in China",
    "The Mona Lisa was painted by Leonardo da Vinci",
    "Mount Everest is the tallest mountain on Earth",
    "The Eiffel Tower is located in Paris France",
    "Usain Bolt is the fastest man in the world",
    "The Pacific Ocean is the largest ocean on Earth",
    "Albert Einstein developed the theory of relativity",
    "J.K. Rowling wrote the Harry Potter series",
    "The Amazon River flows through South America",
    "William Shakespeare wrote Romeo and Juliet",
    "Beethoven composed the Fifth Symphony",
    "The Sahara Desert is in Africa",
    "Apple Inc. was founded by Steve Jobs Steve Wozniak and Ronald Wayne",
    "The sun is a star",
    "The Beatles were a British rock band",
    "Cristiano Ronaldo is a professional soccer player",
    "The Statue of Liberty is in New City",  # sic
    "Pablo Picasso was a famous painter",
    "The Nile is the longest river in the world",
    "Charles Darwin developed the theory of evolution",
    "Google was founded in 1998",
    "The Taj Mahal is in India",
    "The Titanic sank in 1912",
    "Jane Austen wrote Pride and Prejudice",
    "The Moon orbits the Earth",
    "Mount Kilimanjaro is in Tanzania",
    "The Leaning Tower of Pisa is in Italy",
    "Walt Disney created Mickey Mouse",
    "Vincent van Gogh painted Starry Night",
]


def tokenize_prompts(tokenizer, sentences: list[str], bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, S] long, right-padded with the tokenizer's EOS id, and valid [B, S] bool (False on
    padding). bos prepends tokenizer.bos_token_id (the paper does not say; off by default)."""
    if not sentences:
        raise ValueError("sentences must be a non-empty list of strings, got an empty list")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no eos_token_id to pad with")
    ids = [([tokenizer.bos_token_id] if bos else []) + list(tokenizer.encode(s)) for s in sentences]
    for s, i in zip(sentences, ids):
        if len(i) < 2:
            raise ValueError(f"each sentence needs at least 2 tokens (a prefix and an answer), got {s!r} -> {i}")
    S = max(len(i) for i in ids)
    tokens = torch.full((len(ids), S), tokenizer.eos_token_id, dtype=torch.long)  # [B, S]
    valid = torch.zeros(len(ids), S, dtype=torch.bool)  # [B, S]
    for b, i in enumerate(ids):
        tokens[b, : len(i)] = torch.tensor(i)
        valid[b, : len(i)] = True
    return tokens, valid


@torch.no_grad()
def unique_subcomponents(dec: spd.Decomposition, tokens: torch.Tensor, valid: torch.Tensor,
                         threshold: float = 0.0) -> dict:
    """Subcomponents active (g > threshold at some valid position) on exactly one example.

    Returns n_active_total = |∪ over examples, positions, matrices of active (matrix, c)| (the
    paper's "96 active subcomponents in total"), n_active[name], and unique[b] = {name: [{"c": c,
    "positions": [n, ...]}]}: the subcomponents active on example b and on no other example, with
    the positions where they fire; n_unique[b] counts them.
    """
    ci, _ = dec.causal_importance(dec.target_forward(tokens)[1])
    B = tokens.shape[0]
    out = {"threshold": threshold, "n_active": {}, "unique": [{} for _ in range(B)], "n_unique": [0] * B}
    for name, g in ci.items():
        active = (g > threshold) & valid[..., None]  # [B, S, C]
        on_example = active.any(1)  # [B, C]
        out["n_active"][name] = int(on_example.any(0).sum())
        only_here = on_example & (on_example.sum(0, keepdim=True) == 1)  # [B, C]
        for b, c in only_here.nonzero().tolist():
            positions = active[b, :, c].nonzero()[:, 0].tolist()
            out["unique"][b].setdefault(name, []).append({"c": c, "positions": positions})
            out["n_unique"][b] += 1
    out["n_active_total"] = sum(out["n_active"].values())
    return out


def project_out(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Transformer paper §5.2's suppression edit in nn.Linear layout, W [d_out, d_in]:

        W <- W - Σ_k (û_k^T W v̂_k) û_k v̂_k^T,   û_k = u_k / |u_k|,  v̂_k = v_k / |v_k|

    u [d_out, K] the write vectors (U[:, c]), v [K, d_in] the read vectors (V[c]). Note: the paper
    writes W in x W layout, where its û reads and v̂ writes; this is the same edit transposed. All
    K coefficients use the unedited W (the paper's sum), which is an exact projection only when the
    directions are orthogonal."""
    u_hat, v_hat = F.normalize(u, dim=0), F.normalize(v, dim=1)  # [d_out, K], [K, d_in]
    coef = torch.einsum("ok,oi,ki->k", u_hat, W, v_hat)  # û_k^T W v̂_k      [K]
    return W - (u_hat * coef) @ v_hat  # [d_out, d_in]


def _edit_directions(model_or_dec, name: str, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [d_out, K], v [K, d_in]) for one matrix: a (u, v) pair given directly, or subcomponent
    indices c of a Decomposition."""
    if isinstance(spec, tuple) and len(spec) == 2 and all(torch.is_tensor(t) for t in spec):
        return spec
    if not isinstance(model_or_dec, spd.Decomposition):
        raise ValueError(f"edits for {name} are subcomponent indices {spec}; those need a Decomposition, "
                         f"got a {type(model_or_dec).__name__} (pass (u, v) directions instead)")
    cs = [int(c) for c in spec]
    U, V = model_or_dec.UV(name)
    if len(set(cs)) != len(cs) or any(not 0 <= c < U.shape[1] for c in cs):
        raise ValueError(f"edits for {name} must be distinct subcomponent indices in [0, {U.shape[1]}), got {cs}")
    return U[:, cs].detach(), V[cs].detach()


@contextmanager
def suppress(model_or_dec, edits: dict):
    """Within the block, the ORIGINAL target weights carry project_out's edit: for each matrix name,
    edits[name] is a list of subcomponent indices c (model_or_dec a Decomposition: û from U[:, c],
    v̂ from V[c]) or a (u [d_out, K], v [K, d_in]) pair. Weights are restored on exit. Forward
    passes of the target (dec.target or the model) inside the block see the edit."""
    model = model_or_dec.target if isinstance(model_or_dec, spd.Decomposition) else model_or_dec
    new = {}
    for name, spec in edits.items():
        if isinstance(spec, (list, tuple)) and len(spec) == 0:
            continue
        W = spd.linear_weight(model.get_submodule(name)).detach()  # [d_out, d_in]
        u, v = _edit_directions(model_or_dec, name, spec)
        new[name] = project_out(W, u.to(W), v.to(W))
    with run_with_weights(model, new):
        yield model


def _logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens -> logits for a GPT2Logits wrapper (or any tokens -> logits module) or a raw HF model."""
    if hasattr(model, "transformer"):  # HF GPT2LMHeadModel
        return lambda tokens: model(input_ids=tokens).logits
    return model


def _hf_gpt2(model: torch.nn.Module) -> torch.nn.Module:
    """The HF GPT2LMHeadModel inside a GPT2Logits wrapper (or the model itself)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "transformer"):
        raise ValueError(f"expected a HF GPT2LMHeadModel or models.GPT2Logits, got {type(model).__name__}")
    return inner


@torch.no_grad()
def next_token_prob(model_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, valid: torch.Tensor,
                    answer_ids: torch.Tensor | None = None) -> torch.Tensor:
    """P(answer_b | prefix) for each sentence b: softmax of the logits at the position before the
    final valid token, read at answer_ids[b] (default: the final valid token itself).  [B]"""
    B, S = tokens.shape
    length = valid.sum(1)  # [B]
    if not torch.equal(valid, torch.arange(S, device=valid.device)[None, :] < length[:, None]):
        raise ValueError("valid must mark a prefix of each row (right padding)")
    if (length < 2).any():
        raise ValueError(f"each sentence needs >= 2 valid tokens, got lengths {length.tolist()}")
    rows = torch.arange(B, device=tokens.device)
    answer = tokens[rows, length - 1] if answer_ids is None else answer_ids  # [B]
    logits = model_fn(tokens)[rows, length - 2]  # [B, vocab]
    return logits.float().softmax(-1)[rows, answer]


@torch.no_grad()
def fact_suppression(dec: spd.Decomposition, edits: dict, tokens: torch.Tensor, valid: torch.Tensor,
                     fact_tokens: torch.Tensor, fact_valid: torch.Tensor) -> dict:
    """Figure 3: P(answer) on the decomposed prompts and on the FACTS set, before and after
    suppress(dec, edits). drop = P_before - P_after; facts_* are means over the fact set."""
    model_fn = _logits_fn(dec.target)
    p0, f0 = next_token_prob(model_fn, tokens, valid), next_token_prob(model_fn, fact_tokens, fact_valid)
    with suppress(dec, edits):
        p1, f1 = next_token_prob(model_fn, tokens, valid), next_token_prob(model_fn, fact_tokens, fact_valid)
    return {"p_before": p0.tolist(), "p_after": p1.tolist(), "drop": (p0 - p1).tolist(),
            "facts_p_before_mean": float(f0.mean()), "facts_p_after_mean": float(f1.mean()),
            "facts_drop_mean": float((f0 - f1).mean()), "facts_rel_drop_mean": float(((f0 - f1) / f0).mean())}


@torch.no_grad()
def zero_mlp_layers(model: torch.nn.Module, tokens: torch.Tensor, valid: torch.Tensor,
                    answer_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Figure 9: P(answer) with block i's whole MLP output set to 0 (a forward hook on
    transformer.h.{i}.mlp, so c_proj's bias goes too), for each block i.  [n_layer, B]"""
    hf = _hf_gpt2(model)
    model_fn = _logits_fn(model)
    probs = []
    for block in hf.transformer.h:
        hook = block.mlp.register_forward_hook(lambda mod, args, output: torch.zeros_like(output))
        try:
            probs.append(next_token_prob(model_fn, tokens, valid, answer_ids))
        finally:
            hook.remove()
    return torch.stack(probs)  # [n_layer, B]


def _edits_of(unique: dict[str, list[dict]], pattern: str = "*") -> dict[str, list[int]]:
    """{name: [c, ...]} of one example's unique subcomponents in matrices matching the glob."""
    return {n: [d["c"] for d in ds] for n, ds in unique.items() if fnmatch.fnmatchcase(n, pattern)}


@torch.no_grad()
def evaluate_gpt2(dec: spd.Decomposition, target: torch.nn.Module, tokenizer, out_dir: Path,
                  sentences: list[str] = PROMPTS, threshold: float = 0.0, max_single: int = 16,
                  progress: bool = False) -> dict:
    """§6.2 on the decomposed prompts: active and unique subcomponents; Figure 3 (suppressing each
    prompt's unique subcomponents, all of them and those in the layer-0 MLP, vs the FACTS set);
    Figure 4 (prompt 0's unique slices one at a time, and all together); Figure 9 (zeroing each
    MLP). target is dec.target (GPT2Logits). Writes figure3.png, figure4.png, figure9.png."""
    out_dir = Path(out_dir)
    device = _device(dec)
    tokens, valid = (t.to(device) for t in tokenize_prompts(tokenizer, sentences))
    fact_tokens, fact_valid = (t.to(device) for t in tokenize_prompts(tokenizer, FACTS))
    model_fn = _logits_fn(target)
    uniq = unique_subcomponents(dec, tokens, valid, threshold)
    for b, per_name in enumerate(uniq["unique"]):  # name the tokens the unique subcomponents fire on
        for ds in per_name.values():
            for d in ds:
                d["tokens"] = [tokenizer.decode([int(tokens[b, n])]) for n in d["positions"]]
    out = {"sentences": sentences, "paper": PAPER_GPT2, **uniq,
           "p_full": next_token_prob(model_fn, tokens, valid).tolist(), "suppression": {}}

    # Figure 3: one group per (prompt, edit set)
    groups = [(b, label, pattern) for b in range(len(sentences)) for label, pattern in (("all", "*"), ("layer0_mlp", "*h.0.mlp.*"))]
    for b, label, pattern in tqdm(groups, desc="Figure 3: suppressing unique subcomponents", disable=not progress):
        edits = _edits_of(uniq["unique"][b], pattern)
        if edits:
            out["suppression"][f"prompt{b}_{label}"] = {
                "edits": edits, **fact_suppression(dec, edits, tokens, valid, fact_tokens, fact_valid)}

    # Figure 4: prompt 0's unique slices one at a time
    singles = []
    one_by_one = [(name, d) for name, ds in uniq["unique"][0].items() for d in ds]
    for name, d in tqdm(one_by_one, desc="Figure 4: one slice at a time", disable=not progress):
        with suppress(dec, {name: [d["c"]]}):
            p = float(next_token_prob(model_fn, tokens[:1], valid[:1]))
        singles.append({"matrix": name, "c": d["c"], "tokens": d["tokens"], "p": p})
    out["single_slices"] = sorted(singles, key=lambda s: s["p"])

    # Figure 9
    out["zero_mlp"] = zero_mlp_layers(target, tokens, valid).T.tolist()  # [B][n_layer]
    plot_figure3(out, out_dir / "figure3.png")
    plot_figure4(out, out_dir / "figure4.png", max_single)
    plot_figure9(out, out_dir / "figure9.png")
    return out


def plot_figure3(res: dict, path: Path) -> None:
    """Drop in P(answer) on each prompt and the mean drop over FACTS, per suppressed set."""
    plt = _plt()
    groups = list(res["suppression"])
    B = len(res["sentences"])
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(groups) + 2), 3.4))
    width = 0.8 / (B + 1)
    for i in range(B + 1):
        vals = [res["suppression"][g]["drop"][i] if i < B else res["suppression"][g]["facts_drop_mean"] for g in groups]
        label = f"prompt {i}: {res['sentences'][i][:24]}…" if i < B else f"FACTS mean ({len(FACTS)})"
        ax.bar([k + i * width for k in range(len(groups))], vals, width, label=label)
    ax.set_xticks([k + width * B / 2 for k in range(len(groups))], groups, fontsize=7)
    ax.set_ylabel("drop in P(answer)")
    ax.set_title("suppressing unique subcomponents (Figure 3)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_figure4(res: dict, path: Path, max_single: int = 16) -> None:
    """P(answer) of prompt 0: no edit, each unique slice alone (the max_single strongest), all of them."""
    plt = _plt()
    labels, vals = ["no edit"], [res["p_full"][0]]
    for s in res["single_slices"][:max_single]:
        labels.append(f"{s['matrix'].removeprefix('model.transformer.')}[{s['c']}] @{''.join(s['tokens'][:2])!r}")
        vals.append(s["p"])
    if "prompt0_all" in res["suppression"]:
        labels.append("all unique")
        vals.append(res["suppression"]["prompt0_all"]["p_after"][0])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(vals) + 2), 3.8))
    ax.bar(range(len(vals)), vals, color=["C7"] + ["C0"] * (len(vals) - 1))
    ax.set_xticks(range(len(vals)), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("P(answer | prompt 0)")
    ax.set_title("rank-1 slices of prompt 0 (Figure 4)", fontsize=9)
    _save(fig, path)


def plot_figure9(res: dict, path: Path) -> None:
    """P(answer) with each block's MLP zeroed; dashed: the full model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for b, probs in enumerate(res["zero_mlp"]):
        ax.plot(range(len(probs)), probs, "o-", color=f"C{b}", label=res["sentences"][b][:32])
        ax.axhline(res["p_full"][b], color=f"C{b}", ls="--", lw=0.8)
    ax.set_xlabel("MLP layer zeroed")
    ax.set_xticks(range(len(res["zero_mlp"][0])))  # layer numbers are integers
    ax.set_ylabel("P(answer)")
    ax.set_title("zeroing whole MLP layers (Figure 9)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


# ================================================================================================
# F. Results tables: python analysis.py report RUNS_DIR --out results
# ================================================================================================

PAPER_TMS = {"tms_5-2": ("1.000 ± 0.000", "0.993 ± 0.002"), "tms_40-10": ("1.000 ± 0.000", "1.010 ± 0.007"),
             "tms_5-2-id": ("1.000 ± 0.000", "0.992 ± 0.010"), "tms_40-10-id": ("1.000 ± 0.000", "1.031 ± 0.001")}
PAPER_RESID_OUT_DENSE = {"resid_mlp1": 50, "resid_mlp2": 50, "resid_mlp3": 51}


def _runs(root: Path) -> list[tuple[Path, dict, dict]]:
    """(run folder, its run config, its metrics) of the finished SPD runs in root (APD ones: apd_report)."""
    return [r for r in _all_runs(root) if r[1].get("method", "spd") == "spd"]


def _command(run_dir: Path, run_cfg: dict) -> str:
    """The command that made a run (train.py records it in config.json), then the code's git commit."""
    return f"{run_cfg.get('command', f'(command not recorded; run folder {run_dir})')}  # code {run_cfg.get('code', 'not recorded')}"


def tms_table(runs) -> str:
    """SPD paper Table 1: MMCS and ML2R of linear1, mean ± std over decomposition seeds."""
    lines = ["| Model | MMCS (ours) | ML2R (ours) | seeds | steps | MMCS (paper) | ML2R (paper) | W subcomponents per "
             "seed (expected) | identity subcomponents per seed (expected) | ML2R over large subcomponents | "
             "ML2R std over features, per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for model in PAPER_TMS:
        rows = [(d, c, m) for d, c, m in runs if c["model"] == model]
        if not rows:
            continue
        mm, ml = ([m[key] for _, _, m in rows] for key in ("mmcs", "ml2r"))
        steps = sorted({c["spd"]["steps"] for _, c, _ in rows})
        per_seed = lambda key, fmt=str: ", ".join(fmt(m[key]) if key in m else "?" for _, _, m in rows)  # noqa: E731
        target = rows[0][1]["target"]
        W = f"{per_seed('linear1/n_large_subcomponents')} ({target['n_features']})"
        identity = f"{per_seed('hidden_layers.0/n_large_subcomponents')} ({target['n_hidden']})" if model.endswith("-id") else "–"
        large = [m["ml2r_large"] for _, _, m in rows if "ml2r_large" in m]
        large = f"{sum(large) / len(large):.3f} ({len(large)} seed{'s' * (len(large) > 1)})" if large else "–"
        over_features = ("–" if not any("ml2r_std_over_features" in m for _, _, m in rows)
                         else per_seed("ml2r_std_over_features", "{:.3f}".format))
        lines.append(f"| {model} | {_mean_std(mm, ddof=1)} | {_mean_std(ml, ddof=1)} | {len(rows)} | "
                     f"{'/'.join(map(str, steps))} | {PAPER_TMS[model][0]} | {PAPER_TMS[model][1]} | {W} | {identity} | "
                     f"{large} | {over_features} |")
        commands += [_command(d, c) for d, c, _ in rows]
    lines += ["", "± is the sample standard deviation over decomposition seeds; a row of one seed has none. The "
              "paper does not say what its ± is over; the authors' code prints the std over the features of one run, "
              "shown in the last column for the runs evaluated since it is recorded (?: an older run; –: no run of the row). "
              "W subcomponents: how many of linear1's have norm > 0.1; fewer than the features means SPD "
              "merged two features into one subcomponent in that seed. ML2R over large subcomponents: the same "
              "ratio with the max over the subcomponents of norm > 0.1 only (the paper's max over all C can pick a "
              "dead one that points along a feature; results/parity.md).",
              "Per-seed values are in each run's metrics.json. Commands:", "", "```"] + commands + ["```"]
    return "\n".join(lines) + "\n"


def resid_table(runs) -> str:
    lines = ["| Model | W_in monosemantic fraction (paper) | per layer | W_in active per input, per layer | "
             "W_out subcomponents used (paper) | share of one-hot inputs each is active on | active on ≥ half | "
             "neuron-contribution r | stochastic recon | steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    per_layer = lambda m, key: " / ".join(f"{v:.2f}" for v in m[key].values()) if key in m else "–"  # noqa: E731
    commands = []
    for d, c, m in runs:
        if c["model"] not in PAPER_RESID_OUT_DENSE:
            continue
        lines.append(f"| {c['model']} ({d.name}) | {m['in_monosemantic_fraction']:.3f} (1.0) | "
                     f"{per_layer(m, 'in_monosemantic_by_layer')} | {per_layer(m, 'in_active_per_input')} | "
                     f"{m.get('out_alive_count', '-')} ({PAPER_RESID_OUT_DENSE[c['model']]}) | "
                     f"{m.get('out_active_fraction', float('nan')):.2f} | {m['out_dense_count']} | "
                     f"{m['neuron_contribution_corr']:.4f} | "
                     f"{m['eval_losses'].get('stochastic_recon', float('nan')):.3g} | {c['spd']['steps']} |")
        commands.append(_command(d, c))
    lines += ["", "Paper: every W_in feature gets its own subcomponent in every layer (fraction 1.0); W_out is split",
              "into 50 (51) subcomponents that form one rank-50 (51) component (\"noisy\" for 1 layer, Figure 8;",
              "co-active on all inputs for 2 and 3 layers, Figures 12, 13). Active means upper-leaky g > 0.1 on",
              "the one-hot inputs 0.75 e_i. \"per layer\": the same fraction for each layer's W_in on its own (the",
              "column before it asks it of all layers at once); then how many W_in subcomponents each one-hot input",
              "activates on average, per layer (paper: 1). Figures ci_one_hot.png and neuron_contributions.png are in each run",
              "folder. A run that finished before one of these columns existed was re-evaluated from its",
              "checkpoint with its command plus `--evaluate_only`. Commands:", "", "```"] + commands + ["```"]
    return "\n".join(lines) + "\n"


def report(root: Path, out: Path, suffix: str = "") -> None:
    runs = _runs(root)
    out.mkdir(parents=True, exist_ok=True)
    header = _report_header(root, suffix)
    if any(c["model"] in PAPER_TMS for _, c, _ in runs):
        (out / f"tms_table1{suffix}.md").write_text("# SPD paper Table 1 (TMS)\n\n" + header + tms_table(runs))
    if any(c["model"] in PAPER_RESID_OUT_DENSE for _, c, _ in runs):
        (out / f"resid_mlp{suffix}.md").write_text("# Residual MLPs\n\n" + header + resid_table(runs))
    for d, c, m in runs:
        if c["model"] == "induction":
            (out / f"induction_table1{suffix}.md").write_text(
                "# Transformer paper Table 1 (induction heads)\n\n" + header + f"`{_command(d, c)}`\n\n"
                + results_table1_markdown(m))
    print(f"wrote tables for {len(runs)} runs into {out}")


# ================================================================================================
# G. The APD baseline and the robustness sweep: python analysis.py apd|robustness RUNS_DIR --out results
# ================================================================================================

PAPER_APD_TMS = {"tms_5-2": (0.998, 0.000, 0.893, 0.004), "tms_40-10": (0.996, 0.003, 0.935, 0.001)}  # APD Table 1


def _all_runs(root: Path) -> list[tuple[Path, dict, dict]]:
    """(run folder, its run config, its metrics) of every finished run in root, both methods: its run
    folders (each with metrics.json) and the records written by record_runs (NAME.json)."""
    import json

    folders = [(p.parent, json.loads((p.parent / "config.json").read_text())["config"], json.loads(p.read_text()))
               for p in sorted(root.glob("*/metrics.json"))]
    records = [r for r in (json.loads(p.read_text()) for p in root.glob("*.json")) if {"run", "config", "metrics"} <= r.keys()]
    return sorted(folders + [(root / r["run"], r["config"], r["metrics"]) for r in records], key=lambda run: run[0].name)


def record_runs(root: Path, out: Path, suffix: str = "") -> None:
    """python analysis.py record RUNS_DIR --out DIR: one small JSON per finished run in RUNS_DIR, {run,
    config, metrics} (the config holds the command and the code's commit), to commit under results/;
    the tables are rebuilt from DIR as from run folders. A record of another run of that name is kept."""
    import json

    runs = _all_runs(root) if root.is_dir() else []
    if not runs:
        raise SystemExit(f"record: no finished run in {root} (a run folder holds metrics.json once it has finished)")
    out.mkdir(parents=True, exist_ok=True)
    for d, c, m in runs:
        path, text = out / f"{d.name}{suffix}.json", json.dumps({"run": d.name, "config": c, "metrics": m}, indent=1) + "\n"
        if not path.exists():
            path.write_text(text)
            print(f"wrote {path}")
        elif path.read_text() != text:
            print(f"kept {path}: it differs from {d} (another run of that name, or re-evaluated); move it away to record {d}")


def _mean_std(xs: list[float], ddof: int = 0) -> str:
    """mean ± std (ddof 1: the sample std), or the value alone for one run."""
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=ddof):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def apd_table(runs) -> str:
    """APD Table 1 (TMS 5-2, 40-10) and TMS 5-2+ID: MMCS / ML2R over seeds (mean ± std, as the paper),
    features with a component of their own, with the paper's numbers."""
    lines = ["| model | seeds | MMCS (paper) | ML2R (paper) | features with a component of their own, per seed | steps |",
             "| --- | --- | --- | --- | --- | --- |"]
    by_model: dict[str, list] = {}
    for d, c, m in runs:
        by_model.setdefault(c["model"], []).append((d, c, m))
    for model, rows in by_model.items():
        paper = PAPER_APD_TMS.get(model)
        mmcs, ml2r = [m["mmcs"] for *_, m in rows], [m["ml2r"] for *_, m in rows]
        p1 = f" ({paper[0]:.3f} ± {paper[1]:.3f})" if paper else " (not in the APD paper; SPD paper: \"APD fails\")"
        p2 = f" ({paper[2]:.3f} ± {paper[3]:.3f})" if paper else ""
        own = ", ".join(f"{m['features_with_own_component']}/{c['target']['n_features']}" for _, c, m in rows)
        steps = sorted({c["apd"]["steps"] for _, c, _ in rows})
        lines.append(f"| {model} | {len(rows)} | {_mean_std(mmcs)}{p1} | {_mean_std(ml2r)}{p2} | {own} | {steps} |")
    commands = "\n".join(f"    {_command(d, c)}" for d, c, _ in runs)
    return "\n".join(lines) + "\n\nCommands:\n\n" + commands + "\n"


def robustness_rows(runs) -> list[dict]:
    """One row per run of the sweep: method, the hyperparameter's multiple of the preset value, seed,
    recovered (every feature has a (sub)component of its own, features_with_own_component, and no
    other (sub)component of W has norm > 0.1), MMCS and ML2R over the large ones."""
    import train

    rows = []
    for d, c, m in runs:
        method = c.get("method", "spd")
        if method == "apd":
            name, value, preset = "topk", c["apd"]["topk"], train.APD_PRESETS[c["model"]]["topk"]
            seed = c["apd"]["seed"]
        else:
            name, value, preset = "importance_minimality", c["spd"]["importance_minimality"], train.PRESETS[c["model"]]["importance_minimality"]
            seed = c["spd"]["seed"]
        n = c["target"]["n_features"]
        large = m["linear1/n_large_components" if method == "apd" else "linear1/n_large_subcomponents"]
        rows.append({"method": method, "hyperparameter": name, "value": value, "multiple": round(value / preset, 4),
                     "seed": seed, "recovered": m["features_with_own_component"] == n and large == n,
                     "own": m["features_with_own_component"], "large": large, "n_features": n,
                     "mmcs": m["mmcs_large"], "ml2r": m["ml2r_large"], "run": d, "config": c})
    return sorted(rows, key=lambda r: (r["method"], r["multiple"], r["seed"]))


def robustness_table(rows) -> str:
    lines = ["| method | hyperparameter | x preset | value | recovered (of seeds) | features with their own (sub)component / large (sub)components of W, per seed | MMCS, mean (min) | ML2R, mean (min - max) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["multiple"]), []).append(r)
    for (method, x), g in groups.items():
        mm, ml = [r["mmcs"] for r in g], [r["ml2r"] for r in g]
        per_seed = ", ".join(f"{r['own']} / {r['large']}" for r in g)
        lines.append(f"| {method.upper()} | {g[0]['hyperparameter']} | {x:g} | {g[0]['value']:.4g} | "
                     f"{sum(r['recovered'] for r in g)} / {len(g)} | {per_seed} | "
                     f"{np.mean(mm):.3f} ({min(mm):.3f}) | {np.mean(ml):.3f} ({min(ml):.3f} - {max(ml):.3f}) |")
    return "\n".join(lines) + "\n"


def plot_robustness(rows, path: Path) -> None:
    """Fraction of seeds that recover the ground truth, MMCS and ML2R, against the multiple of each
    method's preset hyperparameter (log scale): SPD's importance-minimality coefficient, APD's top-k."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for method, colour in (("spd", "C0"), ("apd", "C3")):
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        label = f"{method.upper()} ({rs[0]['hyperparameter']})"
        xs = sorted({r["multiple"] for r in rs})
        frac = [np.mean([r["recovered"] for r in rs if r["multiple"] == x]) for x in xs]
        axes[0].plot(xs, frac, "o-", color=colour, label=label)
        for ax, key in ((axes[1], "mmcs"), (axes[2], "ml2r")):
            ax.scatter([r["multiple"] for r in rs], [r[key] for r in rs], color=colour, s=14, alpha=0.6)
            ax.plot(xs, [np.mean([r[key] for r in rs if r["multiple"] == x]) for x in xs], "-", color=colour, label=label)
    axes[0].set_ylabel("fraction of seeds recovering all features"), axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("MMCS (large components)"), axes[2].set_ylabel("ML2R (large components)")
    axes[2].axhline(1.0, color="k", lw=0.5, ls="--")
    for ax in axes:
        ax.set_xscale("log"), ax.set_xlabel("hyperparameter / preset value")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def apd_report(root: Path, out: Path, suffix: str = "") -> None:
    runs = [r for r in _all_runs(root) if r[1].get("method") == "apd"]
    text = (f"# APD (the baseline, apd.py): APD paper Table 1 and TMS 5-2+ID\n\n{_report_header(root, suffix)}"
            + apd_table(runs))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"apd{suffix}.md").write_text(text)
    print(f"wrote {out / f'apd{suffix}.md'} ({len(runs)} runs)")


def robustness_report(root: Path, out: Path, suffix: str = "") -> None:
    rows = robustness_rows(_all_runs(root))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    fig = out / "figures" / f"robustness{suffix}.png"
    plot_robustness(rows, fig)
    commands = "\n".join(f"    {_command(r['run'], r['config'])}" for r in rows)
    text = (f"# Robustness to the main hyperparameter: SPD against APD on TMS 5-2\n\n{_report_header(root, suffix)}"
            f"![robustness](figures/{fig.name})\n\n" + robustness_table(rows) + "\n\nCommands:\n\n" + commands + "\n")
    (out / f"robustness{suffix}.md").write_text(text)
    print(f"wrote {out / f'robustness{suffix}.md'} and {fig} ({len(rows)} runs)")


def _report_header(root: Path, suffix: str) -> str:
    import os

    machine = f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {os.cpu_count()} cores'}"
    return (f"The runs found in {root}, made with the commands listed (those `bash experiments.sh"
            f"{' --quick' if suffix else ''}` runs); rows missing here were not run. Report made on {machine}, "
            f"torch {torch.__version__}.\n\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build results/*.md tables from finished run folders.")
    ap.add_argument("command", choices=["report", "apd", "robustness", "record"])
    ap.add_argument("root", type=Path, help="folder holding run folders (each with metrics.json) or their records")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    {"report": report, "apd": apd_report, "robustness": robustness_report, "record": record_runs}[args.command](args.root, args.out, args.suffix)
