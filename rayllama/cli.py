"""What `python -m rayllama.driver` and `python -m rayllama.serve` share on the command line (after torchtune's
`tune ls` / `tune validate` and the `--key=value` overrides TRL users type):

    CONFIG [key=value | --key=value ...] [--print-config | --dry-run]    -h / --help: usage, the bundled configs
                                                                        (one line each) and the config's sections

`--print-config` prints the resolved config as YAML (what a run writes to runs/<name>/config.yaml);
`--dry-run` runs every check that needs no training and no Ray, then exits 0 with one line or 2 with one error line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayllama.config import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the bundled configs (a source checkout)
FLAGS = ("--print-config", "--dry-run")
HELP = ("-h", "--help")


@dataclass
class Args:
    config: str | None
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    print_config: bool = False
    dry_run: bool = False


def parse_args(argv: list[str]) -> Args:
    """Flags anywhere on the line; the first other word is the config, the rest are overrides (`--key=value` is
    taken as `key=value` by rayllama.config.load_typed). An unknown `--option` is a one-line ConfigError."""
    for a in argv:
        if a.startswith("-") and "=" not in a and a not in FLAGS + HELP:
            raise ConfigError(f"unknown option '{a}'; accepted: --help, --print-config, --dry-run, and config keys "
                              f"as key=value or --key=value")
    if "--print-config" in argv and "--dry-run" in argv:
        raise ConfigError("--print-config and --dry-run are exclusive; pass one")
    words = [a for a in argv if a not in FLAGS + HELP]
    return Args(config=words[0] if words else None, overrides=words[1:], help=any(a in HELP for a in argv),
                print_config="--print-config" in argv, dry_run="--dry-run" in argv)


def bundled_configs(program: str, directory: Path = CONFIGS_DIR) -> list[tuple[str, str]]:
    """(file name, one-line description) of every bundled config that `program` ('rayllama.driver' or
    'rayllama.serve') runs: the first header comment line that is not a usage line. A config whose usage line
    names another program is left out; one without a usage line (a `base:` file) belongs to the driver."""
    out = []
    for path in sorted(directory.glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        usage = [h for h in header if h.startswith("python -m ")]
        runs = usage[0].split()[2] if usage else "rayllama.driver"
        if runs != program:
            continue
        description = next((h for h in header if h and not h.startswith("python -m ")), "")
        out.append((path.name, description if len(description) <= 100 else description[:97].rstrip() + "..."))
    return out


def sections(schema: Any) -> list[tuple[str, str]]:
    """(top-level key, what it holds) of a config dataclass: a section's docstring's first sentence (or its keys,
    when it has none), a plain key's default."""
    out = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            doc = (type(default).__doc__ or "").strip()
            if not doc or doc.startswith(f"{type(default).__name__}("):  # the dataclass's generated signature
                text = "keys: " + ", ".join(g.name for g in dataclasses.fields(default))
            else:
                text = " ".join(doc.split())
                text = text.split(". ")[0].split(": ")[0] if len(text) > 100 else text
            out.append((f"{f.name}.*", text if len(text) <= 100 else text[:97].rstrip() + "..."))
        else:
            out.append((f.name, f"default {default!r}"))
    return out


def help_text(program: str, summary: str, schema: Any, extra: str = "") -> str:
    """The --help page: usage, `summary`, the options, the bundled configs and the top-level sections."""
    width = 24
    lines = [f"usage: python -m {program} CONFIG [key=value | --key=value ...] [--print-config | --dry-run]", "",
             summary.strip(), "",
             "options:",
             f"  {'-h, --help':<{width}}this text",
             f"  {'--print-config':<{width}}print the resolved config as YAML (what the run writes to its "
             f"config.yaml) and exit",
             f"  {'--dry-run':<{width}}check keys, types, ranges, files and {extra or 'the model checkpoint'} "
             f"without starting Ray; exit 0, or 2 with one line",
             f"  {'key=value':<{width}}override a config key, dotted (e.g. ppo.iterations=10; --ppo.iterations=10 "
             f"works too)", ""]
    configs = bundled_configs(program)
    if configs:
        lines.append(f"bundled configs ({CONFIGS_DIR.name}/):")
        lines += [f"  {name:<{width}}{text}" for name, text in configs]
        lines.append("")
    lines.append("config sections (top-level keys; --print-config shows every key and value):")
    lines += [f"  {name:<{width}}{text}" for name, text in sections(schema)]
    return "\n".join(lines)


def writable_dir(path: Path) -> bool:
    """Whether `path` exists as a writable directory or could be created (its nearest existing parent is one)."""
    import os

    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
