"""Tests of cluster.py: the description length and its merge change against direct computation, the
greedy merge against a from-scratch reference, planted blocks recovered over a stated range of alpha
(its lower end derived from the cost formula), the adjusted Rand index by hand, and the clustering of
a saved TMS 5-2+ID decomposition against the SPD paper's known mechanisms."""

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cluster

ROOT = Path(__file__).parent
FIXTURE = ROOT / "fixtures" / "cluster_tms_5-2-id"


# --- B. description length -----------------------------------------------------------------------


def test_description_length_by_hand():
    # two groups: log2 2 = 1 bit of index; 0.5 (1 + 3 * 1) + 0.25 (1 + 3 * 2) = 3.75
    assert cluster.description_length(np.array([0.5, 0.25]), np.array([1.0, 2.0]), 3.0) == pytest.approx(3.75)
    # one group needs no index: only its rank, 0.8 * 2 * 4
    assert cluster.description_length(np.array([0.8]), np.array([4.0]), 2.0) == pytest.approx(6.4)


def _cost(A, groups, alpha):  # L computed from scratch for a partition of A's columns
    f = np.array([A[:, g].any(1).mean() for g in groups])
    return cluster.description_length(f, np.array([float(len(g)) for g in groups]), alpha)


def test_merge_delta_is_the_cost_after_minus_the_cost_before_in_both_forms():
    rng = np.random.default_rng(0)
    A = rng.random((500, 7)) < rng.uniform(0.05, 0.5, 7)
    groups = [[0, 1], [2], [3, 4, 5], [6]]
    alpha, G = 1.7, len(groups)
    f = np.array([A[:, g].any(1).mean() for g in groups])
    for a, b in itertools.combinations(range(G), 2):
        merged = [g for k, g in enumerate(groups) if k not in (a, b)] + [groups[a] + groups[b]]
        f_ab = A[:, groups[a] + groups[b]].any(1).mean()
        delta = cluster.merge_delta(f[a], f[b], f_ab, len(groups[a]), len(groups[b]), f.sum(), G, alpha)
        assert delta == pytest.approx(_cost(A, merged, alpha) - _cost(A, groups, alpha), abs=1e-12)
        both = f[a] + f[b] - f_ab
        second = (-both * math.log2(G - 1) + alpha * (len(groups[a]) * (f[b] - both) + len(groups[b]) * (f[a] - both))
                  - f.sum() * math.log2(G / (G - 1)))
        assert delta == pytest.approx(second, abs=1e-12)


# --- C. greedy merge -----------------------------------------------------------------------------


def _reference_greedy(A, alpha):
    """The greedy merge written the slow way: every candidate partition costed from scratch."""
    groups = [[k] for k in range(A.shape[1]) if A[:, k].any()]
    costs = [_cost(A, groups, alpha)]
    while len(groups) > 1:
        best = None
        for a, b in itertools.combinations(range(len(groups)), 2):
            merged = [g for k, g in enumerate(groups) if k not in (a, b)]
            merged.insert(a, sorted(groups[a] + groups[b]))
            change = _cost(A, merged, alpha) - costs[-1]
            if best is None or change < best[0] - 1e-12:
                best = (change, merged)
        if best[0] >= -1e-12:
            break
        groups = best[1]
        costs.append(_cost(A, groups, alpha))
    return groups, costs


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 4.0])
def test_greedy_merge_matches_the_from_scratch_reference(alpha):
    rng = np.random.default_rng(1)
    on = rng.random((400, 3)) < [0.1, 0.2, 0.3]
    A = np.concatenate([on[:, [0, 0, 1]], rng.random((400, 3)) < 0.15, on[:, [2, 1]]], 1)
    A &= rng.random(A.shape) > 0.1  # members drop out now and then
    A[:, 5] = False  # a dead column
    groups, history = cluster.merge_with_history(A, alpha)
    ref_groups, ref_costs = _reference_greedy(A, alpha)
    assert sorted(groups) == sorted(ref_groups)
    assert [h["cost"] for h in history] == pytest.approx(ref_costs, abs=1e-12)
    assert all(5 not in g for g in groups)
    assert [h["cost"] - prev["cost"] for prev, h in zip(history, history[1:])] == pytest.approx(
        [h["delta"] for h in history[1:]], abs=1e-12)


def test_alpha_zero_merges_everything_and_the_merge_is_deterministic():
    A, _ = cluster.planted_membership(1000, [2, 3, 2], 0.2, 0.1, seed=3)
    assert cluster.merge(A, 0.0) == [list(range(7))]  # one group names no index: L = 0
    assert cluster.merge(A, 1.0) == cluster.merge(A.copy(), 1.0)
    perm = np.random.default_rng(0).permutation(7)  # shuffled columns give the same groups
    assert sorted(sorted(perm[g].tolist()) for g in cluster.merge(A[:, perm], 1.0)) == cluster.merge(A, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        cluster.merge(A, -1.0)


SIZES, P_ACTIVE, P_DROP = [3, 3, 4, 2, 5], 0.1, 0.05


def test_planted_blocks_are_recovered_exactly_from_the_derived_lower_bound_of_alpha_to_20():
    """Range stated: [1.02 α*, 20], α* = alpha_lower_bound (0.416 here, derived from the cost: below it
    merging two planted blocks lowers L, so merge() cannot stop at the planted partition). The upper
    end, measured: 20 recovers, 40 leaves a member that dropped out 5% of the time on its own (the
    rank it would add to its block costs more than the index it saves)."""
    A, planted = cluster.planted_membership(4000, SIZES, P_ACTIVE, P_DROP, seed=0)
    lower = cluster.alpha_lower_bound(A, planted)
    assert 0.3 < lower < 0.6
    for alpha in [1.02 * lower, 1.5 * lower, 1.0, 3.0, 10.0, 20.0]:
        assert cluster.merge(A, alpha) == planted, alpha
    below = cluster.merge(A, 0.98 * lower)
    assert len(below) < len(planted)  # two planted blocks merged
    assert len(cluster.merge(A, 40.0)) > len(planted)
    # the bound is where the cheapest merge of two planted blocks costs nothing
    f = np.array([A[:, g].any(1).mean() for g in planted])
    deltas = [cluster.merge_delta(f[a], f[b], A[:, planted[a] + planted[b]].any(1).mean(), len(planted[a]),
                                  len(planted[b]), f.sum(), len(planted), lower)
              for a, b in itertools.combinations(range(len(planted)), 2)]
    assert min(deltas) == pytest.approx(0.0, abs=1e-12)


def test_the_jaccard_cross_check_recovers_the_planted_blocks():
    A, planted = cluster.planted_membership(4000, SIZES, P_ACTIVE, P_DROP, seed=0)
    assert cluster.jaccard_merge(A, 0.5) == planted
    J = cluster.jaccard(A)
    a, b = A[:, 0], A[:, 1]
    assert J[0, 1] == pytest.approx((a & b).sum() / (a | b).sum())
    assert len(cluster.jaccard_merge(A, 1.0)) > len(planted)  # no two columns identical at 5% dropout


def _reference_average_linkage(A, threshold):
    """Average linkage the slow way: the mean pairwise Jaccard of two clusters' members, from scratch."""
    J = cluster.jaccard(A)
    groups = [[k] for k in range(A.shape[1]) if A[:, k].any()]
    while len(groups) > 1:
        score, a, b = max((J[np.ix_(ga, gb)].mean(), a, b) for (a, ga), (b, gb)
                          in itertools.combinations(enumerate(groups), 2))
        if score < threshold:
            break
        groups[a] = sorted(groups[a] + groups.pop(b))
    return groups


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.6])
def test_jaccard_merge_is_average_linkage(threshold):
    A, _ = cluster.planted_membership(300, [3, 2, 4, 1], 0.3, 0.3, seed=5)
    A = A | (np.random.default_rng(2).random(A.shape) < 0.05)  # some noise between blocks
    assert cluster.jaccard_merge(A, threshold) == _reference_average_linkage(A, threshold)


# --- E. agreement --------------------------------------------------------------------------------


def test_adjusted_rand_index_by_hand():
    # n_ij: 2, 1, 1 -> Σ C(n_ij, 2) = 1; rows 2, 2 -> 2; columns 2, 1, 1 -> 1; C(4, 2) = 6;
    # E = 2 * 1 / 6; ARI = (1 - 1/3) / (1.5 - 1/3) = 4/7
    assert cluster.adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert cluster.adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert cluster.adjusted_rand_index(["a", "a", "b"], [7, 7, 3]) == 1.0
    assert cluster.labels_of([[2, 0], [1]], [0, 1, 2, 3]) == [0, 1, 0, -4]


# --- G. cluster masks ----------------------------------------------------------------------------


def test_cluster_masks_give_every_member_the_groups_max():
    g = torch.tensor([[0.2, 0.9, 0.0, 0.5], [1.0, 0.0, 0.3, -0.01]])
    m = cluster.cluster_masks(g, [[0, 1], [3]])
    assert torch.equal(m, torch.tensor([[0.9, 0.9, 0.0, 0.5], [1.0, 1.0, 0.3, -0.01]]))


# --- A run: a saved TMS 5-2+ID decomposition (fixtures/cluster_tms_5-2-id, see its README) -----------


@pytest.fixture
def tms_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    return run


def test_clustering_a_saved_tms_5_2_id_run_finds_the_papers_mechanisms(tms_run, tmp_path, capsys):
    """The SPD paper's TMS 5-2+ID: five mechanisms, one per feature (its subcomponent of W in both
    uses), and the identity's two subcomponents as one. Found exactly at alpha 2; not below the
    derived bound (about 1 here); at alpha 10 the identity splits in two (its halves are co-active on
    only half of the inputs where either is). Ablating a feature's cluster changes mostly its output."""
    result = cluster.main([str(tms_run), "--target_dir", str(FIXTURE / "targets"), "--n", "4000", "--alpha", "2",
                           "--sweep", "0.5", "10", "--out", str(tmp_path / "out")])
    known = result["known"]
    assert known["n_groups"] == 6 and known["ari"] == 1.0
    assert 0.5 < known["alpha_lower_bound"] < 2
    assert known["sweep"][0]["ari"] < 1.0 and known["sweep"][0]["n_groups"] < 6  # alpha 0.5: mechanisms merged
    assert known["sweep"][1]["n_groups"] == 7  # alpha 10: the identity in two
    by_known = {tuple(g["known"]): g for g in result["groups"]}
    identity = by_known[("hidden_layers",)]
    assert identity["rank"] == 2 and all(m.startswith("hidden_layers.0:") for m in identity["members"])
    for i in range(5):
        grp = by_known[(f"feature {i}",)]
        assert sorted(m.split(":")[0] for m in grp["members"]) == ["linear1", "linear2"]
        assert grp["top_outputs"][0][0] == i and grp["top_output_share"] > 0.5
    # the Jaccard cross-check (0.5) finds the same five feature groups; the identity's halves, Jaccard
    # about 0.47, it keeps apart
    jaccard = result["jaccard"]["groups"]
    assert sorted(g for g in jaccard if g[0].startswith("linear")) == sorted(
        g["members"] for g in result["groups"] if g["members"][0].startswith("linear"))
    assert sorted(g for g in jaccard if g[0].startswith("hidden")) == [[m] for m in sorted(identity["members"])]
    saved = json.loads((tmp_path / "out" / "clusters.json").read_text())
    assert saved["groups"] == result["groups"] and (tmp_path / "out" / "clusters.png").exists()
    assert not (tms_run / "clusters.json").exists()  # --out respected


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "-1"], "--alpha must be"),
    (["--threshold", "1.5"], "--threshold must be in"),
    (["--n", "1"], "--n must be at least 2"),
    (["--jaccard_threshold", "0"], "--jaccard_threshold must be in"),
])
def test_cli_bad_input_names_the_value(tms_run, argv, message):
    with pytest.raises(SystemExit, match=message):
        cluster.main([str(tms_run), *argv])


def test_cli_refuses_what_is_not_a_finished_spd_run(tms_run, tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        cluster.main([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="config.json not found"):
        cluster.main([str(tmp_path / "empty")])
    (tms_run / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="not a finished run"):
        cluster.main([str(tms_run), "--target_dir", str(FIXTURE / "targets")])


def test_report_tabulates_a_clustered_run(tms_run, tmp_path):
    cluster.main([str(tms_run), "--target_dir", str(FIXTURE / "targets"), "--n", "2000", "--sweep", "0.5", "2"])
    out = tmp_path / "clustering.md"
    cluster.report([str(tms_run)], out)
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {tms_run} |"))
    assert "| 12 of 60 (12) | 6 |" in row and "0.5: 0.00, 2: 1.00 | 2 | 2 |" in row
    assert "python train.py --model tms_5-2-id --seed 0" in text and "python cluster.py" in text
