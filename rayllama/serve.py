"""`python -m rayllama.serve configs/serve.yaml [key=value ...]`: the OpenAI-compatible chat endpoint.

A thin launcher: the app lives in the top-level `serve/` package (Ray Serve + FastAPI), imported only here
inside `main`, so `rayllama` itself never imports `serve/` at load time.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from serve.app import main as serve_main

    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
