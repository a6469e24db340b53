"""Tests of spd.py: each equation against an independent computation (by hand, autograd, finite
differences or a naive loop), the decomposition's invariants, save/load, and bad input."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


# --- C. eq. 1 and initialisation -----------------------------------------------------------------

def test_projection_init_is_projection_onto_rank_one_directions():
    torch.manual_seed(0)
    W = torch.randn(3, 4)
    comp = spd.Components(4, 3, 7)
    spd.init_components_(comp, W)
    for c in range(7):
        u, v = comp.U[:, c], comp.V[c]
        assert abs(v.norm() - 1) < 1e-5
        u_hat = u / u.norm()
        assert torch.allclose(u.norm(), (u_hat @ W @ v).abs(), atol=1e-5)  # |u_c| = |u_hat^T W v_c|


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


@pytest.mark.parametrize("stream_above,chunk", [(1 << 24, 0), (0, 1 << 18), (0, 40)])  # plain; streamed in one / many chunks
def test_scalar_ci_matches_autograd(monkeypatch, stream_above, chunk):
    monkeypatch.setattr(spd, "_STREAM_ABOVE", stream_above)
    monkeypatch.setattr(spd, "_CHUNK_ELEMS", chunk)
    torch.manual_seed(0)
    ci = spd.ScalarCI(C=7, d_gate=5)
    with torch.no_grad():
        ci.b_in.normal_(), ci.b_out.normal_()
    h = torch.randn(3, 4, 7, requires_grad=True)
    w = torch.randn(3, 4, 7)
    grads = []
    for fn in (ci, lambda x: naive_scalar_gamma(ci, x)):
        out = fn(h)
        grads.append((out, *torch.autograd.grad((out * w).sum(), [h, *ci.parameters()])))
    for mine, ref in zip(*grads):
        assert torch.allclose(mine, ref, atol=1e-5)


def test_scalar_gamma_gradcheck_double():
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
    cfg = spd.SPDConfig(steps=150, batch_size=64, lr=1e-2, lr_schedule="constant")
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
    (tmp_path / "decomposition.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        spd.load(decomposition(tiny_mlp()), tmp_path)
    meta["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version|cannot read"):
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
