"""Tests of analysis.py sections D (induction heads: Table 1, attention KL, Algorithm 2, Figure 2)
and E (GPT-2: prompts, unique subcomponents, the suppression edit, zeroed MLPs). Each checks a
hand-computed value or an independent computation (HF logits, a zeroed copy of the model)."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import analysis
import models
import spd

torch.set_num_threads(1)


def set_exact(dec):
    """U = W, V = I (C = d_in): U V equals the target weight exactly."""
    with torch.no_grad():
        for name in dec.names:
            W = spd.linear_weight(dec.module(name))
            comp = dec.components[spd._key(name)]
            comp.U.copy_(W)
            comp.V.copy_(torch.eye(W.shape[1]))


def tiny_induction(ci_fn="vector"):
    torch.manual_seed(0)
    model = models.InductionTransformer(vocab_size=12, d_model=8, n_layers=2, seq_len=10)
    dec = spd.Decomposition(model, ["blocks.*.attn.*_proj"], C=8, ci_fn=ci_fn, d_gate=4, max_seq_len=10)
    return model, dec


# --- D. Table 1a, 1b ---------------------------------------------------------------------------------

def test_table1_counts_by_hand():
    B, S, C = 2, 7, 3
    s1_pos = torch.tensor([1, 3])  # ex 0: s1 1, m 2, random {3, 4, 5}; ex 1: s1 3, m 4, random {1, 2, 5}
    a = torch.full((B, S, C), -0.01)  # lower-leaky g < 0 is inactive
    a[0, 1, 0] = 0.5  # s1
    a[0, 2, 1], a[0, 2, 2] = 0.05, 1.0  # m: 2 active at threshold 0, 1 at 0.1
    a[1, 3, 0] = 1.0  # s1
    a[1, 4, 1] = 0.2  # m
    a[1, 5, 2] = 0.3  # random
    a[1, 0, 1] = 0.7  # BOS
    ci = {"a": a, "b": torch.zeros(B, S, C)}  # g = 0 exactly is not active
    t0 = analysis.table1_counts(ci, s1_pos, 0.0)
    assert t0["avg_active"]["a"] == pytest.approx({"s1": 1.0, "m": 1.5, "s2": 0.0, "random": 1 / 6, "bos": 0.5})
    assert t0["avg_active"]["b"] == pytest.approx({"s1": 0, "m": 0, "s2": 0, "random": 0, "bos": 0})
    assert t0["total_unique"] == {"a": 3, "b": 0} and t0["total_unique_sum"] == 3
    t1 = analysis.table1_counts(ci, s1_pos, 0.1)
    assert t1["avg_active"]["a"]["m"] == pytest.approx(1.0)
    assert t1["total_unique"]["a"] == 3  # c1 still active (0.2 at m of ex 1)
    assert analysis.spd_counts(ci) == {"total_unique": 3, "mean_per_example": pytest.approx((3 + 3) / 2)}


def test_position_classes_partition_and_reject_bad_s1():
    classes = analysis.position_classes(torch.tensor([2, 4]), 7)  # ex 1: m = 5 sits just before s2 = 6
    total = sum(classes[k].long() for k in ("s1", "m", "s2", "random", "bos"))
    assert torch.equal(total, torch.ones(2, 7, dtype=torch.long))  # every position in exactly one class
    assert classes["random"][1].nonzero()[:, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"\[5\]"):
        analysis.position_classes(torch.tensor([5]), 7)
    with pytest.raises(ValueError):
        analysis.position_classes(torch.tensor([0]), 7)


# --- D. Table 1c -------------------------------------------------------------------------------------

def test_attention_pattern_kl_by_hand_3x3():
    A_t = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])[None]
    A_m = torch.tensor([[1.0, 0, 0], [0.25, 0.75, 0], [0.1, 0.1, 0.8]])[None]
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row2 = 0.2 * math.log(2) + 0.3 * math.log(3) + 0.5 * math.log(0.5 / 0.8)
    assert float(analysis.attention_pattern_kl(A_t, A_m)) == pytest.approx((0 + row1 + row2) / 3, rel=1e-6)
    # A target zero inside the causal triangle contributes 0 log 0 = 0; a model zero stays finite.
    A_t2 = torch.tensor([[1.0, 0, 0], [0.0, 1.0, 0], [0.0, 0.0, 1.0]])[None]
    A_m2 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.0]])[None]
    kl = float(analysis.attention_pattern_kl(A_t2, A_m2))
    assert math.isfinite(kl) and kl > 20  # row 2: -log(tiny) ~ 87
    assert float(analysis.attention_pattern_kl(A_t2[:, :2, :2], A_m2[:, :2, :2])) == pytest.approx(math.log(2) / 2)


def test_attention_kl_and_losses_vanish_for_exact_decomposition():
    model, dec = tiny_induction()
    set_exact(dec)
    tokens = models.induction_batch(16, 10, 10, torch.Generator().manual_seed(0))[0]
    ones = {n: torch.ones(16, 10, 8) for n in dec.names}
    kl = analysis.attention_kl(dec, tokens, ones)
    assert set(kl) == {"layer0", "layer1", "mean"}
    assert all(abs(v) < 1e-6 for v in kl.values())
    losses = analysis.table1c_losses(dec, tokens, ones)
    assert all(abs(v) < 1e-6 for v in losses.values())
    half = {n: torch.rand(16, 10, 8, generator=torch.Generator().manual_seed(1)) for n in dec.names}
    kl = analysis.attention_kl(dec, tokens, half)
    assert kl["layer0"] > 1e-4 and kl["layer1"] > 1e-4
    assert kl["mean"] == pytest.approx((kl["layer0"] + kl["layer1"]) / 2)
    # independent: the masked pattern of layer 0 from the target's own attention with masked weights
    with torch.no_grad():
        _, A_t = model(tokens, return_attn=True)
        with dec.replaced(half):
            _, A_m = model(tokens, return_attn=True)
    assert kl["layer0"] == pytest.approx(float(analysis.attention_pattern_kl(A_t[0], A_m[0])))
    assert all("forward" not in dec.module(n).__dict__ for n in dec.names)


# --- D. Algorithm 2 ----------------------------------------------------------------------------------

def test_svd_prune_keeps_exact_rank_of_a_rank_two_matrix():
    torch.manual_seed(0)
    W = torch.randn(5, 2) @ torch.randn(2, 4)  # rank 2  [5, 4]
    x = torch.randn(50, 4)

    def loss_fn(ws):
        return float(((x @ ws["w"].T - x @ W.T) ** 2).mean())

    ranks, loss = analysis.svd_prune({"w": W}, loss_fn, tau=1e-8)
    assert ranks == {"w": 2} and loss <= 1e-8
    ranks, loss = analysis.svd_prune({"w": W}, loss_fn, tau=1e9)
    assert ranks == {"w": 0} and loss == pytest.approx(float(((x @ W.T) ** 2).mean()))


def test_svd_prune_greedy_order_by_hand():
    weights = {"a": torch.diag(torch.tensor([3.0, 1.0])), "b": torch.diag(torch.tensor([2.0, 0.5]))}

    def loss_fn(ws):  # Σ ||W' - W||_F^2 = Σ of the dropped σ^2: drops 0.5 (0.25), 1 (1.25), 2 (5.25), 3 (14.25)
        return float(sum(((ws[n] - weights[n]) ** 2).sum() for n in weights))

    assert analysis.svd_prune(weights, loss_fn, 0.1) == ({"a": 2, "b": 2}, 0.0)
    ranks, loss = analysis.svd_prune(weights, loss_fn, 0.3)
    assert ranks == {"a": 2, "b": 1} and loss == pytest.approx(0.25)
    ranks, loss = analysis.svd_prune(weights, loss_fn, 1.3)
    assert ranks == {"a": 1, "b": 1} and loss == pytest.approx(1.25)
    steps = analysis.svd_prune_path(weights, loss_fn)
    assert [s["matrix"] for s in steps] == ["b", "a", "b", "a"]
    assert [s["loss"] for s in steps] == pytest.approx([0.25, 1.25, 5.25, 14.25])
    for tau in (0.1, 0.3, 1.3, 6.0, 100.0):  # Figure 2's shortcut equals a run with that tau
        assert analysis.prune_at(steps, weights, tau) == pytest.approx(analysis.svd_prune(weights, loss_fn, tau))
    with pytest.raises(ValueError, match="-1"):
        analysis.svd_prune(weights, loss_fn, -1)


class Conv1D(nn.Module):
    """Stand-in with HF GPT-2 Conv1D's layout: y = x W + b with W stored [d_in, d_out]."""

    def __init__(self, d_out, d_in):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_run_with_weights_respects_conv1d_layout_and_restores_after_error():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3), nn.Linear(5, 2))
    before = [p.detach().clone() for p in model.parameters()]
    W0, W1 = torch.randn(5, 3), torch.randn(2, 5)  # nn.Linear layout [d_out, d_in]
    x = torch.randn(4, 3)
    with analysis.run_with_weights(model, {"0": W0, "1": W1}):
        expected = (x @ W0.T + model[0].bias) @ W1.T + model[1].bias
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="boom"):
        with analysis.run_with_weights(model, {"0": W0}):
            raise RuntimeError("boom")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        with analysis.run_with_weights(model, {"0": W0.T}):
            pass


# --- E. the suppression edit -------------------------------------------------------------------------

def linear_dec(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5))
    return model, spd.Decomposition(model, ["0"], C=3)


def test_suppress_removes_exactly_the_chosen_rank_one_direction():
    model, dec = linear_dec()
    W = model[0].weight.detach().clone()
    U, V = (t.detach() for t in dec.UV("0"))
    u, v = U[:, 1] / U[:, 1].norm(), V[1] / V[1].norm()
    x = torch.randn(10, 4)
    x_perp = x - (x @ v)[:, None] * v  # orthogonal to v̂
    y_perp = torch.randn(7, 5)
    y_perp = y_perp - (y_perp @ u)[:, None] * u  # orthogonal to û
    with analysis.suppress(dec, {"0": [1]}):
        W_edit = model[0].weight.detach().clone()
    assert abs(float(u @ W_edit @ v)) < 1e-6  # the chosen direction is gone
    assert torch.allclose(x_perp @ W_edit.T, x_perp @ W.T, atol=1e-6)  # unchanged on v̂'s complement
    assert torch.allclose(y_perp @ W_edit, y_perp @ W, atol=1e-6)  # and on û's
    assert torch.allclose(W - W_edit, float(u @ W @ v) * torch.outer(u, v), atol=1e-6)
    assert torch.equal(model[0].weight, W)  # restored exactly
    with pytest.raises(KeyError):
        with analysis.suppress(dec, {"0": [0]}):
            raise KeyError("inside")
    assert torch.equal(model[0].weight, W)


def test_suppress_orthogonal_directions_and_bad_input():
    model = nn.Sequential(nn.Linear(4, 5))
    W = model[0].weight.detach().clone()
    u = torch.linalg.qr(torch.randn(5, 2))[0]  # orthonormal write directions  [5, 2]
    v = torch.randn(2, 4) * 3  # read directions, not unit norm
    with analysis.suppress(model, {"0": (u, v)}):  # a plain model takes (u, v) directly
        W_edit = model[0].weight.detach().clone()
    v_hat = v / v.norm(dim=1, keepdim=True)
    for k in range(2):
        assert abs(float(u[:, k] @ W_edit @ v_hat[k])) < 1e-6
    assert torch.equal(model[0].weight, W)
    _, dec = linear_dec()
    with pytest.raises(ValueError, match=r"\[3\]"):
        with analysis.suppress(dec, {"0": [3]}):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with analysis.suppress(dec, {"0": [1, 1]}):
            pass
    with pytest.raises(ValueError, match="Decomposition"):
        with analysis.suppress(model, {"0": [1]}):
            pass


# --- E. prompts and probabilities --------------------------------------------------------------------

class FakeTokenizer:
    """Word-level stand-in for GPT2TokenizerFast: ids 1..98 by a fixed hash, EOS = BOS = 0."""

    eos_token_id = bos_token_id = 0

    def encode(self, s):
        return [1 + sum(map(ord, w)) % 98 for w in s.split()]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_tokenize_prompts_right_pads_with_eos():
    tok = FakeTokenizer()
    tokens, valid = analysis.tokenize_prompts(tok, ["a b c", "d e"])
    assert tokens.tolist() == [tok.encode("a b c"), tok.encode("d e") + [0]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    tokens, valid = analysis.tokenize_prompts(tok, ["a b"], bos=True)
    assert tokens.tolist() == [[0] + tok.encode("a b")] and valid.all()
    with pytest.raises(ValueError, match="'a'"):
        analysis.tokenize_prompts(tok, ["a b", "a"])
    with pytest.raises(ValueError, match="empty"):
        analysis.tokenize_prompts(tok, [])


def test_next_token_prob_reads_the_position_before_the_answer():
    tokens = torch.tensor([[3, 1, 2], [4, 2, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    logits = torch.randn(2, 3, 5)
    p = analysis.next_token_prob(lambda t: logits, tokens, valid)
    assert torch.allclose(p, torch.stack([logits[0, 1].softmax(-1)[2], logits[1, 0].softmax(-1)[2]]))
    p = analysis.next_token_prob(lambda t: logits, tokens, valid, torch.tensor([4, 0]))
    assert torch.allclose(p, torch.stack([logits[0, 1].softmax(-1)[4], logits[1, 0].softmax(-1)[0]]))
    with pytest.raises(ValueError, match="prefix"):
        analysis.next_token_prob(lambda t: logits, tokens, torch.tensor([[True, False, True]] * 2))


def test_unique_subcomponents_by_hand_ignores_padding():
    _, dec = linear_dec()
    tokens = torch.zeros(2, 4, 4)  # the toy model's inputs play the role of [B, S] tokens
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    g = torch.zeros(2, 4, 3)
    g[0, 0, 0] = g[1, 2, 0] = 0.3  # c0 on both examples: not unique
    g[0, 1, 1] = g[0, 2, 1] = 0.9  # c1 on example 0 only, at positions 1, 2
    g[0, 3, 2] = 1.0  # c2 on example 0's padding only: ignored ...
    g[1, 3, 2] = 0.01  # ... so c2 is unique to example 1
    dec.causal_importance = lambda acts: ({"0": g}, {"0": g})
    out = analysis.unique_subcomponents(dec, tokens, valid)
    assert out["n_active_total"] == 3 and out["n_active"] == {"0": 3}
    assert out["unique"] == [{"0": [{"c": 1, "positions": [1, 2]}]}, {"0": [{"c": 2, "positions": [3]}]}]
    assert out["n_unique"] == [1, 1]
    assert analysis.unique_subcomponents(dec, tokens, valid, threshold=0.5)["unique"][1] == {}


# --- E. GPT-2 ----------------------------------------------------------------------------------------

GPT2_TARGETS = [f"model.transformer.h.*.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def tiny_gpt2_dec(C=None):
    pytest.importorskip("transformers")
    hf = models.tiny_gpt2()
    with torch.no_grad():  # HF initialises biases to 0; random ones make the bias check mean something
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    target = models.GPT2Logits(hf)
    torch.manual_seed(0)
    C = C or {"*.mlp.c_proj": 128, "*": 32}  # C = d_in of each matrix
    return hf, spd.Decomposition(target, GPT2_TARGETS, C=C, ci_fn="vector", d_gate=2)


def test_gpt2_exact_decomposition_reproduces_hf_logits():
    hf, dec = tiny_gpt2_dec()
    assert len(dec.names) == 8
    assert dec.UV("model.transformer.h.0.mlp.c_fc")[0].shape == (128, 32)  # [d_out, C]: Conv1D transposed
    set_exact(dec)
    tokens = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    masks = {n: torch.ones(3, 9, dec.C[n]) for n in dec.names}
    expected = hf(input_ids=tokens).logits
    assert torch.allclose(dec(tokens, masks), expected, atol=1e-4)
    a = torch.randn(3, 9, 32)
    attn = dec.module("model.transformer.h.1.attn.c_attn")
    assert torch.allclose(dec.component_forward("model.transformer.h.1.attn.c_attn", a), attn(a), atol=1e-5)
    assert spd.faithfulness_loss(dec.target_weights(), dec.component_weights()).item() < 1e-12


def test_gpt2_suppress_matches_the_papers_layout_and_restores():
    hf, dec = tiny_gpt2_dec(C=6)
    name = "model.transformer.h.0.mlp.c_fc"
    conv = dec.module(name)
    W_conv = conv.weight.detach().clone()  # paper layout x W: [d_in, d_out]
    U, V = (t.detach() for t in dec.UV(name))
    read, write = V[4] / V[4].norm(), U[:, 4] / U[:, 4].norm()  # paper's û (reads), v̂ (writes)
    expected = W_conv - (read @ W_conv @ write) * torch.outer(read, write)
    tokens = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    before = hf(input_ids=tokens).logits
    with analysis.suppress(dec, {name: [4]}):
        assert torch.allclose(conv.weight, expected, atol=1e-6)
        assert not torch.allclose(hf(input_ids=tokens).logits, before)
    assert torch.equal(conv.weight, W_conv)
    assert torch.equal(hf(input_ids=tokens).logits, before)


def test_zero_mlp_layers_matches_zeroed_c_proj():
    hf, dec = tiny_gpt2_dec(C=4)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 6, dtype=torch.bool)
    probs = analysis.zero_mlp_layers(dec.target, tokens, valid)
    assert probs.shape == (2, 2)
    for i in range(2):  # independent: a copy whose MLP i writes W = 0, b = 0
        hf0 = copy.deepcopy(hf)
        with torch.no_grad():
            hf0.transformer.h[i].mlp.c_proj.weight.zero_()
            hf0.transformer.h[i].mlp.c_proj.bias.zero_()
        expected = analysis.next_token_prob(lambda t: hf0(input_ids=t).logits, tokens, valid)
        assert torch.allclose(probs[i], expected, atol=1e-6)
    assert torch.allclose(analysis.zero_mlp_layers(hf, tokens, valid), probs)  # raw HF model too
    full = analysis.next_token_prob(dec.target, tokens, valid)
    assert not torch.allclose(probs[0], full)  # hooks removed afterwards:
    assert torch.allclose(analysis.next_token_prob(dec.target, tokens, valid), full)


def test_evaluate_gpt2_end_to_end(tmp_path):
    hf, dec = tiny_gpt2_dec(C=4)
    fc0, attn1 = "model.transformer.h.0.mlp.c_fc", "model.transformer.h.1.attn.c_attn"

    def hand_ci(acts):  # prompt 0: fc0 c1 at pos 1, attn1 c2 at pos 2; prompt 1: fc0 c3 at pos 2; both: fc0 c0
        B, S = acts[fc0].shape[:2]
        ci = {n: torch.zeros(B, S, 4) for n in dec.names}
        ci[fc0][:, 0, 0] = 1.0
        ci[fc0][0, 1, 1] = ci[attn1][0, 2, 2] = ci[fc0][1, 2, 3] = 0.5
        return ci, ci

    dec.causal_importance = hand_ci
    res = analysis.evaluate_gpt2(dec, dec.target, FakeTokenizer(), tmp_path)
    assert res["n_active_total"] == 4 and res["n_unique"] == [2, 1]
    assert res["unique"][0][fc0] == [{"c": 1, "positions": [1], "tokens": [FakeTokenizer().decode(
        [FakeTokenizer().encode(analysis.PROMPTS[0])[1]])]}]
    assert set(res["suppression"]) == {"prompt0_all", "prompt0_layer0_mlp", "prompt1_all", "prompt1_layer0_mlp"}
    assert res["suppression"]["prompt0_layer0_mlp"]["edits"] == {fc0: [1]}
    tokens, valid = analysis.tokenize_prompts(FakeTokenizer(), analysis.PROMPTS)
    with analysis.suppress(dec, {fc0: [1], attn1: [2]}):
        p = analysis.next_token_prob(dec.target, tokens, valid)
    assert res["suppression"]["prompt0_all"]["p_after"] == pytest.approx(p.tolist())
    assert res["suppression"]["prompt0_all"]["p_before"] == pytest.approx(res["p_full"])
    assert len(res["single_slices"]) == 2 and len(res["zero_mlp"]) == 2 and len(res["zero_mlp"][0]) == 2
    json.dumps(res)  # metrics.json-able
    assert len(analysis.FACTS) == 30 and "New City" in analysis.FACTS[17]
    for f in ("figure3.png", "figure4.png", "figure9.png"):
        assert (tmp_path / f).stat().st_size > 0


# --- D. the whole evaluation -------------------------------------------------------------------------

def test_evaluate_induction_end_to_end(tmp_path):
    model, dec = tiny_induction(ci_fn="attention")
    res = analysis.evaluate_induction(dec, model, spd.SPDConfig(output_loss="kl", last_token_only=True), tmp_path,
                                      n_eval=24, taus=(1e-3, 1e-1, 10.0))
    assert set(res["table1_t0"]["avg_active"]) == set(dec.names)
    assert res["table1_t0"]["total_unique_sum"] >= res["table1_t0.1"]["total_unique_sum"]
    svd = res["figure2"]["svd"]
    assert [s["total_rank"] for s in svd] == sorted((s["total_rank"] for s in svd), reverse=True)
    assert all(s["kl"] <= s["tau"] for s in svd)
    assert svd[-1]["total_rank"] == 0  # τ = 10 removes everything from an untrained model
    # Figure 2's shortcut agrees with Algorithm 2 run directly at that tau
    tokens = models.induction_batch(24, 10, 10, torch.Generator().manual_seed(0))[0]
    ranks, loss = analysis.svd_prune(dec.target_weights(), analysis.last_token_kl_fn(model, tokens), 1e-1)
    assert ranks == svd[1]["ranks"] and loss == pytest.approx(svd[1]["kl"])
    json.dumps(res)  # metrics.json-able
    md = (tmp_path / "table1.md").read_text()
    assert md == analysis.results_table1_markdown(res)
    assert "| Q_0 |" in md and "(16) |" in md and "| O_1 |" in md and "| D_KL Attn (Mean) |" in md
    for f in ("table1.png", "attention_patterns.png", "figure2.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_table1_markdown_layout():
    table = {"threshold": 0.0, "avg_active": {"blocks.0.attn.q_proj": {"s1": 0.0, "m": 1.0, "s2": 0.0, "random": 0.002}},
             "total_unique": {"blocks.0.attn.q_proj": 2}, "total_unique_sum": 2}
    metrics = {"table1_t0": table, "table1c": {k: 0.5 for k in analysis.PAPER_TABLE1C}}
    md = analysis.results_table1_markdown(metrics)
    assert "| Q_0 | 0.000 (0.000) | 1.000 (1.000) | 0.000 (0.000) | 0.002 (0.001) | 2 (1) |" in md
    assert "| D_KL Attn (Layer 1) | 0.5 | 0.385 |" in md
