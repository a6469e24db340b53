"""The GPU path (marked cuda; skipped where torch sees no GPU, so in CI): one step on CUDA against the
CPU, short runs of the presets, a run saved on CUDA and loaded on the CPU, and the host-device
synchronisations of the training step; the same with spd.py section L's compiled Γ (named
compiled_ci); benchmark.py's CUDA-graph replay of a step against the eager step. `bash gpu_check.sh`
runs these first."""

import contextlib
import copy
import dataclasses
import warnings

import pytest
import torch

import models
import spd
import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch.cuda.is_available())")]

# the reconstruction terms without random masks (CI-masked), so that both devices see the same step
DETERMINISTIC = dict(stochastic_recon=0.0, stochastic_recon_layerwise=0.0, recon=1.0, recon_layerwise=1.0,
                     stochastic_recon_partial=0.0)


def _setup(preset: str, batch: int):
    target, tcfg = models.build_target(preset)
    cfg = spd.SPDConfig(**{**train.PRESETS[preset], **DETERMINISTIC, "batch_size": batch})
    torch.manual_seed(0)
    dec = spd.Decomposition.from_config(target, cfg, max_seq_len=tcfg.get("seq_len"))
    x = models.batch_fn(tcfg)(batch, torch.Generator().manual_seed(0))
    return dec, cfg, x


@pytest.mark.parametrize("preset", ["tms_5-2", "resid_mlp1", "induction"])
def test_one_step_on_cuda_equals_the_cpu(preset):
    """Losses and every gradient within float32 tolerance (TF32 off: torch's default for matmuls)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    dec, cfg, x = _setup(preset, 64)
    results = []
    for d, device in ((dec, "cpu"), (copy.deepcopy(dec).cuda(), "cuda")):
        losses = spd.spd_losses(d, x.to(device), cfg, cfg.p)
        losses["total"].backward()
        results.append(({k: v.item() for k, v in losses.items()},
                        [p.grad.cpu() for p in d.parameters_to_train() if p.grad is not None]))
    (l_cpu, g_cpu), (l_cuda, g_cuda) = results
    assert l_cpu.keys() == l_cuda.keys()
    for k in l_cpu:
        assert l_cuda[k] == pytest.approx(l_cpu[k], rel=1e-4, abs=1e-9), k
    assert len(g_cpu) == len(g_cuda) > 0
    for a, b in zip(g_cpu, g_cuda):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("preset", ["tms_5-2", "resid_mlp1", "induction"])
def test_a_short_run_on_cuda_saves_a_run_the_cpu_loads(preset, tmp_path):
    out = tmp_path / preset
    metrics = train.main(["--model", preset, "--device", "cuda", "--steps", "50", "--batch_size", "64",
                          "--target_steps", "200", "--target_dir", str(tmp_path / "targets"), "--out", str(out),
                          "--no_progress"])
    assert metrics["device"].startswith("cuda")
    dec, *_ = train.load_run(out, "cpu", str(tmp_path / "targets"))
    saved = spd.read_tensors(out / "decomposition.pt")
    for k, v in dec.state_dict().items():
        if not k.startswith("target."):
            assert torch.equal(v, saved[k]) and v.device.type == "cpu"


@pytest.mark.parametrize("compiled", [False, True], ids=["plain_ci", "compiled_ci"])
def test_the_training_step_does_not_synchronise_with_the_host(compiled):
    """Between checks (every log_every steps on a GPU) a step makes no host-device sync: with
    torch.cuda.set_sync_debug_mode("warn") the only warnings come from reading the final losses.
    Also with the compiled Γ (spd.py section L), compiled before the counted steps."""
    dec, cfg, _ = _setup("resid_mlp1", 256)
    dec = dec.cuda()
    sample = models.batch_fn(models.build_target("resid_mlp1")[1], "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with spd.compiled_ci(dec) if compiled else contextlib.nullcontext():
        if compiled:  # two steps outside the count: compiling may synchronise
            spd.optimize(dec, lambda b: sample(b, gen), dataclasses.replace(cfg, steps=2), progress=False)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                final = spd.optimize(dec, lambda b: sample(b, gen), dataclasses.replace(cfg, steps=12), log_every=1000,
                                     progress=False, start_step=1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= len(final), syncs  # the .item() of each final loss


def test_compiled_ci_on_cuda_equals_the_plain_ci():
    """spd.py section L on CUDA (Triton kernels): one step's losses and gradients with the scalar Γ
    under torch.compile against the plain Γ on the same GPU (resid_mlp1 at the sync test's batch, so
    that one compilation serves both; test_spd.py checks every CI function on the CPU)."""
    dec, cfg, x = _setup("resid_mlp1", 256)
    dec, x = dec.cuda(), x.cuda()
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)  # the same subsets for the partial losses
        with spd.compiled_ci(dec) if compiled else contextlib.nullcontext():
            losses = spd.spd_losses(dec, x, cfg, cfg.p)
            grads = torch.autograd.grad(losses["total"], dec.parameters_to_train(), allow_unused=True)
        results.append([*losses.values(), *(g for g in grads if g is not None)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_cuda_graph_replay_equals_the_eager_step():
    """benchmark.py --cuda_graph (an experiment): from the same parameters, Adam state and GPU seed, a
    replay of the captured training step gives the eager step's losses, parameters and Adam state
    (random masks and data included: torch's graph-safe RNG continues the generator's stream); a
    replay under another seed draws other masks, so the graph does not freeze them."""
    import benchmark

    target, tcfg = models.build_target("resid_mlp1")
    cfg = spd.SPDConfig(**{**train.PRESETS["resid_mlp1"], "batch_size": 256})
    torch.manual_seed(0)
    dec = spd.Decomposition.from_config(target, cfg).cuda()
    sample = models.batch_fn(tcfg, "cuda")
    opt = spd.make_optimizer(dec, cfg, capturable=True)

    def step() -> dict:
        losses = spd.spd_losses(dec, sample(cfg.batch_size), cfg, cfg.p)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        return losses

    replay = benchmark.cuda_graphed(step, warmup=2)
    state = [*dec.parameters_to_train(), *(t for s in opt.state.values() for t in s.values())]
    saved = [t.detach().clone() for t in state]

    def from_saved(seed: int, run) -> tuple[dict, list]:
        with torch.no_grad():
            for t, v in zip(state, saved):
                t.copy_(v)
        torch.cuda.manual_seed(seed)
        losses = run()
        return {k: v.item() for k, v in losses.items()}, [t.detach().clone() for t in state]

    (l1, s1), (l1_again, s1_again), (l2, _), (l_eager, s_eager) = (from_saved(1, replay), from_saved(1, replay),
                                                                   from_saved(2, replay), from_saved(1, step))
    assert l1 == pytest.approx(l1_again, rel=1e-6)  # the same seed: the same draws
    for a, b in zip(s1, s1_again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert l2["stochastic_recon"] != l1["stochastic_recon"]
    assert l1 == pytest.approx(l_eager, rel=1e-5)
    assert not torch.equal(s1[0], saved[0])  # the replay trained
    for a, b in zip(s1, s_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_benchmark_times_a_cuda_graph_step():
    """benchmark.py --cuda_graph's row: the replayed step's time, its host share, a finite loss."""
    import benchmark

    row = benchmark.time_one("resid_mlp1", None, None, 3, "cuda", 256, cuda_graph=True)
    assert row["cuda_graph"] and row["path"].endswith("CUDA graph")
    assert 0 < row["host_ms_per_step"] <= row["ms_per_step"] and torch.isfinite(torch.tensor(row["total_loss"]))
