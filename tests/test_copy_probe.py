"""bench/copy_probe.py (can the tiny model copy a token it was shown?): its reference losses by hand, its unseen ids
never in training, and a short run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("copy_probe", ROOT / "bench" / "copy_probe.py")
copy_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(copy_probe)


def test_reference_losses_by_hand():
    # spans of 2-5 tokens (mean 3.5) from 1700 ids: an item predicts 2 x 3.5 + 3 = 10 tokens; the originals cost
    # 3.5 ln 1700 plus ln 4 for where SEP falls; the copies cost as much again unless they are copied
    original = 3.5 * math.log(1700) + math.log(4)
    no_copy, exact = copy_probe.reference_losses()
    assert math.isclose(no_copy, (original + 3.5 * math.log(1700)) / 10)
    assert math.isclose(exact, original / 10)
    assert round(no_copy, 2) == 5.35 and round(exact, 2) == 2.74


def test_unseen_ids_never_reach_training():
    tokens = copy_probe.batch(random.Random(0), size=64)
    assert tokens.shape == (64, 129)
    used = set(tokens.flatten().tolist())
    assert not used & set(copy_probe.UNSEEN)
    assert used - {copy_probe.BOS, copy_probe.COPY, copy_probe.SEP, copy_probe.END} <= set(copy_probe.SEEN)


def test_token_roles():
    B, C, S, E = copy_probe.BOS, copy_probe.COPY, copy_probe.SEP, copy_probe.END
    row = [B, C, 100, 101, 102, S, 100, 101, 102, E, C, 103, 104, S, 103]
    assert copy_probe.token_roles(row) == [0, 0, 1, 1, 1, 0, 2, 3, 3, 0, 0, 1, 1, 0, 2]
    assert copy_probe.token_roles([103, 104, S, 103, 104, E]) == [0, 0, 0, 2, 3, 0]  # a row cut inside an item


def test_short_run_writes_its_table(tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "copy_probe.py"), "--steps", "4", "--eval-every", "2",
                           "--layers", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert set(row["seen"]) == set(row["unseen"]) == {"first", "later", "exact", "context_mass"}
        assert all(0.0 <= v <= 1.0 for v in (*row["seen"].values(), *row["unseen"].values()))
        assert math.isfinite(row["loss"])
        assert set(row["loss_by_role"]) == {"original", "copy_first", "copy_later", "copy_before_32", "copy_from_32"}
    assert "exact" in done.stdout
