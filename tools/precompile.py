"""Byte-compile the named installed packages on every core: `python tools/precompile.py torch ray vllm`.

The Makefile installs without byte-compiling (~33k files, most never imported) and runs with PYTHONPYCACHEPREFIX,
so a module is compiled on its first import. The packages named here are imported by most processes a run or the
test suite starts (Ray workers, Ray Train workers, generators), several at once: compiling them once, in parallel,
at setup saves each of those processes compiling what the others have not written yet. A package that is not
installed is skipped; a file that does not compile (torch ships a Python 3.12-only test file) is left to Python.
"""

from __future__ import annotations

import compileall
import importlib.util
import sys


def precompile(names: list[str]) -> None:
    """Compile every .py under each installed package of `names` (names not installed are skipped)."""
    for name in names:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(location, quiet=2, workers=0)


if __name__ == "__main__":
    precompile(sys.argv[1:])
