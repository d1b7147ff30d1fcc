"""Can the tiny model learn to copy? GAtt's held-out target (a start / end word no training instruction used) needs
the model to copy a token it was shown, so this trains the tiny preset on nothing but copying drills and measures
when copying appears.

    .venv/bin/python bench/copy_probe.py [--steps 3000] [--layers 4] [--lr 2e-3] [--out bench/results/copy_probe.json]

Each training sequence packs items `COPY x1 .. xn SEP x1 .. xn END` (n = 2-5 random token ids from 100-1799) into
128 tokens, 16 sequences per step, AdamW as pretraining's (lr 2e-3 after 10 warm-up steps, weight decay 0.1,
clip 1.0), one torch thread. Every --eval-every steps, on 100 fresh prompts `... COPY a b c SEP` each: greedy
accuracy of the first copied token, of the next two given the correct ones before them (induction: find the
earlier copy of the current token, emit its successor), and of all three in a row; with ids from the training range
and with ids 1800-1999, which no training sequence contains; "in context" is the probability the model puts, at
those three positions, on any id of the prompt (seen ids; a model that copies the right one puts 1 there too).
The loss column (training batches) has two reference points, printed above the table: what it is when the
copies are guessed at random (no copying) and when they are copied exactly; "copy loss" is the loss of the copied
tokens alone on 32 fresh training-like rows (first / later copied token, positions before 32 / from 32 on;
ln 1700 = 7.44 is a uniform guess).
Deterministic for given arguments on one machine; ~0.6 s per step here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BOS, COPY, SEP, END = 1, 5, 6, 7
SEEN, UNSEEN = range(100, 1800), range(1800, 2000)
SPAN = (2, 5)


def item(rng: random.Random, ids: range, n: int | None = None) -> list[int]:
    xs = [rng.choice(ids) for _ in range(n or rng.randint(*SPAN))]
    return [COPY, *xs, SEP, *xs, END]


def batch(rng: random.Random, size: int = 16, length: int = 128) -> torch.Tensor:
    rows = []
    for _ in range(size):
        row = [BOS]
        while len(row) < length + 1:
            row += item(rng, SEEN)
        rows.append(row[:length + 1])
    return torch.tensor(rows)  # (B, T + 1)


def token_roles(row: list[int]) -> list[int]:
    """Per token of a packed row: 0 structure (BOS, COPY, SEP, END, a cut item's start), 1 original, 2 the first
    copied token, 3 a later copied token."""
    roles, state = [], 0
    for token in row:
        if token in (BOS, COPY, SEP, END):
            roles.append(0)
            state = {COPY: 1, SEP: 2}.get(token, 0)
        else:
            roles.append(state)
            state = 3 if state in (2, 3) else state
    return roles


@torch.no_grad()
def loss_by_role(model: torch.nn.Module, rng: random.Random, size: int = 32) -> dict[str, float]:
    """Mean loss of the originals and of the copied tokens (first / later; at positions before 32, where the
    accuracy prompts' copies are, and from 32 on) on a fresh batch of training-like rows."""
    tokens = batch(rng, size)
    target = tokens[:, 1:]
    nll = F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), target, reduction="none")  # (B, T)
    role = torch.tensor([token_roles(row) for row in tokens.tolist()])[:, 1:]
    early = torch.arange(target.size(1)).expand_as(target) < 32
    copied = role >= 2
    return {"original": float(nll[role == 1].mean()), "copy_first": float(nll[role == 2].mean()),
            "copy_later": float(nll[role == 3].mean()), "copy_before_32": float(nll[copied & early].mean()),
            "copy_from_32": float(nll[copied & ~early].mean())}


def reference_losses() -> tuple[float, float]:
    """Mean loss per predicted token over an item when every copied token is a uniform guess, and when it is exact
    (the originals are always uniform guesses; the length of a span is not predictable, so SEP and the first copied
    position carry the span's length entropy either way: counted as uniform over the lengths)."""
    lengths = range(SPAN[0], SPAN[1] + 1)
    mean_n = sum(lengths) / len(lengths)
    per_token = mean_n * 2 + 3  # COPY, n, SEP, n, END
    original = mean_n * math.log(len(SEEN)) + math.log(len(lengths))
    return (original + mean_n * math.log(len(SEEN))) / per_token, original / per_token


@torch.no_grad()
def accuracy(model: torch.nn.Module, rng: random.Random, ids: range, prompts: int = 100) -> dict[str, float]:
    first = later = exact = 0
    context_mass = 0.0
    for _ in range(prompts):
        xs = [rng.choice(ids) for _ in range(3)]
        prefix = [BOS, *item(rng, SEEN), *item(rng, SEEN), COPY, *xs, SEP]
        logits = model(torch.tensor([prefix + xs[:2]]))[0]  # teacher-forced: the three copy positions at once
        guess = logits[-3:].argmax(-1).tolist()
        context = sorted(set(prefix) - {BOS, COPY, SEP, END})
        context_mass += float(logits[-3:].softmax(-1)[:, context].sum(-1).mean())
        first += guess[0] == xs[0]
        later += (guess[1] == xs[1]) + (guess[2] == xs[2])
        seq = list(prefix)
        for _ in range(3):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        exact += seq[-3:] == xs
    return {"first": first / prompts, "later": later / (2 * prompts), "exact": exact / prompts,
            "context_mass": context_mass / prompts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=4, help="the tiny config's 4 (the preset's own is 6)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "copy_probe.json")
    args = ap.parse_args()

    from rayllama.model import Transformer, preset

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = preset("tiny")
    cfg.n_layers, cfg.max_seq_len = args.layers, 256
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    train_rng, eval_rng, loss_rng = (random.Random(args.seed + k) for k in range(3))
    no_copy, exact_copy = reference_losses()
    print(f"tiny preset, {args.layers} layers, lr {args.lr:g}, 16 x 128 tokens per step; loss without copying "
          f"{no_copy:.2f}, with exact copying {exact_copy:.2f}")
    header = (f"{'step':>6} {'loss':>6}   {'seen ids: first / later / exact':>32}   "
              f"{'unseen ids: first / later / exact':>34} {'in context':>10}   "
              f"{'copy loss: first / later / <32 / >=32':>37} {'s/step':>7}")
    print(header)
    rows, started, losses = [], time.perf_counter(), []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 10)
        tokens = batch(train_rng)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            seen, unseen = accuracy(model, eval_rng, SEEN), accuracy(model, eval_rng, UNSEEN)
            roles = loss_by_role(model, loss_rng)
            model.train()
            row = {"step": step, "loss": sum(losses) / len(losses), "seen": seen, "unseen": unseen,
                   "loss_by_role": roles, "seconds_per_step": (time.perf_counter() - started) / step}
            rows.append(row)
            losses = []
            fmt = lambda a: f"{a['first']:.2f} / {a['later']:.2f} / {a['exact']:.2f}"  # noqa: E731
            print(f"{step:>6} {row['loss']:>6.3f}   {fmt(seen):>32}   {fmt(unseen):>34} "
                  f"{seen['context_mass']:>10.2f}   {roles['copy_first']:>11.2f} / {roles['copy_later']:.2f} / "
                  f"{roles['copy_before_32']:.2f} / {roles['copy_from_32']:>5.2f} {row['seconds_per_step']:>7.2f}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "loss_without_copying": no_copy, "loss_with_exact_copying": exact_copy,
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
