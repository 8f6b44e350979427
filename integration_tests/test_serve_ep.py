"""``mcore serve PATH --ep 2`` as a user starts it: two real processes with torchrun's environment, CPU and gloo.

A tiny Mixtral (4 experts, top-2, random weights, byte tokenizer) written as a Hugging Face directory by
``transformers``. Under ``python -m torch.distributed.run --nproc-per-node 2`` each rank keeps 2 experts of every
moe block; the official ``openai`` client against rank 0 gets the single-process ``LLM``'s greedy completions
(plain, streamed, chat; ``--engine-process`` is noted as not applying), and SIGTERM to the launcher stops both
ranks (each prints its stop line, which it does only on the way to exit code 0). Ranks started by hand with torchrun's variables (so each exit code is seen): a
follower killed with SIGKILL makes rank 0 exit 1 with a one-line message within seconds; ``--ep`` without
torchrun's environment, with ``WORLD_SIZE != ep``, on a model without moe blocks, and with experts not divisible
by ``ep`` each give one line and exit code 2 (the last two before any process group exists: rank 0 alone).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.chat_template import default_render

from mcore_testing.procs import alive as process_alive
from mcore_testing.procs import children as child_processes

PROMPTS = ("def f(x):", "mixture of experts")
MAX_TOKENS = 6


def _hf_model(root: Path, arch: str, experts: int = 4) -> Path:
    """A tiny ``transformers`` model (``mixtral`` with ``experts`` experts, or ``llama``: no moe) with the byte
    tokenizer's files."""
    import torch
    import transformers

    from mcore.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    common: dict[str, Any] = dict(vocab_size=ByteTokenizer().vocab_size, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
    if arch == "mixtral":
        config: Any = transformers.MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=2)
        model: Any = transformers.MixtralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    out = root / f"{arch}{experts if arch == 'mixtral' else ''}"
    model.save_pretrained(out)
    ByteTokenizer().save(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_ep")
    return {
        "moe": _hf_model(root, "mixtral", 4),
        "moe3": _hf_model(root, "mixtral", 3),
        "dense": _hf_model(root, "llama"),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env | {"OMP_NUM_THREADS": "1"} | {k: str(v) for k, v in extra.items()}


def _serve_args(path: Path, port: int, *more: str) -> list[str]:
    return ["-m", "mcore", "serve", str(path), "--ep", "2", "--port", str(port), "--device", "cpu",
            "--num-blocks", "32", "--model-name", "moe", *more]  # fmt: skip


def _wait_healthy(port: int, procs: list[subprocess.Popen[bytes]], logs: list[Path], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while True:
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, f"a rank exited ({proc.returncode}): {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"mcore serve --ep did not come up: {logs[0].read_text()[-3000:]}"
        time.sleep(0.2)


@contextmanager
def _ranks(
    path: Path, tmp: Path, name: str, *more: str
) -> Iterator[tuple[int, list[subprocess.Popen[bytes]], list[Path]]]:
    """Two ranks started by hand with torchrun's variables (their own exit codes): the HTTP port, the processes,
    their logs (in ``tmp``)."""
    master, port = _free_port(), _free_port()
    procs, logs = [], []
    for rank in (0, 1):
        log = tmp / f"{name}{rank}.log"
        env = _env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=master)
        with log.open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, *_serve_args(path, port, *more)], env=env, stdout=out,
                                          stderr=subprocess.STDOUT))  # fmt: skip
        logs.append(log)
    try:
        yield port, procs, logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the launcher's child processes from /proc")
def test_serve_ep2_under_torchrun_answers_like_one_process_and_stops_on_sigterm(
    models: dict[str, Path], tmp_path: Path
) -> None:
    port, log = _free_port(), tmp_path / "torchrun.log"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), *_serve_args(models["moe"], port), "--engine-process"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(launcher, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        # the single-process reference, while the ranks start
        llm = LLM(models["moe"], num_blocks=32, device="cpu")
        greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        chat_prompt = default_render([{"role": "user", "content": PROMPTS[0]}])
        want = [o.text for o in llm.generate([*PROMPTS, chat_prompt], greedy)]
        del llm
        _wait_healthy(port, [proc], [log])
        ranks = child_processes(proc.pid)
        assert len(ranks) == 2, f"torchrun runs {len(ranks)} processes, not 2"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        extra: dict[str, Any] = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}
        answer = client.completions.create(model="moe", prompt=list(PROMPTS), **extra)
        assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == want[:2]
        stream = client.completions.create(model="moe", prompt=PROMPTS[1], stream=True, **extra)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want[1]
        messages: list[Any] = [{"role": "user", "content": PROMPTS[0]}]
        chat = client.chat.completions.create(model="moe", messages=messages, **extra)
        assert chat.choices[0].message.content == want[2]

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - start
        deadline = time.monotonic() + 10
        while any(process_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(process_alive(p) for p in ranks), "a rank outlived the launcher"
        text = log.read_text()
        for rank, rows in ((0, "0..1"), (1, "2..3")):  # each rank holds half the experts of every moe block
            assert re.search(rf"mcore serve: rank {rank} of 2: \d+ expert tensors sharded, rows {rows} of 4 ", text)
        assert "mcore serve: --engine-process does not apply with --ep: the engine runs in each rank's own" in text
        assert "mcore serve: rank 0 of 2 stopped after" in text, text[-3000:]
        assert "mcore serve: rank 1 of 2 stopped after" in text, text[-3000:]
        assert "mcore: error" not in text, text[-3000:]
        assert took < 30, f"the ranks took {took:.1f} s to stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_ep2_rank0_exits_nonzero_when_a_follower_dies(models: dict[str, Path], tmp_path: Path) -> None:
    with _ranks(models["moe"], tmp_path, "lost", "--lockstep-timeout", "5") as (port, procs, logs):
        _wait_healthy(port, procs, logs)
        procs[1].kill()
        start = time.monotonic()
        assert procs[0].wait(timeout=30) == 1, logs[0].read_text()[-3000:]
        assert time.monotonic() - start < 15
        assert _lines(logs[0])[-1].startswith("mcore: error: --ep 2: rank 0 lost a rank that follows (")


def test_serve_ep_refuses_bad_launches_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    alone = [sys.executable, *_serve_args(models["moe"], _free_port())]
    got = subprocess.run(alone, env=_env(), capture_output=True, text=True, timeout=120)
    assert got.returncode == 2 and got.stderr.strip().splitlines() == [
        "mcore: error: --ep 2: RANK and WORLD_SIZE not set (not started by torchrun); allowed: "
        "torchrun --nproc-per-node 2 -m mcore serve PATH --ep 2"
    ], got.stderr
    got = subprocess.run(alone, env=_env(RANK=0, WORLD_SIZE=1), capture_output=True, text=True, timeout=120)
    assert got.returncode == 2 and got.stderr.strip().splitlines() == [
        "mcore: error: --ep 2 but WORLD_SIZE = 1; allowed: --ep equal to the number of processes "
        "(torchrun --nproc-per-node 2)"
    ], got.stderr
    # checked before any process group exists: rank 0 alone (no peer started) refuses the model
    started = []
    for name, match in (("dense", "has no moe block to split"), ("moe3", "num_experts = 3 is not divisible by")):
        env = _env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
        args = [sys.executable, *_serve_args(models[name], _free_port())]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append((proc, match))  # both at once
    for proc, match in started:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        (line,) = err.strip().splitlines()
        assert line.startswith("mcore: error: --ep 2: ") and match in line, line
