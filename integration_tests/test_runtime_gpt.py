"""The training runtime with real plugins: gpt (mcore-models), adamw (mcore-optim), fsdp (mcore-fsdp).

* 2-process ``fsdp`` training resumes bit for bit after an interruption, matches the
  single-process run, and its checkpoint reloads under ``single`` on one process;
* a trained checkpoint exports to a directory that Hugging Face ``transformers`` loads
  (model and tokenizer) and whose logits equal ours.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from mcore.config import resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.plugins import load_plugins
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

BASE: dict[str, Any] = {
    "model": {"name": "gpt", "preset": "tiny"},
    "optimizer": {"name": "adamw", "lr": 3e-3},
    "train": {
        "steps": 6,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "warmup_steps": 2,
        "deterministic": True,
        "cpu_threads": 1,
    },
    "data": {"workers": 0},
    "log": {"progress": "none", "tensorboard": False, "plot": False},
    "checkpoint": {"async_save": False, "save_final": True},
}
FSDP = {"parallel": {"layouts": ["fsdp"]}}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config(host: Any, out_dir: Path, corpus: str, *updates: dict[str, Any]) -> Any:
    raw = merge(BASE, {"train": {"out_dir": str(out_dir)}, "data": {"source": corpus}})
    for update in updates:
        raw = merge(raw, update)
    return resolve_config(raw, host)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare(iter_documents("stdlib"), out, tokenizer_spec="byte", workers=0, max_tokens=60_000)
    return str(out)


#: Muon on matrices that fsdp keeps whole on one rank (ragged DTensors through the runtime's
#: checkpoints); Newton-Schulz in fp32 so that one process and two agree to 1e-5
MUON = {"optimizer": {"name": "muon", "lr": 0.01, "ns_dtype": "float32"}}
WHOLE = {"parallel": {"fsdp": {"whole_params": "matrices"}}}


def _fsdp_two_ranks(root: str, corpus: str, extra: dict[str, Any]) -> None:
    host, root_path = load_plugins(env=False, unpackaged=False, strict=True), Path(root)
    full = run(config(host, root_path / "full", corpus, FSDP, extra), host)
    cut = {"train": {"resume": "latest"}, "checkpoint": {"every": 2, "async_save": True, "save_final": False}}
    first = run(config(host, root_path / "cut", corpus, FSDP, extra, cut), host, stop_at_step=3)
    assert first.steps_done == 3
    resumed = run(config(host, root_path / "cut", corpus, FSDP, extra, cut), host)
    assert resumed.start_step == 2
    cont = run(
        config(
            host, root_path / "cont", corpus, FSDP, extra, {"train": {"steps": 8, "resume": str(full.last_checkpoint)}}
        ),
        host,
    )
    if dist.get_rank() == 0:
        payload = {"full": full.losses, "resumed": resumed.losses, "cont": cont.losses}
        (root_path / "losses.json").write_text(json.dumps(payload))


@pytest.mark.parametrize(("extra", "fsdp"), [({}, {}), (MUON, WHOLE)], ids=["adamw", "muon-whole-matrices"])
def test_fsdp_resumes_exactly_matches_single_and_reshards(
    corpus: str, tmp_path: Path, extra: dict[str, Any], fsdp: dict[str, Any]
) -> None:
    run_distributed(_fsdp_two_ranks, 2, str(tmp_path), corpus, merge(extra, fsdp), timeout=400)
    losses = {
        k: {int(s): v for s, v in d.items()} for k, d in json.loads((tmp_path / "losses.json").read_text()).items()
    }
    assert {s: losses["resumed"][s] for s in (3, 4, 5, 6)} == {
        s: losses["full"][s] for s in (3, 4, 5, 6)
    }  # bit for bit
    assert losses["full"][6] < losses["full"][1]

    host = load_plugins(env=False, unpackaged=False, strict=True)
    one = run(config(host, tmp_path / "one", corpus, extra), host)  # layout 'single', same batches
    for step in range(1, 7):
        assert one.losses[step] == pytest.approx(losses["full"][step], rel=1e-5)
    # the 2-process fsdp checkpoint of step 6, resharded onto one process under 'single'
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000006"
    single = run(config(host, tmp_path / "single", corpus, extra, {"train": {"steps": 8, "resume": str(ckpt)}}), host)
    assert single.start_step == 6
    for step in (7, 8):
        assert single.losses[step] == pytest.approx(losses["cont"][step], rel=1e-5)


def test_export_loads_in_transformers_with_equal_logits(corpus: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcore.train.export import export_checkpoint
    from mcore.train.generate import load_for_inference

    host = load_plugins(env=False, unpackaged=False, strict=True)
    result = run(config(host, tmp_path / "run", corpus, {"train": {"steps": 3}}), host)
    assert result.last_checkpoint is not None
    out = export_checkpoint(result.last_checkpoint, tmp_path / "hf", host)

    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ours, tokenizer, _config, _meta = load_for_inference(result.last_checkpoint, host)
    text = "def main(argv):\n    return 0\n"
    ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [int(t) for t in tokenizer.encode(text)]
    with torch.no_grad():
        assert_rel_close(ours.eval()(ids), hf_model(ids).logits, name="exported logits")
