"""mcore-inference's issue-21 benchmarks on CPU: ``bench_speculative.py`` (MTP speculation) and
``bench_moe_decode.py`` (the MoE inference path against the training path inside the engine).

They build mcore-models' and mcore-moe's models, so they live with the integration tests. Smoke runs of
``--quick`` check the rows and the derived numbers (allowed speedup, efficiency, ratios), the held-out prompts,
the one-line refusal of bad arguments, and that the MoE training-path candidate really takes the training path
(the inference path's ``static_moe`` never runs) with the same greedy tokens as the inference path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "plugins" / "mcore-inference" / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    sys.path.insert(0, str(BENCH))  # the scripts import bench_decode from their folder, as when they run
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def spec_bench() -> ModuleType:
    return load("bench_speculative")


@pytest.fixture(scope="module")
def moe_bench() -> ModuleType:
    return load("bench_moe_decode")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_speculative_quick(spec_bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spec.jsonl"
    spec_bench.main(["--quick", "--batches", "1", "--k", "1", "2", "--out", str(out)])
    header, *results = rows(out)
    assert header["config"] and header["date"] and header["torch"] == torch.__version__
    assert not [r for r in results if "error" in r]
    assert sorted((r["temperature"], r["k"]) for r in results) == [(t, k) for t in (0.0, 1.0) for k in (0, 1, 2)]
    for r in results:
        assert r["card"] == "cpu" and r["batch"] == 1 and r["tok_s"] > 0 and r["step_ms"] > 0
        if r["k"] == 0:
            assert "acceptance" not in r
            continue
        assert len(r["acceptance"]) == r["k"] and all(0 <= a <= 1 for a in r["acceptance"])
        assert 0 <= r["mean_accepted"] <= r["k"]
        allowed = (1 + r["mean_accepted"]) / r["step_cost"]
        assert math.isclose(r["allowed_speedup"], allowed, rel_tol=2e-3)
        assert math.isclose(r["efficiency"], r["speedup"] / r["allowed_speedup"], rel_tol=2e-3)
        assert r["draft_ms"] > 0 and r["verify_ms"] is not None
    printed = capsys.readouterr().out
    assert "| model | batch | temp | k |" in printed and printed.count("| tiny+mtp2 (random) | 1 |") == 6


def test_prompts_come_from_the_held_out_tail(spec_bench: ModuleType) -> None:
    from mcore.data.sources import source_files
    from mcore.data.tokenizer import ByteTokenizer

    prompts = spec_bench.held_out_prompts(ByteTokenizer(), 3, 40)
    assert [len(p) for p in prompts] == [40, 40, 40]
    files = source_files("stdlib")
    total = sum(f.stat().st_size for f in files)
    tail, size = [], 0
    for f in reversed(files):  # the last 2% of the corpus's bytes (data.eval_fraction's default)
        if size >= 0.02 * total:
            break
        tail.append(f)
        size += f.stat().st_size
    starts = {bytes(f.read_bytes()[:40]) for f in tail}
    assert all(bytes(p) in starts for p in prompts)


@pytest.mark.parametrize(
    "argv",
    [
        ["--quick", "--k", "0"],
        ["--quick", "--batches", "0"],
        ["--checkpoint", "/tmp", "--output", "1"],
        ["--k", "x"],
        [],
    ],
)
def test_speculative_bad_arguments(spec_bench: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        spec_bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("bench_speculative:")


def test_moe_decode_quick(moe_bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moe.jsonl"
    moe_bench.main(["--quick", "--batches", "2", "--out", str(out)])
    header, *results = rows(out)
    assert header["config"] and header["date"] and header["preset"] == "moe-bench"
    by_name = {r["candidate"]: r for r in results}
    assert set(by_name) == {"engine", "engine-training-moe"}
    assert by_name["engine-training-moe"]["vs_training_moe"] == 1.0
    engine = by_name["engine"]
    assert engine["decode_tok_s"] > 0 and engine["card"] == "cpu"
    want = engine["decode_tok_s"] / by_name["engine-training-moe"]["decode_tok_s"]
    assert math.isclose(engine["vs_training_moe"], want, rel_tol=0.01)
    assert "| moe-bench | 2 | engine |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        moe_bench.main(["--quick", "--batches", "0"])
    assert exit_info.value.code == 2


def test_training_path_candidate_skips_the_inference_path(
    moe_bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``TrainingPath`` no MoE call reaches ``static_moe``, and greedy decoding gives the inference path's
    tokens (both are dropless here); afterwards the blocks' own forward is back."""
    from mcore_inference.llm import LLM
    from mcore_inference.sampling import SamplingParams

    import mcore_moe.block

    model = moe_bench.build_model("moe-bench", moe_bench.QUICK, torch.device("cpu"), torch.float32)
    blocks = moe_bench.moe_blocks(model)
    assert len(blocks) == 2
    calls: list[int] = []
    real = mcore_moe.block.static_moe

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mcore_moe.block, "static_moe", counted)
    llm = LLM(model, num_blocks=16, max_num_seqs=2, max_model_len=32, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 3, 88, 40], [9, 9, 1, 60]]
    inference = [o.token_ids for o in llm.generate(prompts, params)]
    assert calls, "the engine's calls should take the inference path"
    calls.clear()
    with moe_bench.TrainingPath(blocks):
        training = [o.token_ids for o in llm.generate(prompts, params)]
    assert not calls, "the training-path candidate reached the inference path"
    assert training == inference
    assert all("forward" not in vars(b) for b in blocks)
