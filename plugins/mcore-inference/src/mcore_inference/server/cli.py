"""``mcore serve PATH``: load a checkpoint (mcore or Hugging Face directory) and serve it with uvicorn.

Why it exists: the command-line face of ``build_app``. It binds 127.0.0.1 unless ``--host`` says otherwise, and
stops cleanly, exit code 0, on SIGINT or SIGTERM (uvicorn's shutdown: stop accepting, let open responses end within
``--shutdown-timeout`` seconds, then the app's lifespan aborts what still runs and ends the engine).

The engine runs in a process of its own (``--engine-process``, the default: ``engine_process.py``), which loads
the model; ``--no-engine-process`` runs it in a thread of the server process instead. ``--max-waiting N`` refuses
requests (HTTP 429) while N requests wait for a slot.

``--ep N`` serves a model with moe layers over N ranks started by torchrun (``torchrun --nproc-per-node N -m mcore
serve PATH --ep N``): each rank holds ``E / N`` experts, rank 0 serves HTTP and the others follow its steps
(``ep_serve.py``); without ``--ep`` nothing changes (``--seed`` seeds the engine's sampling in either mode).

FastAPI and uvicorn are imported only here and in ``app``: without them ``mcore serve`` says which extra to install.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

from mcore.cli import run_with_user_errors
from mcore.errors import UserError

_MISSING = "mcore serve needs FastAPI and uvicorn: pip install 'mcore-inference[serve]'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcore serve", description="OpenAI-compatible HTTP server over a model")
    parser.add_argument("path", help="an mcore checkpoint or run directory, or a Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    parser.add_argument("--model-name", default=None, help="the model's name in the API (default: PATH's name)")
    parser.add_argument("--max-model-len", type=int, default=None, help="most tokens of prompt plus output")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    parser.add_argument("--gpu-memory-fraction", type=float, default=None, help="of the GPU's memory, for the cache")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most requests decoded together")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on a GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template file")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body")
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a request's body may take to arrive (then 408)"
    )
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds open responses get to end")
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="refuse requests (HTTP 429) while this many wait (default: no limit)",
    )
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine in a process of its own (default), or in a thread of the server (--no-engine-process)",
    )
    parser.add_argument(
        "--overlap-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each CUDA-graph decode step before reading the one before it (host work hidden behind the GPU; "
        "default: on with CUDA graphs and no speculation)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="the engine's sampling seed (default: none; 0 with --ep)"
    )
    parser.add_argument(
        "--ep",
        type=int,
        default=None,
        help="split the moe experts over this many ranks, started by torchrun (--nproc-per-node EP)",
    )
    parser.add_argument(
        "--lockstep-timeout",
        type=float,
        default=300.0,
        help="with --ep: seconds a rank waits for the others (a lost rank fails the server within it)",
    )
    return parser


def _build_llm(path: str, options: dict[str, Any]) -> Any:
    """The engine process's factory (module level: the spawned process imports it by name)."""
    from mcore_inference.llm import LLM

    return LLM(path, **options)


def _serve(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be in [0, 65535]")
    if args.max_waiting is not None and args.max_waiting < 1:
        raise UserError(f"--max-waiting {args.max_waiting}: must be >= 1 (leave it out for no limit)")
    for flag, value in (("--max-model-len", args.max_model_len), ("--num-blocks", args.num_blocks)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1 (leave it out for the default)")
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise UserError(f"--body-timeout {args.body_timeout}: must be a finite number of seconds > 0")
    fraction = args.gpu_memory_fraction
    if fraction is not None and not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise UserError(f"--gpu-memory-fraction {fraction}: must be in (0, 1]")
    if args.api_key is not None and (not args.api_key or any(c.isspace() for c in args.api_key)):
        # an empty key (``--api-key "$KEY"`` with KEY unset) let 'Authorization: Bearer' in; a spaced one matches nothing
        raise UserError(f"--api-key {args.api_key!r}: must be non-empty without spaces (leave it out for no key)")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise UserError(f"--shutdown-timeout {args.shutdown_timeout}: must be a finite number of seconds >= 0")
    if not (math.isfinite(args.lockstep_timeout) and args.lockstep_timeout > 0):
        raise UserError(f"--lockstep-timeout {args.lockstep_timeout}: must be a finite number of seconds > 0")
    if args.ep is not None:  # before the heavy imports: a launch without torchrun fails at once
        from mcore_inference.server.ep_serve import launch_ranks

        launch_ranks(args.ep, os.environ)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(_MISSING) from None
    template = None
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise UserError(f"--chat-template {str(args.chat_template)!r}: no such file")
        try:
            template = args.chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"--chat-template {str(args.chat_template)!r}: cannot read it as UTF-8 text ({exc})"
            ) from None
    from mcore_inference.server.app import build_app
    from mcore_inference.server.engine_process import EngineProcess

    options = {
        "max_model_len": args.max_model_len,
        "num_blocks": args.num_blocks,
        "gpu_memory_fraction": args.gpu_memory_fraction,
        "max_num_seqs": args.max_num_seqs,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "overlap_decode": args.overlap_decode,
    }
    name = args.model_name or Path(args.path).resolve().name
    common: dict[str, Any] = {
        "model_name": name,
        "api_key": args.api_key,
        "max_body_bytes": args.max_body_bytes,
        "body_timeout": args.body_timeout,
    }
    if args.ep is not None:
        from mcore_inference.server.ep_serve import serve_ep

        return serve_ep(args, options, common, template)
    check_bind(args.host, args.port)  # before the model loads: a busy port or an unknown host fails at once
    if args.engine_process is None or args.engine_process:
        engine = EngineProcess(
            functools.partial(_build_llm, args.path, options),
            max_waiting=args.max_waiting,
            stop_timeout=args.shutdown_timeout,
        )
        app = build_app(engine, chat_template=template, **common)
    else:
        app = build_app(_build_llm(args.path, options), chat_template=template, max_waiting=args.max_waiting, **common)
    run_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    return 0


def check_bind(host: str, port: int) -> None:
    """A ``UserError`` naming ``host:port`` unless a listening socket can be bound there now (as uvicorn binds it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:  # socket.gaierror included: a host name that does not resolve
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def run_server(app: Any, *, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until SIGINT or SIGTERM: stop accepting, give open responses ``shutdown_timeout``
    seconds, then the app's lifespan ends the engine (its process too); returns normally."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=cast(Any, shutdown_timeout)
    )  # a float works
    _quiet_exit_server()(config).run()


def _quiet_exit_server() -> Any:
    """uvicorn's ``Server``, ending with exit code 0 after a graceful SIGINT/SIGTERM shutdown (uvicorn re-raises the
    signal once shut down, so the process would die of it); a second SIGINT still forces the exit."""

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:  # type: ignore[has-type]  # uvicorn absent in lint
                self.force_exit = True
            else:
                self.should_exit = True

    return Server


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_serve, list(sys.argv[1:] if argv is None else argv))
