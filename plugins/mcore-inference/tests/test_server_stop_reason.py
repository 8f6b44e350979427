"""``stop_reason`` in completion and chat choices, as vLLM gives it: the stop string that matched, or the stop token
id; None for the end-of-document token and the length limit. Streamed (on the chunk with the ``finish_reason``)
and not, with the engine in a thread and in its own process; and ``EngineCore`` on its own for the EOS case."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.engine_core import EngineCore, OutputDelta
from server_helpers import GREEDY, MAX_LEN, MODEL, MODES, live_server, make_app, reference, reference_ids
from toy_model import ToyLM

from mcore.data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module", params=MODES)
def client(request: pytest.FixtureRequest) -> Iterator[openai.OpenAI]:
    with live_server(make_app(request.param)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _first_new_char(text: str) -> tuple[int, str]:
    """An index > 0 whose character appears there first (a stop string that cuts the text at that index)."""
    return next((i, c) for i, c in enumerate(text) if i > 0 and c != "\ufffd" and text.index(c) == i)


def _extra(choice: Any) -> Any:
    return (choice.model_extra or {})["stop_reason"]


def _stream(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[Any], list[Any]]:
    """Streamed completion: its text, its finish reasons and the stop reasons of the chunks that finish."""
    chunks = list(client.completions.create(model=MODEL, stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks)
    finishes = [c.choices[0] for c in chunks if c.choices[0].finish_reason is not None]
    assert all(_extra(c.choices[0]) is None for c in chunks if c.choices[0].finish_reason is None)
    return text, [c.finish_reason for c in finishes], [_extra(c) for c in finishes]


def test_stop_string(client: openai.OpenAI) -> None:
    text = reference("stop here", 12)
    index, stop = _first_new_char(text)
    kwargs: dict[str, Any] = {"prompt": "stop here", "max_tokens": 12, "stop": ["never appears", stop], **GREEDY}
    out = client.completions.create(model=MODEL, **kwargs)
    assert (out.choices[0].text, out.choices[0].finish_reason, _extra(out.choices[0])) == (text[:index], "stop", stop)
    assert _stream(client, **kwargs) == (text[:index], ["stop"], [stop])
    kept = kwargs | {"extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}
    out = client.completions.create(model=MODEL, **kept)
    assert (out.choices[0].text, _extra(out.choices[0])) == (text[: index + 1], stop)


def test_stop_token_id_and_length(client: openai.OpenAI) -> None:
    ids = reference_ids("abc", 8)
    at = next(i for i, t in enumerate(ids) if i > 0 and ids.index(t) == i)
    extra = {"ignore_eos": True, "stop_token_ids": [ids[at]]}
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0.0, extra_body=extra)
    choice = out.choices[0]
    assert (choice.finish_reason, _extra(choice)) == ("stop", ids[at])
    assert out.usage is not None and out.usage.completion_tokens == at + 1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          **GREEDY)  # fmt: skip
    assert (chat.choices[0].finish_reason, _extra(chat.choices[0])) == ("length", None)
    assert _stream(client, prompt="abc", max_tokens=3, **GREEDY)[1:] == (["length"], [None])


class _EosAt(ByteTokenizer):
    """The byte tokenizer with a chosen end-of-document id."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id


def test_engine_core_eos_has_no_stop_reason() -> None:
    model = ToyLM(vocab=257, max_len=MAX_LEN).eval()
    (first,) = reference_ids("eos", 1)  # the greedy first token becomes the end of document
    engine = LLMEngine(model, tokenizer=_EosAt(first), block_size=4, num_blocks=64)
    core = EngineCore(engine)
    core.add([7, 8], [(list(b"eos"), SamplingParams(max_tokens=4, temperature=0.0)),
                      (list(b"eos"), SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=(first,)))],
             arrival=0.0)  # fmt: skip
    done: dict[int, OutputDelta] = {}
    while core.has_work():
        done |= {d.request_id: d for d in core.step() if d.finished}
    assert {k: (d.finish_reason, d.stop_reason, d.new_token_ids) for k, d in done.items()} == {
        7: ("stop", None, [first]),  # eos wins over the stop id, as in vLLM
        8: ("stop", None, [first]),
    }
