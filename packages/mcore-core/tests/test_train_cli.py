"""The commands: ``mcore train``, ``generate``, ``export``, ``plan``, ``data``, and exit code 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_train_loop import make_corpus

import mcore.plugins
from mcore.cli import main
from mcore.plugins import Source, hookimpl
from mcore_testing.hosts import isolated_host

TOML = """
[model]
name = "reference-tiny"
vocab_size = 257
max_seq_len = 32

[optimizer]
name = "reference-adamw"
lr = 0.003

[train]
steps = 4
seq_len = 16
global_batch_size = 4
micro_batch_size = 4
out_dir = "{out}"
cpu_threads = 1

[data]
source = "{source}"
workers = 0

[log]
progress = "none"
tensorboard = false
"""


class ExportableTiny:
    """``reference-tiny`` with a stand-in ``export_hf`` (the real mappings live in mcore-models)."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        class Factory(TinyModelFactory):
            @staticmethod
            def export_hf(model: Any, config: Any, out_dir: Path) -> None:
                from safetensors.torch import save_file

                save_file(
                    {k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out_dir) / "model.safetensors")
                )
                (Path(out_dir) / "config.json").write_text(json.dumps({"hidden_size": config.hidden_size}))

        registry.add("model", "exportable-tiny", Factory)


class PlainLoopEngine:
    """A ``GenerationEngine`` over the core's plain loop (greedy output must match ``--engine none``)."""

    name = "plain-loop"
    calls: list[dict[str, Any]] = []

    def __init__(self, model: Any, max_model_len: int) -> None:
        self.model, self.max_model_len = model, max_model_len

    serves = True

    @classmethod
    def from_model(cls, model: Any, *, tokenizer: Any, max_model_len: int) -> PlainLoopEngine | None:
        cls.calls.append({"max_model_len": max_model_len})
        return cls(model, max_model_len) if cls.serves else None

    def generate_ids(self, prompts: Any, *, max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        from mcore.train.generate import generate_ids

        out = []
        for prompt in prompts:
            ids = generate_ids(self.model, list(prompt), max_new_tokens=max_new_tokens, context=16, top_k=0)
            out.append(ids[len(prompt) :])
        return out


@pytest.fixture
def cli_host(monkeypatch: pytest.MonkeyPatch) -> Any:
    host = isolated_host("mcore_testing.plugin", ExportableTiny())
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


def test_train_generate_export_plan(
    cli_host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(TOML.format(out=tmp_path / "run", source=corpus))
    assert main(["train", str(run_toml), "--train.steps=3", "--model.name=exportable-tiny"]) == 0
    out = capsys.readouterr().out
    assert "trained steps 1..3" in out and "checkpoint:" in out
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["step"] == 3
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"

    assert main(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert (
        main(["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    )  # run dir: newest
    assert capsys.readouterr().out == first  # greedy is deterministic
    assert (
        main(["generate", str(ckpt), "--prompt", "x", "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "5"])
        == 0
    )

    capsys.readouterr()
    # an installed engine (kind "engine") serves `mcore generate`; `--engine none` keeps the plain loop
    cli_host.registry.add("engine", "plain-loop", PlainLoopEngine, source=Source("test-engine", "0", "test"))
    PlainLoopEngine.calls.clear()
    assert main(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == first and len(PlainLoopEngine.calls) == 1
    assert PlainLoopEngine.calls[0]["max_model_len"] >= 8
    assert main(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "8", "--engine", "none"]) == 0
    assert capsys.readouterr().out == first and len(PlainLoopEngine.calls) == 1
    PlainLoopEngine.serves = False  # an engine that cannot serve the model: the plain loop answers
    assert main(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == first and len(PlainLoopEngine.calls) == 2
    PlainLoopEngine.serves = True
    assert main(["generate", str(ckpt), "--prompt", "def ", "--engine", "plain-lop"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown engine 'plain-lop'" in err and "did you mean 'plain-loop'" in err and "\n" not in err

    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer  # a test dependency (the [test] extra)

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok("def f")["input_ids"] == list(b"def f") and tok.eos_token == "<|endoftext|>"
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not (tmp_path / "hf.tmp").exists()

    assert main(["plan", str(run_toml), "--device-memory-gb=1"]) == 0
    plan = capsys.readouterr().out
    assert "peak" in plan and "fits" in plan and "layers.1" in plan


def test_export_without_mapping_is_an_error(
    cli_host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(TOML.format(out=tmp_path / "run", source=corpus))
    assert main(["train", str(run_toml), "--train.steps=1"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert "has no Hugging Face mapping" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_data_commands(cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(200)))
    assert (
        main(["data", "train-tokenizer", "--source", str(src), "--out", str(tmp_path / "tok"), "--vocab-size", "300"])
        == 0
    )
    tok = tmp_path / "tok" / "tokenizer.json"
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "ds"),
                "--tokenizer",
                str(tok),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["num_docs"] == 200 and index["tokenizer"]["vocab_size"] == 300


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train.stepz=3"], "unknown key 'train.stepz'"),
        (["--data.source=/nonexistent/corpus"], "data.source = '/nonexistent/corpus': no such file or directory"),
        (["--parallel.layouts=single", "--parallel.sizes=dp_shard=2"], "parallel.sizes names dimension 'dp_shard'"),
        (["--data.tokenizer=/nonexistent/tok.json"], "data.tokenizer = '/nonexistent/tok.json': no such file"),
    ],
)
def test_bad_input_exits_2(
    cli_host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(TOML.format(out=tmp_path / "run", source=corpus))
    assert main(["train", str(run_toml), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_generate_bad_checkpoint_exits_2(cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_missing_demo_plugin_names_the_distribution(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host = isolated_host()  # no model plugin at all
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    assert main(["train", "--train.steps=1"]) == 2
    assert "pip install mcore-models" in capsys.readouterr().err
