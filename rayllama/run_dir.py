"""Where a run keeps everything: `run_dir`, a directory on this disk (runs/<name>/) or a URI on an object store
(run_dir=s3://bucket/runs/tiny, rayllama.storage).

A run on an object store has the store as its copy of record. Every process reads its inputs from there and
writes its outputs there: Ray Train workers (their data tensors, init checkpoint and tokenizer by URI; their
checkpoints, metrics and final model to the store), the RL actors (their checkpoints by URI, each node its own
cached copy; the learners' sharded checkpoints and the policy export uploaded by each rank). The driver works in a
local copy (`root`, under Ray's temp root: rayllama.storage.cache_dir) that nothing relies on: `restore` fills it
from the store when a driver starts (so a driver killed and started again on another machine resumes), `push`
uploads what the driver itself wrote (tokenizer, data tensors, eval.json, config.yaml, driver.log, the report),
`pull` brings a stage's finished output down for the driver's own evaluation. For a local run_dir `root` is the
directory itself and push / pull do nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rayllama import storage

STAGE_MODELS = ("pretrain", "sft", "rejection", "ppo", "gatt")
PULLED = ".pulled"  # in a directory pulled from the store: the version of it (storage.marker_version) copied


class RunDir:
    def __init__(self, run_dir):
        """`run_dir`: a path, a URI, or anything with a `run_dir` attribute (a PipelineConfig)."""
        run_dir = str(getattr(run_dir, "run_dir", run_dir))
        self.uri = run_dir if storage.is_uri(run_dir) else None
        self.root = storage.cache_dir("runs") / storage.key_of(run_dir) if self.uri else Path(run_dir)
        self.data = self.root / "data"
        self.tokenizer = self.root / "tokenizer" / "tokenizer.model"
        self.eval_json = self.root / "eval.json"

    @property
    def name(self) -> str:
        """What a message calls the run: its URI (without the ?options that may carry credentials) or its path."""
        return self.uri.partition("?")[0] if self.uri else str(self.root)

    def model(self, stage: str) -> Path:
        return self.root / stage / "model"

    def reward_model(self, kind: str) -> Path:
        return self.root / "reward" / kind / "model"

    def load_eval(self) -> dict:
        return json.loads(self.eval_json.read_text()) if self.eval_json.exists() else {}

    def save_eval(self, results: dict) -> None:
        tmp = self.eval_json.with_name(f".eval.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
        os.replace(tmp, self.eval_json)
        self.push(self.eval_json)

    # ------------------------------------------------------------------------------------------- the store

    def remote(self, path: str | Path) -> str:
        """What another process opens for `path` (under root): its URI in the store, or the local path itself."""
        if not self.uri or storage.is_uri(path) or not Path(path).is_relative_to(self.root):
            return str(path)  # a URI already, or a path outside the run (the user's own: every node must see it)
        return storage.join(self.uri, Path(path).relative_to(self.root).as_posix())

    def push(self, path: Path, *, only_if_missing: bool = False) -> None:
        """Upload the file `path` (under root) to the store (directories are written there by the processes that
        make them). `only_if_missing`: leave a file the store already has."""
        if not self.uri:
            return
        remote = self.remote(path)
        if not (only_if_missing and storage.is_file(remote)):
            storage.write_bytes(remote, path.read_bytes())

    def pull(self, path: Path) -> Path:
        """`path` (under root) as the store holds it: a complete directory (replacing the local copy) or a file;
        nothing when the store lacks it. Returns `path`."""
        if not self.uri:
            return path
        remote = self.remote(path)
        if storage.is_complete_dir(remote):
            version = storage.marker_version(remote)
            pulled = path / PULLED
            if not (pulled.is_file() and pulled.read_text() == version):  # not this writing of it yet
                storage.download_dir(remote, path)
                pulled.write_text(version)
        elif storage.is_file(remote):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(storage.read_bytes(remote))
        return path

    def pull_metrics(self) -> None:
        """Every metrics.jsonl in the store (the run report reads them)."""
        if not self.uri:
            return
        for uri in storage.list_files(self.uri):
            rel = storage.relative(uri, self.uri)
            if rel.endswith("metrics.jsonl"):
                target = self.root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(uri))

    def restore(self) -> None:
        """A driver starting on a run in the store: the local copy gets what earlier drivers finished (eval.json,
        the tokenizer, each complete stage model; driver.log, which this driver appends to), so the stages that
        are done are skipped."""
        if not self.uri:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (self.eval_json, self.tokenizer, self.root / "driver.log", *[self.model(s) for s in STAGE_MODELS],
                     *[self.reward_model(k) for k in ("helpfulness", "safety")]):
            self.pull(path)
