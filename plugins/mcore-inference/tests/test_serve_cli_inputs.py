"""``mcore serve`` options a careless user gets wrong are one line and exit code 2, before the model loads; the files
it reads beside a tokenizer stay in its directory.

Found by trying them: ``--shutdown-timeout nan`` served, then ended in a traceback at shutdown; ``--host`` naming no
address loaded the model, logged uvicorn's error and exited 0; a busy port failed only after the model loaded; an
empty ``--api-key`` (an unset variable) let any request sending ``Authorization: Bearer`` in. The tokenizer's
``tokenizer_config.json`` (its chat template) was read through links out of its directory, and a JSON array there
was a traceback.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from mcore_inference.server.chat_template import tokenizer_template
from mcore_inference.server.cli import check_bind, main

from mcore.errors import UserError


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcore: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shutdown-timeout", "nan"], "--shutdown-timeout nan: must be a finite number of seconds >= 0"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout -1.0: must be a finite number of seconds >= 0"),
        (["--lockstep-timeout", "0"], "--lockstep-timeout 0.0: must be a finite number of seconds > 0"),
        (["--lockstep-timeout", "inf"], "--lockstep-timeout inf: must be a finite number of seconds > 0"),
        (["--api-key", ""], "--api-key '': must be non-empty without spaces"),
        (["--api-key", "two words"], "--api-key 'two words': must be non-empty without spaces"),
        (["--host", "no-such-host.invalid"], "--host no-such-host.invalid --port 8000: cannot listen there"),
        (["--max-model-len", "-1"], "--max-model-len -1: must be >= 1"),
        (["--num-blocks", "0"], "--num-blocks 0: must be >= 1"),
        (["--max-num-seqs", "0"], "--max-num-seqs 0: must be >= 1"),
        (["--max-body-bytes", "-1"], "--max-body-bytes -1: must be >= 1"),
        (["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction 1.5: must be in (0, 1]"),
        (["--gpu-memory-fraction", "nan"], "--gpu-memory-fraction nan: must be in (0, 1]"),
        (["--body-timeout", "0"], "--body-timeout 0.0: must be a finite number of seconds > 0"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/nowhere`` is never read: each refusal comes first."""
    assert message in one_line_error(capsys, main(["/nowhere", *args]))


def test_a_busy_port_is_named() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"--host 127.0.0.1 --port {port}: cannot listen there"):
            check_bind("127.0.0.1", port)
    check_bind("127.0.0.1", 0)  # any free port


class _Tokenizer:
    def __init__(self, path: Path) -> None:
        self.path = path


def test_a_malformed_tokenizer_config_gives_no_template(tmp_path: Path) -> None:
    """A JSON array was an ``AttributeError`` at start; nested past the recursion limit, a ``RecursionError``."""
    (tmp_path / "tokenizer.json").write_text("{}")
    for text in ("[1, 2]", "[" * 100_000 + "]" * 100_000, '{"chat_template": 5}'):
        (tmp_path / "tokenizer_config.json").write_text(text)
        assert tokenizer_template(_Tokenizer(tmp_path / "tokenizer.json")) is None


def test_a_tokenizer_config_linked_from_outside_is_never_read(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    (tmp_path / "elsewhere.json").write_text('{"chat_template": "{{ secret }}"}')
    (model / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="outside the model directory"):
        tokenizer_template(_Tokenizer(model / "tokenizer.json"))


def test_a_chat_template_that_is_not_utf8_text_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A binary ``--chat-template`` was a ``UnicodeDecodeError`` traceback (found by trying it)."""
    binary = tmp_path / "template.bin"
    binary.write_bytes(b"\xff\xfe\x00{{ x }}\x80")
    err = one_line_error(capsys, main(["/nowhere", "--chat-template", str(binary), "--port", "0"]))
    assert f"--chat-template {str(binary)!r}: cannot read it as UTF-8 text" in err


def test_a_kv_cache_larger_than_the_device_is_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    """``--num-blocks 10**12`` was a ``MemoryError`` with an empty message."""
    from mcore_inference.cache import PagedKVCache

    from mcore.protocols.block import AttentionCacheSpec

    specs = {0: AttentionCacheSpec(kv_heads=8, head_dim=128, value_dim=128, dtype=torch.float32)}
    with pytest.raises(UserError, match=r"PagedKVCache num_blocks = 1000000000000: [0-9,.]+ GiB of cache, more than"):
        PagedKVCache(specs, num_blocks=10**12, block_size=16, device="cpu")
    assert PagedKVCache(specs, num_blocks=4, block_size=16, device="cpu").num_blocks == 4
