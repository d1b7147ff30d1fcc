"""Print the `uv pip install` flags that make uv find packages where this machine's pip does.

uv does not read pip's configuration, so the Makefile passes pip's index settings (from `pip config list`, files
and PIP_* variables, the variables winning) as flags: index-url, extra-index-url, find-links, no-index,
constraint. `--index-strategy unsafe-best-match` is pip's own rule (every index's versions are candidates); uv's
default takes a package from the first index that has it. Usage: `uv pip install $(python tools/uv_flags.py) ...`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def pip_settings() -> dict[str, str]:
    """pip's settings by key (`global.find-links` and `:env:.find-links` both give `find-links`); the
    environment's win, then install.*, then global.*."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in rank:
            continue
        value = value.strip().strip("'\"")
        if name not in found or rank[section] >= found[name][0]:
            found[name] = (rank[section], value)
    return {name: value for name, (_, value) in found.items()}


def uv_flags(settings: dict[str, str]) -> list[str]:
    flags = ["--index-strategy", "unsafe-best-match"]
    for name, flag in FLAGS.items():
        for value in settings.get(name, "").split():
            flags += [flag, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    return flags


if __name__ == "__main__":
    print(shlex.join(uv_flags(pip_settings())))
