"""Expert parallelism on gloo with spawned processes: layer, training, checkpoints, routing, errors.

Every comparison is against the single-process code on the same global batch: the EP layer against
`MoELayer`, EP training against one process accumulating the same micro-batches.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.distributed.mesh import check_sizes
from moekit.layer import MoELayer
from moekit.train.checkpoint import find_checkpoint, load_weights
from moekit.train.config import RunConfig
from moekit.train.loop import Trainer

from .dist_workers import layer_global_batch, layer_worker, sizes_worker, spawn, train_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no torch.distributed gloo backend")

MIXTRAL = MoEConfig(hidden_size=16, moe_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
DEEPSEEK = MoEConfig(hidden_size=16, moe_intermediate_size=8, num_local_experts=16, num_experts_per_tok=4,
                     n_shared_experts=1, router="deepseek_v3", scoring_func="sigmoid", n_group=4, topk_group=2,
                     routed_scaling_factor=2.5)


def _reference(config: MoEConfig, tokens: int, bias: list[float] | None = None):
    layer, x, upstream = layer_global_batch(config, tokens)
    if bias is not None:
        layer.router.e_score_correction_bias.copy_(torch.tensor(bias))
    x.requires_grad_()
    out = layer(x)
    (out.hidden_states * upstream).sum().backward()
    return layer, x, out


def _run_layer(tmp_path, config: MoEConfig, world: int, ep: int, tokens: int, bias=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spawn(layer_worker, world, ep, config.to_dict(), tokens, str(tmp_path), bias)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _assert_layer_matches(config: MoEConfig, results, tokens: int, bias=None) -> None:
    layer, x, out = _reference(config, tokens, bias)
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.hidden_states.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x.grad, atol=1e-5, rtol=0)
    for r in results:
        torch.testing.assert_close(r["router_grad"], layer.router.weight.grad, atol=1e-5, rtol=0)
        for name, grad in r["expert_grads"].items():
            full = getattr(layer.experts, name).grad
            torch.testing.assert_close(grad, full[r["offset"]:r["offset"] + grad.shape[0]], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("world", "ep"), [(2, 2), (4, 4), (4, 2)])
def test_ep_layer_equals_single_process(tmp_path, world, ep):
    """Outputs, input grads, router grads and every expert slice's grads equal the one-process layer's."""
    results = _run_layer(tmp_path, MIXTRAL, world, ep, tokens=48)
    assert [r["offset"] for r in results] == [(rank % ep) * (8 // ep) for rank in range(world)]
    _assert_layer_matches(MIXTRAL, results, tokens=48)


def test_ep_layer_fine_grained_shared_deepseek(tmp_path):
    """DeepSeek-V3 routing (sigmoid, groups, bias) with a shared expert and 16 small experts over 2 ranks."""
    _assert_layer_matches(DEEPSEEK, _run_layer(tmp_path, DEEPSEEK, 2, 2, tokens=40), tokens=40)


def test_rank_with_no_tokens(tmp_path):
    """A selection bias sends every token to experts 0-3 (rank 0's): rank 1 receives nothing and its experts get
    zero gradients, rank 0's experts 1 and 3 (biased lower) get no tokens either; all still equals one process."""
    config = MoEConfig(hidden_size=16, moe_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                       router="deepseek_v3", scoring_func="sigmoid")
    bias = [100.0, 0.0, 100.0, 0.0, -100.0, -100.0, -100.0, -100.0]  # only experts 0 and 2 can be picked
    results = _run_layer(tmp_path, config, 2, 2, tokens=32, bias=bias)
    _assert_layer_matches(config, results, tokens=32, bias=bias)
    rank1 = results[1]
    assert all(float(g.abs().max()) == 0.0 for g in rank1["expert_grads"].values())
    assert results[0]["stats"]["tokens_per_expert"].tolist() == [16, 0, 16, 0, 0, 0, 0, 0]
    # rank 0 keeps its tokens at home; rank 1 sends each of its 16 tokens once (two experts, one rank)
    assert float(results[0]["stats"]["all_to_all_rows"]) == 0.0
    assert float(results[1]["stats"]["all_to_all_rows"]) == 16.0


@pytest.mark.parametrize("bias", [None, [100.0, 0.0, 100.0, 0.0, -100.0, -100.0, -100.0, -100.0]])
def test_ep_layer_under_bf16_autocast(tmp_path, bias):
    """Under CPU bf16 autocast (train.dtype=bfloat16) the experts compute in bf16 while tokens travel in their own
    dtype: every rank must agree on each exchange's dtype, a rank without tokens included (it used to abort)."""
    config = MoEConfig(hidden_size=16, moe_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                       router="deepseek_v3", scoring_func="sigmoid")
    tmp_path.mkdir(parents=True, exist_ok=True)
    spawn(layer_worker, 2, 2, config.to_dict(), 32, str(tmp_path), bias, True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    layer, x, upstream = layer_global_batch(config, 32)
    if bias is not None:
        layer.router.e_score_correction_bias.copy_(torch.tensor(bias))
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (out.hidden_states.float() * upstream).sum().backward()
    # bf16 products: the grouping of rows differs, so compare at bf16 precision
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.hidden_states.detach().float(),
                               atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(torch.cat([r["inference"] for r in results]), out.hidden_states.detach().float(),
                               atol=2e-2, rtol=2e-2)


def _remote_pairs(config: MoEConfig, tokens: int, world: int) -> list[int]:
    """Per rank: the (token, other rank) pairs its routing needs, counted from the single-process routing."""
    layer, x, _ = layer_global_batch(config, tokens)
    with torch.no_grad():
        routing = layer.router(x, torch.zeros(tokens, dtype=torch.long), 1)
    per_rank = config.num_local_experts // world
    holder = routing.expert_index.view(tokens, -1) // per_rank
    share = tokens // world
    counts = []
    for rank in range(world):
        rows = holder[rank * share:(rank + 1) * share]
        counts.append(sum(len(set(row.tolist()) - {rank}) for row in rows))
    return counts


@pytest.mark.slow
def test_device_limited_routing_cuts_traffic(tmp_path):
    """With max_devices_per_token=1 every token reaches one rank: rows sent are the hand-counted (token, remote rank)
    pairs, fewer than without the limit, and the layer still equals one process."""
    free = MoEConfig(hidden_size=16, moe_intermediate_size=24, num_local_experts=16, num_experts_per_tok=4,
                     expert_devices=4)
    limited = free.replace(max_devices_per_token=1)
    sent = {}
    for name, config in (("free", free), ("limited", limited)):
        results = _run_layer(tmp_path / name, config, 4, 4, tokens=64)
        _assert_layer_matches(config, results, tokens=64)
        rows = [int(r["stats"]["all_to_all_rows"]) for r in results]
        assert rows == _remote_pairs(config, 64, 4)
        sent[name] = (sum(rows), sum(float(r["stats"]["all_to_all_bytes"]) for r in results))
    assert sent["limited"][0] <= 64 and sent["limited"][0] < sent["free"][0] / 2
    assert sent["limited"][1] < sent["free"][1]


def test_device_limited_routing_reference():
    """The router's device limit against a per-token reference: blocks scored by their best ceil(k/M) scores."""
    config = MoEConfig(hidden_size=8, moe_intermediate_size=8, num_local_experts=12, num_experts_per_tok=4,
                       expert_devices=3, max_devices_per_token=2)
    torch.manual_seed(1)
    layer = MoELayer(config)
    x = torch.randn(50, 8)
    with torch.no_grad():
        routing = layer.router(x, torch.zeros(50, dtype=torch.long), 1)
        scores = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    for t in range(50):
        blocks = [sorted(scores[t, d * 4:(d + 1) * 4].tolist(), reverse=True) for d in range(3)]
        block_score = [sum(b[:2]) for b in blocks]  # ceil(4 / 2) = 2 best per block
        kept = sorted(range(3), key=lambda d: -block_score[d])[:2]
        eligible = [e for e in range(12) if e // 4 in kept]
        want = sorted(eligible, key=lambda e: -float(scores[t, e]))[:4]
        assert sorted(routing.expert_index.view(50, 4)[t].tolist()) == sorted(want)
        assert len({e // 4 for e in want}) <= 2


def test_device_limited_routing_config_errors():
    with pytest.raises(ValueError, match="expert_devices"):
        MoEConfig(num_local_experts=8, expert_devices=3)
    with pytest.raises(ValueError, match="max_devices_per_token"):
        MoEConfig(num_local_experts=8, num_experts_per_tok=4, expert_devices=4, max_devices_per_token=1)  # 2 < k
    with pytest.raises(ValueError, match="max_devices_per_token"):
        MoEConfig(num_local_experts=8, expert_devices=2, max_devices_per_token=3)
    with pytest.raises(ValueError, match="device-limited routing applies"):
        MoEConfig(num_local_experts=8, router="noisy_topk", expert_devices=2, max_devices_per_token=1)


def test_bad_sizes_error_clearly(tmp_path):
    with pytest.raises(ValueError, match="--ep 3 does not divide the world size 4"):
        check_sizes(4, 3)
    with pytest.raises(ValueError, match="--ep 4 does not divide num_local_experts=6"):
        check_sizes(4, 4, num_experts=6)
    spawn(sizes_worker, 2, 4, str(tmp_path))  # two processes asked for ep 4
    for rank in range(2):
        assert "--ep 4 does not divide the world size 2" in torch.load(tmp_path / f"rank{rank}.pt")["error"]


def test_ep_without_torchrun_errors(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    run = RunConfig.from_dict(_run_dict(steps=1) | {"train": {**_run_dict(steps=1)["train"], "expert_parallel": 2}})
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2 -m moekit train --ep 2"):
        Trainer(run, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_layouts_that_cannot_work(tmp_path):
    """Checked before any process group or file: a dense model with --ep, and device blocks that --ep cannot hold."""
    dense = _run_dict(1, ep=2)
    dense["model"]["moe"] = None
    with pytest.raises(ValueError, match="this model is dense"):
        Trainer(RunConfig.from_dict(dense), tmp_path / "a", progress=False)
    blocks = _run_dict(1, ep=2)
    blocks["model"]["moe"].update(expert_devices=4, max_devices_per_token=2)
    with pytest.raises(ValueError, match="does not split into 4 groups of ranks"):
        Trainer(RunConfig.from_dict(blocks), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- training
def _run_dict(steps: int, ep: int = 1, batch_size: int = 2, grad_accum: int = 1, router: str = "topk") -> dict:
    moe = MoEConfig(hidden_size=32, moe_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    if router == "deepseek_v3":
        moe = moe.replace(router="deepseek_v3", scoring_func="sigmoid", n_shared_experts=1,
                          aux_free_bias_update_rate=0.01, router_aux_loss_coef=0.0, seq_aux_loss_coef=0.01)
    model = ModelConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, moe=moe)
    train = {"seed": 3, "block_size": 16, "batch_size": batch_size, "grad_accum": grad_accum, "max_steps": steps,
             "warmup_steps": 2, "eval_interval": 100, "eval_batches": 2, "log_interval": 1,
             "checkpoint_interval": 100, "device": "cpu", "dtype": "float32", "expert_parallel": ep}
    return {"name": "ep-test", "model": model.to_dict(), "train": train}


def _curve(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def _single(run_dict: dict, run_dir, resume: bool = False) -> Trainer:
    trainer = Trainer(RunConfig.from_dict(run_dict), run_dir, resume=resume, progress=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("router", ["topk", "deepseek_v3"])
def test_ep2_training_equals_single_process(tmp_path, router):
    """5 steps at EP=2 (batch 2 per rank) give the loss curve of one process accumulating the same 2 micro-batches,
    aux losses, clipping and (deepseek_v3) the aux-free bias update included."""
    spawn(train_worker, 2, _run_dict(5, ep=2, router=router), str(tmp_path / "ep2"), False)
    single = _single(_run_dict(5, grad_accum=2, router=router), tmp_path / "one")
    ep_curve, one_curve = _curve(tmp_path / "ep2"), _curve(tmp_path / "one")
    assert len(ep_curve) == 5
    assert max(abs(a - b) for a, b in zip(ep_curve, one_curve, strict=True)) < 1e-4
    assert ep_curve[-1] < ep_curve[0]
    record = [json.loads(line) for line in (tmp_path / "ep2" / "metrics.jsonl").read_text().splitlines()][-2]
    assert record["world_size"] == 2 and record["all_to_all_bytes"] > 0
    # the sharded checkpoint loads in one process and holds the single-process model's weights
    joined = single.model.__class__(single.model.config)
    load_weights(find_checkpoint(tmp_path / "ep2"), joined)
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(joined.state_dict()[name], tensor, atol=1e-4, rtol=1e-4, msg=name)


def test_ep2_training_under_bf16_autocast(tmp_path):
    """train.dtype=bfloat16 at EP=2: the exchanges keep one dtype per role on every rank (a mismatch aborted gloo),
    and the losses follow one process's at bf16 precision."""
    run = _run_dict(3, ep=2)
    run["train"]["dtype"] = "bfloat16"
    spawn(train_worker, 2, run, str(tmp_path / "ep2"), False)
    single = _run_dict(3, grad_accum=2)
    single["train"]["dtype"] = "bfloat16"
    _single(single, tmp_path / "one")
    curve, reference = _curve(tmp_path / "ep2"), _curve(tmp_path / "one")
    assert len(curve) == 3 and max(abs(a - b) for a, b in zip(curve, reference, strict=True)) < 2e-2


@pytest.mark.slow
def test_dp2_x_ep2_training_equals_single_process(tmp_path):
    """4 ranks as 2 data-parallel replicas of an EP=2 pair: expert gradients are summed over the replicas, dense
    ones averaged by DDP, and 3 steps give the curve of one process accumulating the 4 micro-batches."""
    spawn(train_worker, 4, _run_dict(3, ep=2), str(tmp_path / "dpep"), False)
    _single(_run_dict(3, grad_accum=4), tmp_path / "one")
    curve, reference = _curve(tmp_path / "dpep"), _curve(tmp_path / "one")
    assert len(curve) == 3 and max(abs(a - b) for a, b in zip(curve, reference, strict=True)) < 1e-4
    layout = json.loads((find_checkpoint(tmp_path / "dpep") / "meta.json").read_text())["layout"]
    assert layout == {"world_size": 4, "expert_parallel": 2}


@pytest.mark.slow
def test_checkpoint_reshards_across_ep_sizes(tmp_path):
    """3 of 5 steps at EP=2 on 2 ranks (2 micro-batches each), then resumed at EP=4 on 4 ranks and, separately, in one
    process: both continue the one-process curve, whose batches they draw in the same order."""
    spawn(train_worker, 2, _run_dict(5, ep=2, grad_accum=2), str(tmp_path / "ep"), False, 3)
    shutil.copytree(tmp_path / "ep", tmp_path / "one-resumed")
    spawn(train_worker, 4, _run_dict(5, ep=4), str(tmp_path / "ep"), True)
    _single(_run_dict(5, grad_accum=4), tmp_path / "one-resumed", resume=True)
    _single(_run_dict(5, grad_accum=4), tmp_path / "one")
    reference = _curve(tmp_path / "one")
    for run in ("ep", "one-resumed"):
        curve = _curve(tmp_path / run)
        assert len(curve) == 5 and max(abs(a - b) for a, b in zip(curve, reference, strict=True)) < 1e-4, run
    files = sorted(p.name for p in find_checkpoint(tmp_path / "ep").iterdir())
    assert [f for f in files if f.startswith("experts-")] == [f"experts-{j:05d}-of-00004.safetensors" for j in range(4)]
    assert len([f for f in files if f.startswith("state-rank")]) == 4


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """The documented launch: torchrun -m moekit train --ep 2, then one-process eval, generate and export."""
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps(_run_dict(4)))
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "moekit", "train", "--config", str(preset), "--ep", "2", "--out", str(run_dir), "--no-progress"]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "expert parallel 2 x data parallel 1" in done.stdout
    assert (run_dir / "report.md").is_file()
    for command in (["eval", str(run_dir), "--batches", "2"],
                    ["generate", str(run_dir), "--prompt", "To", "--max-new-tokens", "5"],
                    ["export", str(run_dir), str(tmp_path / "hf")]):
        done = subprocess.run([sys.executable, "-m", "moekit", *command], capture_output=True, text=True,
                              timeout=120, env=_env())
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- faults under torchrun
def _launch(tmp_path, run_dict: dict, out: str = "run") -> subprocess.Popen:
    """torchrun -m moekit train --ep 2 on 2 processes, in a session of its own (so a test can signal the group)."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run_dict))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit",
               "train", "--config", str(config), "--ep", "2", "--out", str(tmp_path / out), "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)


def _long_run(**train) -> dict:
    run = _run_dict(100000, ep=2)
    run["train"].update({"checkpoint_interval": 100000, **train})
    return run


def _wait_steps(run_dir, n: int, process: subprocess.Popen, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run_dir / "metrics.jsonl"
        if log.is_file() and sum('"train"' in line for line in log.read_text().splitlines()) >= n:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} steps in {timeout} s")


def _worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started."""
    from pathlib import Path

    pids = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for child in (task / "children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = next((int(item[5:]) for item in env if item.startswith(b"RANK=")), None)
            if rank is not None:
                pids[rank] = int(child)
    return pids


def _assert_one_consistent_checkpoint(run_dir) -> int:
    path = find_checkpoint(run_dir, need="all")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["layout"] == {"world_size": 2, "expert_parallel": 2}
    steps = {torch.load(path / f"state-rank{r:05d}-of-00002.pt", weights_only=False)["step"] for r in range(2)}
    assert steps == {meta["step"]}  # every rank saved the same step
    return meta["step"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c to every process", "SIGTERM to torchrun"])
def test_a_stop_under_torchrun_is_agreed_by_every_rank_and_writes_one_checkpoint(tmp_path, how):
    import os
    import signal

    process = _launch(tmp_path, _long_run())
    _wait_steps(tmp_path / "run", 5, process)
    if how == "ctrl-c to every process":
        os.killpg(process.pid, signal.SIGINT)  # what a terminal sends: torchrun and both ranks get it
    else:
        process.send_signal(signal.SIGTERM)  # what a scheduler sends torchrun; it forwards it to the ranks
    out, err = process.communicate(timeout=120)
    step = _assert_one_consistent_checkpoint(tmp_path / "run")
    assert f"interrupted at step {step}" in out, (out, err[-3000:])
    # it resumes, here in one process drawing the same micro-batches per step (2 ranks x 1 = 1 x grad_accum 2)
    resumed = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(tmp_path / "run"),
                              "--no-progress", "--set", "train.grad_accum=2", "--set", "train.expert_parallel=1",
                              "--stop-at", str(step + 2)], capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _run_dict(100000, grad_accum=2)  # the same planned schedule, stopped at the same step
    reference["train"]["checkpoint_interval"] = 100000
    Trainer(RunConfig.from_dict(reference), tmp_path / "one", progress=False).train(stop_at=step + 2)
    curve, expected = _curve(tmp_path / "run"), _curve(tmp_path / "one")
    assert len(curve) == step + 2 and max(abs(a - b) for a, b in zip(curve, expected, strict=True)) < 1e-4


@pytest.mark.slow
def test_a_stopped_rank_is_reported_within_the_collective_timeout(tmp_path):
    import os
    import signal

    process = _launch(tmp_path, _long_run(collective_timeout_s=5, checkpoint_interval=2))
    _wait_steps(tmp_path / "run", 5, process)
    worker = _worker_pids(process.pid)[1]
    os.kill(worker, signal.SIGSTOP)  # a hung peer: alive, silent
    try:
        _, err = process.communicate(timeout=150)  # torchrun ends once rank 0 gives up (and it kills rank 1)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(worker, sig)
            except ProcessLookupError:
                pass
    assert process.returncode != 0
    line = next((ln for ln in err.splitlines() if "another rank stopped answering" in ln), None)
    assert line is not None and line.startswith("moekit train: error: rank 0: ") and "collective_timeout_s=5" in line, \
        err[-3000:]
    assert "the last checkpoint (step " in line
    _assert_one_consistent_checkpoint(tmp_path / "run")  # the checkpoints before the hang are intact


def test_a_refusal_on_rank_0_ends_every_rank_at_once(tmp_path):
    occupied = tmp_path / "run"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not a run")
    process = _launch(tmp_path, _long_run(collective_timeout_s=600))  # a hang would last 10 minutes
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "already exists and is not empty" in err, err[-3000:]
    assert (occupied / "notes.txt").read_text() == "not a run" and sorted(p.name for p in occupied.iterdir()) == [
        "notes.txt"]
