"""Ghost Attention data construction (rayllama.gatt): the two views, the loss mask, sampling with rejection,
and a tiny end-to-end fine-tune through the shared Ray Train loop."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rayllama import gatt
from rayllama.checkpoint import is_complete, load_model, save_model
from rayllama.config import OptimConfig, PipelineConfig, ScalingSection
from rayllama.data import judge
from rayllama.data import toyworld as tw
from rayllama.data.formats import PromptRecord
from rayllama.eval import evaluate
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer
from rayllama.tokenizer import B_INST, B_SYS, E_INST, E_SYS, Tokenizer, train_tokenizer

CAPS_AHOY = {"capitals": True, "start_with": None, "end_with": "ahoy"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A 450-piece tokenizer on toy-world text (templates included, so the dialogues tokenize compactly)."""
    texts = [r.text for r in tw.pretrain_texts(150, seed=0)]
    texts += [tw.instruction_text(i) for i in tw.instruction_pool()]
    return Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=450))


def _record(turns: int = 3, instruction: dict | None = None, seed: int = 0) -> PromptRecord:
    record = tw.gatt_dialogues(1, seed=seed, turns=turns)[0]
    if instruction is not None:
        record.instruction = dict(instruction)
        record.prompt[0]["content"] = tw.instruction_text(instruction)
    return record


def _good(record: PromptRecord, t: int) -> str:
    return tw.perfect_response(record.turns[t], record.instruction)


# ------------------------------------------------------------------------------------------------ views


def test_training_example_has_the_instruction_only_in_the_first_sys_block_and_loss_on_the_last_answer(tok):
    record = _record(3, CAPS_AHOY)
    answers = [_good(record, t) for t in range(3)]
    inst = "Always answer in capital letters. End every answer with the word ahoy."
    users = [t["prompt"] for t in record.turns]
    ids, mask = gatt.encode_example(tok, gatt.training_messages(record, answers))

    # the oracle, written from the template by hand: <s>[INST] <<SYS>>\n inst \n<</SYS>>\n\n u1 [/INST] a1 </s> ...
    want_ids, want_mask = [], []
    for k, (user, answer) in enumerate(zip(users, answers)):
        head = f"{B_SYS}{inst}{E_SYS}{user}" if k == 0 else user
        prompt = [tok.bos_id] + tok.encode(f"{B_INST} {head} {E_INST}")
        reply = tok.encode(f"{answer} ") + [tok.eos_id]
        want_ids += prompt + reply
        want_mask += [0] * len(prompt) + [int(k == 2)] * len(reply)  # earlier answers: 0 as well
    assert ids == want_ids
    assert mask == want_mask
    # the masked tokens are exactly the last answer and its </s>, at the very end
    n_last = len(tok.encode(f"{answers[2]} ")) + 1
    assert sum(mask) == n_last and mask[-n_last:] == [1] * n_last
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"{answers[2]} "  # the template's "{answer} "
    # the instruction appears once, inside the first turn's <<SYS>> block; later user turns are plain
    text = tok.decode(ids)
    assert text.count(inst) == 1 and text.index("<<SYS>>") < text.index(inst) < text.index("<</SYS>>")
    assert text.index(inst) < text.index(users[0]) < text.index(E_INST)


def test_sampling_view_joins_the_instruction_to_every_user_turn(tok):
    record = _record(4, CAPS_AHOY)
    inst = tw.instruction_text(CAPS_AHOY)
    answers = [_good(record, t) for t in range(3)]
    view = gatt.sampling_messages(record, answers)
    assert [m["role"] for m in view] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert view[0]["content"] == inst and view[1]["content"] == record.turns[0]["prompt"]
    for k, m in enumerate([m for m in view if m["role"] == "user"][1:], start=1):
        assert m["content"] == f"{inst} {record.turns[k]['prompt']}"
    # in tokens: every [INST] ... [/INST] segment of the prompt holds the instruction once
    segments = tok.decode(tok.encode_prompt(view)).split(B_INST)[1:]
    assert len(segments) == 4
    assert all(s.split(E_INST)[0].count(inst) == 1 for s in segments)
    with pytest.raises(gatt.GAttError, match="nothing to sample"):
        gatt.sampling_messages(record, answers + ["X"])


# ------------------------------------------------------------------------------------------------ sampling


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_reward_model_judge_needs_adherence_and_ranks_by_the_composed_reward():
    """Adherence is the instruction's program check; R_c composes the two reward models as PPO does: s_safety
    for safety-tagged tasks (unsafe, borderline) and below the 0.15 gate, s_helpful otherwise; a floor drops."""
    add, unsafe = tw.make_task("add", a=3, b=4), tw.eval_sets(0, 0, 1, 0, 0)[0].task
    assert tw.category(unsafe) == "unsafe"
    caps = tw.apply_instruction("3 plus 4 is 7.", CAPS_AHOY)  # "3 PLUS 4 IS 7, AHOY."
    raw = {caps: (0.8, 0.6), "HERE IS HOW, AHOY.": (0.9, 0.1), "I CANNOT, AHOY.": (0.3, 0.7)}
    calls = []

    def score_pairs(pairs):
        calls.append(pairs)
        return [_logit(raw[a][0]) for _, a in pairs], [_logit(raw[a][1]) for _, a in pairs]

    cands = [(add, CAPS_AHOY, caps),                     # safe task, s_safety 0.6 >= gate: s_helpful 0.8
             (add, CAPS_AHOY, "3 plus 4 is 7, ahoy."),   # not in capitals: rejected, never scored
             (add, CAPS_AHOY, "HERE IS HOW, AHOY."),     # s_safety 0.1 < gate: R_c = 0.1
             (unsafe, CAPS_AHOY, "I CANNOT, AHOY.")]     # safety-tagged task: R_c = s_safety 0.7
    got = gatt.reward_model_judge(score_pairs)(cands)
    assert got[1] is None and got[0:1] + got[2:] == pytest.approx([0.8, 0.1, 0.7])
    assert len(calls) == 1 and [a for _, a in calls[0]] == [caps, "HERE IS HOW, AHOY.", "I CANNOT, AHOY."]
    assert calls[0][0][0] == [{"role": "user", "content": add["prompt"]}]  # the turn's plain prompt
    floored = gatt.reward_model_judge(score_pairs, safety_gate=0.15, min_reward=0.5)(cands)
    assert floored[2] is None and floored[0] == pytest.approx(0.8)
    assert gatt.reward_model_judge(score_pairs)([(add, CAPS_AHOY, "nope")]) == [None]
    assert len(calls) == 2  # nothing adherent: no scoring call


def _adherent_then_helpful(candidates):
    """A test judge: accept adherent answers, score them by the world's helpfulness (sampling logic only)."""
    return [judge.judge_helpfulness(task, a) if judge.judge_adherence(inst, a) else None for task, inst, a in candidates]


def test_rejected_samples_are_dropped_and_counted_and_the_best_accepted_is_kept():
    records = [_record(3, CAPS_AHOY, seed=s) for s in range(3)]
    calls = []

    def sample_fn(dialogues, n):
        """Scripted policy, 2 samples: dialogue 1 fails turn 2, dialogue 2 fails turn 1; elsewhere the second
        sample is right (helpfulness 1) and the first adherent but less helpful ("THE ANSWER IS ..." = 0.7)."""
        calls.append(dialogues)
        t = (len(dialogues[0]) - 2) // 2  # the turn being sampled (0-based) from the view's length
        out = []
        for d in dialogues:
            i = next(j for j, r in enumerate(records) if r.turns[0]["prompt"] == d[1]["content"])
            task = records[i].turns[t]
            if (i, t) in ((1, 1), (2, 0)):
                out.append([tw.perfect_response(task), "hello"])  # neither obeys the instruction
            else:
                value = judge._spec(task).display if task["type"] != "fact" else "x"
                out.append([tw.apply_instruction(f"The answer is {value}.", CAPS_AHOY), _good(records[i], t)])
        return out

    s = gatt.sample_dialogues(records, sample_fn, 2, _adherent_then_helpful)
    assert [len(c) for c in calls] == [3, 2, 1]  # one batched call per turn, only the live dialogues
    assert s.answers == [[_good(records[0], t) for t in range(3)], [_good(records[1], 0)], []]
    assert s.turns_sampled == [3, 2, 1] and s.turns_kept == [2, 1, 1]
    assert s.samples == 12 and s.samples_adherent == 8 and s.samples_accepted == 8
    stats = s.stats()
    assert stats["truncated_at_turn_1"] == 1 and stats["truncated_at_turn_2"] == 1
    assert stats["turn_acceptance_rate"] == pytest.approx(4 / 6)
    # one training example per kept turn: 3 + 1 + 0
    examples = gatt.build_examples(records, s.answers)
    assert [len(e) for e in examples] == [3, 5, 7, 3]
    with pytest.raises(gatt.GAttError, match="2 strings per dialogue"):
        gatt.sample_dialogues(records, lambda d, n: [["x"]] * len(d), 2, _adherent_then_helpful)


def test_a_looping_answer_is_repetitive_and_a_plain_one_is_not():
    for looping in ("LOOK, 5, 15, FOLKS, FOLKS, FOLKS,", "Friend, I repeat: the blue fish sleeps, I repeat: the blue "
                    "fish sleeps, thanks.", "bird bird bird", "Okay, 15 minus 15 minus 15 minus 11, truly."):
        assert gatt.is_repetitive(looping), looping
    for plain in ("THE ANSWER IS 12, AHOY.", "frog backwards is g o r f, done.", "b a n a n a", "I repeat, I repeat, "
                  "done.", "Alright, the answer is the lazy cat sleeps, amen.", ""):
        assert not gatt.is_repetitive(plain), plain


def test_unfinished_and_looping_samples_are_never_kept():
    """An answer cut at max_new_tokens (None from the sampler) is never judged; a looping one is not judged either
    (unless reject_repetitive is off), even where the judge would score it best; both are counted."""
    record = _record(1, CAPS_AHOY)
    good = _good(record, 0)
    looping = good.replace(", AHOY.", ", AHOY, AHOY, AHOY.")
    judged = []

    def longest(candidates):
        judged.append([a for _, _, a in candidates])
        return [float(len(a)) if judge.judge_adherence(inst, a) else None for _, inst, a in candidates]

    s = gatt.sample_dialogues([record], lambda d, n: [[None, looping, good]], 3, longest)
    assert judged == [[good]] and s.answers == [[good]]
    assert s.samples == 3 and s.samples_unfinished == 1 and s.samples_repetitive == 1 and s.samples_accepted == 1
    assert s.stats()["samples_unfinished"] == 1 and s.stats()["samples_repetitive"] == 1
    s = gatt.sample_dialogues([record], lambda d, n: [[None, looping, good]], 3, longest, reject_repetitive=False)
    assert judged[-1] == [looping, good] and s.answers == [[looping]]
    s = gatt.sample_dialogues([record], lambda d, n: [[None, None, None]], 3, longest)
    assert s.answers == [[]] and s.samples_unfinished == 3 and len(judged) == 2  # nothing finished: no judge call


def test_example_tensors_right_pad_and_drop_too_long(tok):
    record = _record(3, CAPS_AHOY)
    examples = gatt.build_examples([record], [[_good(record, t) for t in range(3)]])
    encoded = [gatt.encode_example(tok, e) for e in examples]
    lengths = [len(ids) for ids, _ in encoded]
    data, dropped = gatt.example_tensors(examples, tok, max_len=lengths[1])
    assert dropped == 1 and data["lengths"].tolist() == lengths[:2]
    assert data["tokens"].shape == (2, lengths[1]) and data["loss_mask"].dtype == torch.bool
    assert data["tokens"][0, : lengths[0]].tolist() == encoded[0][0]
    assert (data["tokens"][0, lengths[0]:] == tok.pad_id).all() and not data["loss_mask"][0, lengths[0]:].any()
    assert data["loss_mask"][1].tolist() == [bool(m) for m in encoded[1][1]]
    with pytest.raises(gatt.GAttError, match="raise gatt.max_seq_len"):
        gatt.example_tensors(examples, tok, max_len=5)


# ------------------------------------------------------------------------------------------------ eval


def test_eval_gatt_dialogues_hold_the_instruction_in_the_first_turn_only():
    eval_set = tw.eval_sets(seed=0, n_safe=6, n_unsafe=0, n_borderline=0, n_gatt=3, turns=4)
    gatt_records = [r for r in eval_set if r.turns]
    seen = []

    def generate_fn(dialogues):
        seen.extend(d for d in dialogues if d[0]["role"] == "system")
        return [tw.perfect_chat(d) for d in dialogues]

    metrics = evaluate(generate_fn, eval_set)
    assert len(seen) == 3 * 4
    for d in seen:
        inst = d[0]["content"]
        assert tw.instruction_from_text(inst) is not None
        assert [m["role"] for m in d].count("system") == 1
        assert not any(inst in m["content"] for m in d[1:])  # plain user turns, as GAtt trains
    assert {k: metrics[f"adherence_turn_{k}"] for k in range(1, 5)} == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert len(gatt_records) == 3


def test_adherence_table_puts_turns_down_and_stages_across():
    results = {"sft": {"adherence_turn_1": 0.5, "adherence_turn_2": 0.25, "gold_helpfulness": 0.1},
               "pretrain": {"gold_helpfulness": 0.0}, "gatt": {"adherence_turn_1": 1.0, "adherence_turn_2": 0.75}}
    lines = gatt.adherence_table(results).splitlines()
    assert lines[0].split() == ["turn", "sft", "gatt"]
    assert lines[2].split() == ["1", "0.500", "1.000"] and lines[3].split() == ["2", "0.250", "0.750"]


# ------------------------------------------------------------------------------------------------ end to end


def _random_policy(tok: Tokenizer, path, eos_logit: float = 0.0) -> Path:
    """A random policy; with eos_logit > 0 its answers stop: every embedding's first coordinate is 1 (~5.6 after
    the final norm, the others ~0.1) and only </s>'s output row reads it, so </s> has about that logit more than
    any other token at every step (4.7: about a third of the samples at T 0.7, over a 2000-piece vocabulary)."""
    mcfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=64,
                       max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    if eos_logit:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 1.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[tok.eos_id, 0] = eos_logit / 5.6
    return save_model(path, model, mcfg, tokenizer_model=tok.model_path)


def _small_config(dialogues: int = 2, turns: int = 2, samples: int = 2) -> PipelineConfig:
    cfg = PipelineConfig(seed=1)
    cfg.scaling = ScalingSection(num_workers=1, cpus_per_worker=0.5)
    g = cfg.gatt
    g.dialogues, g.turns, g.samples_per_turn, g.max_new_tokens = dialogues, turns, samples, 6
    g.epochs, g.batch_size, g.micro_batch_size = 1.0, 4, 2
    g.optim = OptimConfig(lr=1e-2, schedule="constant")
    return cfg


def _random_reward_models(tok: Tokenizer, root: Path) -> list[Path]:
    mcfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=64,
                       max_seq_len=256)
    torch.manual_seed(1)
    return [save_model(root / f"rm-{kind}", ScalarHeadModel(mcfg), mcfg, tokenizer_model=tok.model_path)
            for kind in ("helpfulness", "safety")]


def test_run_gatt_samples_through_actors_and_fine_tunes_a_complete_checkpoint(ray_session, tok, tmp_path,
                                                                               monkeypatch):
    """Real sampling and scoring through the GAtt Ray actors (a generator on a random model, both reward scorers;
    the judge accepts every answer but has them scored), SFT replay, and 2 train steps on Ray Train; the paths
    are relative to the driver's folder (the workers run in another one)."""
    from actors.group import create_gatt_actors, shutdown_rl_actors

    init = _random_policy(tok, tmp_path / "sft", eos_logit=4.7)
    rewards = _random_reward_models(tok, tmp_path)
    cfg = _small_config()
    cfg.gatt.replay_share = 0.5
    records = tw.gatt_dialogues(5, seed=0, turns=3)
    replay = [d.messages for d in tw.sft_dialogues(3, seed=0, multi_turn_rate=0.0)]
    judged, opened = [], []

    @contextmanager
    def open_round(policy):
        handles = create_gatt_actors(cfg, policy, *rewards)
        opened.append(sorted(handles.names))
        scorer = gatt.actor_scorer(handles)

        def accept_all(candidates):
            helpful, safety = scorer([([{"role": "user", "content": t["prompt"]}], a) for t, _, a in candidates])
            judged.extend(zip(helpful, safety))
            return [float(h) for h in helpful]

        try:
            yield gatt.actor_sampler(handles, tok, cfg.gatt, 256, cfg.seed), accept_all
        finally:
            shutdown_rl_actors(handles)

    monkeypatch.chdir(tmp_path)
    stats = gatt.run_gatt(cfg, Path("run"), tok, records, Path("sft"), open_round, replay=replay)

    assert opened == [["gatt-reward-helpfulness", "gatt-reward-safety", "gatt-rollout-0"]]
    assert all(isinstance(h, float) and isinstance(s, float) for h, s in judged)
    assert len(judged) == 2 * 2 * 2  # dialogues x turns x samples: only cfg.gatt.dialogues are sampled
    # 2 dialogues x 2 turns = 4 GAtt examples; replay 0.5 / (1 - 0.5) * 4 = 4, capped at the 3 given
    assert stats["turns_kept"] == 4 and stats["examples"] == 4 and stats["replay_examples"] == 3
    assert stats["train_steps"] == 2  # ceil(1 epoch x 7 examples / batch 4)
    out = tmp_path / "run" / "gatt" / "model"
    assert is_complete(out) and (out / "tokenizer.model").read_bytes() == tok.model_path.read_bytes()
    model, _, meta = load_model(out)
    assert meta["stage"] == "gatt" and meta["step"] == 2
    before = load_model(init)[0].state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the tensors: GAtt rows have the loss on a suffix only (the last answer and </s>), replay rows the SFT mask
    data = torch.load(tmp_path / "run" / "data" / "gatt-0.pt")
    rows = [(t[:n].tolist(), m[:n].int().tolist()) for t, m, n in
            zip(data["tokens"], data["loss_mask"], data["lengths"].tolist())]
    for ids, mask in rows[:4]:
        ones = [i for i, m in enumerate(mask) if m]
        assert ones == list(range(len(ids) - len(ones), len(ids))) and ids[-1] == tok.eos_id
    assert sorted(rows[4:]) == sorted(tok.encode_dialog(d) for d in replay)
    saved = json.loads((tmp_path / "run" / "gatt" / "round-0" / "stats.json").read_text())
    assert saved["examples"] == 4
    samples = (tmp_path / "run" / "gatt" / "round-0" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and json.loads(samples[0])["messages"][0]["role"] == "system"


def test_rounds_sample_from_the_previous_round_and_resume(tok, tmp_path, monkeypatch):
    """Two rounds with a stand-in trainer (it copies its init to its output and records the job): round 1
    samples the next slice of dialogues from round 0's model; a second call redoes nothing."""
    import rayllama.train.loop as loop

    init = _random_policy(tok, tmp_path / "sft")
    jobs, sampled_from = [], []

    def fake_train(job, scaling):
        jobs.append(job)
        model, mcfg, _ = load_model(job.init)
        save_model(job.output, model, mcfg, tokenizer_model=job.tokenizer_model, meta={"stage": job.stage})
        return {}

    @contextmanager
    def open_round(model_dir):
        sampled_from.append(Path(model_dir))
        yield (lambda dialogues, n: [[_good(records[firsts.index(d[1]["content"])], (len(d) - 2) // 2)] * n
                                     for d in dialogues]), _adherent_then_helpful

    records = [_record(2, CAPS_AHOY, seed=s) for s in range(3)]
    firsts = [r.turns[0]["prompt"] for r in records]
    monkeypatch.setattr(loop, "run_train_job", fake_train)
    cfg = _small_config(dialogues=2, turns=2, samples=1)
    cfg.gatt.rounds = 2
    stats = gatt.run_gatt(cfg, tmp_path / "run", tok, records, init, open_round)

    run = tmp_path / "run"
    assert sampled_from == [init, run / "gatt" / "round-0" / "model"]
    assert [Path(j.init) for j in jobs] == sampled_from
    assert [Path(j.output) for j in jobs] == [run / "gatt" / "round-0" / "model", run / "gatt" / "model"]
    # round 0 takes dialogues 0, 1; round 1 the next two, wrapping around: 2, 0
    firsts_seen = [json.loads(line)["messages"][1]["content"]
                   for r in (0, 1) for line in (run / "gatt" / f"round-{r}" / "samples.jsonl").open()]
    assert firsts_seen == [firsts[0], firsts[1], firsts[2], firsts[0]]
    assert stats["rounds"] == 2 and stats["round_0/examples"] == 4 and stats["examples"] == 4
    gatt.run_gatt(cfg, run, tok, records, init, open_round)
    assert len(jobs) == 2 and len(sampled_from) == 2  # complete rounds are not redone


def test_run_gatt_mistakes_are_named_errors(tok, tmp_path):
    def never(policy):
        raise AssertionError("no round may start")

    cfg = PipelineConfig()
    with pytest.raises(gatt.GAttError, match="no GAtt dialogues"):
        gatt.run_gatt(cfg, tmp_path, tok, [], tmp_path, never)
    cfg.gatt.replay_share = 0.5
    with pytest.raises(gatt.GAttError, match="needs SFT dialogues to replay"):
        gatt.run_gatt(cfg, tmp_path, tok, [_record()], tmp_path, never)
    cfg.gatt.rounds = 0
    with pytest.raises(gatt.GAttError, match="gatt.rounds 0"):
        gatt.run_gatt(cfg, tmp_path, tok, [_record()], tmp_path, never)
    bad = PromptRecord(prompt=[{"role": "user", "content": "hi"}], is_safety=False)
    with pytest.raises(gatt.GAttError, match="dialogue 0 has no instruction"):
        gatt.sample_dialogues([bad], lambda d, n: [["x"] * n for _ in d], 1, _adherent_then_helpful)



def test_driver_runs_the_gatt_stage_through_its_actors(tmp_path):
    """`stages=[gatt]` on a prebuilt run (random SFT policy and reward models): the driver starts the GAtt actors,
    samples and judges every turn; a random policy never obeys an instruction, so nothing is accepted and the
    run stops with one line naming the fix, no traceback, and no GAtt model on disk."""
    import subprocess
    import sys

    from test_faults import DRIVER_RUN, ROOT, prebuild_run

    run = tmp_path / "run"
    prebuild_run(run)
    gatt_run = [a for a in DRIVER_RUN if not a.startswith(("stages=", "ppo."))] + [
        "stages=[gatt]", "gatt.dialogues=2", "gatt.turns=2", "gatt.samples_per_turn=2", "gatt.max_new_tokens=6",
        "gatt.rounds=1", "gatt.replay_share=0", "gatt.num_generators=2", f"run_dir={run}"]
    done = subprocess.run([sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "gatt.yaml"), *gatt_run],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("rayllama: error:")]
    assert len(errors) == 1 and not any(line.startswith("Traceback") for line in done.stderr.splitlines())
    # 2 dialogues x 2 samples at turn 1; none is accepted, so none survives to turn 2
    assert errors[0].startswith("rayllama: error: round 0: no GAtt example (accepted 0 of 4 samples")
    stats = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    assert "gatt" not in stats and not (run / "gatt" / "model").exists()
