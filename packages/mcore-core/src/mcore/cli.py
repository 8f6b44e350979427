"""The ``mcore`` command line: ``--version``, ``version``, ``plugins``, ``config``, and plugin subcommands.

Kept import-light: ``mcore plugins`` must not import torch or any plugin's heavy modules.
Any ``UserError`` becomes its message on stderr and exit code 2. ``mcore`` alone prints the
help (the demo is ``mcore train``). Output into a pipe whose reader has gone (``mcore plugins |
head -1``) ends the command quietly, with the exit code of a process ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mcore.__about__ import PLUGIN_API_VERSION, __version__
from mcore.errors import EXIT_USER_ERROR, UserError

if TYPE_CHECKING:
    from mcore.plugins import PluginHost

EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away
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
    table = [
        [row["kind"], row["name"], row["distribution"], row["version"], row["summary"]]
        for row in sorted(rows, key=lambda r: (r["kind"], r["name"]))
    ]
    commands = [[c.name, c.source.distribution, c.source.version, c.help] for c in host.commands.values()]
    print_table(["kind", "name", "distribution", "version", "summary"], table)
    if commands:
        print()
        print_table(["command", "distribution", "version", "help"], commands)
    for problem in host.problems:
        print(f"\nskipped: {problem.message}")
    return 0


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns: a ``rich`` table on a terminal (wrapped to its width), plain aligned text otherwise.

    Plain text (one row per line, columns padded with spaces, a dashed rule under the header) is
    what pipes, ``grep`` and tests see.
    """
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*header, box=None, header_style="bold", pad_edge=False)
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())


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


FIRST_RUN = """\
first run:
  mcore train                              train the built-in demo (no config file): a small GPT on
                                           this Python's standard library (a minute or two on a CPU)
  mcore generate runs/default --prompt 'def '
                                           sample from what it learned
  mcore train --help                       every config key, its default and what it does
  mcore COMMAND --help                     the options of one command"""


def build_parser(host: PluginHost) -> argparse.ArgumentParser:
    from mcore.helptext import OVERRIDES_HELP

    parser = argparse.ArgumentParser(
        prog="mcore",
        description="mcore: compose LLM training runs from plugins.",
        epilog=FIRST_RUN if "train" in host.commands else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mcore-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in host.commands.values():
        if command.name not in BUILTIN_COMMANDS:
            origin = "" if command.source.distribution == "mcore-core" else f" [{command.source.distribution}]"
            sub.add_parser(command.name, help=command.help + origin, add_help=False)
    config = sub.add_parser(
        "config",
        help="print the resolved config of a run (TOML + --section.key=value overrides)",
        usage="mcore config [RUN.toml] [--section.key=value ...]",
        description="Print the resolved config of a run as TOML: the file, the overrides, every default\n"
        "and each chosen implementation's keys, validated as `mcore train` would.",
        epilog=OVERRIDES_HELP + "\nEvery key, with its default and doc: mcore train --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument("file", nargs="?", metavar="RUN.toml", help="run config TOML file")
    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("version", help="versions of core, plugins, torch, CUDA and Python")
    return parser


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (``mcore plugins | head -1``)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):
        return True  # no poll(): take the broken pipe to be stdout's
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR (the reader closed its end) is reported whatever is asked
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _quiet_after_broken_pipe() -> int:
    """Point stdout at /dev/null (so the interpreter's final flush cannot fail) and give the exit code
    of a process ended by SIGPIPE, as ``cat`` or ``git`` would give."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    from mcore.plugins import load_plugins

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(load_plugins(), argv)
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is caught below
        return code
    except UserError as exc:
        print(f"mcore: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _quiet_after_broken_pipe()


def _dispatch(host: PluginHost, argv: list[str]) -> int:
    """Run the command ``argv`` names; no command at all prints the help (the demo is ``mcore train``)."""
    if argv and argv[0] in host.commands and argv[0] not in BUILTIN_COMMANDS:
        return host.commands[argv[0]].run(argv[1:])
    overrides: list[str] = []
    if argv[:1] == ["config"]:  # argparse would take an override whose value holds a space for the file
        overrides = [a for a in argv[1:] if a.startswith("--") and "." in a.split("=", 1)[0]]
        argv = argv[:1] + [a for a in argv[1:] if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    parser = build_parser(host)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 0
    if args.command == "config":
        return cmd_config(host, args, overrides + rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "plugins":
        return cmd_plugins(host, args)
    return cmd_version(host)


def run_with_user_errors(function: Any, *args: Any) -> int:
    """Run a subcommand body, turning ``UserError`` into its message and exit code 2."""
    try:
        return int(function(*args) or 0)
    except UserError as exc:
        print(f"mcore: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
