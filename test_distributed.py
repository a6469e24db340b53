"""Data parallelism (torchrun, torch.distributed with gloo on CPU, 2 processes): the same optimisation
as one process with the whole batch, replicas that stay identical, the CLI under torchrun, resume of
a 2-process run, and the errors."""

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import models
import spd
import train

ROOT = Path(__file__).parent
B, STEPS = 64, 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(**kw) -> spd.SPDConfig:
    return spd.SPDConfig(targets=["linear1", "linear2"], C=8, steps=STEPS, batch_size=B, lr=1e-2, **kw)


def _decomposition(cfg, seed: int = 1):
    torch.manual_seed(0)
    target = models.TMS(5, 2)
    torch.manual_seed(seed)
    return spd.Decomposition.from_config(target, cfg)


def _global_batch(step: int) -> torch.Tensor:  # the same stream of whole batches in every test run
    return models.sparse_features(B, 5, 0.2, (0.0, 1.0), torch.Generator().manual_seed(step))


def _run(rank: int, world: int, cfg, shard: bool, shard_optimizer: bool = False) -> dict:
    """optimize on this process's share (rows rank::world of each whole batch, shard) or on all of it;
    also the numbers of Adam's first moment this process holds, and (process 0) the optimizer's state.
    Each process initialises its decomposition from its own seed: optimize starts every one from
    process 0's values, the one-process run's."""
    torch.set_num_threads(1)
    dec = _decomposition(cfg, seed=1 + rank)
    step = [0]

    def batch_fn(b):
        x = _global_batch(step[0])
        step[0] += 1
        assert b == (B // world if shard else B)
        return x[rank * b:(rank + 1) * b] if shard else x

    logged, held = [], {}

    def checkpoint(step, opt):  # optimize calls it on every process at the end
        local = opt.optim if shard_optimizer else opt  # ZeroRedundancyOptimizer's own AdamW, over its share
        held["adam_numbers"] = sum(s["exp_avg"].numel() for s in local.state.values())
        if shard_optimizer:
            opt.consolidate_state_dict(to=0)
        held["optimizer"] = opt.state_dict() if rank == 0 else None

    torch.manual_seed(100 + rank)  # masks: each process its own draws
    final = spd.optimize(dec, batch_fn, cfg, log=lambda s, l: logged.append(l), log_every=10, progress=False,
                         checkpoint=checkpoint, shard_optimizer=shard_optimizer)
    return {"UV": {n: [t.detach().clone() for t in dec.UV(n)] for n in dec.names}, "final": final, "logged": logged,
            **held}


@contextlib.contextmanager
def _gloo_group(rank: int, world: int, port: int):
    """A spawned process's gloo group; the block ends with a barrier (nothing in flight at teardown),
    and the group is destroyed even when the block fails."""
    import torch.distributed as dist
    spd.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out: str, cfg_kw: dict, shard_optimizer: bool) -> None:
    with _gloo_group(rank, world, port):
        torch.save(_run(rank, world, _cfg(**cfg_kw), shard=True, shard_optimizer=shard_optimizer), f"{out}/rank{rank}.pt")


def _spawn(tmp_path, cfg_kw, shard_optimizer=False) -> list[dict]:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), cfg_kw, shard_optimizer), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


DETERMINISTIC = dict(stochastic_recon=0.0, stochastic_recon_layerwise=0.0, recon=1.0, recon_layerwise=1.0)


def test_two_processes_give_the_one_process_optimisation_on_the_whole_batch(tmp_path):
    """Without random masks (CI-masked recon losses instead of the stochastic ones), 2 processes on
    half a batch each and 1 process on the whole batch take the same 30 steps. Tolerance 1e-5: the
    batch means are summed in another order (two halves, then averaged), a float32 rounding of about
    1e-7 per step that Adam carries along; U and V move by about 0.1 over the run."""
    ranks = _spawn(tmp_path, DETERMINISTIC)
    single = _run(0, 1, _cfg(**DETERMINISTIC), shard=False)
    before = _decomposition(_cfg(**DETERMINISTIC))
    for name in single["UV"]:
        for a, b, init in zip(ranks[0]["UV"][name], single["UV"][name], before.UV(name)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            assert (b - init).abs().max() > 0.05  # it trained
    for two, one in zip(ranks[0]["logged"], single["logged"]):  # logged losses: the whole batch's
        assert two.keys() == one.keys()
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-9)
    assert ranks[1]["logged"] == ranks[0]["logged"]


def test_with_random_masks_the_replicas_stay_identical(tmp_path):
    """The paper's stochastic losses: each process draws its own masks, yet after the averaged
    gradients every process holds exactly the same U, V."""
    ranks = _spawn(tmp_path, {})
    for name in ranks[0]["UV"]:
        for a, b in zip(ranks[0]["UV"][name], ranks[1]["UV"][name]):
            assert torch.equal(a, b)
    assert ranks[0]["final"] == ranks[1]["final"]


def test_sharded_adam_takes_the_same_steps_and_each_process_holds_a_share(tmp_path):
    """shard_optimizer (torch's ZeroRedundancyOptimizer): 2 processes take the one-process run's 30
    steps (tolerance 1e-5 as above), each holds Adam's moments for part of the parameters only, and
    process 0's consolidated state is the one-process AdamW's, in its format (rtol 1e-4: the same
    float32 summation order as above, in moments that are squares of gradients)."""
    ranks = _spawn(tmp_path, DETERMINISTIC, shard_optimizer=True)
    single = _run(0, 1, _cfg(**DETERMINISTIC), shard=False)
    for name in single["UV"]:
        for a, b, one in zip(ranks[0]["UV"][name], ranks[1]["UV"][name], single["UV"][name]):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, one, atol=1e-5, rtol=0)
    shares = [r["adam_numbers"] for r in ranks]
    assert sum(shares) == single["adam_numbers"] and 0 < min(shares), shares
    sharded, plain = ranks[0]["optimizer"], single["optimizer"]
    assert sharded["param_groups"] == plain["param_groups"] and sharded["state"].keys() == plain["state"].keys()
    for i, state in plain["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sharded["state"][i][k], state[k], rtol=1e-4, atol=1e-10)


def _rank_tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(n, generator=g) for n in (3, 2, 7, 1, 4)] + [torch.randn(4, 3, generator=g).T]


def _average_worker(rank: int, world: int, port: int, out: str) -> None:
    with _gloo_group(rank, world, port):
        tensors = _rank_tensors(rank)
        spd.average_over_processes_(tensors, bucket=5)  # buckets: [3, 2], [7] alone, [1, 4], [3x4, not contiguous]
        torch.save(tensors, f"{out}/rank{rank}.pt")


def test_gradient_averaging_in_buckets_gives_the_mean(tmp_path):
    mp.spawn(_average_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    averaged = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b, t0, t1 in zip(*averaged, _rank_tensors(0), _rank_tensors(1)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, (t0 + t1) / 2)


def _teardown_worker(rank: int, world: int, port: int, out: str) -> None:
    with _gloo_group(rank, world, port):
        cfg = _cfg()
        dec = _decomposition(cfg)
        for shard in (False, True):  # the first optimizers: torch._dynamo and torch.distributed.optim are imported now
            spd.make_optimizer(dec, cfg, shard=shard)
    tasks = Path("/proc/self/task")
    Path(out, f"rank{rank}.txt").write_text(" ".join((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks)))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_destroy_process_group_ends_the_gloo_threads_after_the_optimizers_imports(tmp_path):
    """spd.init_process_group: the group must not outlive destroy_process_group (its gloo threads
    torn down at exit aborted 3 of 28 two-process runs)."""
    mp.spawn(_teardown_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        threads = (tmp_path / f"rank{r}.txt").read_text().split()
        assert "python" in threads and not [t for t in threads if "gloo" in t], threads


def test_optimize_refuses_a_batch_that_does_not_split(tmp_path, monkeypatch):
    monkeypatch.setattr(spd, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="--batch_size 64 does not split evenly over 3 processes"):
        spd.optimize(_decomposition(_cfg()), lambda b: _global_batch(0), _cfg(), progress=False)


# --- the command line ----------------------------------------------------------------------------


def _argv(tmp_path, out, *extra):
    return ["--model", "tms_5-2", "--steps", "20", "--batch_size", "64", "--target_steps", "200", "--save_every", "10",
            "--log_every", "5", "--target_dir", str(tmp_path / "targets"), "--out", str(tmp_path / out), "--no_progress", *extra]


def _cli_worker(rank: int, world: int, port: int, argv: list, fail_at: int | None, rng_dir: str | None = None) -> None:
    """A process as torchrun starts it (its environment), running train.main; fail_at: die at that step;
    rng_dir: save there the random state that draws the first step's masks (rank{rank}.pt)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    make_optimizer = spd.make_optimizer

    def checked(dec, cfg, shard=False):  # the flag reaches the optimizer
        assert shard == ("--shard_optimizer" in argv)
        return make_optimizer(dec, cfg, shard)
    spd.make_optimizer = checked
    lr_at = spd.lr_at

    def hooked(step, cfg):  # called at the start of every step
        if rng_dir is not None and step == 0:  # a fresh run's first step
            torch.save(torch.get_rng_state(), f"{rng_dir}/rank{rank}.pt")
        if step == fail_at:
            raise RuntimeError("killed")
        return lr_at(step, cfg)
    spd.lr_at = hooked
    try:
        train.main(argv)
    except RuntimeError as e:
        if str(e) != "killed":
            raise
    finally:  # a process that exits with its gloo group alive can abort ("terminate called without an active exception")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_cli_under_torchrun_writes_one_run_folder_and_a_killed_run_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *_argv(tmp_path, "whole")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run folder:") == 1 and "2 processes (torchrun)" in done.stdout  # process 0 alone prints
    whole = tmp_path / "whole"
    assert (whole / "metrics.json").exists()
    state = torch.load(whole / "train_state.pt", weights_only=True)
    assert len(state["process_rngs"]) == 2 and not torch.equal(*(r["data_rng"] for r in state["process_rngs"]))
    assert spd.read_config(whole)["config"]["processes"] == 2

    mp.spawn(_cli_worker, args=(2, _free_port(), _argv(tmp_path, "killed"), 13, str(tmp_path)), nprocs=2, join=True)
    # each process its own masks from the first step on (later, the CPU's skipped all-zero rows, a
    # count that depends on the data, would part the random states even if the processes shared a seed)
    assert not torch.equal(*(torch.load(tmp_path / f"rank{r}.pt") for r in range(2)))
    killed = tmp_path / "killed"
    assert spd.read_config(killed)["step"] == 10 and not (killed / "metrics.json").exists()
    with pytest.raises(SystemExit, match="checkpointed by 2 process"):  # one process cannot continue it
        train.main(_argv(tmp_path, "killed", "--resume"))
    mp.spawn(_cli_worker, args=(2, _free_port(), _argv(tmp_path, "killed", "--resume"), None), nprocs=2, join=True)
    a, b = (spd.read_tensors(d / "decomposition.pt") for d in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_shard_optimizer_takes_the_same_steps_bit_for_bit_and_resumes_either_way(tmp_path):
    """--shard_optimizer: the same U, V, bit for bit, as an unsharded 2-process run (each process
    updates its share with the same averaged gradients and the same elementwise AdamW), also when
    killed at step 13 and resumed from the step-10 checkpoint (AdamW's format, consolidated by process
    0) without the flag, and when an unsharded run is resumed with it."""
    def spawn(out, *flags, fail_at=None):
        mp.spawn(_cli_worker, args=(2, _free_port(), _argv(tmp_path, out, *flags), fail_at), nprocs=2, join=True)

    spawn("plain")
    spawn("sharded", "--shard_optimizer", fail_at=13)
    adam = torch.load(tmp_path / "sharded" / "train_state.pt", weights_only=True)["optimizer"]
    assert spd.read_config(tmp_path / "sharded")["step"] == 10
    assert len(adam["state"]) == len(adam["param_groups"][0]["params"])  # every parameter's moments
    spawn("sharded", "--resume")
    spawn("unsharded", fail_at=13)
    spawn("unsharded", "--shard_optimizer", "--resume")
    a, b, c = (spd.read_tensors(tmp_path / d / "decomposition.pt") for d in ("plain", "sharded", "unsharded"))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_cli_refuses_what_data_parallelism_does_not_cover(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--shard_optimizer shards Adam's state over torchrun's processes; this is one"):
        train.main(_argv(tmp_path, "w", "--shard_optimizer"))
    with pytest.raises(ValueError, match="shard_optimizer shards Adam's state .* this is one process"):
        spd.optimize(_decomposition(_cfg()), lambda b: _global_batch(0), _cfg(), progress=False, shard_optimizer=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--batch_size 63 does not split evenly over 2 processes"):
        train.main(_argv(tmp_path, "x", "--batch_size", "63"))
    with pytest.raises(SystemExit, match="runs in one process only"):
        train.main(_argv(tmp_path, "y", "--method", "apd"))
    with pytest.raises(SystemExit, match="--shard_optimizer cannot split tied matrices"):
        train.main(_argv(tmp_path, "z", "--shard_optimizer", "--tied_updates", "separate"))
    assert not any((tmp_path / d).exists() for d in "wxyz")


def test_benchmark_times_a_data_parallel_step_per_process():
    """benchmark.py --processes 2 --shard_optimizer: process 0's row, each process's peak memory."""
    import benchmark
    row = benchmark.time_parallel(2, "tms_5-2", None, None, 1, "cpu", 64, True)
    assert row["processes"] == 2 and row["shard_optimizer"] and row["batch"] == 64
    assert len(row["peak_gb_per_process"]) == 2 and all(g > 0 for g in row["peak_gb_per_process"]) and row["ms_per_step"] > 0
