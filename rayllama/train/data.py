"""Token tensors for the Ray Train stages, built once on the driver and read by every worker.

Three kinds, each a dict of tensors saved with `torch.save` (atomically):

    lm:      tokens (N, L) long, right-padded with 0; loss_mask (N, L) bool (1 where a token is a target);
             lengths (N,) -- pretraining packs text into full rows, SFT keeps one dialogue per row
    reward:  chosen / rejected (N, L) long, chosen_len / rejected_len (N,), margin (N,) float, rating (N,) long
             (-1: unrated), source (N,) long indexing source_names (a list of the pairs' data sources)
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from rayllama.tokenizer import Tokenizer

RATING_INDEX = {"significantly_better": 0, "better": 1, "slightly_better": 2, "negligibly_better": 3}


def save_tensors(path: Path, tensors: dict) -> None:
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(tensors, tmp)
    os.replace(tmp, path)


def pack_texts(texts: Iterable[str], tok: Tokenizer, seq_len: int) -> dict:
    """Pretraining rows: `<s> text </s>` documents concatenated and cut into rows of seq_len + 1 tokens."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tok.encode(text, bos=True, eos=True))
    row = seq_len + 1
    n = len(stream) // row
    if n == 0:
        raise ValueError(f"only {len(stream)} tokens of text; need at least {row} for one sequence of seq_len {seq_len}")
    tokens = torch.tensor(stream[: n * row], dtype=torch.long).view(n, row)  # (N, L)
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    loss_mask[:, 0] = False  # the first token of a row is never a target
    return {"tokens": tokens, "loss_mask": loss_mask, "lengths": torch.full((n,), row, dtype=torch.long)}


def _pad(rows: Sequence[Sequence[int]], length: int, value: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def sft_rows(dialogues: Iterable[list[dict]], tok: Tokenizer, max_len: int) -> tuple[dict, int]:
    """One chat-template dialogue per row (no packing, so examples never attend to each other); the loss mask
    is 1 exactly on answer tokens and their `</s>`. Dialogues longer than max_len are dropped and counted."""
    ids_rows, mask_rows, dropped = [], [], 0
    for messages in dialogues:
        ids, mask = tok.encode_dialog(messages)
        if len(ids) > max_len:
            dropped += 1
            continue
        ids_rows.append(ids)
        mask_rows.append(mask)
    if not ids_rows:
        raise ValueError(f"every SFT dialogue is longer than sft.max_seq_len {max_len}; raise it")
    width = max(len(r) for r in ids_rows)
    return {
        "tokens": _pad(ids_rows, width),
        "loss_mask": _pad(mask_rows, width).bool(),
        "lengths": torch.tensor([len(r) for r in ids_rows], dtype=torch.long),
    }, dropped


def replay_sample(replay: Sequence, n_new: int, share: float, seed: int) -> list:
    """The replayed SFT dialogues to mix with `n_new` new examples so that they make `share` of a fine-tune's data
    (share / (1 - share) * n_new of them, at most all of `replay`), drawn without replacement by `seed`. Used
    against forgetting by the rejection-sampling and GAtt fine-tunes (`*.replay_share`)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"replay_share {share} must be in [0, 1)")
    k = min(round(share / (1.0 - share) * n_new), len(replay))
    return random.Random(seed).sample(list(replay), k)


def preference_rows(pairs: Iterable, tok: Tokenizer, max_len: int, margins: dict[str, float]) -> tuple[dict, int]:
    """Each pair as two full dialogues (prompt + chosen answer, prompt + rejected answer); the reward model
    scores the last token of each. Pairs where either side exceeds max_len are dropped and counted."""
    chosen, rejected, margin, rating, source, dropped = [], [], [], [], [], 0
    sources: dict[str, int] = {}  # the pairs' data sources (user data: extra["source"]), for accuracy per source
    for p in pairs:
        c, _ = tok.encode_dialog(list(p.prompt) + [{"role": "assistant", "content": p.chosen}])
        r, _ = tok.encode_dialog(list(p.prompt) + [{"role": "assistant", "content": p.rejected}])
        if max(len(c), len(r)) > max_len:
            dropped += 1
            continue
        chosen.append(c)
        rejected.append(r)
        margin.append(pair_margin(p, margins))
        rating.append(RATING_INDEX.get(p.rating, -1))  # -1: unrated (counts in overall accuracy only)
        source.append(sources.setdefault(p.extra.get("source", ""), len(sources)))
    if not chosen:
        raise ValueError(f"every preference pair is longer than reward.max_seq_len {max_len}; raise it")
    width = max(max(len(x) for x in chosen), max(len(x) for x in rejected))
    return {
        "chosen": _pad(chosen, width),
        "rejected": _pad(rejected, width),
        "chosen_len": torch.tensor([len(x) for x in chosen], dtype=torch.long),
        "rejected_len": torch.tensor([len(x) for x in rejected], dtype=torch.long),
        "margin": torch.tensor(margin, dtype=torch.float32),
        "rating": torch.tensor(rating, dtype=torch.long),
        "source": torch.tensor(source, dtype=torch.long),
        "source_names": list(sources),  # not a tensor: num_examples reads the first entry, "chosen"
    }, dropped


def pair_margin(pair, margins: dict[str, float]) -> float:
    """The margin m(r) of a pair: its own "margin" (a TRL-style number), else its rating's, else 0 for an
    unrated pair (LLaMA 2 trains pairs without a rating level with no margin)."""
    if "margin" in pair.extra:
        return float(pair.extra["margin"])
    return margins[pair.rating] if pair.rating is not None else 0.0


def safety_mix(safety_pairs: list, helpful_pairs: list, helpful_share: float, seed: int) -> list:
    """LLaMA 2's safety RM data: all safety pairs mixed with helpfulness pairs so that they make up
    `helpful_share` of the result (the paper's 90/10 proportion for share 0.1)."""
    if not 0.0 <= helpful_share < 1.0:
        raise ValueError(f"reward.safety_helpfulness_share {helpful_share} must be in [0, 1)")
    n_help = round(helpful_share / (1.0 - helpful_share) * len(safety_pairs))
    rng = random.Random(seed)
    mixed = list(safety_pairs) + rng.sample(list(helpful_pairs), min(n_help, len(helpful_pairs)))
    rng.shuffle(mixed)
    return mixed


def num_examples(data: dict) -> int:
    return int(next(iter(data.values())).shape[0])
