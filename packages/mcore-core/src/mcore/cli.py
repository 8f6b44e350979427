"""The ``mcore`` command line: ``--version``, ``version``, ``plugins``, ``config``, and plugin subcommands.

Kept import-light: ``mcore plugins`` must not import torch or any plugin's heavy modules.
Any ``UserError`` becomes its message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mcore.__about__ import PLUGIN_API_VERSION, __version__
from mcore.errors import UserError

if TYPE_CHECKING:
    from mcore.plugins import PluginHost

EXIT_USER_ERROR = 2
BUILTIN_COMMANDS = ("plugins", "config", "version")


def _plugin_rows(host: PluginHost) -> list[dict[str, str]]:
    return [
        {
            "distribution": impl.source.distribution,
            "version": impl.source.version,
            "plugin": impl.source.plugin,
            "kind": impl.kind,
            "name": impl.name,
            "ref": impl.ref_text,
            "summary": impl.summary,
        }
        for impl in host.registry
    ]


def cmd_plugins(host: PluginHost, args: argparse.Namespace) -> int:
    rows = _plugin_rows(host)
    if args.json:
        payload = {
            "core": {"version": __version__, "plugin_api": PLUGIN_API_VERSION},
            "implementations": rows,
            "commands": [
                {"name": c.name, "ref": c.ref, "distribution": c.source.distribution, "help": c.help}
                for c in host.commands.values()
            ],
            "problems": [
                {
                    "plugin": p.plugin,
                    "distribution": p.source.distribution,
                    "version": p.source.version,
                    "message": p.message,
                }
                for p in host.problems
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        grouped.setdefault((row["distribution"], row["version"], row["kind"]), []).append(row["name"])
    table = [("distribution", "version", "kind", "names")] + [
        (dist, version, kind, ", ".join(sorted(names))) for (dist, version, kind), names in sorted(grouped.items())
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for i, r in enumerate(table):
        print("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    if host.commands:
        print("\ncommands: " + ", ".join(f"{c.name} ({c.source.distribution})" for c in host.commands.values()))
    for problem in host.problems:
        print(f"\nskipped: {problem.message}")
    return 0


def cmd_config(host: PluginHost, args: argparse.Namespace, overrides: list[str]) -> int:
    import tomli_w

    from mcore.config import load_raw, resolve_config

    config = resolve_config(load_raw(args.file, overrides), host)
    sys.stdout.write(tomli_w.dumps(config.to_dict()))
    return 0


def cmd_version(host: PluginHost) -> int:
    import platform

    import torch

    print(f"mcore-core {__version__} (plugin API {PLUGIN_API_VERSION})")
    for name, source in sorted(host.sources.items()):
        print(f"plugin {name}: {source}")
    cuda = torch.version.cuda or "none"
    print(f"torch {torch.__version__} (CUDA {cuda}, available: {torch.cuda.is_available()})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    return 0


def build_parser(host: PluginHost) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcore", description="mcore: compose LLM training runs from plugins.")
    parser.add_argument("--version", action="version", version=f"mcore-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    config = sub.add_parser("config", help="print the resolved config of a run (TOML + --section.key=value overrides)")
    config.add_argument("file", nargs="?", help="run config TOML file")
    sub.add_parser("version", help="versions of core, plugins, torch, CUDA and Python")
    for command in host.commands.values():
        sub.add_parser(command.name, help=f"{command.help} [{command.source.distribution}]", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mcore.plugins import load_plugins

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        host = load_plugins()
        if argv and argv[0] in host.commands and argv[0] not in BUILTIN_COMMANDS:
            return host.commands[argv[0]].run(argv[1:])
        parser = build_parser(host)
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            default = host.commands.get("train")
            if default is not None and not argv:
                return default.run([])
            parser.print_help()
            return 0
        if args.command == "config":
            return cmd_config(host, args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "plugins":
            return cmd_plugins(host, args)
        return cmd_version(host)
    except UserError as exc:
        print(f"mcore: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def run_with_user_errors(function: Any, *args: Any) -> int:
    """Run a subcommand body, turning ``UserError`` into its message and exit code 2."""
    try:
        return int(function(*args) or 0)
    except UserError as exc:
        print(f"mcore: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
