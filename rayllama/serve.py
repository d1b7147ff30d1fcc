"""`python -m rayllama.serve configs/serve.yaml [key=value ...]`: the OpenAI-compatible chat endpoint.

A thin launcher: the config and its checks (serve.config, serve.preflight: no Ray Serve or FastAPI, so a
mistake is answered at once), then the app of the top-level `serve/` package (Ray Serve + FastAPI), imported only
here inside `main`, so `rayllama` itself never imports `serve/` at load time. `--help`, `--print-config` and
`--dry-run` work as for the driver (rayllama.cli).
"""

from __future__ import annotations

import sys

SUMMARY = "Serves a checkpoint (the pipeline's policy) over an OpenAI-compatible HTTP API through Ray Serve."


def main(argv: list[str] | None = None) -> int:
    from rayllama import cli
    from rayllama.config import ConfigError, to_yaml

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = cli.parse_args(argv)
    except ConfigError as e:
        print(f"rayllama.serve: error: {e}", file=sys.stderr)
        return 2
    if args.help or args.config is None:
        from serve.config import ServeConfig

        print(cli.help_text("rayllama.serve", SUMMARY, ServeConfig, "the checkpoint, auth token and port"))
        return 0 if args.help else 2
    from serve.config import load_serve_config
    from serve.preflight import ServeError, preflight

    try:
        cfg = load_serve_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        ray_env = preflight(cfg)  # checkpoint, tokenizer, auth token, port, ingress: before Ray starts
    except (ConfigError, ServeError) as e:
        print(f"rayllama.serve: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"rayllama.serve: dry run OK: {args.config} ('{cfg.model_name}' from {cfg.model_dir}, engine "
              f"{cfg.engine}, http://{cfg.http.host}:{cfg.http.port})")
        return 0
    from serve.app import run

    return run(cfg, ray_env)


if __name__ == "__main__":
    sys.exit(main())
