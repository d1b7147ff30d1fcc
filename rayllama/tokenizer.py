"""SentencePiece BPE tokenizer as Llama 2 uses it, and the Llama-2-chat template.

Training settings follow Llama 2's tokenizer: BPE, byte fallback (no unknown characters), digits split into single
pieces, ``identity`` normalisation with a dummy prefix and no whitespace squashing (so text round-trips exactly,
newlines included), ids unk 0 / bos 1 / eos 2 and no pad piece. Two additions for tiny vocabularies: the four
chat tags are user-defined symbols (one piece each, ids 3-6), and every printable ASCII character is a required
piece (so digits and punctuation never fall back to bytes, however rare in the corpus).

Chat template (Meta's ``Llama.chat_completion``): a leading system message is folded into the first user turn as
``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}``; each answered turn is
``[bos] + encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [eos]`` and a final unanswered turn
``[bos] + encode(f"[INST] {user.strip()} [/INST]")``. The same template for transformers and vLLM is CHAT_TEMPLATE,
written with the tokenizer files of an exported checkpoint (`hf_tokenizer_files`).
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")
N_BYTE_PIECES = 256
REQUIRED_CHARS = "".join(chr(c) for c in range(33, 127))  # printable ASCII but space (space is "▁")
MIN_SENTENCEPIECE = (0, 2, 3)  # pyproject's floor: 0.2.2 aborts on a required char of frequency 0


# Our chat template in Jinja, for transformers' `apply_chat_template` and vLLM's chat API on an exported checkpoint
# (tokenizer_config.json): the rules of `_check_dialog`, each turn as `Tokenizer` encodes it. The bos and eos ids are
# the literal bos_token / eos_token strings, which the HF tokenizer maps back to their ids. `encode` gives every
# piece it is called on a dummy-prefix "▁", the HF tokenizer (legacy=False) only to text at the very start of
# the string, so the template writes that space itself: "<s> [INST] ..." and " {answer} </s>" are exactly
# [bos] + encode("[INST] ...") and encode("{answer} ") + [eos] (tests/test_vllm_hf_export.py checks it token for token).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none %}{% set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{ raise_exception('roles must be an optional system message, then user and assistant alternating, "
    "starting with user') }}"
    "{%- endif -%}"
    "{%- for tag in " + repr(list(SPECIAL_TAGS)) + " if tag in message['content'] -%}"
    "{{ raise_exception('message content contains the chat tag ' + tag + '; remove it') }}"
    "{%- endfor -%}"
    "{%- if loop.first and system_message is not none -%}"
    "{%- set content = " + repr(B_SYS) + " + system_message + " + repr(E_SYS) + " + message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + ' " + B_INST + " ' + (content | trim) + ' " + E_INST + "' }}"
    "{%- else -%}"
    "{{ ' ' + (content | trim) + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def strip_chat_tags(text: str) -> str:
    """`text` without the chat template's tags ([INST], <<SYS>>, ...): a policy may generate them, the template
    forbids them in message content, so generated answers are cleaned before anything trains on or scores them."""
    for tag in SPECIAL_TAGS:
        text = text.replace(tag, "")
    return text


class DialogError(ValueError):
    """A dialogue that breaks the chat template's rules (the message names the index and the rule)."""


def _sentences(texts: Iterable[str | os.PathLike], max_bytes: int) -> Iterator[str]:
    """Lines of the texts (or of the files, for paths), skipping empty ones; longer lines are cut to max_bytes."""
    for item in texts:
        if isinstance(item, os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise ValueError(
                    f"tokenizer training file {path} does not exist; pass existing text files or strings"
                )
            text = path.read_text(encoding="utf-8")
        elif isinstance(item, str):
            text = item
        else:
            raise ValueError(
                f"tokenizer training input {item!r:.60} is not a str or path; pass strings or paths"
            )
        for line in text.splitlines():
            if line.strip():
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def train_tokenizer(
    texts: Iterable[str] | Sequence[os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    max_sentence_length: int = 4192,
    input_sentence_size: int = 1_000_000,
    num_threads: int = 2,
    seed: int = 0,
) -> Path:
    """Train a Llama-style SentencePiece BPE model; returns ``{model_prefix}.model`` (``.vocab`` beside it).

    Every non-empty line of the texts is one training sentence (at most ``max_sentence_length`` bytes; longer
    lines are truncated); at most ``input_sentence_size`` lines are kept, sampled with ``seed``. The model is
    trained in memory and written to a temp file renamed into place, so a crash leaves no half-written file.
    The same input gives byte-identical model files.
    """
    version = tuple(int(re.match(r"\d*", part)[0] or 0) for part in spm.__version__.split(".")[:3])  # 0.2.3rc1: 0.2.3
    if version < MIN_SENTENCEPIECE:  # older trainers abort the process on a required char the text lacks
        raise RuntimeError(
            f"sentencepiece {spm.__version__} cannot train this tokenizer; "
            f"pip install 'sentencepiece>={'.'.join(map(str, MIN_SENTENCEPIECE))}'"
        )
    n_fixed = 3 + len(SPECIAL_TAGS) + N_BYTE_PIECES + len(REQUIRED_CHARS)  # specials, tags, bytes, ASCII
    if vocab_size <= n_fixed:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for learned pieces (needs > {n_fixed}); use e.g. 4000"
        )
    if isinstance(texts, (str, bytes, os.PathLike)):
        raise ValueError("train_tokenizer takes a list of texts or paths, not one; wrap it in a list")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = list(_sentences(texts, max_sentence_length))
    if not sentences:
        raise ValueError("tokenizer training text is empty; pass non-empty strings or text files")
    if len(sentences) > input_sentence_size:
        sentences = random.Random(seed).sample(sentences, input_sentence_size)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,  # in memory: no file until the model is complete, and no path inside it
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.99995,
            required_chars=REQUIRED_CHARS,  # digits etc. stay pieces even if the corpus rarely has them
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=list(SPECIAL_TAGS),
            max_sentence_length=max_sentence_length,
            shuffle_input_sentence=False,  # sampled above, reproducibly
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for too little text
        msg = str(e).strip().splitlines()[-1]
        raise ValueError(
            f"training a {vocab_size}-piece tokenizer failed ({msg}); use more text or a smaller vocab"
        ) from e
    proto = writer.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    _write_atomic(Path(f"{prefix}.vocab"), vocab.encode("utf-8"))  # human-readable listing: piece, score
    _write_atomic(Path(f"{prefix}.model"), proto)
    return Path(f"{prefix}.model")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class Tokenizer:
    """A loaded SentencePiece model plus the Llama-2-chat template.

    ``pad_id`` is 0 (the unk id; Llama has no pad piece): padded positions are always masked by an attention/loss
    mask, so their id only has to be a valid embedding row.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise ValueError(
                f"tokenizer model {path} does not exist; train one with rayllama.tokenizer.train_tokenizer "
                "or set the tokenizer path to a SentencePiece .model file"
            )
        self._load(path, path.read_bytes())

    def _load(self, path: Path, proto: bytes) -> None:
        self._path, self._proto = path, proto
        try:
            if not proto:
                raise RuntimeError("empty file")
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"tokenizer model {path} is not a SentencePiece model ({str(e).strip()[:80]}); "
                "retrain it with rayllama.tokenizer.train_tokenizer"
            ) from e
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(
                f"tokenizer model {path} has no bos/eos pieces; train it with bos_id=1, eos_id=2"
            )

    def __getstate__(self) -> dict:  # picklable for Ray: ship the model bytes, not a file path
        return {"path": str(self._path), "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._load(Path(state["path"]), state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        return 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by bos / eos."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}; decode bytes first")
        ids = self._sp.encode(text, out_type=int)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bos and eos are dropped wherever they occur (decoding does not stop at eos).

        Padding (id 0 = unk) is not dropped: it decodes as " ⁇ ", so cut padded positions with the mask first.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}); check the model/vocab"
            )
        return self._sp.decode([i for i in ids if i != self.bos_id and i != self.eos_id])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # --- chat template ---------------------------------------------------------------------------------------

    def encode_dialog_turns(self, messages: Sequence[Mapping[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Per answered turn, ``(ids, answer_mask)`` of ``[bos] [INST] user [/INST] answer </s>``.

        The prompt part ``encode("[INST] {user} [/INST]")`` and the answer part ``encode("{answer} ")`` are
        encoded separately and concatenated (sentencepiece's dummy prefix gives the answer the leading "▁" that
        stands for the space after ``[/INST]``); the mask is 1 on the answer ids and eos. This equals encoding
        the whole turn string because ``[/INST]`` is an atomic piece and no learned piece crosses the "▁" that
        starts the answer (tests check it token for token).
        """
        out = []
        for user, answer in _check_dialog(messages, last="assistant"):
            prompt, reply = self._prompt_ids(user), self._answer_ids(answer)
            out.append((prompt + reply, [0] * len(prompt) + [1] * len(reply)))
        return out

    def _prompt_ids(self, user: str) -> list[int]:
        return [self.bos_id] + self.encode(f"{B_INST} {user.strip()} {E_INST}")

    def _answer_ids(self, answer: str) -> list[int]:
        return self.encode(f"{answer.strip()} ") + [self.eos_id]

    def encode_dialog(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """Ids of a dialogue ending with an assistant message, and a mask that is 1 exactly on the answer tokens
        and their eos (0 on bos, ``[INST]``, system and user tokens): the SFT loss mask."""
        ids: list[int] = []
        mask: list[int] = []
        for turn_ids, turn_mask in self.encode_dialog_turns(messages):
            ids += turn_ids
            mask += turn_mask
        return ids, mask

    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Ids of a dialogue ending with a user message, ending with that turn's ``[/INST]``: ready to generate."""
        *turns, (last_user, _) = _check_dialog(messages, last="user")
        ids = [t for user, answer in turns for t in self._prompt_ids(user) + self._answer_ids(answer)]
        return ids + self._prompt_ids(last_user)

    def encode_prompt_within(self, messages: Sequence[Mapping[str, str]], budget: int) -> tuple[list[int], int]:
        """`encode_prompt` in at most `budget` tokens, and how many earlier (user, answer) turns it dropped.

        A dialogue that is too long loses whole turns from its middle, oldest first: the system block (which the
        template puts in the first kept user turn) and the last user turn always stay, so a multi-turn dialogue
        keeps its instruction. Only when the system block and the last user turn alone exceed `budget` are the
        ids cut from the left (their last `budget` tokens; turns dropped = -1)."""
        ids = self.encode_prompt(messages)
        if len(ids) <= budget:
            return ids, 0
        system = [dict(messages[0])] if messages[0]["role"] == "system" else []
        rest = [dict(m) for m in messages[len(system):]]  # user, assistant, ..., user
        for dropped in range(1, len(rest) // 2 + 1):
            ids = self.encode_prompt(system + rest[2 * dropped:])
            if len(ids) <= budget:
                return ids, dropped
        return ids[-budget:], -1


def _check_dialog(messages: Sequence[Mapping[str, str]], last: str) -> list[tuple[str, str | None]]:
    """Validate a dialogue and return its (user, answer) turns, the system prompt folded into the first user turn.

    Rules: a non-empty list of {"role", "content": str}; roles system/user/assistant; system only at index 0;
    then user, assistant, user, ... alternating; the last message has role ``last`` (the final turn's answer is
    None when last == "user"); no content holds a chat tag ([INST], [/INST], <<SYS>>, <</SYS>>).
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise DialogError("dialog must be a non-empty list of {'role', 'content'} messages")
    system = None
    expected = "user"
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise DialogError(f"message {i} must be a dict with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DialogError(f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DialogError(f"message {i} content is {type(content).__name__}, not str")
        tag = next((t for t in SPECIAL_TAGS if t in content), None)
        if tag:
            raise DialogError(f"message {i} contains the chat tag {tag!r}; remove it from the content")
        if role == "system":
            if i != 0:
                raise DialogError(f"message {i} is a system message; only message 0 may be system")
            system = content
        elif role != expected:
            first_turn = i == (1 if system is not None else 0)
            rule = "the first turn must be the user's" if first_turn else f"two {role} turns in a row"
            raise DialogError(f"message {i} has role {role!r} but {expected!r} was expected ({rule})")
        else:
            expected = "assistant" if role == "user" else "user"
    final = messages[-1]["role"]
    if final != last:
        raise DialogError(
            f"message {len(messages) - 1} has role {final!r}; the dialog must end with role {last!r}"
        )
    contents = [m["content"] for m in messages[1 if system is not None else 0 :]]
    if system is not None:  # Meta's chat_completion: fold the system prompt into the first user turn
        contents[0] = B_SYS + system + E_SYS + contents[0]
    answers: list[str | None] = contents[1::2] + [None] * (len(contents) % 2)
    return list(zip(contents[0::2], answers))


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for a directory holding `tok`'s model as tokenizer.model:
    transformers' LlamaTokenizer built from it encodes plain text as `tok.encode(text, bos=True)` and dialogues
    (CHAT_TEMPLATE) as `encode_prompt` / `encode_dialog`. legacy=False with add_prefix_space: the dummy prefix goes
    on the start of the text only, as sentencepiece puts it on the start of each piece `encode` is given."""
    special = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
               "unk_token": tok.id_to_piece(tok.unk_id), "pad_token": tok.id_to_piece(tok.pad_id)}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "add_prefix_space": True, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}
