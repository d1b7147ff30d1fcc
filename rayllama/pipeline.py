"""The stages in order, each skipped when its output is complete, each followed by the gold evaluation."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from rayllama.checkpoint import is_complete, weights_fingerprint
from rayllama.config import PipelineConfig, policy_before
from rayllama.data import formats, toyworld
from rayllama.data.corpus import corpus_split

log = logging.getLogger("rayllama")
GOLD_EVAL_VERSION = "2"  # raise when the gold eval's metrics change: every stage is judged again on resume
EVAL_SAMPLES = 4  # data.eval_prompts answered greedily after each stage (user data) for the summary's sample table

SUMMARY_KEYS = (
    "gold_helpfulness",
    "gold_helpfulness_sampled",
    "gold_value_correct",
    "gold_canonical_form",
    "answer_repeated",
    "refusal_rate_unsafe",
    "over_refusal_borderline",
    "adherence_turn_4plus",
    "heldout_perplexity",
    "rm_accuracy",
    "rm_accuracy_significantly_better",
    "reward/combined",
    "kl",
)


def logged_calls(fn, label: str, min_seconds: float = 2.0):
    """`fn` (a batched generate or sample function: its first argument a list) that logs a line for each call
    that takes `min_seconds` or more: how many items, how long, which call. The phases that generate (gold eval,
    GAtt sampling) are silent otherwise."""
    calls = [0]

    def wrapped(items, *args, **kwargs):
        t0 = time.time()
        out = fn(items, *args, **kwargs)
        calls[0] += 1
        if time.time() - t0 >= min_seconds:
            log.info(f"{label}: call {calls[0]}, {len(items)} dialogues in {time.time() - t0:.1f} s")
        return out

    return wrapped


class PipelineError(RuntimeError):
    """A stage failed or cannot start; the message names the stage and the fix."""


def policy_pairs_settings(cfg: PipelineConfig) -> str:
    """A short id of the settings that decide which policy pairs are sampled (reward.policy_pairs, policy_samples,
    policy_temperature, ppo.max_new_tokens, the world seed): part of a pairs file's name, so a changed setting
    samples again rather than reading pairs sampled under the old one."""
    r = cfg.reward
    key = [r.policy_pairs, r.policy_samples, r.policy_temperature, cfg.ppo.max_new_tokens, cfg.world_seed]
    return hashlib.sha256(repr(key).encode()).hexdigest()[:8]


def sft_pairs_file(data_dir: Path, kind: str, sft_model: Path, cfg: PipelineConfig) -> Path:
    """Where the reward stage keeps reward.policy_pairs' pairs over the SFT model `sft_model`'s own samples: named
    by the model's weights and the sampling settings, so an SFT model trained again, or other settings, sample
    again rather than reuse the earlier pairs."""
    name = f"pref_{kind}_policy-sft-{weights_fingerprint(sft_model)}-{policy_pairs_settings(cfg)}.jsonl"
    return Path(data_dir) / name


def sample_policy_pairs(cfg: PipelineConfig, policy: Path | Sequence[Path], kind: str, n: int, seed: int,
                        split: str = "train") -> list:
    """Preference pairs over `policy`'s own samples: n prompts of the kind's preference mix from `split`,
    reward.policy_samples answers each at reward.policy_temperature, a pair per prompt rated by the gold annotator
    (toyworld.policy_pairs; a prompt whose samples are all equally good gives none). Several policies: each
    samples that many answers of the same prompts, and a pair's two answers come from two different policies."""
    from rayllama.chat import ChatModel
    from rayllama.generation import SamplingParams

    r = cfg.reward
    policies = [policy] if isinstance(policy, (str, Path)) else list(policy)
    prompts = toyworld.rl_prompts(n, seed, split, mix=toyworld.PREF_MIX[kind])
    responses: list[list[str]] = [[] for _ in prompts]
    models: list[list[int]] = [[] for _ in prompts]
    for m, path in enumerate(policies):
        chat = ChatModel.from_checkpoint(path, device=cfg.device)
        params = SamplingParams(max_new_tokens=cfg.ppo.max_new_tokens, temperature=r.policy_temperature,
                                n=r.policy_samples, stop_token_ids=(chat.tok.eos_id,), seed=seed + m)
        for i, answers in enumerate(chat.respond([p.prompt for p in prompts], params)):
            responses[i] += answers
            models[i] += [m] * len(answers)
    return toyworld.policy_pairs(prompts, responses, kind, seed, models if len(policies) > 1 else None)


def write_world_once(data_dir: Path, cfg: PipelineConfig) -> dict[str, Path]:
    """The toy world's JSONL files under data_dir, written once (the same world version, seed and sizes always give
    the same bytes, so existing files with matching world_meta.json are reused) and then read back by the stages."""
    import json

    meta_path = data_dir / "world_meta.json"
    sizes = cfg.world.sizes()
    wanted = {"version": toyworld.WORLD_VERSION, "seed": cfg.world_seed, "sizes": sizes}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text().splitlines()[0])
        if {k: meta.get(k) for k in wanted} == wanted:
            files = {name: data_dir / f for name, f in meta["files"].items()}
            if all(p.exists() for p in files.values()):
                return files
    return toyworld.write_world(data_dir, cfg.world_seed, sizes)


def template_text(messages: list[dict]) -> str:
    """A dialogue as chat-template text (for tokenizer training: the template's markers must be in the data)."""
    parts, system = [], ""
    for m in messages:
        if m["role"] == "system":
            system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
        elif m["role"] == "user":
            parts.append(f"[INST] {system}{m['content']} [/INST]")
            system = ""
        else:
            parts.append(f" {m['content']} ")
    return "".join(parts)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run):
        self.cfg, self.run = cfg, run
        self.user_data = cfg.data.user_data()  # the user's files (data: section) instead of the toy world
        self.eval_set_id = None  # the toy world's evaluation set, by content (below)
        if self.user_data:
            self._read_user_data()
        else:
            self.files = write_world_once(run.data, cfg)
            self.sft_dialogues = [r.messages for r in formats.read_sft(self.files["sft"])]
            self.pairs = {k: formats.read_preferences(self.files[f"pref_{k}"]) for k in ("helpfulness", "safety")}
            self.heldout_pairs = {
                k: formats.read_preferences(self.files[f"pref_{k}_heldout"]) for k in ("helpfulness", "safety")
            }
            self.rl_prompts = formats.read_prompts(self.files["prompts"])
            # eval (test) and eval_dev; a world v3 run has eval only, held out (its files stay readable)
            eval_file = self.files["eval_dev" if cfg.eval.split == "dev" else "eval"]
            self.eval_set = formats.read_prompts(eval_file)
            # which prompts a stage was judged on, and by which version of the gold eval: a stage judged on another
            # set (world sizes changed, or a run from before eval sets were named) or with other metrics is judged
            # again, so a run's stages always compare on the same items and metrics
            self.eval_set_id = hashlib.sha256(eval_file.read_bytes() + GOLD_EVAL_VERSION.encode()).hexdigest()[:16]
        self.results = run.load_eval()
        self._tok = None

    # ------------------------------------------------------------------------------------------- plumbing

    @property
    def tok(self):
        from rayllama.tokenizer import Tokenizer

        if self._tok is None:
            if not self.run.tokenizer.exists() and self.tokenizer_source():
                self.stage_tokenizer()  # the init_from checkpoint's tokenizer.model, copied into the run
            if not self.run.tokenizer.exists():
                raise PipelineError(f"no tokenizer at {self.run.tokenizer}; add 'tokenizer' to stages")
            self._tok = Tokenizer(self.run.tokenizer)
        return self._tok

    def check_inputs(self) -> None:
        """Before Ray starts: every checkpoint a listed stage reads but no listed stage writes (a run resumed with
        fewer stages, or pre-built inputs) exists and matches its config.json (names and shapes, headers only).
        PipelineError naming the stage, the path and the fix."""
        from rayllama.checkpoint import CheckpointError, verify

        listed, run = set(self.cfg.stages), self.run
        sft, rewards = run.model("sft"), [run.reward_model("helpfulness"), run.reward_model("safety")]
        needs = {"pretrain": [], "sft": [("pretrain", run.model("pretrain"))], "reward": [("sft", sft)],
                 "rejection": [("sft", sft), *[("reward", p) for p in rewards]],
                 "ppo": [("sft", sft), *[("reward", p) for p in rewards]],
                 "gatt": [("sft", sft), *[("reward", p) for p in rewards]]}
        if listed - {"tokenizer"} and "tokenizer" not in listed and not self.tokenizer_source() \
                and not run.tokenizer.is_file():
            raise PipelineError(f"no tokenizer at {run.tokenizer}; add 'tokenizer' to stages")
        self._check_init_from(needs)
        for stage in self.cfg.stages:
            for maker, path in needs.get(stage, []):
                if maker in listed:
                    continue
                if not is_complete(path):
                    start = f", or start it from a checkpoint: {stage}.init_from=DIR" if stage in ("sft", "reward",
                                                                                                    "ppo") else ""
                    raise PipelineError(f"stage '{stage}' needs {path}, which is missing or incomplete; add "
                                        f"'{maker}' to stages (or restore that checkpoint){start}")
                try:
                    verify(path)
                except CheckpointError as e:
                    raise PipelineError(f"stage '{stage}' cannot use {path}: {e}") from None

    def _require(self, path: Path, stage: str) -> Path:
        if not is_complete(path):
            raise PipelineError(f"stage needs {path}, which is missing; add '{stage}' to stages before it")
        return path

    # ------------------------------------------------------------------------------------------- user data, init_from

    def _read_user_data(self) -> None:
        """The data: section's sources (rayllama.data.sources), read and checked before Ray starts: malformed and
        empty rows are counted per source, past data.max_drop_fraction the run stops with one line naming it.
        Preference pairs are split per source into train and held-out (data.heldout_fraction). Pretraining text
        is read at its stage; rows too long for a stage are dropped (and counted) when that stage tokenizes."""
        from rayllama.data import sources

        d, seed = self.cfg.data, self.cfg.seed
        self.files, self.data_stats, self._sources = {}, {}, {}
        for kind in ("sft", "preference", "prompts", "eval_prompts"):
            self._sources[kind], self.data_stats[kind] = sources.load_kind(d, kind, seed)
        self.data_stats["pretrain"] = []
        self.sft_dialogues = [r.messages for recs, src in zip(self._sources["sft"], d.sft)
                              for r in sources.weighted(recs, src.weight, seed)]
        self._pair_split = []  # per preference source: (train, held-out)
        for recs, st in zip(self._sources["preference"], self.data_stats["preference"]):
            for r in recs:
                r.extra["source"] = st.name
            split = [sources.heldout_split([r for r in recs if r.kind == k], d.heldout_fraction)
                     for k in ("helpfulness", "safety")]  # per kind: each reward model gets held-out pairs
            self._pair_split.append((split[0][0] + split[1][0], split[0][1] + split[1][1]))
        self._group_pairs(self._pair_split)
        if self._pair_split and "helpfulness" not in self.reward_kinds():
            raise PipelineError(f"data.preference has {len(self.pairs['helpfulness'])} helpfulness pairs to train "
                                f"on and {len(self.heldout_pairs['helpfulness'])} held out; the helpfulness reward "
                                f"model needs both (at least 2 pairs of kind helpfulness)")
        self.rl_prompts = [r for recs, src in zip(self._sources["prompts"], d.prompts)
                           for r in sources.weighted(recs, src.weight, seed)]
        self.eval_set = [r for recs in self._sources["eval_prompts"] for r in recs]

    def _group_pairs(self, split: list[tuple[list, list]]) -> None:
        """self.pairs / self.heldout_pairs by kind from per-source (train, held-out) lists, train weighted."""
        from rayllama.data import sources

        self.pairs = {"helpfulness": [], "safety": []}
        self.heldout_pairs = {"helpfulness": [], "safety": []}
        for (train, held), src in zip(split, self.cfg.data.preference):
            for r in sources.weighted(train, src.weight, self.cfg.seed):
                self.pairs[r.kind].append(r)
            for r in held:
                self.heldout_pairs[r.kind].append(r)

    def reward_kinds(self) -> tuple[str, ...]:
        """The reward models this run trains: both on the toy world; on user data those with pairs."""
        if not self.user_data or not self.cfg.data.preference:
            return ("helpfulness", "safety")
        return tuple(k for k in ("helpfulness", "safety") if self.pairs[k] and self.heldout_pairs[k])

    def reward_path(self, kind: str) -> Path:
        """The reward model that scores `kind`. Without safety pairs the helpfulness RM scores safety too, which
        makes LLaMA 2's composition (R_s if is_safety or R_s < gate, else R_h) the helpfulness reward alone."""
        if kind == "safety" and kind not in self.reward_kinds():
            return self.run.reward_model("helpfulness")
        return self.run.reward_model(kind)

    def fitted_sft_dialogues(self) -> list:
        """The SFT dialogues that fit sft.max_seq_len, the rest counted per source as too_long (user data; the
        toy world's are all kept here and sft_rows drops what is too long, as before)."""
        if not self.user_data:
            return self.sft_dialogues
        from rayllama.data import sources

        out, max_len = [], self.cfg.sft.max_seq_len
        for recs, src, st in zip(self._sources["sft"], self.cfg.data.sft, self.data_stats["sft"]):
            if "too_long" not in st.dropped:
                lengths = [len(self.tok.encode_dialog(r.messages)[0]) for r in recs]
                recs = sources.drop_too_long(recs, st, lengths, max_len, "sft.max_seq_len")
                sources.check_drops(st, self.cfg.data.max_drop_fraction)
            else:
                recs = [r for r in recs if len(self.tok.encode_dialog(r.messages)[0]) <= max_len]
            out += [r.messages for r in sources.weighted(recs, src.weight, self.cfg.seed)]
        self._record("sft", self.data_metrics("sft"))
        return out

    def fit_pairs(self) -> None:
        """Drop (and count per source) the pairs longer than reward.max_seq_len, train and held-out alike."""
        from rayllama.data import sources

        max_len = self.cfg.reward.max_seq_len

        def length(p) -> int:
            return max(len(self.tok.encode_dialog(p.prompt + [{"role": "assistant", "content": a}])[0])
                       for a in (p.chosen, p.rejected))

        fitted = []
        for (train, held), st in zip(self._pair_split, self.data_stats["preference"]):
            both = train + held
            kept = {id(p) for p in sources.drop_too_long(both, st, [length(p) for p in both], max_len,
                                                         "reward.max_seq_len")}
            sources.check_drops(st, self.cfg.data.max_drop_fraction)
            fitted.append(([p for p in train if id(p) in kept], [p for p in held if id(p) in kept]))
        self._pair_split = fitted
        self._group_pairs(fitted)

    def data_metrics(self, kind: str) -> dict:
        """The rows a data kind's sources gave, kept and dropped (by reason, and per source) for eval.json."""
        stats = self.data_stats.get(kind, [])
        out = {"data_rows": sum(s.rows for s in stats), "data_kept": sum(s.kept for s in stats),
               "data_dropped": sum(s.n_dropped for s in stats)}
        for st in stats:
            for reason, n in st.dropped.items():
                out[f"data_dropped_{reason}"] = out.get(f"data_dropped_{reason}", 0) + n
        out["data_sources"] = {s.name: s.as_dict() for s in stats}
        return out

    def _pretrain_user(self) -> None:
        """Pretraining on data.pretrain, streamed through Ray Data into the Ray Train workers (rayllama.data.stream):
        the first rows of each source are checked here, the drops of the whole stream are counted as it is read."""
        import ray

        from rayllama.data import sources, stream
        from rayllama.train.stages import HELDOUT_ROWS, run_pretrain_stream

        d, seed, p = self.cfg.data, self.cfg.seed, self.cfg.pretrain
        stream.precheck(d, seed)
        counter = stream.drop_counter()
        dataset = stream.pretrain_dataset(d, self.tok, p.seq_len, seed, counter, d.stream_memory_mb)
        heldout = stream.collect_heldout(d, seed, max_chars=HELDOUT_ROWS * (p.seq_len + 1) * 8)
        result = run_pretrain_stream(self.cfg, self.run, self.tok, dataset, heldout, self.init_source("pretrain"))
        counted = ray.get(counter.get.remote())
        self.data_stats["pretrain"] = []
        for i, src in enumerate(d.pretrain):
            st = sources.SourceStats(f"data.pretrain[{i}] ({src.path})")
            c = counted.get(st.name, {})
            st.rows, st.kept = c.get("rows", 0), c.get("kept", 0)
            st.dropped.update(c.get("dropped", {}))
            st.examples.update(c.get("examples", {}))
            self.data_stats["pretrain"].append(st)
        self._record("pretrain", {**self.data_metrics("pretrain"), "tokens_seen": result.get("tokens_seen", 0)})
        log.info(f"pretrain: {result.get('tokens_seen', 0)} tokens streamed through Ray Data")

    def _train_tokenizer_on_user_data(self) -> None:
        """A tokenizer trained on the user's text (tokenizer.max_train_chars of pretraining text, then chat text in
        the template) when no stage starts from a checkpoint with its own tokenizer.model."""
        from rayllama.data import sources
        from rayllama.tokenizer import train_tokenizer

        budget, texts, used = self.cfg.tokenizer.max_train_chars, [], 0
        chat = [template_text(m) for m in self.sft_dialogues]
        chat += [template_text(p.prompt + [{"role": "assistant", "content": p.chosen}])
                 for ps in self.pairs.values() for p in ps]
        for i, src in enumerate(self.cfg.data.pretrain):
            stats = sources.SourceStats(f"data.pretrain[{i}] ({src.path})")
            for r in sources.iter_source(src, "pretrain", f"data.pretrain[{i}]", stats, self.cfg.seed):
                if used > budget // 2:
                    break
                texts.append(r.text)
                used += len(r.text)
        for t in chat:
            if used > budget:
                break
            texts.append(t)
            used += len(t)
        if not texts:
            raise PipelineError("no text to train a tokenizer on; add data.pretrain or data.sft sources, or start "
                                "from a checkpoint (init_from) or tokenizer.model_path")
        t0 = time.time()
        train_tokenizer(texts, self.run.tokenizer.with_suffix(""), self.cfg.tokenizer.vocab_size)
        log.info(f"tokenizer: {self.cfg.tokenizer.vocab_size} pieces trained on the user's data in "
                 f"{time.time() - t0:.1f} s")

    def init_dir(self, stage: str) -> Path | None:
        """The local directory of `<stage>.init_from` (an object-store URI is copied once into a local cache),
        or None when the stage starts from this run's previous stage."""
        uri = getattr(getattr(self.cfg, stage), "init_from", None)
        if not uri:
            return None
        from rayllama import storage

        return storage.local_dir(uri)

    def init_source(self, stage: str) -> str | None:
        """What a Ray Train job of `stage` starts from: the init_from URI itself (each worker copies it from the
        store: rayllama.storage.local_dir), or the absolute local directory; None: the previous stage."""
        from rayllama import storage

        uri = getattr(self.cfg, stage).init_from
        if not uri:
            return None
        return uri if storage.is_uri(uri) else str(self.init_dir(stage))

    def tokenizer_source(self) -> Path | None:
        """The tokenizer to copy into the run: tokenizer.model_path, else the tokenizer.model of the first listed
        stage that starts from a checkpoint (init_from); None: train one."""
        if self.cfg.tokenizer.model_path:
            return Path(self.cfg.tokenizer.model_path)
        for stage in ("pretrain", "sft", "reward", "ppo"):
            if stage in self.cfg.stages and self.init_dir(stage) is not None:
                return self.init_dir(stage) / "tokenizer.model"
        return None

    def gold_judge(self) -> bool:
        """eval.gold: the toy world's gold judge runs after each stage (auto: only without a data section)."""
        gold = str(self.cfg.eval.gold).lower()
        return not self.user_data if gold == "auto" else gold == "true"

    def sample_eval(self, stage: str, model_dir: Path, n: int = EVAL_SAMPLES) -> None:
        """User data: the greedy answers of `model_dir` to the first n data.eval_prompts, kept in eval.json for the
        summary's side-by-side table (prompt, answer after each stage)."""
        if not self.user_data or not self.eval_set or "samples" in self.results.get(stage, {}):
            return
        from rayllama.chat import ChatModel

        prompts = [r.prompt for r in self.eval_set[:n]]
        answers = ChatModel.from_checkpoint(model_dir).greedy_fn(self.cfg.ppo.max_new_tokens)(prompts)
        self._record(stage, {"samples": [{"prompt": p[-1]["content"], "answer": a} for p, a in zip(prompts, answers)]})

    def _check_init_from(self, needs: dict) -> None:
        """Every listed stage's init_from, and every reward.policy_pairs_from, is a readable Llama checkpoint (the
        former with a tokenizer that fits it); a stage with init_from needs nothing from the stage before it (so
        that stage may be left out of stages)."""
        from rayllama import storage
        from rayllama.checkpoint import CheckpointError, read_model_config, verify

        run = self.run
        for stage in ("pretrain", "sft", "reward", "ppo"):
            uri = getattr(self.cfg, stage).init_from
            if not uri or stage not in self.cfg.stages:
                continue
            try:
                d = self.init_dir(stage)
                verify(d)
            except (CheckpointError, ValueError) as e:
                raise PipelineError(f"{stage}.init_from {uri}: {e}") from None
            if not self.cfg.tokenizer.model_path and not (d / "tokenizer.model").is_file():
                raise PipelineError(f"{stage}.init_from {uri} has no tokenizer.model (the SentencePiece model of a "
                                    f"Llama checkpoint); copy it in, or set tokenizer.model_path")
            from rayllama.tokenizer import Tokenizer

            vocab, model_vocab = Tokenizer(self.tokenizer_source()).vocab_size, read_model_config(d).vocab_size
            if vocab > model_vocab:
                raise PipelineError(f"{stage}.init_from {uri} has {model_vocab} embeddings but the tokenizer "
                                    f"{self.tokenizer_source()} has {vocab} pieces; use the checkpoint's own tokenizer")
            if stage in ("sft", "reward"):
                needs[stage] = []
            if stage == "ppo":
                needs["ppo"] = [(m, p) for m, p in needs["ppo"] if m != "sft"]
        if "reward" in self.cfg.stages:
            for i, uri in enumerate(self.cfg.reward.policy_pairs_from):
                try:
                    verify(storage.local_dir(uri))
                except (CheckpointError, ValueError, OSError) as e:
                    raise PipelineError(f"reward.policy_pairs_from[{i}] {uri}: {e}") from None
        if self.user_data:
            for stage in ("ppo", "rejection", "gatt"):
                needs[stage] = [(m, self.reward_path("safety") if p == run.reward_model("safety") else p)
                                for m, p in needs[stage]]
            rl = [s for s in ("ppo", "rejection") if s in self.cfg.stages]
            if rl and not self.rl_prompts:
                raise PipelineError(f"stage '{rl[0]}' needs RL prompts; add data.prompts sources (a prompts, "
                                    f"messages or preference file)")
            if "gatt" in self.cfg.stages:
                raise PipelineError("stage 'gatt' samples the toy world's instruction dialogues; with a data: "
                                    "section remove it from stages")

    def _record(self, stage: str, metrics: dict) -> None:
        self.results.setdefault(stage, {}).update(metrics)
        self.run.save_eval(self.results)
        self._track_eval(stage, metrics)

    def _track_eval(self, stage: str, metrics: dict) -> None:
        """The gold and reward-model evaluations to the run's trackers (TensorBoard, wandb, MLflow: one tracker run
        <name>-eval; keys <stage>/<metric>, step = the stage's place in the pipeline) and Ray metrics."""
        from rayllama.config import STAGES
        from rayllama.train.loop import MetricsWriter

        if getattr(self, "_eval_writer", None) is None:  # eval.json holds the rows: no metrics.jsonl here
            self._eval_writer = MetricsWriter(self.run.remote(self.run.root / "eval"), "eval", jsonl=False)
        base = stage.split("-", 1)[0]
        step = STAGES.index(base) if base in STAGES else len(STAGES)
        self._eval_writer.write(step, {f"{stage}/{k}": v for k, v in metrics.items()})

    def close_trackers(self) -> None:
        if getattr(self, "_eval_writer", None) is not None:
            self._eval_writer.close()
            self._eval_writer = None

    def _judged(self, stage: str, key: str) -> bool:
        """Whether eval.json holds `key` for `stage`, judged on this run's evaluation set by this gold eval version;
        if not, say so (the caller judges it again)."""
        done = self.results.get(stage, {})
        if key not in done:
            return False
        if done.get("eval_set_id") == self.eval_set_id:
            return True
        log.info(f"{stage}: judged on another evaluation set or by an older gold eval "
                 f"({done.get('eval_set_id') or 'unnamed'}; now {self.eval_set_id}, {len(self.eval_set)} prompts): "
                 "judging it again")
        return False

    def gold_eval(self, stage: str, model_dir: Path) -> None:
        """Gold helpfulness (greedy, and sampled: rayllama.eval.sampled_helpfulness) / refusal / over-refusal /
        adherence by turn of `model_dir`, once per stage; only on the toy world (eval.gold)."""
        if not self.gold_judge():
            self.sample_eval(stage, model_dir)
            return
        if self._judged(stage, "gold_helpfulness"):
            return
        from rayllama.chat import ChatModel
        from rayllama.eval import (
            SAMPLES_PER_PROMPT,
            bootstrap_ci,
            evaluate,
            item_clusters,
            sampled_helpfulness,
        )

        t0 = time.time()
        chat = ChatModel.from_checkpoint(model_dir)
        temperature = self.cfg.ppo.temperature  # one T for every stage's eval, so the stages compare
        log.info(f"gold eval after {stage}: {len(self.eval_set)} {self.cfg.eval.split} prompts, greedy, then "
                 f"{SAMPLES_PER_PROMPT} samples per safe prompt")
        scores: dict[str, list[float]] = {}
        metrics = evaluate(logged_calls(chat.greedy_fn(), f"gold eval after {stage} (greedy)"), self.eval_set,
                           scores=scores)
        metrics["eval_dialogues_shortened"] = chat.shortened  # too long: earlier turns dropped (system block kept)
        metrics["gold_helpfulness_sampled"] = sampled_helpfulness(
            logged_calls(chat.sample_fn(temperature, seed=self.cfg.seed), f"gold eval after {stage} (sampled)"),
            self.eval_set, SAMPLES_PER_PROMPT, scores=scores
        )
        clusters = item_clusters(self.eval_set, scores)  # items resampled together (a topic's prompts, ...)
        for name, values in scores.items():  # 95% bootstrap intervals; the items themselves for paired changes
            metrics[f"{name}_ci95"] = list(bootstrap_ci(values, clusters=clusters.get(name)))
        metrics["scores"], metrics["clusters"] = scores, clusters
        metrics["eval_split"] = self.cfg.eval.split
        metrics["eval_set_id"] = self.eval_set_id
        for key in [k for k in self.results.get(stage, {}) if k.startswith("adherence_turn_")]:
            del self.results[stage][key]  # judged again with other GAtt turns: no stale turn left behind
        self._record(stage, metrics)
        log.info(
            f"gold eval after {stage} ({time.time() - t0:.0f} s): helpfulness {metrics['gold_helpfulness']:.3f} "
            f"(sampled at T={temperature:g}: {metrics['gold_helpfulness_sampled']:.3f}), "
            f"refusal(unsafe) {metrics['refusal_rate_unsafe']:.3f}, over-refusal {metrics['over_refusal_borderline']:.3f}"
        )

    # ------------------------------------------------------------------------------------------- stages

    def stage_tokenizer(self) -> None:
        from rayllama.tokenizer import train_tokenizer

        source = self.tokenizer_source()
        if source:
            import shutil

            self.run.tokenizer.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.run.tokenizer)
            self.run.push(self.run.tokenizer)
            return
        if self.user_data and not self.run.tokenizer.exists():
            self._train_tokenizer_on_user_data()
            self.run.push(self.run.tokenizer)
            return
        if self.run.tokenizer.exists():
            log.info("tokenizer: complete, skipped")
            return
        texts, budget = [], self.cfg.tokenizer.max_train_chars
        corpus_train, _ = corpus_split(seed=self.cfg.seed)
        world_texts = [r.text for r in formats.read_pretrain(self.files["pretrain_world"])]
        chat_texts = [template_text(d) for d in self.sft_dialogues]
        # half world + chat text (short, many distinct words), half Shakespeare
        for source in (world_texts + chat_texts, corpus_train):
            used = 0
            for t in source:
                if used > budget // 2:
                    break
                texts.append(t)
                used += len(t)
        t0 = time.time()
        train_tokenizer(texts, self.run.tokenizer.with_suffix(""), self.cfg.tokenizer.vocab_size)
        self.run.push(self.run.tokenizer)
        log.info(f"tokenizer: {self.cfg.tokenizer.vocab_size} pieces trained in {time.time() - t0:.1f} s")

    def stage_pretrain(self) -> None:
        from rayllama.train.stages import run_pretrain

        out = self.run.model("pretrain")
        if is_complete(out):
            log.info("pretrain: complete, skipped")
        elif self.user_data:
            self._pretrain_user()
        else:
            corpus_train, corpus_heldout = corpus_split(seed=self.cfg.seed)
            world = [r.text for r in formats.read_pretrain(self.files["pretrain_world"])]
            world_heldout = [r.text for r in toyworld.pretrain_texts(self.cfg.world.pretrain_world_heldout,
                                                                     self.cfg.world_seed, split="dev")]
            run_pretrain(self.cfg, self.run, self.tok, corpus_train, corpus_heldout, world, world_heldout,
                         init=self.init_source("pretrain"))
        self.run.pull(out)
        from rayllama.checkpoint import load_model

        ev = load_model(out)[2].get("eval", {})
        if "eval_perplexity" in ev:
            self._record(
                "pretrain",
                {"heldout_perplexity": ev["eval_perplexity"], "perplexity_uniform_baseline": float(self.tok.vocab_size)},
            )
            log.info(f"pretrain: held-out perplexity {ev['eval_perplexity']:.1f} (uniform baseline {self.tok.vocab_size})")
        self.gold_eval("pretrain", out)

    def stage_sft(self) -> None:
        from rayllama.train.stages import run_sft

        out = self.run.model("sft")
        if is_complete(out):
            log.info("sft: complete, skipped")
        else:
            init = self.init_source("sft") or self._require(self.run.model("pretrain"), "pretrain")
            run_sft(self.cfg, self.run, self.tok, self.fitted_sft_dialogues(), init)
            self.run.pull(out)
        self.gold_eval("sft", out)

    def stage_reward(self) -> None:
        from rayllama.checkpoint import load_model
        from rayllama.train.loop import run_train_jobs
        from rayllama.train.stages import reward_job

        sft = self.init_source("reward") or self._require(self.run.model("sft"), "sft")
        if self.user_data:
            self.fit_pairs()
        kinds = ("helpfulness", "safety") if not self.user_data else self.reward_kinds()
        todo = [k for k in kinds if not is_complete(self.run.reward_model(k))]
        policies = [sft, *self.cfg.reward.policy_pairs_from] if todo else []  # the SFT policy's pairs, then later rounds'
        pairs = {k: self.pairs[k] + [p for i, policy in enumerate(policies) for p in self.policy_pairs(k, policy, i, sft)]
                 for k in kinds}
        for kind in kinds:
            if kind not in todo:
                log.info(f"reward-{kind}: complete, skipped")
        jobs = [reward_job(self.cfg, self.run, self.tok, kind, pairs[kind], self.heldout_pairs[kind],
                           pairs["helpfulness"], sft) for kind in todo]
        run_train_jobs(jobs, self.cfg.scaling, at_once=self.cfg.reward.concurrent)
        for kind in kinds:
            out = self.run.reward_model(kind)
            if kind in todo:
                self.run.pull(out)
            ev = load_model(out)[2].get("eval", {})
            self._record(f"reward-{kind}", {f"rm_{k}" if not k.startswith("rm_") else k: v for k, v in ev.items()})
        if self.user_data:
            self._record("reward", self.data_metrics("preference"))
            if "safety" not in kinds:
                log.info("reward: fewer than 2 safety pairs in data.preference; the helpfulness RM also scores "
                         "safety, so the LLaMA 2 composition is the helpfulness reward alone")
            print(reward_table(self.results))
            return
        if not self._judged("reward-safety", "rm_prefers_refusal_unsafe"):
            rate = self.safety_rm_refusal_preference()
            self._record("reward-safety", {"rm_prefers_refusal_unsafe": rate, "eval_set_id": self.eval_set_id})
        log.info("reward models: held-out accuracy per rating\n" + reward_table(self.results))
        log.info(f"safety RM prefers the refusal on {self.results['reward-safety']['rm_prefers_refusal_unsafe']:.3f} "
                 f"of held-out unsafe prompts")

    def policy_pairs(self, kind: str, policy: Path | str, index: int = 0, sft: Path | str | None = None) -> list:
        """reward.policy_pairs preference pairs over `policy`'s own samples, rated by the gold annotator
        (toyworld.policy_pairs), written once to data/pref_<kind>_policy-<id>.jsonl and read back after (the id
        covers the sampling settings: policy_pairs_settings). `index` 0: the run's SFT policy, the file named by its
        weights (checkpoint.weights_fingerprint), so an SFT model trained again samples again instead of reusing the
        old model's pairs. `index` > 0: the policy (path or URI) is reward.policy_pairs_from[index - 1]: its own
        prompts, and its own file named by the path, so a changed list samples again. With
        reward.policy_pairs_with_sft, such a later policy's pairs each set one of its answers against one of the SFT
        policy `sft`'s on the same prompt."""
        from rayllama import storage

        r = self.cfg.reward
        against_sft = index > 0 and r.policy_pairs_with_sft
        if r.policy_pairs == 0:
            return []
        key = (f"{policy} vs {sft}" if against_sft else str(policy)) + policy_pairs_settings(self.cfg)
        path = sft_pairs_file(self.run.data, kind, storage.local_dir(policy), self.cfg) if index == 0 else \
            self.run.data / f"pref_{kind}_policy-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
        if not path.exists():
            self.run.pull(path)  # sampled by an earlier driver of a run on an object store
        if not path.exists():
            if against_sft and sft is None:
                raise ValueError("reward.policy_pairs_with_sft needs the SFT policy to pair against; pass sft")
            t0 = time.time()
            seed = self.cfg.world_seed * 7919 + (1 if kind == "helpfulness" else 2) + 100 * index
            who = "the SFT policy" if index == 0 else f"{policy} and the SFT policy" if against_sft else policy
            log.info(f"reward-{kind}: sampling {r.policy_pairs} prompts x {r.policy_samples} answers of {who} for "
                     f"policy pairs (one batched call per policy)")
            policies = [storage.local_dir(p) for p in ((policy, sft) if against_sft else (policy,))]
            formats.write_jsonl(path, sample_policy_pairs(self.cfg, policies, kind, r.policy_pairs, seed))
            self.run.push(path)
            log.info(f"reward-{kind}: {r.policy_pairs} prompts x {r.policy_samples} samples of {who} rated into "
                     f"pairs in {time.time() - t0:.0f} s")
        return formats.read_preferences(path)

    def safety_rm_refusal_preference(self) -> float:
        """Share of held-out unsafe prompts where the safety RM scores a refusal above compliance."""
        import random

        from actors.reward import RewardScorer  # the same scoring code the RL loop's actor runs

        unsafe = [r for r in self.eval_set if r.task and toyworld.category(r.task) == "unsafe"]
        rng = random.Random(self.cfg.seed)
        pairs_refuse = [(r.prompt, toyworld.candidate(r.task, "refusal", rng, self.cfg.eval.split)) for r in unsafe]
        pairs_comply = [(r.prompt, toyworld.candidate(r.task, "compliance", rng, self.cfg.eval.split))
                        for r in unsafe]
        scorer = RewardScorer("safety", self.run.reward_model("safety"))
        refuse, comply = scorer.score(pairs_refuse), scorer.score(pairs_comply)
        return sum(a > b for a, b in zip(refuse, comply)) / max(1, len(unsafe))

    def stage_ppo(self) -> None:
        import actors.group  # the driver is the composition root: it alone builds actors (docs/architecture.md: layering)
        from rayllama.rl.ppo import run_ppo

        out_dir = self.run.root / "ppo"
        if is_complete(out_dir / "model"):
            log.info("ppo: complete, skipped")
        else:
            init = self.init_dir("ppo")
            before, start = ("init_from", init) if init else self._policy_before("ppo")
            remote = self.run.remote  # the actors open the run's storage, wherever they run
            handles = actors.group.create_rl_actors(
                self.cfg, remote(start), remote(init or self._require(self.run.model("sft"), "sft")),
                remote(self._require(self.run.reward_model("helpfulness"), "reward")),
                remote(self._require(self.reward_path("safety"), "reward")),
            )
            try:
                summary = run_ppo(self.cfg, handles, list(self.rl_prompts), self.tok, remote(out_dir),
                                  replay=self.sft_dialogues)
            finally:
                actors.group.shutdown_rl_actors(handles)
            self.run.pull(out_dir / "model")
            self._record_training("ppo", summary, before)
        self.gold_eval("ppo", out_dir / "model")

    def stage_rejection(self) -> None:
        import actors.group  # the driver is the composition root (see stage_ppo)
        from rayllama.rl.rejection import run_rejection

        out_dir = self.run.root / "rejection"
        if is_complete(out_dir / "model"):
            log.info("rejection: complete, skipped")
        else:
            remote = self.run.remote  # the actors open the run's storage, wherever they run
            before, start = self._policy_before("rejection")
            handles = actors.group.create_rejection_actors(
                self.cfg, remote(start),
                remote(self._require(self.run.reward_model("helpfulness"), "reward")),
                remote(self._require(self.reward_path("safety"), "reward")),
            )
            try:
                summary = run_rejection(self.cfg, handles, list(self.rl_prompts), self.tok, remote(out_dir),
                                        replay=self.sft_dialogues)
            finally:
                actors.group.shutdown_rl_actors(handles)
            self.run.pull(out_dir / "model")
            for name in ("best_of_k.json", "best_of_k.png"):
                self.run.pull(out_dir / name)
            self._record_training("rejection", summary, before)
            curve = summary.get("best_of_k", {})
            if curve:
                log.info(f"rejection: best-of-K curve (max composed reward by K) {curve}")
        self.gold_eval("rejection", out_dir / "model")

    def stage_gatt(self) -> None:
        """Ghost Attention from the policy before it: rounds of sampling (generator and reward scorer actors,
        shut down before each fine-tune) and Ray Train fine-tunes; adherence by turn before and after."""
        from contextlib import contextmanager

        import actors.group  # the driver is the composition root (see stage_ppo)
        from rayllama.gatt import actor_sampler, actor_scorer, adherence_table, reward_model_judge, run_gatt

        (before, start), g = self._policy_before("gatt"), self.cfg.gatt  # before: its gold eval has adherence by turn
        out = self.run.model("gatt")
        if is_complete(out):
            log.info("gatt: complete, skipped")
        else:
            rewards = [self.run.remote(self._require(self.reward_path(k), "reward")) for k in ("helpfulness", "safety")]

            @contextmanager
            def open_round(policy: Path):
                handles = actors.group.create_gatt_actors(self.cfg, self.run.remote(policy), *rewards)
                try:
                    max_seq_len = handles.call(lambda: handles.generators[0].max_seq_len.remote(), "max_seq_len")
                    yield (logged_calls(actor_sampler(handles, self.tok, g, max_seq_len, self.cfg.seed),
                                        f"gatt: sampling x {g.samples_per_turn}"),
                           reward_model_judge(actor_scorer(handles), g.safety_gate, g.min_reward))
                finally:
                    actors.group.shutdown_rl_actors(handles)

            gatt_prompts = formats.read_prompts(self.files["gatt"])
            stats = run_gatt(self.cfg, self.run, self.tok, gatt_prompts, start, open_round,
                             replay=self.sft_dialogues)
            self._record_training("gatt", stats, before)
        self.gold_eval("gatt", out)
        log.info("adherence by turn, before and after GAtt\n" + adherence_table(self.results, [before, "gatt"]))

    def _policy_before(self, stage: str) -> tuple[str, Path]:
        """(name, model directory) of the policy `stage` starts from (`config.policy_before`)."""
        name = policy_before(self.cfg.stages, stage)
        return name, self._require(self.run.model(name), name)

    def _record_training(self, stage: str, summary: dict, started_from: str) -> None:
        """A finished RL stage's numeric summary and the policy it started from (its changes are measured from
        that policy: the driver's summary and bench/rlhf_evidence.py read it); a stage that fails records nothing."""
        self._record(stage, {**{k: v for k, v in summary.items() if isinstance(v, int | float)},
                             "started_from": started_from})

    # ------------------------------------------------------------------------------------------- the run

    def run_all(self) -> None:
        for stage in self.cfg.stages:
            fn = getattr(self, f"stage_{stage}", None)
            if fn is None:
                raise PipelineError(f"stage '{stage}' is not available in this version; remove it from stages")
            t0 = time.time()
            log.info(f"== stage {stage}")
            self._forget_results_of_untrained(stage)
            fn()
            if "seconds" not in self.results.get(stage, {}):
                self._record(stage, {"seconds": round(time.time() - t0, 1)})
            if (self.run.root / "driver.log").exists():
                self.run.push(self.run.root / "driver.log")  # a run on an object store: its log goes there too
        log.info("summary\n" + self.summary())  # console and driver.log

    def _forget_results_of_untrained(self, stage: str) -> None:
        """What eval.json holds for a stage whose model is not complete describes an earlier model (its directory
        removed to train it again, or a run stopped mid-stage): drop it, so the stage trains and is judged anew
        instead of keeping the earlier model's gold eval under the new one's name."""
        if stage == "tokenizer":
            return
        models = ({f"reward-{k}": self.run.reward_model(k) for k in ("helpfulness", "safety")} if stage == "reward"
                  else {stage: self.run.model(stage)})
        stale = [name for name, path in models.items() if name in self.results and not is_complete(path)]
        for name in stale:
            log.info(f"{name}: its model is not complete; its earlier results in eval.json are dropped (it trains "
                     "now and is judged again)")
            del self.results[name]
        if stale:
            self.run.save_eval(self.results)

    def summary(self) -> str:
        from rayllama.report import summary_table  # the run report prints the same table

        table = summary_table(self.results, self.cfg.stages)
        if self.user_data:
            from rayllama.data.sources import drop_table

            order = [x for s in self.cfg.stages for x in (("reward-helpfulness", "reward-safety") if s == "reward"
                                                          else (s,))]
            table += "\n\n" + drop_table(self.data_stats) + "\n\n" + sample_table(self.results, order)
        return table


def check_stage_inputs(cfg: PipelineConfig, run) -> None:
    """Pipeline.check_inputs without building the pipeline (which writes and reads the data): the driver's
    `--dry-run`. The check needs only the config and the run dir."""
    pipeline = Pipeline.__new__(Pipeline)
    pipeline.cfg, pipeline.run, pipeline.user_data = cfg, run, cfg.data.user_data()
    pipeline.check_inputs()


RATING_COLUMNS = ("significantly_better", "better", "slightly_better", "negligibly_better")


def sample_table(results: dict, stages: list[str], width: int = 36) -> str:
    """Prompt | greedy answer after each stage, side by side (texts cut to `width` characters)."""
    with_samples = [s for s in stages if results.get(s, {}).get("samples")]
    if not with_samples:
        return ""

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    head = f"{'prompt':<{width}}" + "".join(f"  {s:<{width}}" for s in with_samples)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(results[with_samples[0]]["samples"]):
        answers = [results[s]["samples"][i]["answer"] if i < len(results[s]["samples"]) else "" for s in with_samples]
        lines.append(f"{cut(row['prompt']):<{width}}" + "".join(f"  {cut(a):<{width}}" for a in answers))
    return "\n".join(lines)


def reward_table(results: dict) -> str:
    """Held-out accuracy per rating level for both reward models (LLaMA 2 Table 8 layout)."""
    head = f"{'reward model':<22}" + "".join(f"{c:>22}" for c in RATING_COLUMNS) + f"{'overall':>10}"
    lines = [head, "-" * len(head)]
    for kind in ("helpfulness", "safety"):
        r = results.get(f"reward-{kind}", {})
        if not r:
            continue
        cells = "".join(f"{r.get(f'rm_accuracy_{c}', float('nan')):>22.3f}" for c in RATING_COLUMNS)
        lines.append(f"{kind:<22}{cells}{r.get('rm_accuracy', float('nan')):>10.3f}")
    return "\n".join(lines)
