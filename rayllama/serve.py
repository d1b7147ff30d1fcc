"""`python -m rayllama.serve configs/serve.yaml [key=value ...]`: the OpenAI-compatible chat endpoint.

A thin launcher: the app lives in the top-level `serve/` package (Ray Serve + FastAPI), imported only here
inside `main`, so `rayllama` itself never imports `serve/` at load time. `--help`, `--print-config` and
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
    if not (args.print_config or args.dry_run):
        from serve.app import main as serve_main

        return serve_main(argv)
    from serve.app import ServeError, check_checkpoint, check_port_free, ingress_env
    from serve.config import load_serve_config, resolve_auth_token

    try:
        cfg = load_serve_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        check_checkpoint(cfg)  # the checks serve.app.main makes before Ray starts
        resolve_auth_token(cfg)
        if not cfg.ray.address:
            check_port_free(cfg.http.host, cfg.http.port)
            ingress_env(cfg)  # http.ingress=haproxy without an HAProxy binary
    except (ConfigError, ServeError) as e:
        print(f"rayllama.serve: error: {e}", file=sys.stderr)
        return 2
    print(f"rayllama.serve: dry run OK: {args.config} ('{cfg.model_name}' from {cfg.model_dir}, engine {cfg.engine}, "
          f"http://{cfg.http.host}:{cfg.http.port})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
