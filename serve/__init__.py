"""Ray Serve chat endpoint (OpenAI-compatible) over a rayllama checkpoint and the shared GenerationEngine.

    python -m rayllama.serve configs/serve.yaml [key=value ...]

`serve.config` (ServeConfig, load_serve_config) is pure; `serve.app` (build_app, start, main) imports Ray and
FastAPI, so import it explicitly: `from serve.app import build_app`.
"""
