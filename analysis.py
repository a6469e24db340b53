"""Evaluation and figures of a finished decomposition, per target family.

spd.py holds the method; this file holds what the papers measure on each target:
  A  Every run          final losses, causal-importance L0 and alive subcomponents per matrix
  B  TMS                MMCS / ML2R (SPD paper eqs. 9, 10, Table 1), identity subcomponents, Figures 1-4
  C  Residual MLPs      one-hot causal importances (Figures 8, 12, 13), monosemantic W_in fraction,
                        dense W_out count, neuron contributions (eqs. 11, 12; Figures 7, 10, 11)
Each evaluate_* returns a flat dict for metrics.json and writes PNGs into out_dir.
"""

from __future__ import annotations

from pathlib import Path

import torch

import spd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ================================================================================================
# A. Every run
# ================================================================================================


@torch.no_grad()
def evaluate_common(dec: spd.Decomposition, batch: torch.Tensor, cfg: spd.SPDConfig) -> dict:
    """Losses at p_final on a fresh batch, CI L0 (g > 0) and alive subcomponents (g > 0.1)."""
    losses = spd.spd_losses(dec, batch, cfg, spd.p_at(cfg.steps - 1, cfg))
    ci, _ = dec.causal_importance(dec.target_forward(batch)[1])
    return {"eval_losses": {k: v.item() for k, v in losses.items()},
            "ci_l0": spd.ci_l0(ci), "alive_01": spd.alive(ci, 0.1)}


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================================================
# B. Toy models of superposition
# ================================================================================================


def subcomponent_norms(dec: spd.Decomposition, name: str) -> torch.Tensor:
    """Frobenius norm of each rank-one subcomponent u_c v_c^T: |u_c| |v_c|.   [C]"""
    U, V = dec.UV(name)
    return U.norm(dim=0) * V.norm(dim=1)


@torch.no_grad()
def evaluate_tms(dec: spd.Decomposition, out_dir: Path, norm_threshold: float = 0.1) -> dict:
    """MMCS and ML2R of linear1's W (columns = feature embeddings), as the paper's Table 1; for
    the -id models, how many subcomponents of the identity have norm > norm_threshold (the
    paper's Figure 3 expects n_hidden)."""
    U, V = dec.UV("linear1")
    mmcs, ml2r = spd.mmcs_ml2r(dec.target_weights()["linear1"], U, V)
    out = {"mmcs": mmcs, "ml2r": ml2r}
    hidden = [n for n in dec.names if n.startswith("hidden_layers")]
    for name in hidden:
        norms = subcomponent_norms(dec, name)
        out[f"{name}/n_large_subcomponents"] = int((norms > norm_threshold).sum())
        out[f"{name}/top_norms"] = sorted(norms.tolist(), reverse=True)[:6]
    plot_tms(dec, out_dir / "tms_subcomponents.png")
    return out


def plot_tms(dec: spd.Decomposition, path: Path, n_show: int = 6) -> None:
    """Paper Figure 1 (2-D) or 2-style heatmaps: target W, the sum of subcomponents, and the
    largest subcomponents of linear1, ordered by norm."""
    plt = _plt()
    W = dec.target_weights()["linear1"].cpu()
    U, V = (t.detach().cpu() for t in dec.UV("linear1"))
    order = subcomponent_norms(dec, "linear1").cpu().argsort(descending=True)[:n_show]
    panels = [("target W", W), ("sum of subcomponents", U @ V)]
    panels += [(f"subcomponent {int(c)}", U[:, c, None] * V[c][None]) for c in order]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6))
    for ax, (title, M) in zip(axes, panels):
        if M.shape[0] == 2:  # TMS 5-2: feature columns as arrows in the hidden plane
            for j in range(M.shape[1]):
                ax.arrow(0, 0, M[0, j], M[1, j], color=f"C{j}", width=0.02, length_includes_head=True)
            lim = max(1.2, W.abs().max().item() * 1.2)
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        else:
            v = W.abs().max().item()
            ax.imshow(M, cmap="RdBu", vmin=-v, vmax=v)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def monosemantic_in_fraction(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> float:
    """Fraction of features i for which, in every layer, exactly one W_in subcomponent has g > 0.1
    on input i, and no other feature uses that subcomponent."""
    ok = None
    for name, g in ci.items():
        if not name.endswith("mlp_in"):
            continue
        active = g > threshold  # [n, C]
        exactly_one = active.sum(1) == 1
        unshared = (active & (active.sum(0, keepdim=True) == 1)).any(1)
        layer_ok = exactly_one & unshared
        ok = layer_ok if ok is None else ok & layer_ok
    return float(ok.float().mean())


def dense_out_count(ci: dict[str, torch.Tensor], threshold: float = 0.1) -> int:
    """W_out subcomponents (all layers) with g > 0.1 on at least half of the one-hot inputs."""
    return sum(int(((g > threshold).float().mean(0) >= 0.5).sum()) for n, g in ci.items() if n.endswith("mlp_out"))


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
    xs, ys = [], []
    for layer in range(len(target.layers)):
        t, s = neuron_contributions(dec, target.W_E, layer)
        xs.append(t.flatten()), ys.append(s.flatten())
    x, y = torch.cat(xs), torch.cat(ys)
    out["neuron_contribution_corr"] = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    plot_one_hot_ci(ci, out_dir / "ci_one_hot.png")
    plot_neuron_contributions(x, y, out["neuron_contribution_corr"], out_dir / "neuron_contributions.png")
    return out


def plot_one_hot_ci(ci: dict[str, torch.Tensor], path: Path) -> None:
    """Paper Figures 8, 12, 13: CI of each subcomponent on one-hot inputs, columns permuted greedily."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(ci), figsize=(4 * len(ci), 3.6), squeeze=False)
    for ax, (name, g) in zip(axes[0], ci.items()):
        g = g.cpu()
        alive_cols = int((g > 0.1).any(0).sum())
        perm = spd.permute_to_identity(g)
        ax.imshow(g[:, perm][:, : max(alive_cols, g.shape[0])], aspect="auto", cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{name} ({alive_cols} subcomponents with g > 0.1)", fontsize=8)
        ax.set_xlabel("subcomponent (permuted)"), ax.set_ylabel("input feature")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_neuron_contributions(x: torch.Tensor, y: torch.Tensor, corr: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x.cpu(), y.cpu(), s=3, alpha=0.5)
    lim = max(x.abs().max().item(), y.abs().max().item())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.5)
    ax.set_xlabel("target neuron contribution (eq. 11)")
    ax.set_ylabel("W_in subcomponent contribution (eq. 12)")
    ax.set_title(f"Pearson r = {corr:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
