"""Run a test module's Triton kernels on the CPU, in Triton's interpreter, in a child process.

Why it exists: ``TRITON_INTERPRET=1`` must be set before Triton is first imported, and a test session may have
imported it already; so each package's CPU tests of its kernels run an entry function of the test module in a
fresh interpreter (CUDA hidden) that prints one JSON line per case, and the tests assert on those records. Every
package wrote the same child-process fixture; this is that fixture once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def interpreted_lines(
    test_file: str | Path, entry: str = "interpreted_main", timeout: float = 300.0, *, bounds_check: bool = True
) -> list[Any]:
    """The JSON lines ``entry()`` of the module ``test_file`` prints when run under ``TRITON_INTERPRET=1`` with
    CUDA hidden and one CPU thread; ``AssertionError`` with the end of its stderr if the child fails.
    ``bounds_check``: every masked load and store is checked against the launch's tensor arguments
    (``mcore_testing.interpreter_bounds``); off only for kernels that reach tensors through pointer tables."""
    here = Path(test_file).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH", "")]))
    check = "from mcore_testing.interpreter_bounds import install; install(); " if bounds_check else ""
    script = f"import torch; torch.set_num_threads(1); {check}import {Path(test_file).stem} as t; t.{entry}()"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=here
    )
    if done.returncode != 0:
        raise AssertionError(f"{Path(test_file).name}:{entry} failed in the interpreter:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def interpreted_records(
    test_file: str | Path, entry: str = "interpreted_main", timeout: float = 300.0, *, bounds_check: bool = True
) -> dict[str, dict[str, Any]]:
    """``interpreted_lines`` keyed by each record's ``"name"``."""
    return {r["name"]: r for r in interpreted_lines(test_file, entry, timeout, bounds_check=bounds_check)}
