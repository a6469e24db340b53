"""Clustering SPD's rank-one subcomponents into components (mechanisms), by description length.

SPD finds rank-one subcomponents of single matrices; "a further clustering step is required to find
components that span more than one rank and/or more than one layer" (SPD §5). This module does that
step with the minimum-description-length criterion of the APD paper (appendix A.2.1, eq. 11): a
group of subcomponents that always fire together is cheaper to describe as one component (one index
per input instead of several), and groups that fire apart are cheaper kept apart (a merged group
would pay for its whole rank whenever any part of it fires).

    python cluster.py runs/tms_5-2-id_seed0                      # clusters.json + clusters.png
    python cluster.py RUN_DIR --alpha 2 --threshold 0.1 --sweep 0.1 0.3 1 3 10

    import cluster
    groups = cluster.merge(membership, alpha=1.0)   # membership: bool [N, K]; groups: lists of columns

Sections (readers cite them by letter):
  A  Membership            which subcomponents are causally important on each input
  B  Description length    the cost (APD eq. 11, per input) and its change for one merge
  C  Greedy merge          merge the pair that lowers the cost most, until none does
  D  Jaccard cross-check   average-linkage clustering of co-activation similarity
  E  Agreement             adjusted Rand index between two partitions
  F  Known partitions      the toy models' ground-truth mechanisms (SPD paper, §3-4)
  G  Cluster ablation      the decomposed model with one whole cluster masked out
  H  Synthetic memberships planted co-activation blocks, and the smallest alpha that keeps them apart
  I  A run folder          clusters.json, figures, the command line

Not here: clustering by anything but co-activation (for example by weight similarity), and
subcomponents of different ranks (every SPD subcomponent has rank 1; merge() accepts other ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

import analysis
import models
import spd

# ================================================================================================
# A. Membership
# ================================================================================================


def column_names(dec: spd.Decomposition) -> list[str]:
    """One "matrix:index" per subcomponent, in the column order of membership()."""
    return [f"{n}:{c}" for n in dec.names for c in range(dec.C[n])]


@torch.no_grad()
def causal_importances(dec: spd.Decomposition, x, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The lower-leaky g (SPD eq. 6, the g that scales the masks) of every subcomponent, one row per
    input (per position of a sequence model, padding dropped): [N, K], columns as column_names."""
    ci, _ = dec.causal_importance(dec.target_forward(x)[1])
    g = torch.cat([ci[n] for n in dec.names], dim=-1)  # [..., K]
    return g[valid] if valid is not None else g.reshape(-1, g.shape[-1])


def membership(g: torch.Tensor, threshold: float = 0.1) -> np.ndarray:
    """Subcomponent k is a member of input n when g[n, k] > threshold.  bool [N, K]"""
    return (g > threshold).cpu().numpy()


# ================================================================================================
# B. Description length (APD eq. 11, averaged over inputs)
# ================================================================================================


def description_length(f: np.ndarray, r: np.ndarray, alpha: float) -> float:
    """APD eq. 11 averaged over inputs, for a partition into G groups:

        L = Σ_g f_g (log2 G + α r_g)

    f_g: fraction of inputs on which group g is active (any member is); r_g: its rank (number of
    rank-one members); α: bits per unit of rank, against log2 G bits to name which group fires."""
    G = len(f)
    return float(np.sum(f * (math.log2(G) + alpha * r))) if G else 0.0


def merge_delta(f_a, f_b, f_ab, r_a, r_b, S: float, G: int, alpha: float):
    """Change of L when groups a and b (of G, with Σ_g f_g = S) become one group of rank r_a + r_b
    active on a fraction f_ab = f_a + f_b - f_{a∧b} of the inputs (a OR b):

        ΔL = f_ab (log2(G-1) + α (r_a + r_b)) - f_a (log2 G + α r_a) - f_b (log2 G + α r_b)
             + (S - f_a - f_b) (log2(G-1) - log2 G)

    which rearranges to  -f_{a∧b} log2(G-1) + α (r_a P(b ¬a) + r_b P(a ¬b)) - S log2(G / (G-1)):
    a merge pays rank for the inputs where only one side fires, and saves an index where both do
    (and a little on every group's index, there being one group fewer). Elementwise on arrays."""
    L, L1 = math.log2(G), math.log2(G - 1)
    return (f_ab * (L1 + alpha * (r_a + r_b)) - f_a * (L + alpha * r_a) - f_b * (L + alpha * r_b)
            + (S - f_a - f_b) * (L1 - L))


# ================================================================================================
# C. Greedy merge
# ================================================================================================


def merge_with_history(membership: np.ndarray, alpha: float, ranks: np.ndarray | None = None) -> tuple[list, list]:
    """Greedy MDL merge. Start from one group per live column (dead ones, never active, are left
    out); repeatedly merge the pair whose merge lowers L the most (merge_delta), until no merge
    lowers it. Deterministic: ties go to the pair with the lowest (i, j) in the current order.

    membership: bool [N, K]; ranks: [K] (default 1 each). Returns (groups, history): groups as sorted
    lists of column indices, ordered by their first column; history one dict per merge (the two
    groups' first columns a, b, the cost change delta and the cost after, n_groups after), after
    an entry {"cost": L of the singletons}."""
    A = np.asarray(membership, dtype=bool)
    if A.ndim != 2:
        raise ValueError(f"membership must be a bool matrix [N, K], got shape {A.shape}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    N, K = A.shape
    live = np.flatnonzero(A.any(0))
    groups = [[int(c)] for c in live]
    act = A[:, live].astype(np.float64)  # [N, G] group activity
    r = (np.ones(K) if ranks is None else np.asarray(ranks, dtype=np.float64))[live]  # [G]
    f = act.mean(0)  # [G]
    both = act.T @ act / N  # [G, G] fraction of inputs where both groups are active
    history = [{"cost": description_length(f, r, alpha), "n_groups": len(groups)}]
    while len(groups) > 1:
        G = len(groups)
        delta = merge_delta(f[:, None], f[None, :], f[:, None] + f[None, :] - both, r[:, None], r[None, :],
                            f.sum(), G, alpha)  # [G, G]
        delta[np.tril_indices(G)] = np.inf
        i, j = np.unravel_index(np.argmin(delta), delta.shape)
        if not delta[i, j] < -1e-12:  # no merge lowers the cost (beyond float rounding)
            break
        history.append({"a": groups[i][0], "b": groups[j][0], "delta": float(delta[i, j])})
        groups[i] = sorted(groups[i] + groups.pop(j))
        act[:, i] = np.maximum(act[:, i], act[:, j])
        r[i] += r[j]
        act, r, f = np.delete(act, j, 1), np.delete(r, j), np.delete(f, j)
        f[i] = act[:, i].mean()
        both = np.delete(np.delete(both, j, 0), j, 1)
        both[i, :] = both[:, i] = act.T @ act[:, i] / N
        history[-1].update(cost=description_length(f, r, alpha), n_groups=len(groups))
    return groups, history


def merge(membership: np.ndarray, alpha: float, ranks: np.ndarray | None = None) -> list[list[int]]:
    """The groups (sorted lists of column indices) of merge_with_history."""
    return merge_with_history(membership, alpha, ranks)[0]


# ================================================================================================
# D. Jaccard cross-check
# ================================================================================================


def jaccard(membership: np.ndarray) -> np.ndarray:
    """J_ij = |inputs where i and j are active| / |inputs where i or j is| (0 if neither ever is).  [K, K]"""
    A = np.asarray(membership, dtype=np.float64)
    both = A.T @ A
    either = A.sum(0)[:, None] + A.sum(0)[None, :] - both
    return np.divide(both, either, out=np.zeros_like(both), where=either > 0)


def jaccard_merge(membership: np.ndarray, threshold: float = 0.5) -> list[list[int]]:
    """Average-linkage agglomerative clustering of the live columns: merge the two clusters with the
    highest mean pairwise Jaccard similarity while it is at least `threshold`. A second, simpler
    method to check that merge()'s groups are not an artefact of the description length."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the Jaccard threshold must be in (0, 1], got {threshold}")
    A = np.asarray(membership, dtype=bool)
    live = np.flatnonzero(A.any(0))
    groups = [[int(c)] for c in live]
    sums = jaccard(A[:, live])  # [G, G] sums of pairwise similarities between clusters
    size = np.ones(len(groups))
    while len(groups) > 1:
        mean = sums / (size[:, None] * size[None, :])
        mean[np.tril_indices(len(groups))] = -np.inf
        i, j = np.unravel_index(np.argmax(mean), mean.shape)
        if mean[i, j] < threshold:
            break
        groups[i] = sorted(groups[i] + groups.pop(j))
        sums[i, :] += sums[j, :]
        sums[:, i] += sums[:, j]
        sums = np.delete(np.delete(sums, j, 0), j, 1)
        size[i] += size[j]
        size = np.delete(size, j)
    return groups


# ================================================================================================
# E. Agreement between partitions
# ================================================================================================


def labels_of(groups: list[list[int]], columns) -> list[int]:
    """The index of the group holding each of `columns` (-1 - column for one in no group)."""
    where = {c: g for g, members in enumerate(groups) for c in members}
    return [where.get(c, -1 - c) for c in columns]


def adjusted_rand_index(a, b) -> float:
    """Hubert & Arabie's adjusted Rand index of two labellings of the same items: 1 for the same
    partition, about 0 for independent ones.

        ARI = (Σ_ij C(n_ij, 2) - E) / (½ [Σ_i C(a_i, 2) + Σ_j C(b_j, 2)] - E),
        E = Σ_i C(a_i, 2) Σ_j C(b_j, 2) / C(n, 2)

    n_ij: items with label i in a and j in b; a_i, b_j: the label counts. 1.0 when both are the
    same trivial partition (the formula's 0 / 0)."""
    if len(a) != len(b):
        raise ValueError(f"labellings of different lengths: {len(a)} and {len(b)}")
    _, ia = np.unique(np.asarray(a), return_inverse=True)
    _, ib = np.unique(np.asarray(b), return_inverse=True)
    n_ij = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(n_ij, (ia, ib), 1)
    pairs = lambda n: n * (n - 1) / 2
    sum_ij, sum_a, sum_b = pairs(n_ij).sum(), pairs(n_ij.sum(1)).sum(), pairs(n_ij.sum(0)).sum()
    expected = sum_a * sum_b / pairs(len(a)) if len(a) > 1 else 0.0
    top = (sum_a + sum_b) / 2 - expected
    return 1.0 if top == 0 else float((sum_ij - expected) / top)


# ================================================================================================
# F. Known partitions of the toy models
# ================================================================================================


@torch.no_grad()
def known_partition(dec: spd.Decomposition, tcfg: dict, live: list[int]) -> list[str] | None:
    """The ground-truth mechanism of each live column, as a label, where the SPD paper states it:
    TMS (§3.1, Figs. 1-4): one mechanism per feature, holding its W subcomponent in both uses of the
    tied W (linear1 and linear2's transpose); the hidden identity's subcomponents one mechanism.
    Residual MLPs (§3.2, Figs. 8, 12): one per feature, its W_in subcomponents of every layer; all
    W_out subcomponents of all layers one mechanism. A W or W_in subcomponent belongs to the feature
    whose one-hot input (0.75 e_i, the paper's figures) gives it the largest g. None for other models."""
    if tcfg["family"] not in ("tms", "resid_mlp"):
        return None
    n = tcfg["n_features"]
    ci, _ = dec.causal_importance(dec.target_forward(torch.eye(n, device=analysis._device(dec)) * 0.75)[1])
    g = torch.cat([ci[name] for name in dec.names], dim=-1)  # [n_features, K]
    feature = g.argmax(0).tolist()
    names = column_names(dec)
    labels = []
    for k in live:
        matrix = names[k].rsplit(":", 1)[0]
        if matrix.startswith("hidden_layers") or matrix.endswith("mlp_out"):
            labels.append(matrix.split(".")[0] if matrix.startswith("hidden") else "W_out")
        else:
            labels.append(f"feature {feature[k]}")
    return labels


# ================================================================================================
# G. Cluster ablation
# ================================================================================================


def cluster_masks(g: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Masks at the level of clusters: every member of a group gets the group's importance, the max
    of its members' g; a subcomponent in no group keeps its own g.  g [..., K] -> [..., K]"""
    m = g.clone()
    for members in groups:
        m[..., members] = g[..., members].amax(-1, keepdim=True)
    return m


def split_masks(dec: spd.Decomposition, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """[..., K] (columns as column_names) -> {matrix: [..., C]}."""
    return dict(zip(dec.names, m.split([dec.C[n] for n in dec.names], dim=-1)))


def per_input_divergence(out: torch.Tensor, ref: torch.Tensor, output_loss: str, last_token_only: bool) -> torch.Tensor:
    """D(out, ref) for each input (row): mean squared difference (mse), or KL(ref || out) of the
    softmaxes summed over the vocabulary and averaged over positions (kl; the last one only if
    last_token_only).  [B]"""
    if output_loss == "mse":
        return (out - ref).pow(2).reshape(out.shape[0], -1).mean(-1)
    if last_token_only:
        out, ref = out[:, -1:], ref[:, -1:]
    logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean(-1)


@torch.no_grad()
def ablation(dec: spd.Decomposition, x, groups: list[list[int]], cfg) -> dict:
    """What each cluster does: the decomposed model run with cluster_masks (the baseline), then with
    one whole cluster's masks set to 0. For each group: the mean divergence from the baseline over
    the inputs on which the group is active (any member's g > 0 at any position), and, for vector
    outputs, the mean squared change of each output; also the baseline's divergence from the target.
    Inputs are the rows of x (sequences for a sequence model)."""
    ci, _ = dec.causal_importance(dec.target_forward(x)[1])
    g = torch.cat([ci[n] for n in dec.names], dim=-1)  # [B, (S,) K]
    base_masks = cluster_masks(g, groups)
    target_out = dec.target(x)
    base = dec(x, split_masks(dec, base_masks))
    D = lambda out: per_input_divergence(out, base, cfg.output_loss, cfg.last_token_only)
    result = {"baseline_divergence": float(per_input_divergence(base, target_out, cfg.output_loss,
                                                                 cfg.last_token_only).mean()), "groups": []}
    for members in groups:
        m = base_masks.clone()
        m[..., members] = 0.0
        out = dec(x, split_masks(dec, m))
        active = (g[..., members] > 0).reshape(g.shape[0], -1).any(-1)  # [B]
        entry = {"n_active_inputs": int(active.sum()),
                 "divergence": float(D(out)[active].mean()) if active.any() else 0.0}
        if out.dim() == 2:  # [d_out]: which outputs the cluster drives
            entry["output_change"] = (out - base)[active].pow(2).mean(0) if active.any() else torch.zeros(out.shape[1])
        result["groups"].append(entry)
    return result


# ================================================================================================
# H. Synthetic memberships
# ================================================================================================


def planted_membership(n: int, sizes: list[int], p_active: float, p_drop: float = 0.0, seed: int = 0
                       ) -> tuple[np.ndarray, list[list[int]]]:
    """N inputs, blocks of `sizes` columns: each block is active on an input with probability
    p_active (independently), and then each of its members with probability 1 - p_drop.
    Returns (membership bool [n, sum(sizes)], the planted groups)."""
    rng = np.random.default_rng(seed)
    on = rng.random((n, len(sizes))) < p_active  # [n, B]
    block = np.repeat(np.arange(len(sizes)), sizes)  # [K]
    A = on[:, block] & (rng.random((n, len(block))) >= p_drop)
    starts = np.cumsum([0] + list(sizes))
    return A, [list(range(starts[b], starts[b + 1])) for b in range(len(sizes))]


def alpha_lower_bound(membership: np.ndarray, groups: list[list[int]], ranks: np.ndarray | None = None) -> float:
    """The smallest α at which a partition is a stopping point of merge(): no merge of two of its B
    groups lowers L. From merge_delta's second form, ΔL_ab >= 0 iff

        α >= (f_{a∧b} log2(B-1) + S log2(B / (B-1))) / (r_a P(b ¬a) + r_b P(a ¬b))

    so the bound is the largest right-hand side over pairs (inf where two groups always fire
    together: no α keeps those apart). Below it merge() cannot return this partition."""
    A = np.asarray(membership, dtype=bool)
    N, B = A.shape[0], len(groups)
    if B < 2:
        return 0.0
    act = np.stack([A[:, g].any(1) for g in groups], 1).astype(np.float64)  # [N, B]
    r = np.array([len(g) if ranks is None else float(np.sum(np.asarray(ranks)[g])) for g in groups])
    f, both = act.mean(0), act.T @ act / N
    only = f[:, None] - both  # P(a ¬b) [B, B]
    num = both * math.log2(B - 1) + f.sum() * math.log2(B / (B - 1))
    den = r[:, None] * only.T + r[None, :] * only
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(den > 0, num / np.where(den > 0, den, 1), np.inf)
    return float(bound[np.triu_indices(B, 1)].max())


# ================================================================================================
# I. A run folder
# ================================================================================================

DEFAULT_ALPHA = 2.0  # inside the interval that recovers every toy model's known partition (results/clustering*.md)
DEFAULT_THRESHOLD = 0.1
JACCARD_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)  # the cross-check's thresholds, reported for known partitions


def named(groups: list[list[int]], names: list[str]) -> list[list[str]]:
    return [[names[k] for k in g] for g in groups]


def cluster_decomposition(dec: spd.Decomposition, tcfg: dict, cfg, x, valid=None, alpha: float = DEFAULT_ALPHA,
                          threshold: float = DEFAULT_THRESHOLD, jaccard_threshold: float = 0.5,
                          sweep: list[float] = (), n_ablation: int = 2000, s1_pos: torch.Tensor | None = None) -> tuple:
    """Everything clusters.json holds: the MDL groups with rank, activity and ablation effects, the
    cost history, the Jaccard cross-check, and where the model has one, the agreement (ARI) with its
    known partition at alpha and at each alpha of `sweep`. For the induction task (s1_pos given), each
    group's activity at the position classes of the transformer paper's Table 1 (s1, m, s2, random).
    Returns (result, membership, groups, live columns)."""
    names = column_names(dec)
    g = causal_importances(dec, x, valid)  # [N, K]
    A = membership(g, threshold)
    groups, history = merge_with_history(A, alpha)
    live = [k for grp in groups for k in grp]
    live.sort()
    result = {"alpha": alpha, "threshold": threshold, "n_rows": int(A.shape[0]),
              "n_subcomponents": len(names), "n_live": len(live), "n_groups": len(groups)}
    abl = ablation(dec, x[:n_ablation], groups, cfg)
    truth = known_partition(dec, tcfg, live)
    label = dict(zip(live, truth)) if truth is not None else {}
    entries = []
    for members, effect in zip(groups, abl["groups"]):
        entry = {"members": [names[k] for k in members], "rank": len(members),
                 "activity": float(A[:, members].any(1).mean())}
        if truth is not None:
            entry["known"] = sorted({label[k] for k in members})
        change = effect.pop("output_change", None)
        if change is not None:
            top = change.argsort(descending=True)[:3]
            entry["top_outputs"] = [[int(i), float(change[i])] for i in top]
            entry["top_output_share"] = float(change[top[0]] / change.sum()) if change.sum() > 0 else 0.0
        if s1_pos is not None:
            active = A[:, members].any(1).reshape(x.shape[0], x.shape[1])  # [B, S]
            entry["positions"] = {k: float(active[c.cpu().numpy()].mean())
                                  for k, c in analysis.position_classes(s1_pos, x.shape[1]).items()}
        entries.append({**entry, **effect})
    order = sorted(range(len(groups)), key=lambda i: -entries[i]["activity"])
    result["groups"] = [entries[i] for i in order]
    result["cluster_masked_divergence_from_target"] = abl["baseline_divergence"]
    result["cost_history"] = [{**h, **({"a": names[h["a"]], "b": names[h["b"]]} if "a" in h else {})} for h in history]
    jac = jaccard_merge(A, jaccard_threshold)
    result["jaccard"] = {"threshold": jaccard_threshold, "n_groups": len(jac), "groups": named(jac, names),
                         "ari_vs_mdl": adjusted_rand_index(labels_of(jac, live), labels_of(groups, live))}
    if truth is not None:
        large = large_columns(dec, live)  # the subcomponents the paper's mechanisms are made of
        truth_large = [label[k] for k in large]
        result["known"] = {"n_groups": len(set(truth)), "ari": adjusted_rand_index(truth, labels_of(groups, live)),
                           "n_large": len(large), "ari_large": adjusted_rand_index(truth_large, labels_of(groups, large)),
                           "alpha_lower_bound": alpha_lower_bound(A, _groups_of(truth, live)),
                           "jaccard_ari": adjusted_rand_index(truth, labels_of(jac, live)),
                           "jaccard_sweep": [{"threshold": t, "ari": adjusted_rand_index(truth, labels_of(jaccard_merge(A, t), live))}
                                             for t in JACCARD_SWEEP],
                           "partition": sorted(named(_groups_of(truth, live), names)),
                           "sweep": [{"alpha": a, **_agreement(A, a, truth, live, truth_large, large)} for a in sweep]}
        own = [g["top_outputs"][0][0] == int(g["known"][0].split()[1]) for g in entries
               if "top_outputs" in g and len(g["known"]) == 1 and g["known"][0].startswith("feature ")]
        result["known"]["single_feature_groups"] = len(own)
        result["known"]["ablation_hits_own_output"] = sum(own) / len(own) if own else None
    return result, A, groups, live


def _groups_of(labels: list[str], live: list[int]) -> list[list[int]]:
    by = {}
    for k, lab in zip(live, labels):
        by.setdefault(lab, []).append(k)
    return list(by.values())


def _agreement(A: np.ndarray, alpha: float, truth: list[str], live: list[int], truth_large: list[str],
               large: list[int]) -> dict:
    groups = merge(A, alpha)
    return {"ari": adjusted_rand_index(truth, labels_of(groups, live)),
            "ari_large": adjusted_rand_index(truth_large, labels_of(groups, large)), "n_groups": len(groups)}


LARGE_NORM = 0.1  # |u_c| |v_c| of a "large" subcomponent (analysis.evaluate_tms's norm_threshold)


def large_columns(dec: spd.Decomposition, columns: list[int]) -> list[int]:
    """The columns whose rank-one matrix u_c v_c^T has Frobenius norm >= LARGE_NORM: the subcomponents
    the paper's mechanisms are made of (TMS 40-10+ID: exactly 40 of W and 10 of the identity; the
    others, of norm 0.002, fire now and then without mattering)."""
    norms = torch.cat([analysis.subcomponent_norms(dec, n) for n in dec.names]).detach()
    return [k for k in columns if norms[k] >= LARGE_NORM]


def plot_clusters(A: np.ndarray, groups: list[list[int]], history: list[dict], path: Path, title: str,
                  names: list[str], sweep: list[dict] = (), bound: float | None = None) -> None:
    """Jaccard co-activation of the live subcomponents ordered by cluster (boxes around clusters),
    the cost against the merge step, and ARI against alpha when a sweep was made (with the known
    partition's alpha_lower_bound dashed)."""
    plt = analysis._plt()
    order = [k for grp in groups for k in grp]
    J = jaccard(A[:, order])
    n_panels = 3 if sweep else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels + (1.5 if len(order) <= 40 else 0), 4.6))
    im = axes[0].imshow(J, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if len(order) <= 40:  # few enough to name
        axes[0].set_yticks(range(len(order)), [names[k] for k in order], fontsize=6)
        axes[0].set_xticks([])
    start = 0
    for grp in groups:  # a box around each cluster of more than one subcomponent
        if len(grp) > 1:
            axes[0].add_patch(plt.Rectangle((start - 0.5, start - 0.5), len(grp), len(grp), fill=False, ec="r", lw=1))
        start += len(grp)
    axes[0].set_title(f"co-activation (Jaccard), {len(order)} live subcomponents\nordered by cluster ({len(groups)})")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].plot([h["cost"] for h in history], marker="." if len(history) < 60 else None)
    axes[1].set_xlabel("merge step")
    axes[1].set_ylabel("description length L (bits per input)")
    axes[1].set_title("greedy merge")
    if sweep:
        axes[2].semilogx([s["alpha"] for s in sweep], [s["ari"] for s in sweep], marker="o")
        axes[2].set_xlabel("alpha")
        axes[2].set_ylabel("ARI with the known partition")
        axes[2].set_ylim(-0.05, 1.05)
        if bound is not None and math.isfinite(bound):
            axes[2].axvline(bound, ls="--", color="gray", label=f"derived lower bound {bound:.2g}")
            axes[2].legend(fontsize=8)
        axes[2].set_title("agreement with the ground truth")
    fig.suptitle(title)
    analysis._save(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished SPD run folder written by train.py")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="bits per unit of rank in the description length")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="a subcomponent is active on an input when its lower-leaky g exceeds this")
    ap.add_argument("--n", type=int, default=None,
                    help="evaluation inputs (default 10000; sequence models: 256 sequences, every position a row)")
    ap.add_argument("--jaccard_threshold", type=float, default=0.5, help="the cross-check's average-linkage threshold")
    ap.add_argument("--sweep", type=float, nargs="*", default=[], help="also the ARI with the known partition at these alphas")
    ap.add_argument("--seed", type=int, default=54321, help="seed of the evaluation inputs (train.py evaluates on 12345)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--target_dir", default=None, help="the cache of trained targets (default: the run's own --target_dir)")
    ap.add_argument("--out", default=None, help="where to write clusters.json and clusters.png (default: the run folder)")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """One line naming the bad flag, before anything is loaded or written."""
    for name in ("alpha", *(["sweep"] if args.sweep else [])):
        for v in (args.sweep if name == "sweep" else [args.alpha]):
            if not (v >= 0 and math.isfinite(v)):
                raise SystemExit(f"--{name} must be finite numbers >= 0, got {v}")
    if not 0 <= args.threshold < 1:
        raise SystemExit(f"--threshold must be in [0, 1) (g is at most 1), got {args.threshold}")
    if not 0 < args.jaccard_threshold <= 1:
        raise SystemExit(f"--jaccard_threshold must be in (0, 1], got {args.jaccard_threshold}")
    if args.n is not None and args.n < 2:
        raise SystemExit(f"--n must be at least 2, got {args.n}")
    if not Path(args.run_dir).is_dir():
        raise SystemExit(f"{args.run_dir} is not a folder; pass a run folder written by train.py")


def main(argv=None) -> dict:
    import train
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_args(args)
    dec, target, tcfg, cfg, sample = train.load_run(args.run_dir, args.device, args.target_dir)
    sequence = tcfg["family"] in ("induction", "gpt2")
    n, gen = args.n or (256 if sequence else 10_000), torch.Generator(device=analysis._device(dec)).manual_seed(args.seed)
    s1_pos = None
    if tcfg["family"] == "induction":  # the task's positions too, for the Table 1 classes
        x, _, s1_pos = models.induction_batch(n, tcfg["seq_len"], tcfg["vocab"], gen, analysis._device(dec))
        valid = None
    else:
        x, valid = spd.split_batch(sample(n, gen))
    result, A, groups, live = cluster_decomposition(dec, tcfg, cfg, x, valid, args.alpha, args.threshold,
                                                    args.jaccard_threshold, args.sweep,
                                                    n_ablation=64 if sequence else 2000, s1_pos=s1_pos)
    result = {"run": str(args.run_dir), "command": "python cluster.py " + shlex.join(argv), "model": tcfg["family"],
              **result}
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clusters.json").write_text(json.dumps(result, indent=1))
    known = result.get("known", {})
    plot_clusters(A, groups, result["cost_history"], out / "clusters.png",
                  f"{args.run_dir}: alpha {args.alpha}, threshold {args.threshold}", column_names(dec),
                  known.get("sweep", []), known.get("alpha_lower_bound"))
    print(summary(result))
    print(f"wrote {out / 'clusters.json'}, {out / 'clusters.png'}")
    return result


def summary(result: dict) -> str:
    """A few lines for the terminal: the groups (largest rank first) and the agreements."""
    lines = [f"{result['n_live']} live of {result['n_subcomponents']} subcomponents -> {result['n_groups']} groups "
             f"(alpha {result['alpha']}, threshold {result['threshold']}, {result['n_rows']} rows); "
             f"description length {result['cost_history'][0]['cost']:.3f} -> {result['cost_history'][-1]['cost']:.3f} bits"]
    for grp in sorted(result["groups"], key=lambda e: -e["rank"])[:12]:
        shown = ", ".join(grp["members"][:6]) + (", ..." if grp["rank"] > 6 else "")
        lines.append(f"  rank {grp['rank']:3d}  active {grp['activity']:.3f}  ablation D {grp['divergence']:.3g}  [{shown}]")
    if len(result["groups"]) > 12:
        lines.append(f"  ... {len(result['groups']) - 12} more groups")
    lines.append(f"Jaccard cross-check (threshold {result['jaccard']['threshold']}): {result['jaccard']['n_groups']} groups, "
                 f"ARI with the MDL groups {result['jaccard']['ari_vs_mdl']:.3f}")
    if "known" in result:
        k = result["known"]
        lines.append(f"known partition ({k['n_groups']} mechanisms): ARI {k['ari']:.3f}, on the {k['n_large']} large "
                     f"subcomponents {k['ari_large']:.3f} (Jaccard: {k['jaccard_ari']:.3f}); "
                     f"no alpha below {k['alpha_lower_bound']:.3g} can return it")
        if k["ablation_hits_own_output"] is not None:
            lines.append(f"  ablating a group of one feature changes that feature's output most in "
                         f"{k['ablation_hits_own_output']:.0%} of the {k['single_feature_groups']} such groups")
        for s in k["sweep"]:
            lines.append(f"  alpha {s['alpha']:g}: ARI {s['ari']:.3f} (large only {s['ari_large']:.3f}), {s['n_groups']} groups")
    return "\n".join(lines)


# --- the results table (results/clustering*.md) ----------------------------------------------------

SYNTHETIC = dict(n=4000, sizes=[3, 3, 4, 2, 5], p_active=0.1, p_drop=0.05, seed=0)  # test_cluster.py's
SWEEP = [0.1, 0.3, 0.5, 0.7, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 4, 5, 10, 20, 50]  # experiments.sh's


def interval(sweep: list[dict]) -> str:
    """The swept alphas at which the known partition came out exactly (ARI 1), as 'lo-hi' (or 'none')."""
    hits = [s["alpha"] for s in sweep if s["ari"] == 1.0]
    return "none" if not hits else f"{min(hits):g}" if len(hits) == 1 else f"{min(hits):g}-{max(hits):g}"


def synthetic_rows(alphas=SWEEP) -> tuple[float, list[dict]]:
    A, planted = planted_membership(**SYNTHETIC)
    cols = list(range(A.shape[1]))
    truth = labels_of(planted, cols)
    return alpha_lower_bound(A, planted), [{"alpha": a, "ari": adjusted_rand_index(truth, labels_of(merge(A, a), cols)),
                                            "n_groups": len(merge(A, a))} for a in alphas]


def report(run_dirs: list[str], out: Path) -> None:
    """results/clustering*.md from the clusters.json of each run folder (python cluster.py RUN --sweep ...)."""
    bound, rows = synthetic_rows()
    lines = ["# Clustering subcomponents into mechanisms (cluster.py)", "",
             "Made by `python cluster.py report ...` from each run's clusters.json. ARI: adjusted Rand index",
             "with the known partition (1 = exactly the paper's mechanisms). α*: the smallest alpha at which",
             "the known partition is a stopping point of the greedy merge (`alpha_lower_bound`, derived from the",
             "cost); below it the merge cannot return it. \"large\": subcomponents with |u||v| >= 0.1 (the ones",
             "the paper's mechanisms are made of; the others fire now and then without mattering).",
             f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
             f"## Synthetic: planted blocks {SYNTHETIC['sizes']}, each active with p {SYNTHETIC['p_active']}, members "
             f"dropping out with p {SYNTHETIC['p_drop']}, {SYNTHETIC['n']} inputs", "",
             f"α* = {bound:.3f}; exact recovery at α in {interval(rows)} of the swept values.", "",
             "| alpha | " + " | ".join(f"{r['alpha']:g}" for r in rows) + " |",
             "|---|" + "---|" * len(rows),
             "| ARI | " + " | ".join(f"{r['ari']:.2f}" for r in rows) + " |",
             "| groups | " + " | ".join(str(r["n_groups"]) for r in rows) + " |", "",
             "## Runs", "",
             "| run | live (large) subcomponents | known mechanisms | α* | ARI at the swept alphas | exact at α | large only: exact at α | groups at the run's α (ARI, large only) | Jaccard cross-check: ARI at its thresholds |",
             "|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for run in run_dirs:
        r = json.loads((Path(run) / "clusters.json").read_text())
        k = r.get("known")
        cells = [run, f"{r['n_live']} of {r['n_subcomponents']}" + (f" ({k['n_large']})" if k else "")]
        if k:
            cells += [str(k["n_groups"]), f"{k['alpha_lower_bound']:.2f}",
                      ", ".join(f"{s['alpha']:g}: {s['ari']:.2f}" for s in k["sweep"]), interval(k["sweep"]),
                      interval([{"alpha": s["alpha"], "ari": s["ari_large"]} for s in k["sweep"]]),
                      f"{r['n_groups']} at {r['alpha']:g} ({k['ari']:.3f}, {k['ari_large']:.3f})",
                      ", ".join(f"{j['threshold']:g}: {j['ari']:.2f}" for j in k["jaccard_sweep"])]
        else:  # no known partition (induction): the groups only
            cells += ["-", "-", "-", "-", "-", f"{r['n_groups']} at {r['alpha']:g}", f"{r['jaccard']['n_groups']} groups at 0.5"]
        lines.append("| " + " | ".join(cells) + " |")
        commands += [spd.read_config(run)["config"].get("command", "?"), r["command"]]
    for run in run_dirs:  # sequence models: what each group holds and where it fires
        r = json.loads((Path(run) / "clusters.json").read_text())
        if r["groups"] and "positions" in r["groups"][0]:
            lines += ["", f"## {run}: the groups (no known partition; compare the transformer paper's Table 1)", "",
                      f"{r['n_live']} live subcomponents in {r['n_groups']} groups at alpha {r['alpha']:g}. The groups "
                      "active at 10% or more of some position class, largest first: their subcomponents per matrix, "
                      "the fraction of each position class at which the group is active, and the last-position KL "
                      "when the whole group is ablated.", "",
                      "| rank | subcomponents per matrix | s1 | m | s2 | random | bos | ablation KL |", "|---|---|---|---|---|---|---|---|"]
            for g in sorted((g for g in r["groups"] if max(g["positions"].values()) >= 0.1), key=lambda g: -g["rank"]):
                per = {}
                for m in g["members"]:
                    label = analysis.paper_label(m.rsplit(":", 1)[0])
                    per[label] = per.get(label, 0) + 1
                pos = g["positions"]
                lines.append(f"| {g['rank']} | {', '.join(f'{k} {v}' for k, v in per.items())} | " +
                             " | ".join(f"{pos[c]:.2f}" for c in ("s1", "m", "s2", "random", "bos")) +
                             f" | {g['divergence']:.3g} |")
    lines += ["", "Commands (each run's decomposition, then its clustering):", "", "```", *commands, "```", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        ap = argparse.ArgumentParser(description="results table from clusters.json files")
        ap.add_argument("runs", nargs="+")
        ap.add_argument("--out", required=True)
        a = ap.parse_args(sys.argv[2:])
        report(a.runs, Path(a.out))
    else:
        main()
