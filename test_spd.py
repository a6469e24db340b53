"""Tests of spd.py: each equation against an independent computation (by hand, autograd, finite
differences or a naive loop), the decomposition's invariants, save/load, and bad input; and of the
transformer analyses in analysis.py (induction-head Table 1, attention KL, the SVD baseline, GPT-2
unique subcomponents and the suppression edit) against hand computations and the HF model."""

import contextlib
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import analysis
import models
import spd


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def decomposition(model, C=5, **kw):
    torch.manual_seed(1)
    return spd.Decomposition(model, ["0", "2"], C=C, **kw)


def set_exact(dec):
    """U = W, V = I (C = d_in): U V equals the target weight exactly."""
    with torch.no_grad():
        for name in dec.names:
            W = spd.linear_weight(dec.module(name))
            comp = dec.components[spd._key(name)]
            comp.U.copy_(W)
            comp.V.copy_(torch.eye(W.shape[1]))


# --- B. eq. 14 -----------------------------------------------------------------------------------

def test_leaky_hard_sigmoids_by_hand():
    x = torch.tensor([-2.0, 0.0, 0.3, 1.0, 3.0])
    assert torch.allclose(spd.lower_leaky_hard_sigmoid(x), torch.tensor([-0.02, 0.0, 0.3, 1.0, 1.0]))
    assert torch.allclose(spd.upper_leaky_hard_sigmoid(x), torch.tensor([0.0, 0.0, 0.3, 1.0, 1.02]))


def test_leaky_slopes_keep_gradients_alive():
    x = torch.tensor([-2.0, 3.0], requires_grad=True)
    spd.lower_leaky_hard_sigmoid(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.01, 0.0]))
    x.grad = None
    spd.upper_leaky_hard_sigmoid(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.01]))


def test_leaky_hard_sigmoid_slopes_at_the_kinks():
    """The slopes at x = 0 and x = 1, as the authors' code has them (the paper leaves them open):
    lower 0.01 at 0 and 1 at 1; upper 0 at 0 and 1 at 1. Upper's slope at 0 decides the first step:
    at the initialisation every zero input's Γ(0) is exactly 0 (test_parity.py's init fixture)."""
    for fn, slopes in ((spd.lower_leaky_hard_sigmoid, [0.01, 1.0]), (spd.upper_leaky_hard_sigmoid, [0.0, 1.0])):
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        fn(x).sum().backward()
        assert x.grad.tolist() == pytest.approx(slopes)


def test_fast_leaky_hard_sigmoids_equal_the_case_split_bit_for_bit():
    """Section K's forms against section B's literal case split: values and gradients, kinks included."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10_000) * 3, torch.tensor([0.0, -0.0, 1.0, 1e-8, -1e-8, 1 - 6e-8, 1 + 1.2e-7, -200.0, 200.0])])
    for fast, plain in ((spd.lower_leaky_hard_sigmoid_fast, spd.lower_leaky_hard_sigmoid),
                        (spd.upper_leaky_hard_sigmoid_fast, spd.upper_leaky_hard_sigmoid)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fast(xa), plain(xb)
        w = torch.randn_like(x)
        (ya * w).sum().backward(), (yb * w).sum().backward()
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)


# --- C. eq. 1 and initialisation -----------------------------------------------------------------

def test_projection_init_is_projection_onto_rank_one_directions():
    torch.manual_seed(0)
    W = torch.randn(3, 4)
    comp = spd.Components(4, 3, 7)
    spd.init_components_(comp, W)
    for c in range(7):
        u, v = comp.U[:, c], comp.V[c]
        assert abs(v.norm() - 1) < 1e-5
        # u_c = (u_hat^T W v_c) u_hat with u_hat = u_c / |u_c|, so u_c^T W v_c = |u_c|^2 >= 0 whatever the sign of u_hat^T W v_c
        assert torch.allclose(u @ W @ v, u.norm() ** 2, atol=1e-5)


def test_components_forward_never_builds_per_example_weights_but_matches_them():
    dec = decomposition(tiny_mlp())
    a, m = torch.randn(8, 4), torch.rand(8, 5)
    U, V = dec.UV("0")
    expected = torch.stack([U @ torch.diag(m[b]) @ V @ a[b] for b in range(8)]) + dec.module("0").bias
    assert torch.allclose(dec.component_forward("0", a, m), expected, atol=1e-5)


# --- D. causal-importance functions ------------------------------------------------------------------

def naive_scalar_gamma(ci, h):
    return torch.stack([(F.gelu(h[..., c, None] * ci.w_in[c] + ci.b_in[c]) * ci.w_out[c]).sum(-1) + ci.b_out[c]
                        for c in range(h.shape[-1])], -1)


def test_scalar_ci_is_eq_13_per_subcomponent():
    """The plain ScalarCI (SPD eq. 13) against a loop over subcomponents."""
    torch.manual_seed(0)
    ci = spd.ScalarCI(C=7, d_gate=5)
    with torch.no_grad():
        ci.b_in.normal_(), ci.b_out.normal_()
    h = torch.randn(3, 4, 7)
    assert torch.allclose(ci(h), naive_scalar_gamma(ci, h), atol=1e-5)


# section K's fused Γ: hidden tensor kept for the backward; recomputed in one chunk, in several (the last
# one shorter), one c each
@pytest.mark.parametrize("keep, chunk", [(1 << 22, 0), (0, 1 << 18), (0, 40), (0, 0)])
def test_fast_scalar_gamma_equals_the_plain_one(monkeypatch, keep, chunk):
    monkeypatch.setattr(spd, "_KEEP_ELEMS", keep)
    monkeypatch.setattr(spd, "_CHUNK_ELEMS", chunk)
    torch.manual_seed(0)
    ci = spd.ScalarCI(C=7, d_gate=5)
    with torch.no_grad():
        ci.b_in.normal_(), ci.b_out.normal_()
    a = torch.randn(3, 4, 6)
    a[0, 1] = 0  # an all-zero input takes the shared γ(0) path
    V = torch.randn(7, 6, requires_grad=True)
    w = torch.randn(3, 4, 7)
    grads = []
    for fn in (lambda h: spd.scalar_gamma(ci, h, a.ne(0).any(-1)), ci):
        out = fn(a @ V.T)
        grads.append((out, *torch.autograd.grad((out * w).sum(), [V, *ci.parameters()])))
    for mine, ref in zip(*grads):
        assert torch.allclose(mine, ref, atol=1e-5)


def test_scalar_gamma_reuses_no_buffer_a_pending_backward_still_needs():
    """Two forward passes before one backward: the second must not write into the hidden tensor the
    first kept for its backward (spd._buffer hands a buffer out again only when nothing holds it)."""
    torch.manual_seed(0)
    ci = spd.ScalarCI(C=7, d_gate=5)
    with torch.no_grad():
        ci.b_in.normal_()
    h1, h2 = torch.randn(30, 7, requires_grad=True), torch.randn(30, 7, requires_grad=True)
    w1, w2 = torch.randn(30, 7), torch.randn(30, 7)
    grads = []
    fused = lambda h: spd._ScalarGamma.apply(h, ci.w_in, ci.b_in, ci.w_out, ci.b_out)  # noqa: E731
    for fn in (fused, ci):
        loss = (fn(h1) * w1).sum() + (fn(h2) * w2).sum()
        grads.append(torch.autograd.grad(loss, [h1, h2, *ci.parameters()]))
    for mine, ref in zip(*grads):
        assert torch.allclose(mine, ref, atol=1e-5)
    again = fused(h1)  # after the backward, the kept buffers are free and handed out again
    assert torch.allclose(again, ci(h1), atol=1e-5)


@pytest.mark.parametrize("keep", [1 << 22, 0])
def test_scalar_gamma_gradcheck_double(monkeypatch, keep):
    monkeypatch.setattr(spd, "_KEEP_ELEMS", keep)
    torch.manual_seed(0)
    args = [torch.randn(6, 3, dtype=torch.double, requires_grad=True)] + \
           [torch.randn(*s, dtype=torch.double, requires_grad=True) for s in [(3, 4), (3, 4), (3, 4), (3,)]]
    assert torch.autograd.gradcheck(spd._ScalarGamma.apply, args)


def test_vector_ci_is_independent_mlp_per_subcomponent():
    torch.manual_seed(0)
    ci = spd.VectorCI(d_in=4, C=3, d_gate=5)
    a = torch.randn(2, 6, 4)
    ref = torch.stack([(F.gelu(a @ ci.w_in[:, c] + ci.b_in[c]) * ci.w_out[c]).sum(-1) + ci.b_out[c]
                       for c in range(3)], -1)
    assert torch.allclose(ci(a), ref, atol=1e-5)


def naive_attention_ci(ci, x):
    B, S, d = x.shape
    x_pos = x + ci.abs_pos[:S]
    q, k, v = x @ ci.Q.weight.T, x @ ci.K.weight.T, x_pos @ ci.V.weight.T
    out = torch.zeros(B, S, d)
    for n in range(S):
        scores = torch.stack([(q[:, n] * k[:, j]).sum(-1)
                              + (q[:, n] * ci.rel_pos[j - n + ci.max_seq_len]).sum(-1) for j in range(S)], -1)
        if ci.causal:
            scores[:, n + 1:] = -math.inf
        out[:, n] = ((scores / d**0.5).softmax(-1)[:, :, None] * v).sum(1)
    return ci.gamma(torch.cat([out, x_pos], -1))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_ci_matches_loop_over_positions(causal):
    torch.manual_seed(0)
    ci = spd.AttentionCI(d=4, C=3, d_gate=5, max_seq_len=8, causal=causal)
    x = torch.randn(2, 6, 4)
    out = ci(x)
    assert out.shape == (2, 6, 3)
    assert torch.allclose(out, naive_attention_ci(ci, x), atol=1e-5)


def test_attention_ci_position_handling():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 4).expand(1, 5, 4).clone()
    x[:] = x[0, 0]  # the same token at every position
    ci = spd.AttentionCI(d=4, C=3, d_gate=5, max_seq_len=8)
    out = ci(x)
    assert not torch.allclose(out[0, 0], out[0, 1])  # absolute positions make identical tokens differ
    with torch.no_grad():
        ci.abs_pos.zero_(), ci.rel_pos.zero_()
    out = ci(x)
    assert torch.allclose(out[0, 0], out[0, 3], atol=1e-6)  # ... and without them they cannot
    causal = spd.AttentionCI(d=4, C=3, d_gate=5, max_seq_len=8, causal=True)
    y = x.clone()
    y[0, 4] = torch.randn(4)
    assert torch.allclose(causal(x)[0, :4], causal(y)[0, :4], atol=1e-6)  # no look-ahead
    with pytest.raises(ValueError, match="max_seq_len"):
        ci(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match=r"\[B, S, d\]"):
        ci(torch.randn(9, 4))


# --- E. masks ----------------------------------------------------------------------------------------

def test_sample_masks_distribution_and_reparametrisation():
    g = torch.full((200_000,), 0.3, requires_grad=True)
    torch.manual_seed(0)
    m = spd.sample_masks({"a": g})["a"]
    assert m.min() >= 0.3 - 1e-6 and m.max() <= 1
    assert abs(m.mean().item() - (0.3 + 0.7 / 2)) < 3e-3  # mean of U(0.3, 1)
    torch.manual_seed(0)
    r = torch.rand_like(g)
    assert torch.allclose(m, g + (1 - g) * r)  # the same r, in the paper's form
    m.sum().backward()
    assert torch.allclose(g.grad, 1 - r)  # dm/dg = 1 - r


# --- F. decomposition --------------------------------------------------------------------------------

def test_exact_components_with_mask_one_reproduce_target():
    model = tiny_mlp()
    dec = decomposition(model, C=6)  # C >= d_in of both matrices
    with torch.no_grad():
        for name in dec.names:
            W = spd.linear_weight(dec.module(name))
            comp = dec.components[spd._key(name)]
            comp.U.zero_()
            comp.U[:, : W.shape[1]] = W
            comp.V.zero_()
            comp.V[: W.shape[1]] = torch.eye(W.shape[1])
    x = torch.randn(10, 4)
    target = model(x)
    ones = {n: torch.ones(10, 6) for n in dec.names}
    assert torch.equal(dec(x, ones), target) or torch.allclose(dec(x, ones), target, atol=1e-6)
    assert torch.allclose(dec(x, {n: None for n in dec.names}), target, atol=1e-6)
    assert spd.faithfulness_loss(dec.target_weights(), dec.component_weights()) < 1e-12
    assert all("forward" not in dec.module(n).__dict__ for n in dec.names)  # swapped back


def test_masked_forward_replaces_only_named_matrices():
    model = tiny_mlp()
    dec = decomposition(model)
    x = torch.randn(5, 4)
    zero = {"2": torch.zeros(5, 5)}  # layer 2 fully ablated: output = its bias
    assert torch.allclose(dec(x, zero), model[2].bias.expand(5, 3))
    assert torch.allclose(model(x), dec.target_forward(x)[0])


def test_target_forward_captures_pre_weight_activations():
    model = tiny_mlp()
    dec = decomposition(model)
    x = torch.randn(5, 4)
    _, acts = dec.target_forward(x)
    assert torch.equal(acts["0"], x)
    assert torch.allclose(acts["2"], F.relu(model[0](x)))


class Conv1D(nn.Module):
    """Stand-in with HF GPT-2 Conv1D's layout: y = x W + b with W stored [d_in, d_out]."""

    def __init__(self, d_out, d_in):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_conv1d_layout_is_transposed_at_the_boundary():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3))
    dec = spd.Decomposition(model, ["0"], C=3)
    assert torch.equal(dec.target_weights()["0"], model[0].weight.T)  # [d_out, d_in] inside
    set_exact(dec)
    x = torch.randn(4, 3)
    assert torch.allclose(dec(x, {"0": torch.ones(4, 3)}), model(x), atol=1e-5)


class Tied(nn.Module):
    tied_weights = {"dec": "enc"}

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 2, bias=False)
        self.dec = TiedT(self.enc)

    def forward(self, x):
        return F.relu(self.dec(self.enc(x)))


class TiedT(nn.Module):
    def __init__(self, parent):
        super().__init__()
        self._parent = [parent]
        self.bias = nn.Parameter(torch.randn(5))

    @property
    def weight(self):
        return self._parent[0].weight.T

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


TiedT.__name__ = "TiedTranspose"


def test_tied_weights_share_one_set_of_subcomponents():
    torch.manual_seed(0)
    dec = spd.Decomposition(Tied(), ["enc", "dec"], C=4)
    assert list(dec.components.keys()) == ["enc"] and len(dec.ci_fns) == 2
    W = dec.component_weights()
    assert torch.allclose(W["dec"], W["enc"].T)
    U, V = dec.UV("dec")
    U.sum().backward()  # a tied use trains the shared V
    assert dec.components["enc"].V.grad is not None


@pytest.mark.parametrize("mode", spd.TIED_UPDATES)
def test_tied_updates_one_adam_step_against_untied_gradients(mode):
    """One optimize step moves the tied U, V by Adam's first step lr g / (|g| + eps), applied to the
    sum of both uses' gradients ("shared") or to each use's gradient and added ("separate", the
    authors' code). The per-use gradients come from an untied copy with independent leaves."""
    torch.manual_seed(0)
    model, x = Tied(), torch.rand(32, 5)
    cfg = spd.SPDConfig(targets=["enc", "dec"], C=4, steps=1, batch_size=32, lr=1e-2, lr_schedule="constant",
                        tied_updates=mode)
    dec = spd.Decomposition.from_config(model, cfg)
    ref = spd.Decomposition(model, cfg.targets, C=4, tied={})
    ref.load_state_dict(dec.state_dict(), strict=False)  # enc's U, V and both CI functions
    enc, untied = ref.components["enc"], ref.components["dec"]
    with torch.no_grad():
        untied.U.copy_(enc.V.T)
        untied.V.copy_(enc.U.T)
    torch.manual_seed(1)
    total = spd.spd_losses(ref, x, cfg, cfg.p)["total"]
    gU1, gV1, gU2, gV2 = torch.autograd.grad(total, [enc.U, enc.V, untied.U, untied.V])
    adam = lambda g: cfg.lr * g / (g.abs() + 1e-8)  # noqa: E731  (bias-corrected first step)
    if mode == "shared":
        dU, dV = adam(gU1 + gV2.T), adam(gV1 + gU2.T)
    else:
        dU, dV = adam(gU1) + adam(gV2.T), adam(gV1) + adam(gU2.T)
    expected = enc.U.detach() - dU, enc.V.detach() - dV
    torch.manual_seed(1)
    spd.optimize(dec, lambda b: x, cfg, progress=False)
    comp = dec.components["enc"]
    assert torch.allclose(comp.U, expected[0], atol=1e-6) and torch.allclose(comp.V, expected[1], atol=1e-6)
    assert torch.equal(dec.UV("dec")[0], comp.V.T) and torch.equal(dec.UV("dec")[1], comp.U.T)
    assert list(dec.state_dict()) == [k for k in dec.state_dict() if "components.dec" not in k]


def test_cpu_fast_paths_reuse_h_without_changing_losses_or_gradients():
    dec = decomposition(tiny_mlp())
    x = torch.randn(16, 4)
    out, acts = dec.target_forward(x)
    D = spd.make_divergence("mse")

    def losses_and_grads(fast):
        torch.manual_seed(3)
        with spd.cpu_fast_paths(dec) if fast else contextlib.nullcontext():
            lower, _ = dec.causal_importance(acts)
            loss = (spd.stochastic_recon_loss(dec, x, out, lower, D)
                    + spd.stochastic_recon_layerwise_loss(dec, x, out, lower, D))
            if fast:  # the input of "0" in every pass is x itself, "2"'s equals the target's a
                assert dec.inner("0", x) is dec.inner("0", x.clone())
                assert dec.inner("2", acts["2"].clone()) is dec.inner("2", acts["2"])
                assert dec.inner("2", acts["2"] + 1) is not dec.inner("2", acts["2"])
        return [loss, *torch.autograd.grad(loss, dec.parameters_to_train())]

    for fast, plain in zip(losses_and_grads(True), losses_and_grads(False)):
        assert torch.allclose(fast, plain, atol=1e-6)
    assert "inner" not in vars(dec) and "causal_importance" not in vars(dec)  # the plain methods are back


@pytest.mark.parametrize("kind, ci_fn", [("tms_5-2-id", "scalar"), ("resid_mlp2", "scalar"), ("biased_last", "scalar"),
                                         ("tms_5-2-id", "vector")])
def test_fast_losses_equal_the_plain_ones(kind, ci_fn, monkeypatch):
    """spd_losses_fast (rows whose decomposed matrices all see a = 0 skip every pass, h shared, the
    fused scalar Γ) against the plain spd_losses: each loss and every gradient. Masks are fixed
    (r = 0.5) so the two computations draw the same ones."""
    if kind == "biased_last":  # no bias before the last matrix: a zero row stays dead, its output is b
        torch.manual_seed(0)
        target, n_in = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3)), 4
    else:
        target, tcfg = models.build_target(kind, **({"d_embed": 30, "d_mlp": 8} if "resid" in kind else {}))
        n_in = tcfg["n_features"]
    torch.manual_seed(1)
    dec = spd.Decomposition(target, ["*"], C=7, ci_fn=ci_fn)
    with torch.no_grad():  # biases away from 0, so that Γ(0), the dead rows' importance, is not 0
        for f in dec.ci_fns.values():
            f.b_in.normal_(), f.b_out.normal_()
    x = torch.rand(24, n_in) * (torch.rand(24, n_in) < 0.3)
    x[:8] = 0
    cfg = spd.SPDConfig(C=7, recon=1.0, recon_layerwise=1.0, recon_partial=1.0, stochastic_recon_partial=1.0)
    assert spd.live_rows(dec.target_forward(x)[1]).tolist() == x.ne(0).any(-1).tolist()
    monkeypatch.setattr(spd, "sample_masks", lambda ci: {n: g + (1 - g) * 0.5 for n, g in ci.items()})

    def losses_and_grads(fn):
        torch.manual_seed(3)  # the same random subsets for the partial losses
        losses = fn(dec, x, cfg, p=0.7)
        return list(losses), [*losses.values(), *torch.autograd.grad(losses["total"], dec.parameters_to_train())]

    (names_fast, fast), (names_plain, plain) = losses_and_grads(spd.spd_losses_fast), losses_and_grads(spd.spd_losses)
    assert names_fast == names_plain
    for a, b in zip(fast, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_optimize_takes_the_fast_path_on_a_cpu_only_and_both_train_alike(monkeypatch):
    model = tiny_mlp()
    cfg = spd.SPDConfig(targets=["0", "2"], C=5, steps=20, batch_size=64, lr=1e-2)
    batch = lambda b: torch.randn(b, 4) * (torch.rand(b, 4) < 0.3)  # noqa: E731  many dead rows
    assert spd.fast_path(decomposition(model)) and not spd.fast_path(decomposition(tiny_mlp()).to("meta"))
    finals = []
    for fast in (True, False):
        monkeypatch.setattr(spd, "FAST_CPU", fast)
        dec = decomposition(model)
        torch.manual_seed(5)
        finals.append(spd.optimize(dec, batch, cfg, progress=False))
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        assert finals[0][k] == pytest.approx(finals[1][k], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("ci_fn", ["scalar", "vector", "attention"])
def test_compiled_ci_equals_the_plain_ci(ci_fn, monkeypatch):
    """Section L: spd_losses with Γ under torch.compile against the plain Γ, on a small induction
    target (inputs [B, S, d], every CI function): each loss and every gradient, masks fixed (r = 0.5)."""
    import train

    target, tcfg = models.build_target("induction", seq_len=8, vocab=12)
    torch.manual_seed(1)
    cfg = spd.SPDConfig(**{**train.PRESETS["induction"], "ci_fn": ci_fn, "C": 6, "d_gate": 4})
    dec = spd.Decomposition.from_config(target, cfg, max_seq_len=8)
    x = models.batch_fn(tcfg)(16, torch.Generator().manual_seed(0))
    monkeypatch.setattr(spd, "sample_masks", lambda ci: {n: g + (1 - g) * 0.5 for n, g in ci.items()})

    def losses_and_grads():
        torch.manual_seed(3)  # the same random subsets for the partial losses
        losses = spd.spd_losses(dec, x, cfg, p=0.7)
        return [*losses.values(), *torch.autograd.grad(losses["total"], dec.parameters_to_train())]

    compiled_for, compiled_forward = [], spd._compiled_forward
    monkeypatch.setattr(spd, "_compiled_forward", lambda cls: compiled_for.append(cls) or compiled_forward(cls))
    with spd.compiled_ci(dec):
        compiled = losses_and_grads()
    assert set(compiled_for) == {type(f) for f in dec.ci_fns.values()}  # every Γ call went through torch.compile
    assert not any("forward" in vars(f) for f in dec.ci_fns.values())  # the plain forwards are back
    for a, b in zip(compiled, losses_and_grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nonzero_rows_equals_any():
    a = torch.randn(40, 7)
    a[::3] = 0
    a[1], a[4], a[5], a[7] = -0.0, 0.0, 0.0, 0.0
    a[2, 3], a[4, 2], a[5, 0], a[7, 6] = float("nan"), 1e-40, -1e-44, float("-inf")  # NaN, denormals, inf
    assert torch.equal(spd.nonzero_rows(a), a.any(-1))
    assert torch.equal(spd.nonzero_rows(a.reshape(5, 8, 7)), a.reshape(5, 8, 7).any(-1))


def test_live_rows_keeps_rows_a_bias_makes_nonzero():
    _, acts = decomposition(tiny_mlp()).target_forward(torch.zeros(3, 4))  # "2" sees ReLU(b) != 0
    assert spd.live_rows(acts) is None
    assert spd.live_rows({"a": torch.zeros(2, 5, 3), "b": torch.zeros(2, 1)}) is None  # no row live: nothing to skip
    acts = {"a": torch.zeros(3, 5, 3), "b": torch.tensor([[0.0], [0.0], [2.0]])}
    acts["a"][0, 4, 1] = 1.0  # one position of a sequence is enough
    assert spd.live_rows(acts).tolist() == [True, False, True]


# --- G. losses -----------------------------------------------------------------------------------------

def test_faithfulness_by_hand():
    tw = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[1.0, 1.0]])}
    cw = {"a": torch.tensor([[1.0, 0.0], [3.0, 5.0]]), "b": torch.tensor([[0.0, 1.0]])}
    assert spd.faithfulness_loss(tw, cw).item() == pytest.approx((4 + 1 + 1) / 6)


def test_importance_minimality_by_hand():
    ci = {"a": torch.tensor([[0.5, 1.0], [0.0, 0.25]]), "b": torch.tensor([[[1.0], [0.0]], [[0.5], [0.5]]])}
    # a: rows sum g^p -> (0.5^2 + 1, 0 + 0.0625), mean 0.65625; b: [B=2, S=2, C=1] mean of g^2 = 0.375
    assert spd.importance_minimality_loss(ci, p=2).item() == pytest.approx(0.65625 + 0.375, abs=1e-6)
    assert spd.importance_minimality_loss({"a": ci["a"]}, p=0.5).item() == pytest.approx(
        ((0.5**0.5 + 1) + 0.5) / 2, abs=1e-5)
    # padding positions [B, S] left out: b's valid positions hold g = 1, 0.5, 0.5 -> mean of g^2 = 0.5
    valid = torch.tensor([[True, False], [True, True]])
    assert spd.importance_minimality_loss({"b": ci["b"]}, p=2, valid=valid).item() == pytest.approx(0.5, abs=1e-6)


def test_importance_minimality_gradient_is_finite_for_p_below_one():
    x = torch.tensor([[-1.0, 0.5]], requires_grad=True)
    spd.importance_minimality_loss({"a": spd.upper_leaky_hard_sigmoid(x)}, p=0.5).backward()
    assert torch.isfinite(x.grad).all()


def test_kl_by_hand_and_last_token_only():
    t = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])  # [B=1, S=2, V=2]
    q = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    p1 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl_last = (p1 * (p1.log() - math.log(0.5))).sum().item()
    assert spd.kl(q, t).item() == pytest.approx(kl_last / 2, abs=1e-6)
    assert spd.make_divergence("kl", last_token_only=True)(q, t).item() == pytest.approx(kl_last, abs=1e-6)
    assert spd.kl(t, t).item() == pytest.approx(0, abs=1e-7)
    valid = torch.tensor([[False, True]])  # position 0 is padding
    assert spd.make_divergence("kl", valid=valid)(q, t).item() == pytest.approx(kl_last, abs=1e-6)


def test_layerwise_equals_stochastic_for_one_matrix():
    model = nn.Sequential(nn.Linear(4, 3))
    torch.manual_seed(0)
    dec = spd.Decomposition(model, ["0"], C=5)
    x = torch.randn(16, 4)
    y, acts = dec.target_forward(x)
    ci, _ = dec.causal_importance(acts)
    torch.manual_seed(7)
    a = spd.stochastic_recon_loss(dec, x, y, ci, spd.mse)
    torch.manual_seed(7)
    b = spd.stochastic_recon_layerwise_loss(dec, x, y, ci, spd.mse)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() > 0


def explicit_forward(model, x, weights):
    """tiny_mlp's output with per-example weights {name: [B, d_out, d_in]} (SPD eq. 3's W'(x, r)
    built literally) in place of the named Linear layers; the others keep theirs."""
    out = x
    for name, layer in model.named_children():
        if name in weights:
            out = torch.einsum("boi,bi->bo", weights[name], out) + layer.bias
        else:
            out = layer(out)
    return out


def test_stochastic_losses_by_hand_with_explicit_per_example_weights(monkeypatch):
    """SPD eqs. 4, 5 with S = 2 on two matrices, against W'^l_b = U^l diag(m^l_b) V^l built for every
    example and the model run with it: each mask sample its own draw, the layerwise loss one matrix at
    a time with the target's W elsewhere, normalised by S L."""
    model = tiny_mlp()
    dec = decomposition(model)
    x = torch.randn(16, 4)
    y, acts = dec.target_forward(x)
    ci, _ = dec.causal_importance(acts)
    torch.manual_seed(11)
    draws = [{n: torch.rand(16, 5) for n in dec.names} for _ in range(4)]  # 2 samples per loss
    queue = iter(draws)
    monkeypatch.setattr(spd, "sample_masks", lambda g: {n: g[n] + (1 - g[n]) * r for n, r in next(queue).items()})
    masks = [{n: ci[n] + (1 - ci[n]) * r for n, r in d.items()} for d in draws]
    W_prime = lambda n, m: torch.einsum("oc,bc,ci->boi", *dec.UV(n)[:1], m, dec.UV(n)[1])  # noqa: E731
    mse = lambda out: ((out - y) ** 2).mean()  # noqa: E731
    full = [mse(explicit_forward(model, x, {n: W_prime(n, m[n]) for n in dec.names})) for m in masks[:2]]
    layerwise = [mse(explicit_forward(model, x, {n: W_prime(n, m[n])})) for m in masks[2:] for n in dec.names]
    assert spd.stochastic_recon_loss(dec, x, y, ci, spd.mse, S=2).item() == pytest.approx(sum(full).item() / 2, rel=1e-5)
    assert spd.stochastic_recon_layerwise_loss(dec, x, y, ci, spd.mse, S=2).item() == pytest.approx(
        sum(layerwise).item() / 4, rel=1e-5)


def test_spd_losses_masks_with_the_lower_sigmoid_and_trains_v_through_gamma(monkeypatch):
    """The recon losses read g = σ_H,lower(Γ) (they differ from the same losses fed σ_H,upper where
    Γ > 1 or < 0), and V gets a gradient through h = V a in Γ, not only through the masked passes."""
    model = tiny_mlp()
    dec = decomposition(model)
    with torch.no_grad():
        for f in dec.ci_fns.values():
            f.b_out.copy_(torch.linspace(-2, 2, 5))  # Γ outputs on both sides of [0, 1]
    x = torch.randn(16, 4)
    monkeypatch.setattr(spd, "sample_masks", lambda g: {n: v + (1 - v) * 0.3 for n, v in g.items()})
    cfg = spd.SPDConfig(targets=["0", "2"], C=5, faithfulness=0.0, importance_minimality=0.0, stochastic_recon_layerwise=0.0)
    y, acts = dec.target_forward(x)
    lower, upper = dec.causal_importance(acts)
    assert not torch.allclose(lower["0"], upper["0"])
    loss = spd.spd_losses(dec, x, cfg, p=1.0)["stochastic_recon"]
    assert loss.item() == pytest.approx(spd.stochastic_recon_loss(dec, x, y, lower, spd.mse).item(), rel=1e-6)
    V = dec.components["0"].V
    (g_all,) = torch.autograd.grad(loss, V, retain_graph=True)
    detached = {n: g.detach() for n, g in lower.items()}  # the same loss with Γ's input cut off from V
    (g_masks_only,) = torch.autograd.grad(spd.stochastic_recon_loss(dec, x, y, detached, spd.mse), V)
    assert not torch.allclose(g_all, g_masks_only, atol=1e-8)


def test_recon_losses_against_direct_forward_passes():
    model = tiny_mlp()
    dec = decomposition(model)
    x = torch.randn(16, 4)
    y, acts = dec.target_forward(x)
    ci, _ = dec.causal_importance(acts)
    D = spd.mse
    both = ((dec(x, ci) - y) ** 2).mean()
    assert spd.recon_loss(dec, x, y, ci, D).item() == pytest.approx(both.item())
    each = [((dec(x, {n: ci[n]}) - y) ** 2).mean() for n in dec.names]
    assert spd.recon_layerwise_loss(dec, x, y, ci, D).item() == pytest.approx(sum(each).item() / 2)
    torch.manual_seed(3)
    subset = spd.random_subset(dec.names)
    torch.manual_seed(3)
    assert spd.recon_partial_loss(dec, x, y, ci, D).item() == pytest.approx(
        ((dec(x, {n: ci[n] for n in subset}) - y) ** 2).mean().item())


def test_routes_replace_a_matrix_only_at_the_chosen_positions():
    dec = decomposition(tiny_mlp())
    x = torch.randn(16, 4)
    y, acts = dec.target_forward(x)
    ci, _ = dec.causal_importance(acts)
    everywhere, nowhere = torch.ones(16, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)
    assert torch.allclose(dec(x, ci, {n: everywhere for n in dec.names}), dec(x, ci))
    assert torch.allclose(dec(x, ci, {n: nowhere for n in dec.names}), y)
    routes = spd.random_subset_per_position(dec.names, torch.Size([16]), generator=torch.Generator().manual_seed(0))
    mixed = dec(x, ci, routes)
    for b in range(16):  # row b: exactly the matrices of its own subset replaced
        chosen = {n: ci[n][b:b + 1] for n in dec.names if routes[n][b]}
        assert torch.allclose(mixed[b:b + 1], dec(x[b:b + 1], chosen), atol=1e-6)


def test_per_position_subsets_are_nonempty_with_uniform_size():
    g = torch.Generator().manual_seed(0)
    names = list("abcd")
    routes = spd.random_subset_per_position(names, torch.Size([50, 80]), generator=g)
    sizes = torch.stack([routes[n] for n in names], -1).sum(-1)  # [50, 80]
    assert sizes.min() >= 1
    for k in range(1, 5):
        assert abs((sizes == k).float().mean().item() - 0.25) < 0.03
    for n in names:  # by symmetry each matrix is in a subset with probability (1+2+3+4)/4/4 = 0.625
        assert abs(routes[n].float().mean().item() - 0.625) < 0.03


def test_partial_routing_flag_reaches_the_losses(monkeypatch):
    dec = decomposition(tiny_mlp())
    x = torch.randn(16, 4)
    real, calls = spd.random_subset_per_position, []
    monkeypatch.setattr(spd, "random_subset_per_position", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    for routing, n_calls in [("pass", 0), ("position", 2)]:
        cfg = spd.SPDConfig(stochastic_recon=0, stochastic_recon_layerwise=0, recon_partial=1.0,
                            stochastic_recon_partial=1.0, partial_routing=routing)
        losses = spd.spd_losses(dec, x, cfg, p=1.0)
        assert losses["recon_partial"] > 0 and losses["stochastic_recon_partial"] > 0
        assert calls == [torch.Size([16])] * n_calls  # one subset per position of the batch
    with pytest.raises(ValueError, match="partial_routing"):
        spd.SPDConfig(partial_routing="token").validate()


def test_random_subset_size_is_uniform():
    g = torch.Generator().manual_seed(0)
    names = list("abcd")
    sizes = torch.tensor([len(spd.random_subset(names, g)) for _ in range(4000)])
    for k in range(1, 5):
        assert abs((sizes == k).float().mean().item() - 0.25) < 0.03
    for _ in range(100):
        subset = spd.random_subset(names, g)
        assert len(set(subset)) == len(subset) and set(subset) <= set(names)


def test_stochastic_recon_gradient_reaches_ci_parameters_through_masks():
    model = tiny_mlp()
    dec = decomposition(model)
    x = torch.randn(32, 4)
    y, acts = dec.target_forward(x)
    ci, _ = dec.causal_importance(acts)
    spd.stochastic_recon_loss(dec, x, y, ci, spd.mse).backward()
    for name in dec.names:
        grads = [p.grad for p in dec.ci_fns[spd._key(name)].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_stochastic_recon_gradient_wrt_ci_matches_finite_differences():
    model = tiny_mlp()
    dec = decomposition(model)
    x = torch.randn(8, 4, dtype=torch.double)
    dec.double()
    y = dec.target_forward(x)[0]
    g = {n: torch.rand(8, 5, dtype=torch.double, requires_grad=True) for n in dec.names}

    def loss(g0):
        torch.manual_seed(5)  # the same r on every call
        return spd.stochastic_recon_loss(dec, x, y, {"0": g0, "2": g["2"]}, spd.mse)

    assert torch.autograd.gradcheck(loss, (g["0"],))


def test_spd_losses_total_is_weighted_sum():
    model = tiny_mlp()
    dec = decomposition(model)
    cfg = spd.SPDConfig(importance_minimality=0.1, recon=0.5, stochastic_recon_layerwise=2.0)
    losses = spd.spd_losses(dec, torch.randn(8, 4), cfg, p=1.0)
    expected = (losses["faithfulness"] + losses["stochastic_recon"] + 2 * losses["stochastic_recon_layerwise"]
                + 0.5 * losses["recon"] + 0.1 * losses["importance_minimality"])
    assert losses["total"].item() == pytest.approx(expected.item())
    assert "recon_partial" not in losses  # coefficient 0: not computed


# --- H. optimisation -----------------------------------------------------------------------------------

def test_lr_schedule_and_p_anneal_by_hand():
    cfg = spd.SPDConfig(steps=101, lr=1.0, lr_schedule="cosine")
    assert spd.lr_at(0, cfg) == 1.0 and spd.lr_at(100, cfg) == pytest.approx(0, abs=1e-12)
    assert spd.lr_at(50, cfg) == pytest.approx(math.cos(math.pi / 4))
    cfg = spd.SPDConfig(steps=100, lr=2.0, lr_schedule="constant", lr_warmup_pct=0.1)
    assert spd.lr_at(0, cfg) == 0 and spd.lr_at(5, cfg) == 1.0 and spd.lr_at(50, cfg) == 2.0
    cfg = spd.SPDConfig(steps=11, p=0.9, p_final=0.1)
    assert spd.p_at(0, cfg) == pytest.approx(0.9) and spd.p_at(10, cfg) == pytest.approx(0.1)
    assert spd.p_at(5, cfg) == pytest.approx(0.5)


def test_optimize_lowers_the_loss_and_stops_on_nan():
    model = tiny_mlp()
    dec = decomposition(model)
    cfg = spd.SPDConfig(targets=["0", "2"], C=5, steps=150, batch_size=64, lr=1e-2, lr_schedule="constant")
    seen = []
    spd.optimize(dec, lambda b: torch.randn(b, 4), cfg, log=lambda s, l: seen.append(l["total"]),
                 log_every=149, progress=False)
    assert seen[-1] < seen[0]
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        spd.optimize(dec, lambda b: torch.full((b, 4), float("nan")), cfg, progress=False)


# --- I. metrics ----------------------------------------------------------------------------------------

def test_mmcs_ml2r_by_hand():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # columns e1, 2 e2
    U = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # u = e1, e2, e1+e2
    V = torch.tensor([[0.9, 0.0], [0.0, 2.2], [0.1, 0.1]])
    mmcs, ml2r = spd.mmcs_ml2r(W, U, V)
    assert mmcs == pytest.approx(1.0, abs=1e-6)
    assert ml2r == pytest.approx((0.9 / 1 + 2.2 / 2) / 2, abs=1e-6)


def test_evaluate_tms_ml2r_over_large_subcomponents_ignores_a_dead_aligned_one(tmp_path):
    """A dead subcomponent exactly along feature 0 wins the paper's max over all C (ML2R counts its
    tiny ratio); over the large subcomponents only, feature 0 gets its own large one."""
    target = models.TMS(2, 2)
    with torch.no_grad():
        target.linear1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    dec = spd.Decomposition(target, ["linear1", "linear2"], C=3)
    with torch.no_grad():
        comp = dec.components["linear1"]
        comp.U.copy_(torch.tensor([[1.0, 0.0, 1e-3], [0.02, 1.0, 0.0]]))  # subcomponent 0 a little off e1
        comp.V.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]))
    m = analysis.evaluate_tms(dec, tmp_path)
    assert m["ml2r"] == pytest.approx((1e-3 + 1.0) / 2, abs=1e-4)
    assert m["ml2r_large"] == pytest.approx((math.hypot(1.0, 0.02) + 1.0) / 2, abs=1e-4)
    assert m["mmcs_large"] == pytest.approx((1 / math.hypot(1.0, 0.02) + 1.0) / 2, abs=1e-5)
    # the authors' code's "Std": over the features, unbiased (n - 1): ratios 1e-3 and 1, cosines 1 and 1
    assert m["ml2r_std_over_features"] == pytest.approx((1.0 - 1e-3) / math.sqrt(2), abs=1e-4)
    assert m["mmcs_std_over_features"] == pytest.approx(0.0, abs=1e-6)
    assert m["linear1/n_large_subcomponents"] == 2


def test_ci_l0_alive_and_permutation():
    ci = {"a": torch.tensor([[0.0, 0.5, 0.05], [0.2, 0.0, 0.0]])}
    assert spd.ci_l0(ci) == {"a": 1.5}
    assert spd.alive(ci) == {"a": 2}
    assert spd.permute_to_identity(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.7, 0.0]])).tolist() == [1, 0, 2]


# --- J. save / load and bad input ----------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    dec = decomposition(tiny_mlp())
    spd.save(dec, tmp_path, config={"hello": 1}, step=3)
    other = decomposition(tiny_mlp(), )
    with torch.no_grad():
        for p in other.parameters_to_train():
            p.zero_()
    meta = spd.load(other, tmp_path)
    assert meta["config"] == {"hello": 1} and meta["step"] == 3
    for a, b in zip(dec.parameters_to_train(), other.parameters_to_train()):
        assert torch.equal(a, b)
    state = torch.load(tmp_path / "decomposition.pt", weights_only=True)
    assert not any(k.startswith("target.") for k in state)


def test_load_rejects_mismatch_and_corruption(tmp_path):
    spd.save(decomposition(tiny_mlp()), tmp_path)
    with pytest.raises(ValueError, match="C are"):
        spd.load(decomposition(tiny_mlp(), C=7), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    good = (tmp_path / "decomposition.pt").read_bytes()
    (tmp_path / "decomposition.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"decomposition.pt cannot be read: it is truncated .*\(16 bytes\)"):
        spd.load(decomposition(tiny_mlp()), tmp_path)
    (tmp_path / "decomposition.pt").write_bytes(good)
    meta["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has format_version 99, this code reads 1"):
        spd.load(decomposition(tiny_mlp()), tmp_path)
    with pytest.raises(FileNotFoundError, match="spd.save"):
        spd.load(decomposition(tiny_mlp()), tmp_path / "nowhere")


def test_bad_input_names_the_bad_value():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="'nope' matches no module"):
        spd.Decomposition(model, ["nope"])
    with pytest.raises(ValueError, match="only nn.Linear and Conv1D"):
        spd.Decomposition(model, ["1"])
    with pytest.raises(ValueError, match="unknown ci_fn 'foo'"):
        spd.Decomposition(model, ["0"], ci_fn="foo")
    for bad in (dict(C=0), dict(C=-3), dict(steps=-1), dict(ci_fn="x"), dict(lr=0.0), dict(p=0.0)):
        with pytest.raises(ValueError, match="must"):
            spd.SPDConfig(**bad).validate()
    dec = decomposition(model)
    with pytest.raises(KeyError, match="not a decomposed matrix"):
        dec(torch.randn(2, 4), {"1": None})


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "Decompose your own model" block, run with its steps and batch cut down, on a
    model that has the module paths it names; it must save a run that loads back."""
    from pathlib import Path

    readme = (Path(__file__).parent / "README.md").read_text()
    code = readme.split("## Decompose your own model")[1].split("```python")[1].split("```")[0]
    assert "steps=20_000, batch_size=512" in code
    code = code.replace("steps=20_000, batch_size=512", "steps=3, batch_size=16")

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Module() for _ in range(2))
            for block in self.blocks:
                block.mlp = nn.Module()
                block.mlp.fc_in = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for block in self.blocks:
                x = x + F.relu(block.mlp.fc_in(x))
            return self.head(x)

    monkeypatch.chdir(tmp_path)
    scope = {"MyModel": MyModel, "sample_inputs": lambda b: torch.randn(b, 8)}
    exec(code, scope)
    dec = scope["dec"]
    assert dec.names == ["blocks.0.mlp.fc_in", "blocks.1.mlp.fc_in", "head"] and dec.C["head"] == 16
    assert scope["ablated"].shape == (16, 3) and scope["ci"]["blocks.1.mlp.fc_in"].shape == (16, 64)
    spd.load(dec, tmp_path / "runs" / "mine")


# --- residual-MLP metrics (analysis.py section C) ------------------------------------------------------

def test_resid_metrics_by_hand():
    ci = {"layers.0.mlp_in": torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 0.05]]),
          "layers.0.mlp_out": torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.9, 0.3, 0.4]])}
    # feature 0: one unshared subcomponent; 1: two above 0.1; 2: none above 0.1
    assert analysis.monosemantic_in_fraction(ci) == pytest.approx(1 / 3)
    ci["layers.0.mlp_in"][1, 2] = 0.0
    ci["layers.0.mlp_in"][2, 1] = 0.5  # feature 2 now shares feature 1's subcomponent
    assert analysis.monosemantic_in_fraction(ci) == pytest.approx(1 / 3)
    assert analysis.dense_out_count(ci) == 2  # columns 0 (3/3) and 1 (2/3) are active on >= half, 2 (1/3) is not
    assert analysis.out_activity(ci) == (3, pytest.approx(6 / 9))  # (3 + 2 + 1) / 9
    ci["layers.0.mlp_out"][2, 2] = 0.0
    assert analysis.out_activity(ci) == (2, pytest.approx(5 / 6))  # column 2 never active: left out of the mean
    # a second layer in which features 1 and 2 are monosemantic and 0 is not (two subcomponents)
    ci["layers.1.mlp_in"] = torch.tensor([[0.7, 0.5, 0.0, 0.0], [0.0, 0.0, 0.6, 0.0], [0.0, 0.0, 0.0, 0.3]])
    by_layer = analysis.monosemantic_in_by_layer(ci)
    assert by_layer["layers.0.mlp_in"].tolist() == [True, False, False]
    assert by_layer["layers.1.mlp_in"].tolist() == [False, True, True]
    assert analysis.monosemantic_in_fraction(ci) == 0.0  # no feature is monosemantic in both layers


def test_neuron_contributions_of_a_per_feature_decomposition_equal_the_targets():
    """With orthonormal W_E and W_in's subcomponent c = (W_in W_E[c]) W_E[c]^T, subcomponent c is
    feature c's whole computation, so eq. 12 must return eq. 11's target contributions."""
    torch.manual_seed(0)
    target = models.ResidMLP(n_features=4, d_embed=4, d_mlp=3, n_layers=1)
    target.W_E.copy_(torch.eye(4))
    with torch.no_grad():
        target.layers[0].mlp_in.weight.copy_(torch.rand(3, 4) + 0.1)  # positive, so max_n > 0
        target.layers[0].mlp_out.weight.copy_(torch.rand(4, 3) + 0.1)
    dec = spd.Decomposition(target, ["layers.0.mlp_in", "layers.0.mlp_out"], C=4)
    with torch.no_grad():
        comp = dec.components[spd._key("layers.0.mlp_in")]
        comp.V.copy_(target.W_E)
        comp.U.copy_(target.layers[0].mlp_in.weight @ target.W_E.T)
        out = dec.components[spd._key("layers.0.mlp_out")]
        out.U.copy_(torch.cat([target.layers[0].mlp_out.weight, torch.zeros(4, 1)], 1))
        out.V.copy_(torch.eye(4)[:, :3])
        nc_target, nc_spd = analysis.neuron_contributions(dec, target.W_E, 0)
    W_in, W_out = target.layers[0].mlp_in.weight, target.layers[0].mlp_out.weight
    E = target.W_E
    by_hand = torch.tensor([[float(sum(E[i, k] * W_out[k, n] for k in range(4)) * sum(W_in[n, k] * E[i, k] for k in range(4)))
                             for n in range(3)] for i in range(4)])
    assert torch.allclose(nc_target, by_hand, atol=1e-6)
    assert torch.allclose(nc_spd, nc_target, atol=1e-6)


# ================================================================================================
# Transformer analyses (analysis.py sections D, E)
# ================================================================================================

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
    losses = analysis.table1c_losses(dec, tokens, half)
    per_matrix = [losses[f"recon_layerwise:{n}"] for n in dec.names]
    assert min(per_matrix) > 0 and losses["recon_layerwise"] == pytest.approx(sum(per_matrix) / len(per_matrix))
    D = spd.make_divergence("kl", last_token_only=True)
    with torch.no_grad():  # the mean is spd.recon_layerwise_loss itself
        assert losses["recon_layerwise"] == pytest.approx(float(spd.recon_layerwise_loss(dec, tokens, model(tokens), half, D)))
    # independent: the masked pattern of layer 0 from the target's own attention with masked weights
    with torch.no_grad():
        _, A_t = model(tokens, return_attn=True)
        with dec.replaced(half):
            _, A_m = model(tokens, return_attn=True)
    assert kl["layer0"] == pytest.approx(float(analysis.attention_pattern_kl(A_t[0], A_m[0])))
    assert all("forward" not in dec.module(n).__dict__ for n in dec.names)


# --- D. Algorithm 2 ----------------------------------------------------------------------------------

def test_svd_prune_path_shows_progress_when_asked(capsys):
    W = {"a": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    steps = analysis.svd_prune_path(W, lambda w: float(w["a"].norm()), progress=True)
    assert len(steps) == 3 and "Figure 2: greedy SVD pruning" in capsys.readouterr().err


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
        (ranks_a, loss_a), (ranks_b, loss_b) = analysis.prune_at(steps, weights, tau), analysis.svd_prune(weights, loss_fn, tau)
        assert ranks_a == ranks_b and loss_a == pytest.approx(loss_b)
    with pytest.raises(ValueError, match="-1"):
        analysis.svd_prune(weights, loss_fn, -1)


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


def test_tms_network_panels_split_the_network_by_subcomponent(tmp_path):
    """Paper Figures 1 (bottom) and 4: target, sum, then each large subcomponent alone, largest first;
    a subcomponent of W sets both of its uses (W in linear1, W^T in linear2) and nothing else, and the
    single panels add up to the sum panel."""
    torch.manual_seed(0)
    target = models.TMS(5, 2, n_hidden_layers=1)
    dec = spd.Decomposition(target, ["linear1", "linear2", "hidden_layers.0"], C=4)
    with torch.no_grad():  # W keeps subcomponents 0, 1; the identity keeps 3
        dec.UV("linear1")[1][2:] = 0
        dec.UV("hidden_layers.0")[1][:3] = 0
    panels = analysis.tms_network_panels(dec, norm_threshold=1e-6, max_show=10)
    titles = [t for t, _ in panels]
    assert titles[:2] == ["target", "sum of subcomponents"] and len(panels) == 5
    assert sorted(titles[2:]) == ["I_0 subcomponent 3", "W subcomponent 0", "W subcomponent 1"]
    W = target.linear1.weight.detach()
    assert list(panels[0][1]) == ["linear1", "hidden_layers.0", "linear2"]  # forward order
    assert torch.equal(panels[0][1]["linear1"], W) and torch.equal(panels[0][1]["linear2"], W.T)
    singles = panels[2:]
    for title, parts in singles:
        if title.startswith("W"):
            assert torch.allclose(parts["linear2"], parts["linear1"].T) and not parts["hidden_layers.0"].any()
        else:
            assert not parts["linear1"].any() and not parts["linear2"].any()
    norms = [max(M.norm() for M in parts.values()) for _, parts in singles]
    assert norms == sorted(norms, reverse=True)
    U, V = (t.detach() for t in dec.UV("linear1"))
    for name, expected in [("linear1", U @ V), ("linear2", (U @ V).T)]:
        assert torch.allclose(panels[1][1][name], expected)
        assert torch.allclose(sum(parts[name] for _, parts in singles), expected, atol=1e-6)
    assert len(analysis.tms_network_panels(dec, norm_threshold=1e-6, max_show=1)) == 3
    analysis.plot_tms_networks(dec, tmp_path / "net.png", norm_threshold=1e-6)
    assert (tmp_path / "net.png").stat().st_size > 0


def test_report_tables_tms_mean_std_identity_count_and_resid_per_layer(tmp_path):
    import dataclasses
    import json

    import train

    def fake_run(name, model, seed, metrics):
        (tmp_path / name).mkdir()
        spd_cfg = dataclasses.asdict(spd.SPDConfig(**{**train.PRESETS[model], "seed": seed}))
        config = {"model": model, "spd": spd_cfg, "target": models.TARGET_PRESETS[model],
                  "command": f"python train.py --model {model} --seed {seed} --out {tmp_path / name}", "code": "abc"}
        (tmp_path / name / "config.json").write_text(json.dumps({"config": config}))
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))

    fake_run("a", "tms_5-2", 0, {"mmcs": 1.0, "ml2r": 0.99, "linear1/n_large_subcomponents": 5, "ml2r_large": 0.99})
    fake_run("b", "tms_5-2", 1, {"mmcs": 0.98, "ml2r": 1.01, "linear1/n_large_subcomponents": 4, "ml2r_large": 1.02,
                                 "ml2r_std_over_features": 0.0123})  # evaluated since it was recorded
    fake_run("c", "tms_5-2-id", 0, {"mmcs": 1.0, "ml2r": 1.0, "hidden_layers.0/n_large_subcomponents": 2})
    analysis.report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "tms_table1.md").read_text()
    # mean and sample std by hand: MMCS 0.99 ± 0.0141, ML2R 1.00 ± 0.0141
    assert ("| tms_5-2 | 0.990 ± 0.014 | 1.000 ± 0.014 | 2 | 40000 | 1.000 ± 0.000 | 0.993 ± 0.002 | 5, 4 (5) | – | "
            "1.005 (2 seeds) | ?, 0.012 |") in md
    assert "| tms_5-2-id | 1.000 | 1.000 | 1 | 40000 |" in md and "| ? (5) | 2 (2) | – | – |" in md  # one seed: no ±
    assert f"python train.py --model tms_5-2 --seed 1 --out {tmp_path / 'b'}  # code abc" in md
    resid = {"in_monosemantic_fraction": 0.5, "out_alive_count": 50, "out_active_fraction": 0.9, "out_dense_count": 48,
             "neuron_contribution_corr": 0.99, "eval_losses": {"stochastic_recon": 1e-5}}
    fake_run("d", "resid_mlp2", 0, {**resid, "in_monosemantic_by_layer": {"layers.0.mlp_in": 0.9, "layers.1.mlp_in": 0.6},
                                    "in_active_per_input": {"layers.0.mlp_in": 1.0, "layers.1.mlp_in": 1.25}})
    fake_run("e", "resid_mlp1", 0, resid)  # a run evaluated before the per-layer columns existed
    analysis.report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "resid_mlp.md").read_text()
    assert "| resid_mlp2 (d) | 0.500 (1.0) | 0.90 / 0.60 | 1.00 / 1.25 | 50 (50) | 0.90 | 48 | 0.9900 | 1e-05 | 50000 |" in md
    assert "| resid_mlp1 (e) | 0.500 (1.0) | – | – | 50 (50) |" in md


def test_records_of_finished_runs_rebuild_the_robustness_table(tmp_path, capsys):
    """analysis.py record: one JSON per finished run, read back as the run folders are; the robustness
    table from the records equals the one from the folders, and a record of another run is never overwritten."""
    import dataclasses
    import json

    import apd
    import train

    def fake_run(name, method, seed, value, metrics):
        (tmp_path / "runs" / name).mkdir(parents=True)
        Config, presets, key = (apd.APDConfig, train.APD_PRESETS, "topk") if method == "apd" else (spd.SPDConfig, train.PRESETS, "importance_minimality")
        config = {"model": "tms_5-2", "method": method, method: dataclasses.asdict(Config(**{**presets["tms_5-2"], "seed": seed, key: value})),
                  "target": models.TARGET_PRESETS["tms_5-2"], "command": f"python train.py ({name})", "code": "abc"}
        (tmp_path / "runs" / name / "config.json").write_text(json.dumps({"config": config}))
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(metrics))

    good = {"features_with_own_component": 5, "mmcs_large": 1.0, "ml2r_large": 0.99}
    fake_run("spd_s0", "spd", 0, 3e-3, {**good, "linear1/n_large_subcomponents": 5})
    fake_run("spd_s1", "spd", 1, 3e-3, {**good, "features_with_own_component": 4, "linear1/n_large_subcomponents": 5})
    fake_run("apd_s0", "apd", 0, 0.422, {**good, "linear1/n_large_components": 6})
    (tmp_path / "runs" / "unfinished").mkdir()  # no metrics.json: not recorded
    analysis.record_runs(tmp_path / "runs", tmp_path / "rec")
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["apd_s0.json", "spd_s0.json", "spd_s1.json"]
    table = lambda root: analysis.robustness_table(analysis.robustness_rows(analysis._all_runs(root)))
    assert table(tmp_path / "rec") == table(tmp_path / "runs")
    assert "| SPD | importance_minimality | 1 | 0.003 | 1 / 2 | 5 / 5, 4 / 5 |" in table(tmp_path / "rec")
    assert "| APD | topk | 2 | 0.422 | 0 / 1 | 5 / 6 |" in table(tmp_path / "rec")
    before = (tmp_path / "rec" / "spd_s0.json").read_text()
    (tmp_path / "runs" / "spd_s0" / "metrics.json").write_text(json.dumps({**good, "linear1/n_large_subcomponents": 7}))
    capsys.readouterr()
    analysis.record_runs(tmp_path / "runs", tmp_path / "rec")
    assert (tmp_path / "rec" / "spd_s0.json").read_text() == before
    assert "kept " + str(tmp_path / "rec" / "spd_s0.json") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="record: no finished run in .*nowhere"):
        analysis.record_runs(tmp_path / "nowhere", tmp_path / "rec2")
    assert not (tmp_path / "rec2").exists()


# ================================================================================================
# Ground-truth recovery (the SPD paper's Table 1 on CPU; paper-scale runs are marked slow)
# ================================================================================================

def decompose_preset(name, **overrides):
    """What `python train.py --model NAME` does, minus the files: train the target, decompose it."""
    import train

    target, tcfg = models.build_target(name)
    models.train_target(target, tcfg, progress=False)
    cfg = spd.SPDConfig(**{**train.PRESETS[name], **overrides})
    torch.manual_seed(cfg.seed)
    dec = spd.Decomposition.from_config(target, cfg)
    sample, gen = models.batch_fn(tcfg), torch.Generator().manual_seed(cfg.seed + 1)
    spd.optimize(dec, lambda b: sample(b, gen), cfg, progress=False)
    return target, dec


def assert_tms_recovered(dec):
    """Table 1's thresholds on W, and exactly one large subcomponent of W per feature."""
    W = dec.target_weights()["linear1"]
    mmcs, ml2r = spd.mmcs_ml2r(W, *dec.UV("linear1"))
    assert mmcs >= 0.99 and 0.95 <= ml2r <= 1.05, (mmcs, ml2r)
    assert (analysis.subcomponent_norms(dec, "linear1") > 0.1).sum() == W.shape[1]


def test_tms_5_2_recovers_its_five_features():
    """SPD paper Table 1 row 1 (paper: MMCS 1.000, ML2R 0.993) at half the paper's 40k steps and a
    quarter of its batch (measured: MMCS 1.0000, ML2R 0.996-0.997 before the kink fix, 0.9955 after;
    the README's quick start).
    Seeds: the preset target (target seed 2, models.SEED_5_2, the first of seeds 0-29 whose trained
    target is a pentagon) and decomposition seed 0, the preset's. Not every seed recovers all five
    features: at the paper's settings 3 of decomposition seeds 0-9 end with two features sharing one
    subcomponent (seeds 3, 8, 9; results/tms_5-2_seeds.md; the authors' initial states in 2 of 25 seeds,
    parity.md §5), so this test asserts one seed that is known to recover, not that every seed does."""
    target, dec = decompose_preset("tms_5-2", steps=20_000, batch_size=1024)
    assert models.tms_target_ok(target)
    assert_tms_recovered(dec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id"])
def test_tms_paper_settings_recover_ground_truth(name):
    target, dec = decompose_preset(name)
    assert_tms_recovered(dec)
    if name.endswith("-id"):  # the identity splits into exactly n_hidden large subcomponents (Figure 3)
        assert (analysis.subcomponent_norms(dec, "hidden_layers.0") > 0.1).sum() == target.linear1.out_features


def test_short_induction_decomposition_shows_the_circuit():
    """Transformer paper Table 1, scaled down (sequence 16, vocabulary 16, 2000 steps of batch 128):
    the layer-1 query fires at s2, the layer-1 key and value at m (s2 attends to the token after s1),
    and almost nothing fires at random positions. Measured at these settings (one thread) with
    decomposition seeds 0, 1, 2, worst of the three: Q_1 1.63 at s2, 0.001 at random, 0.002 at m;
    K_1 3.55 at m, 0.06 at s2, 0.11 at random; V_1 9.1 at m, 0.16 at random. At batch 64, seed 0
    fails (K_1 0.24 at random).
    Target seed 0: its trained model predicts the induction token with accuracy 1.000 at these
    settings (seed 4 reaches only 0.617, test_models.py); other target seeds were not tried."""
    import train

    torch.manual_seed(0)
    target, tcfg = models.build_target("induction", seq_len=16, vocab=16, steps=1500, batch=256, lr=3e-3, seed=0)
    models.train_target(target, tcfg, progress=False)
    cfg = spd.SPDConfig(**{**train.PRESETS["induction"], "steps": 2000, "C": 20, "batch_size": 128, "seed": 0})
    torch.manual_seed(0)
    dec = spd.Decomposition.from_config(target, cfg, max_seq_len=16)
    sample, gen = models.batch_fn(tcfg), torch.Generator().manual_seed(1)
    spd.optimize(dec, lambda b: sample(b, gen), cfg, progress=False)
    tokens, _, s1 = models.induction_batch(512, 16, 16, torch.Generator().manual_seed(99))
    with torch.no_grad():
        active = analysis.induction_table1(dec, tokens, s1)["avg_active"]
    Q1, K1, V1 = (active[f"blocks.1.attn.{m}_proj"] for m in "qkv")
    assert Q1["s2"] >= 1 and Q1["random"] < 0.1 and Q1["m"] < 0.1
    assert K1["m"] >= 1 and K1["s2"] < 0.2 and K1["random"] < 0.2
    assert V1["m"] >= 1 and V1["random"] < 0.3


def test_tms_5_2_id_recovers_features_and_the_identity(tmp_path):
    """SPD paper Table 1 row 3 and Figure 3 (paper: MMCS 1.000, ML2R 0.992; the identity as exactly
    n_hidden = 2 subcomponents that sum to it), at half the steps and a quarter of the batch
    (measured: MMCS 1.0000, ML2R 1.001, 2 large identity subcomponents). Seeds: the preset target
    (target seed 2) and decomposition seed 0, the preset's; at the paper's settings 1 of seeds 0-4
    merges two features (seed 3, results/tms_5-2_seeds.md)."""
    target, dec = decompose_preset("tms_5-2-id", steps=20_000, batch_size=1024)
    assert_tms_recovered(dec)
    norms = analysis.subcomponent_norms(dec, "hidden_layers.0")
    assert (norms > 0.1).sum() == 2, norms
    U, V = dec.UV("hidden_layers.0")
    top = norms.argsort(descending=True)[:2]
    assert torch.allclose(U[:, top] @ V[top], torch.eye(2), atol=0.05), U[:, top] @ V[top]
    metrics = analysis.evaluate_tms(dec, tmp_path)  # the run folder's metrics and Figures 2-4
    assert metrics["hidden_layers.0/n_large_subcomponents"] == 2
    for figure in ("tms_subcomponents.png", "tms_hidden_layers.0_subcomponents.png", "tms_networks.png"):
        assert (tmp_path / figure).exists(), figure


def test_benchmark_against_another_checkout(tmp_path):
    """benchmark.py --against DIR times both checkouts in alternating rounds (here this one against itself)."""
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    cmd = [sys.executable, str(here / "benchmark.py"), "--presets", "tms_5-2", "--steps", "1", "--rounds", "1"]
    res = subprocess.run(cmd + ["--against", str(here), "--json", str(tmp_path / "ab.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    row = [line for line in res.stdout.splitlines() if line.startswith("tms_5-2")][0].split()
    assert row[5].endswith("x") and len(row) == 9  # preset ci_fn seq other this speedup, two peak GB, the one round
    saved = json.loads((tmp_path / "ab.json").read_text())["ms_per_step"]["tms_5-2/None/None"]
    assert len(saved["other"]) == len(saved["this"]) == 1 and saved["peak_gb"]["this"] > 0
    res = subprocess.run(cmd + ["--against", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "no benchmark.py there" in res.stderr
    res = subprocess.run(cmd + ["--reference", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "pass a checkout of goodfire-ai/spd" in res.stderr


def test_benchmark_params_count_matches_a_hand_count():
    """benchmark.py --params counts on the meta device; TMS 5-2 by hand: one U, V for the tied pair,
    C (d_in + d_out) = 20 * 7; scalar CI per use (2): w_in, b_in, w_out [C, d_gate] and b_out [C]."""
    import benchmark

    r = benchmark.count_one("tms_5-2", None, None)
    assert r["uv_params"] == 20 * (5 + 2)
    assert r["ci_params"] == 2 * (3 * 20 * 16 + 20)
    assert r["state_gb"] == pytest.approx(16 * (140 + 1960) / 1e9)
    r = benchmark.count_one("induction", "vector", 64)  # vector CI: per matrix [d_in, C, d_gate] + 2 [C, d_gate] + [C]
    assert r["ci_params"] == 8 * (16 * 100 * 16 + 2 * 100 * 16 + 100)


def test_benchmark_cuda_graph_refuses_what_a_graph_cannot_replay():
    """benchmark.py --cuda_graph (an experiment; test_cuda.py checks a replay on a GPU): a CPU device,
    and partial losses whose subsets are drawn on the host (a replay would repeat the first draw)."""
    import subprocess
    import sys

    import benchmark

    dec = spd.Decomposition(models.TMS(5, 2), ["linear1"])
    with pytest.raises(ValueError, match="needs --device cuda, got cpu"):
        benchmark.check_graphable(dec, spd.SPDConfig(), torch.device("cpu"))
    partial = spd.SPDConfig(stochastic_recon_partial=1.0)
    with pytest.raises(ValueError, match="partial_routing='position'"):
        benchmark.check_graphable(dec, partial, torch.device("cuda"))
    benchmark.check_graphable(dec, dataclasses.replace(partial, partial_routing="position"), torch.device("cuda"))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "benchmark.py"), "--presets", "tms_5-2",
                          "--device", "cpu", "--cuda_graph"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == ("--cuda_graph times one process on a GPU (--device cuda, got "
                                                          "cpu), without --compile, --processes, --against or --reference")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(spd.SPDConfig)
                                  if f.type in ("float", "float | None")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_every_float_setting_rejects_nan_inf_and_negatives_naming_itself(name, value):
    with pytest.raises(ValueError, match=rf"^--{name} must be .*, got {value}$"):
        spd.SPDConfig(**{name: value}).validate()


def test_optimize_validates_first_and_refuses_a_config_its_decomposition_was_not_built_with(tmp_path):
    model = tiny_mlp()
    cfg = spd.SPDConfig(targets=["0", "2"], C=5, steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r"^--importance_minimality must be"):  # the Python API gets the CLI's checks
        spd.optimize(decomposition(model), lambda b: torch.randn(b, 4), dataclasses.replace(cfg, importance_minimality=-1))
    with pytest.raises(ValueError, match="--log_every must be an integer >= 1, got 0"):
        spd.optimize(decomposition(model), lambda b: torch.randn(b, 4), cfg, log_every=0)
    for field, value in (("C", 20), ("targets", ["*"]), ("d_gate", 4), ("init", "normal")):
        with pytest.raises(ValueError, match=f"the config has {field} = .* but the Decomposition was built with"):
            spd.optimize(decomposition(model), lambda b: torch.randn(b, 4), dataclasses.replace(cfg, **{field: value}))
        with pytest.raises(ValueError, match=f"the config has {field} ="):  # nor can a contradicting config be saved
            spd.save(decomposition(model), tmp_path / "run", config={"spd": dataclasses.replace(cfg, **{field: value})})
    assert not (tmp_path / "run").exists()
    dec = spd.Decomposition.from_config(model, cfg)
    spd.optimize(dec, lambda b: torch.randn(b, 4), cfg, progress=False)
    spd.save(dec, tmp_path / "run", config={"spd": cfg})
    saved = spd.read_config(tmp_path / "run")
    assert (saved["config"]["spd"]["C"], saved["config"]["spd"]["targets"], saved["C"]) == (5, ["0", "2"], {"0": 5, "2": 5})


def test_a_C_entry_that_matches_no_matrix_is_an_error():
    with pytest.raises(ValueError, match=r"C has keys \['3\*'\] that match no decomposed matrix"):
        spd.Decomposition(tiny_mlp(), ["0", "2"], C={"0": 4, "2": 3, "3*": 9})
    assert spd.Decomposition(tiny_mlp(), ["0", "2"], C={"0": 4, "*": 3}).C == {"0": 4, "2": 3}


def test_figures_have_a_colour_bar_integer_layer_ticks_and_apart_position_labels(monkeypatch, tmp_path):
    figs = []
    monkeypatch.setattr(analysis, "_save", lambda fig, path: figs.append(fig))
    analysis.plot_one_hot_ci({"a": torch.rand(5, 8), "b": torch.rand(5, 8)}, tmp_path / "ci.png")
    assert [ax.get_label() for ax in figs[-1].axes].count("<colorbar>") == 2
    analysis.plot_figure9({"zero_mlp": [[0.1, 0.2, 0.3], [0.2, 0.1, 0.0]], "p_full": [0.5, 0.4], "sentences": ["a", "b"]},
                          tmp_path / "f9.png")
    assert list(figs[-1].axes[0].get_xticks()) == [0, 1, 2]
    torch.manual_seed(0)
    model = models.InductionTransformer(vocab_size=12, d_model=8, n_layers=2, seq_len=64)
    dec = spd.Decomposition(model, ["blocks.*.attn.q_proj"], C=4, ci_fn="attention", d_gate=4, max_seq_len=64)
    tokens = torch.randint(0, 12, (1, 64))
    ci, _ = dec.causal_importance(dec.target_forward(tokens)[1])
    analysis.plot_attention(dec, tokens, ci, 30, tmp_path / "attn.png")
    fig = figs[-1]
    fig.canvas.draw()
    for ax in fig.axes:
        s1, m = (next(t for t in ax.texts if t.get_text() == lab).get_window_extent() for lab in ("s1", "m"))
        assert not s1.overlaps(m)


def test_every_mutation_still_finds_its_line():
    """mutations.py breaks one line at a time of each file in its SETS; a line that its file no longer
    has (after a rewrite) would stop the check, so each must still be there exactly once."""
    import mutations

    stale = {name: mutations.stale(file, muts) for name, (file, muts, _) in mutations.SETS.items()}
    assert not any(stale.values()), f"update mutations.py: {stale}"


def test_gpu_check_fits_one_device_call():
    """gpu_check.sh runs as one command on a lent GPU machine, which stops a command at 600 s: on one
    GPU its steps' time limits (outside the two-GPU block) must leave room for its setup and summary."""
    import re

    script = (Path(__file__).resolve().parent / "gpu_check.sh").read_text()
    one_gpu = re.sub(r"if \(\( N_GPU >= 2 \)\); then.*?\nfi\n", "", script, flags=re.S)
    limits = [int(t) for t in re.findall(r"^\s*timeout (\d+) ", one_gpu, flags=re.M)]
    assert len(limits) == 10 and sum(limits) <= 580, limits
