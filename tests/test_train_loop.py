"""The shared Ray Train loop: DDP really averages, the schedule is LLaMA 2's, the data order is the position."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayllama.checkpoint import load_model
from rayllama.config import OptimConfig, ScalingSection
from rayllama.dist.fsdp import init_weights
from rayllama.model import ModelConfig, Transformer
from rayllama.train.data import save_tensors
from rayllama.train.loop import TrainJob, example_order, rank_micro_batches, run_train_job
from rayllama.train.optim import lr_factor

SMALL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=32)


def test_cosine_schedule_warms_up_then_decays_to_ten_percent():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, final_lr_ratio=0.1)
    # warm-up: step s (0-based) gets (s + 1) / 10
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    # halfway through the cosine part (step 60 of 10 + 100): 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2)) = 0.55
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)
    # the end: 10% of the peak
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(5, OptimConfig(lr=1.0, schedule="constant"), 100) == 1.0


def test_example_order_is_a_function_of_seed_and_step():
    a = example_order(10, 4, 6, seed=3)
    assert torch.equal(a, example_order(10, 4, 6, seed=3))
    assert len(a) == 24
    # every epoch is a permutation of all examples
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:20].tolist()) == list(range(10))
    same_width = torch.full((10,), 7)  # rows of one width (pretraining's): contiguous even shares
    shares = [rank_micro_batches(a[8:12], same_width, 1, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    assert torch.cat([torch.cat(s) for s in shares]).tolist() == a[8:12].tolist()


def _padded_tokens(micro: list[torch.Tensor], widths: torch.Tensor) -> int:
    return sum(len(m) * int(widths[m].max()) for m in micro)


@pytest.mark.parametrize("world,batch,micro", [(2, 32, 16), (2, 32, 4), (3, 24, 3), (1, 16, 4)])
def test_micro_batches_balance_padded_tokens_across_ranks(world, batch, micro):
    """Each step's examples are used exactly once; every rank runs as many micro-batches as an even split (a
    sharded forward is a collective); no micro-batch holds more padded tokens than micro_batch_size full-width
    rows; and the busiest rank carries fewer padded tokens than under the even split."""
    g = torch.Generator().manual_seed(world * 1000 + micro)
    n, steps = 200, 20
    widths = torch.cat([torch.randint(15, 40, (n - n // 5,), generator=g),  # most rows short, a fifth long
                        torch.randint(60, 112, (n // 5,), generator=g)])
    order = example_order(n, batch, steps, seed=3)
    balanced = even = 0
    for step in range(steps):
        step_idx = order[step * batch : (step + 1) * batch]
        shares = [rank_micro_batches(step_idx, widths, micro, r, world) for r in range(world)]
        assert [len(s) for s in shares] == [math.ceil(batch / world / micro)] * world
        assert all(len(m) > 0 and len(m) * int(widths[m].max()) <= micro * int(widths.max()) for s in shares for m in s)
        assert sorted(torch.cat([torch.cat(s) for s in shares]).tolist()) == sorted(step_idx.tolist())
        balanced += max(_padded_tokens(s, widths) for s in shares)
        even += max(_padded_tokens(list(step_idx.view(world, -1)[r].split(micro)), widths) for r in range(world))
    assert balanced < 0.85 * even, (balanced, even)


def _lm_data(n: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 2, width + 1, (n,), generator=g)
    tokens = torch.randint(3, SMALL.vocab_size, (n, width), generator=g)
    loss_mask = torch.rand(n, width, generator=g) < 0.7  # uneven target counts per row: normalisation matters
    for i, n_i in enumerate(lengths.tolist()):
        tokens[i, n_i:] = 0
        loss_mask[i, n_i:] = False
    loss_mask[:, 0] = False
    return {"tokens": tokens, "loss_mask": loss_mask, "lengths": lengths}


def _reference_step(data: dict, seed: int, optim: OptimConfig) -> dict:
    """One plain single-process AdamW step on the union batch: mean CE over all target tokens, clip, step."""
    model = Transformer(SMALL)
    init_weights(model, seed)  # the trainers' fresh init: seeded per parameter, the same for every sharding
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
    )
    tokens, mask = data["tokens"], data["loss_mask"]
    attn = (torch.arange(tokens.shape[1])[None] < data["lengths"][:, None]).long()
    logits = model(tokens[:, :-1], attention_mask=attn[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view_as(mask[:, 1:])
    loss = (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    opt.step()
    return model.state_dict()


def test_two_sharded_workers_equal_one_process_on_the_union_batch(ray_session, tmp_path):
    data = _lm_data(8, 12, seed=1)
    save_tensors(tmp_path / "data.pt", data)
    optim = OptimConfig(lr=1e-2, schedule="constant")
    job = TrainJob(
        stage="ddp-test", objective="lm", data_path=str(tmp_path / "data.pt"), output=str(tmp_path / "model"),
        log_dir=str(tmp_path / "logs"), optim=optim, total_steps=1, batch_size=8, micro_batch_size=2,
        model=SMALL, seed=7,
    )
    run_train_job(job, ScalingSection(num_workers=2, cpus_per_worker=0.5))
    trained, _, meta = load_model(tmp_path / "model")
    assert meta["step"] == 1
    # Step 0 uses the permutation example_order(...)[0:8]: the whole (8-example) data set, shuffled -- the union.
    expected = _reference_step(data, seed=7, optim=optim)
    initial = Transformer(SMALL)
    init_weights(initial, 7)
    initial = initial.state_dict()
    moved = 0.0
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=2e-6, msg=f"{name} differs")
        moved = max(moved, float((value - initial[name]).abs().max()))
    assert moved > 1e-3  # the step really moved the weights (lr 1e-2)
    assert math.isfinite(moved)


def test_single_shard_step_differs_from_the_union_step(tmp_path):
    """The oracle above can tell averaging from not averaging: a step on half the batch lands elsewhere."""
    data = _lm_data(8, 12, seed=1)
    half = {k: v[:4] for k, v in data.items()}
    optim = OptimConfig(lr=1e-2, schedule="constant")
    full, part = _reference_step(data, 7, optim), _reference_step(half, 7, optim)
    assert max(float((full[k] - part[k]).abs().max()) for k in full) > 1e-4


def test_stage_tensors_are_rebuilt_when_what_they_are_made_of_changes(tmp_path):
    """A run dir reused with another max_seq_len, world or tokenizer must not train on the old cached tensors."""
    from rayllama.data import toyworld as tw
    from rayllama.run_dir import RunDir
    from rayllama.tokenizer import Tokenizer, train_tokenizer
    from rayllama.train.stages import _tensors

    texts = [r.text for r in tw.pretrain_texts(60, seed=0)]
    tok_a = Tokenizer(train_tokenizer(texts, tmp_path / "a", vocab_size=400))
    tok_b = Tokenizer(train_tokenizer(texts, tmp_path / "b", vocab_size=420))
    builds = []

    def build(texts, n):
        builds.append((texts, n))
        return {"x": torch.arange(n)}

    run = RunDir(tmp_path)  # the tensors go to run.data
    first = _tensors(run, "sft", tok_a, build, ["hello"], 8)
    assert _tensors(run, "sft", tok_a, build, ["hello"], 8) == first  # unchanged: reused, not rebuilt
    other_len = _tensors(run, "sft", tok_a, build, ["hello"], 3)
    other_text = _tensors(run, "sft", tok_a, build, ["hello!"], 8)
    other_tok = _tensors(run, "sft", tok_b, build, ["hello"], 8)
    assert builds == [(["hello"], 8), (["hello"], 3), (["hello!"], 8), (["hello"], 8)]
    assert len({first, other_len, other_text, other_tok}) == 4
    assert torch.load(other_len)["x"].tolist() == [0, 1, 2]
    assert not list(run.data.glob(".*tmp*"))  # written through a temp file and renamed


def test_jobs_at_once_return_in_order_and_a_failure_is_raised_once_the_others_end(monkeypatch):
    """run_train_jobs with Ray Train replaced by a stub: results in the jobs' order; a failed job's error is raised
    only after the slower job ended; without room for both, the jobs run one after the other (a failure stops
    the rest)."""
    import time
    from types import SimpleNamespace

    from rayllama.train import loop

    ended = []
    slow, fast, bad = (SimpleNamespace(stage=name) for name in ("slow", "fast", "bad"))

    def stub(job, scaling):
        time.sleep(0.3 if job is slow else 0.0)
        ended.append(job.stage)
        if job is bad:
            raise RuntimeError("bad job")
        return {"job": job.stage}

    monkeypatch.setattr(loop, "run_train_job", stub)
    monkeypatch.setattr(loop, "holds_worker_groups", lambda scaling, groups: True)
    assert loop.run_train_jobs([slow, fast], None) == [{"job": "slow"}, {"job": "fast"}]
    assert ended == ["fast", "slow"]  # at once: the fast one ended first
    ended.clear()
    with pytest.raises(RuntimeError, match="bad job"):
        loop.run_train_jobs([bad, slow], None)
    assert ended == ["bad", "slow"]
    ended.clear()
    monkeypatch.setattr(loop, "holds_worker_groups", lambda scaling, groups: False)
    with pytest.raises(RuntimeError, match="bad job"):
        loop.run_train_jobs([bad, slow], None)
    assert ended == ["bad"]
    ended.clear()
    assert loop.run_train_jobs([slow, fast], None, at_once=True) == [{"job": "slow"}, {"job": "fast"}]
    assert ended == ["slow", "fast"]


def test_ctrl_c_while_jobs_run_at_once_reaches_the_driver(monkeypatch):
    """SIGINT while run_train_jobs waits on its threads raises KeyboardInterrupt on the main thread at once (the
    driver then ends with one line, exit 130) instead of waiting for the jobs."""
    import os
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from rayllama.train import loop

    monkeypatch.setattr(loop, "run_train_job", lambda job, scaling: time.sleep(5.0))
    monkeypatch.setattr(loop, "holds_worker_groups", lambda scaling, groups: True)
    # the driver's handler (Python's own); earlier tests in this process may have left another one installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            loop.run_train_jobs([SimpleNamespace(stage="a"), SimpleNamespace(stage="b")], None)
        assert time.monotonic() - start < 3.0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ray_train_run_gives_the_sigint_handler_back(monkeypatch):
    """TorchTrainer.fit on the main thread installs Ray Train's SIGINT handler and leaves it installed (Ray 2.58),
    which swallowed a later Ctrl-C; run_train_job puts the driver's own back when the run ends, failed or not."""
    import signal
    from types import SimpleNamespace

    import ray.train.torch

    from rayllama.train.loop import TrainJobError

    def ray_handler(signum, frame):  # what Ray Train installs: abort the run it belongs to
        pass

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            self.fail = kwargs["train_loop_config"]["job"].stage == "bad"

        def fit(self):
            signal.signal(signal.SIGINT, ray_handler)
            if self.fail:
                raise RuntimeError("worker died")
            return SimpleNamespace(metrics={"step": 1})

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    before = signal.getsignal(signal.SIGINT)
    job = TrainJob(stage="ok", objective="lm", data_path="x", output="o", log_dir="/tmp/rayllama-sigint-test",
                   optim=OptimConfig(), total_steps=1, batch_size=1, micro_batch_size=1)
    assert run_train_job(job, ScalingSection()) == {"step": 1}
    assert signal.getsignal(signal.SIGINT) is before
    job.stage = "bad"
    with pytest.raises(TrainJobError, match="bad failed: worker died"):
        run_train_job(job, ScalingSection())
    assert signal.getsignal(signal.SIGINT) is before


def test_worker_groups_at_once_need_free_resources_and_whole_gpus(monkeypatch):
    """holds_worker_groups against a stubbed cluster: CPUs (and GPUs) for every group at once; workers of a
    fraction of a GPU never run beside another group (they could share a GPU the memory plan counts once)."""
    import ray

    from rayllama.train.loop import holds_worker_groups

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    assert holds_worker_groups(ScalingSection(num_workers=2, cpus_per_worker=4), 2)
    assert not holds_worker_groups(ScalingSection(num_workers=2, cpus_per_worker=4.5), 2)
    assert holds_worker_groups(ScalingSection(num_workers=2, use_gpu=True, gpus_per_worker=1, cpus_per_worker=1), 2)
    assert not holds_worker_groups(ScalingSection(num_workers=4, use_gpu=True, gpus_per_worker=1, cpus_per_worker=1), 2)
    assert not holds_worker_groups(ScalingSection(num_workers=2, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=1), 2)
