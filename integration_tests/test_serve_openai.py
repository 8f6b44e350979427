"""``mcore serve`` on a real model directory (mcore-models' tiny ``gpt`` exported for Hugging Face, byte tokenizer), driven by the official
``openai`` client: the CLI starts on 127.0.0.1, the answers (completions and chat, streamed and not) equal the
offline ``LLM``'s greedy output, the API key is enforced, ``/metrics`` counts the tokens, and SIGTERM ends the
server cleanly (exit 0), its engine process too; with the engine in its own process (the default) and in a thread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.chat_template import default_render

from mcore_testing import procs


def _hf_directory(root: Path) -> Path:
    """A tiny ``gpt`` (llama-shaped) exported as a Hugging Face directory, with the byte tokenizer's files."""
    from mcore.data.tokenizer import ByteTokenizer
    from mcore_models.gpt import GPT, GPTConfig
    from mcore_models.hf import export_hf

    base = {"vocab_size": 257, "hidden_size": 32, "num_layers": 2, "swiglu": {"ffn_hidden_size": 48}}
    cfg = GPTConfig.from_values(
        {**base, "attention": {"num_heads": 4, "num_kv_heads": 2}, "max_position_embeddings": 64}
    )
    export_hf(GPT.build(cfg, seed=3, device="cpu").eval(), cfg, root / "hf")
    ByteTokenizer().save(root / "hf")
    return root / "hf"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize("mode", ["--engine-process", "--no-engine-process"])
def test_mcore_serve_answers_like_llm_and_stops_on_sigterm(tmp_path: Path, mode: str) -> None:
    run = _hf_directory(tmp_path)
    llm = LLM(run, num_blocks=32, block_size=8, device="cpu")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    chat_prompt = default_render([{"role": "user", "content": "def f():"}])
    want_completion, want_chat = (o.text for o in llm.generate(["def f():", chat_prompt], greedy))
    del llm

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")} | {"OMP_NUM_THREADS": "1"}
    args = ["serve", str(run), "--port", str(port), "--api-key", "k3y", "--model-name", "tiny", "--device", "cpu",
            "--num-blocks", "32", mode]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "mcore", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mcore serve exited: {proc.communicate()[1][-2000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mcore serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0, timeout=60)
        extra: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="def f():", **extra).choices[0].text == want_completion
        stream = client.completions.create(model="tiny", prompt="def f():", stream=True, **extra)
        assert "".join(c.choices[0].text for c in stream) == want_completion
        messages: list[Any] = [{"role": "user", "content": "def f():"}]
        chat = client.chat.completions.create(model="tiny", messages=messages, **extra)
        assert chat.choices[0].message.content == want_chat
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'mcore:generation_tokens_total{model_name="tiny"} 18' in metrics  # 3 answers of 6 tokens
        assert 'mcore:request_success_total{model_name="tiny",finished_reason="length"} 3' in metrics
        children = procs.children(proc.pid)
        assert len(children) >= (1 if mode == "--engine-process" else 0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert "Traceback" not in err
        deadline = time.monotonic() + 10
        while any(procs.alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(procs.alive(p) for p in children), "a process of the server outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
