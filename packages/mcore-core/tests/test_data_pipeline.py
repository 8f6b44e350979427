"""Data: tokenizers, sources, memory-mapped shards, packing, and the sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mcore.config.sections import DataConfig, TrainConfig
from mcore.data.packing import RowDataset, pack
from mcore.data.pipeline import build_train_data
from mcore.data.sampler import BlendedSampler
from mcore.data.shards import TokenShards, prepare
from mcore.data.sources import iter_documents, source_files
from mcore.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from mcore.errors import UserError

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld", "class A:\n    pass\n" * 3]


def test_byte_tokenizer_round_trip_and_hf_equivalence(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids.tolist() == list("héllo".encode())
    assert tok.decode(ids) == "héllo"
    tok.save(tmp_path)
    hf = load_tokenizer(tmp_path)  # the saved tokenizer.json is the same tokenizer
    assert hf.encode("héllo\n  x").tolist() == tok.encode("héllo\n  x").tolist()
    assert hf.eos_id == tok.eos_id == 256 and hf.vocab_size == 257


def test_train_bpe_and_load(tmp_path: Path) -> None:
    tok = train_bpe(iter(DOCS * 20), vocab_size=300, out=tmp_path / "tok")
    assert 257 < tok.vocab_size <= 300
    again = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    text = "def f(x): return x"
    assert again.decode(again.encode(text)) == text
    assert len(again.encode(text)) < len(text.encode())  # merges learned


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_sources_text_jsonl_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[1:]) + "\n")
    import pyarrow as pa  # the [parquet] extra; part of the [test] extra
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet doc one", "parquet doc two"]}), tmp_path / "c.parquet")
    docs = list(iter_documents(str(tmp_path)))
    assert docs == [DOCS[0], *DOCS[1:], "parquet doc one", "parquet doc two"]
    assert any(p.name == "os.py" for p in source_files("stdlib"))


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or directory"):
        list(iter_documents(str(tmp_path / "nope")))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="no string field 'text'"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("   \n")
    with pytest.raises(UserError, match="is empty"):
        prepare(iter_documents(str(empty)), tmp_path / "out", tokenizer_spec="byte", workers=0, source=str(empty))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # no temporary sibling left


def test_prepare_with_workers_streams_into_shards(tmp_path: Path) -> None:
    docs = [f"document {i}: " + "x" * (i % 7) for i in range(300)]
    shards = prepare(iter(docs), tmp_path / "ds", tokenizer_spec="byte", workers=2, shard_tokens=2000)
    assert len(shards.shards) > 1
    flat = np.concatenate([np.asarray(s.tokens) for s in shards.shards])
    expected = np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8), 256) for d in docs])
    assert np.array_equal(flat, expected)
    assert shards.num_tokens == len(expected) and shards.index["num_docs"] == 300


def test_corrupt_shards_are_named(tmp_path: Path) -> None:
    prepare(iter(DOCS * 10), tmp_path / "ds", tokenizer_spec="byte", workers=0)
    tokens = tmp_path / "ds" / "tokens_00000.bin"
    data = bytearray(tokens.read_bytes())
    data[3] ^= 0xFF
    tokens.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch.*mcore data prepare"):
        TokenShards.open(tmp_path / "ds")
    tokens.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match="tokens_00000.bin is corrupt"):
        TokenShards.open(tmp_path / "ds")
    (tmp_path / "ds" / "index.json").write_text("{")
    with pytest.raises(UserError, match="index .* is corrupt"):
        TokenShards.open(tmp_path / "ds")


def test_packing_gives_document_offsets_and_positions(tmp_path: Path) -> None:
    shards = prepare(iter(["ab", "cdef", "g"]), tmp_path / "ds", tokenizer_spec="byte", workers=0)
    # stream: a b E c d e f E g E  (E = 256); seq_len 4 -> rows [a b E c d], [d e f E g]
    rows = RowDataset(shards, 4)
    assert len(rows) == 2
    batch = pack([rows.row(0), rows.row(1)], 4, thd=True)
    assert batch.tokens.tolist() == [[97, 98, 256, 99], [100, 101, 102, 256]]
    assert batch.labels.tolist() == [[98, 256, 99, 100], [101, 102, 256, 103]]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 8]  # row 0: "abE" | "c"; row 1: "defE" (continues a doc)
    assert batch.positions.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert batch.max_seqlen == 4


def test_sampler_is_deterministic_disjoint_and_blended() -> None:
    ranks = [BlendedSampler([50, 30], [3, 1], global_batch=8, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(5):
        a, b = ranks[0].local_slots(step), ranks[1].local_slots(step)
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == ranks[0].global_slots(step)
    again = BlendedSampler([50, 30], [3, 1], global_batch=8, seed=1)
    assert again.global_slots(4) == ranks[0].global_slots(4)  # random access = sequential
    picks = [d for s in range(50) for d, _ in again.global_slots(s)]
    assert abs(picks.count(0) / len(picks) - 0.75) < 0.01
    rows0 = [r for s in range(10) for d, r in again.global_slots(s) if d == 0]
    assert sorted(rows0[:50]) == list(range(50))  # an epoch visits each row once


def test_build_train_data_blends_sources_and_holds_out_eval(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a" * 4000)
    (tmp_path / "b.txt").write_text("b" * 4000)
    data = DataConfig(
        source=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", weights=[3, 1], workers=0, cache_dir=tmp_path / "c"
    )
    train = TrainConfig(seq_len=16, global_batch_size=8, micro_batch_size=4, out_dir=tmp_path)
    td = build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=1)
    letters = [chr(int(mb.tokens[r, 1])) for s in range(10) for mb in td.micro_batches(s) for r in range(4)]
    assert 0.7 < letters.count("a") / len(letters) < 0.8
    train_slots = {slot for s in range(40) for slot in td.sampler.global_slots(s)}
    assert train_slots.isdisjoint(td.eval_slots) and td.eval_slots
    with pytest.raises(UserError, match="one weight per source"):
        build_train_data(
            DataConfig(source="x,y", weights=[1.0], workers=0), train, ByteTokenizer(), dp_rank=0, dp_size=1
        )
