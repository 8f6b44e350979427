"""Incremental detokenisation: UTF-8 safe deltas, stop strings across tokens, stop tokens, length, flush."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from mcore_inference.detokenize import IncrementalDetokenizer
from mcore_inference.sampling import SamplingParams

from mcore.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, train_bpe

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "naïve café — déjà vu, Ærøskøbing",
    "日本語のテキストと中文文本, 还有한국어 텍스트。",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵 mixed with text",
    "def f(x):\n    return x ** 2  # 平方\n",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A real byte-level BPE trained on a small corpus that holds multi-byte text (so merges split characters)."""
    corpus = [t * 3 for t in TEXTS] + ["stop STOP here END end of story"] * 5
    return train_bpe(iter(corpus), vocab_size=400, out=Path(tmp_path_factory.mktemp("bpe")))


def stream(tokenizer: Tokenizer, ids: list[int], params: SamplingParams, prompt: list[int] | None = None):
    detok = IncrementalDetokenizer(tokenizer, prompt or [], params)
    deltas = []
    for token in ids:
        deltas.append(detok.push(token))
        if detok.finished:
            break
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_deltas_add_up_and_never_hold_a_broken_character(kind: str, text: str, bpe: HFTokenizer) -> None:
    tokenizer: Tokenizer = bpe if kind == "bpe" else ByteTokenizer()
    ids = tokenizer.encode(text).tolist()
    prompt = tokenizer.encode("prompt: 日本").tolist()
    detok, deltas = stream(tokenizer, ids, SamplingParams(max_tokens=1000), prompt)
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.finished and detok.finish_reason is None


def test_a_multi_byte_character_appears_with_its_last_byte() -> None:
    text = "a🙂世"
    detok, deltas = stream(ByteTokenizer(), list(text.encode()), SamplingParams())
    assert deltas == ["a", "", "", "", "🙂", "", "", "世"]


def test_bpe_splits_characters_across_tokens(bpe: HFTokenizer) -> None:
    """Guard for the test above on the real tokenizer: some token of the corpus ends inside a character."""
    ids = bpe.encode(TEXTS[3]).tolist()
    assert any("\ufffd" in bpe.decode(ids[:n]) for n in range(1, len(ids)))


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_stop_string_across_tokens_is_cut_and_never_streamed(kind: str, bpe: HFTokenizer) -> None:
    tokenizer: Tokenizer = bpe if kind == "bpe" else ByteTokenizer()
    ids = tokenizer.encode("go on STOP here and more").tolist()
    detok, deltas = stream(tokenizer, ids, SamplingParams(stop=("STOP",), max_tokens=100))
    assert detok.finished and detok.finish_reason == "stop" and detok.stop_reason == "STOP"
    assert detok.text == "".join(deltas) == "go on "
    assert len(detok.token_ids) < len(ids)  # stopped at the token completing the string
    kept, kept_deltas = stream(
        tokenizer, ids, SamplingParams(stop=("STOP",), include_stop_str_in_output=True, max_tokens=100)
    )
    assert kept.text == "".join(kept_deltas) == "go on STOP"


def test_text_that_may_start_a_stop_string_is_held_back_then_released() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("abc", "xyz")))
    assert [detok.push(b) for b in b"zab"] == ["z", "", ""]  # "ab" could start "abc"
    assert detok.push(ord("a")) == "ab"  # "aba": the first "ab" is not a stop; "a" still may be
    assert detok.push(ord("d")) == "ad"
    assert not detok.finished


def test_the_earliest_stop_string_wins_and_multi_byte_stops_work() -> None:
    ids = list("前言世界 END 你好".encode())
    detok, deltas = stream(ByteTokenizer(), ids, SamplingParams(stop=("END", "世界", "你好")))
    assert detok.stop_reason == "世界" and detok.text == "".join(deltas) == "前言"


def test_stop_tokens_and_eos(bpe: HFTokenizer) -> None:
    ids = bpe.encode("one two").tolist()
    detok, deltas = stream(bpe, [*ids, 7, *ids], SamplingParams(stop_token_ids=(7,)))
    assert detok.finish_reason == "stop" and detok.stop_reason == 7 and detok.text == "one two"
    assert detok.token_ids == [*ids, 7]
    eos, _ = stream(bpe, [*ids, bpe.eos_id, *ids], SamplingParams())
    assert eos.finish_reason == "stop" and eos.stop_reason is None and eos.text == "one two"
    ignored, _ = stream(bpe, [*ids, bpe.eos_id, *ids], SamplingParams(ignore_eos=True, max_tokens=100))
    assert not ignored.finished and ignored.text == "one two<|endoftext|>one two"


def test_length_flushes_held_text_and_incomplete_bytes() -> None:
    tok = ByteTokenizer()
    detok, deltas = stream(tok, list(b"hi xy"), SamplingParams(max_tokens=5, stop=("xyz",)))
    assert deltas[-2:] == ["", "xy"] and detok.finish_reason == "length"  # "x", "xy" held until the end
    cut, deltas = stream(tok, list("ab🙂".encode())[:4], SamplingParams(max_tokens=4))
    assert cut.finish_reason == "length" and "".join(deltas) == "ab\ufffd" == cut.text


def test_flush_on_abort_and_push_after_finish() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], SamplingParams(stop=("xyz",)))
    assert detok.push(ord("x")) == ""
    assert detok.flush() == "x" and detok.finish_reason == "abort"
    with pytest.raises(AssertionError):
        detok.push(ord("y"))


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_random_texts_and_stop_strings_match_the_whole_text_decoded(kind: str, bpe: HFTokenizer) -> None:
    tokenizer: Tokenizer = bpe if kind == "bpe" else ByteTokenizer()
    rng = random.Random(0)
    alphabet = list("ab STOPé世界🙂👩\u200d👧\n")
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        start = rng.randrange(len(text))
        stops = (text[start : start + rng.randint(1, 4)], rng.choice(["OP", "界🙂", "zz"]))
        include = rng.random() < 0.5
        params = SamplingParams(stop=stops, include_stop_str_in_output=include, max_tokens=1000)
        detok, deltas = stream(tokenizer, tokenizer.encode(text).tolist(), params)
        hits = [(i, len(s)) for s in stops if (i := text.find(s)) >= 0]
        index, length = min(hits)
        assert detok.finished and detok.stop_reason in stops
        assert "".join(deltas) == detok.text == text[: index + length if include else index], (text, stops)
        assert not any("\ufffd" in d for d in deltas)
