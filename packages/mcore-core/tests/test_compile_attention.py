"""``train.compile`` (blocks compiled from outside, with recompute) and ``train.attention`` (the
context's attention backend, by registered name) on the one-process run loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from test_train_loop import make_config, make_corpus, merge

from mcore.errors import UserError
from mcore.plugins import hookimpl
from mcore.train import run
from mcore.train.compile import apply_compile
from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyTransformer

CALLS: list[tuple[int, ...]] = []


class RecordingAttention:
    """SDPA causal attention that records the query shapes it is called with."""

    name: ClassVar[str] = "recording"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: Any, scale: float, window: int | None
    ) -> torch.Tensor:
        CALLS.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
        )
        return out.transpose(1, 2)


class AttentionPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("attention", "recording", f"{__name__}:RecordingAttention", summary="tests: records calls")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


def test_compiled_blocks_keep_names_and_match_eager() -> None:
    eager, compiled = TinyTransformer(seed=0), TinyTransformer(seed=0)
    names = [n for n, _ in compiled.named_parameters()]
    assert apply_compile(compiled, "blocks", backend="aot_eager") == len(compiled.layers)
    assert [n for n, _ in compiled.named_parameters()] == names
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    want, got = eager(tokens, labels=tokens), compiled(tokens, labels=tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want.backward()
    got.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_unknown_compile_backend_is_one_line() -> None:
    from mcore.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"train.compile_backend = 'inducter' is not a torch.compile backend; allowed: .*inductor"
    ) as info:
        apply_compile(TinyTransformer(seed=0), "blocks", backend="inducter")
    assert "\n" not in str(info.value)


def test_run_with_compile_and_recompute_matches_eager(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin")
    plain = run(make_config(host, tmp_path / "plain", corpus, {"train": {"steps": 3}}), host)
    update = {"train": {"steps": 3, "compile": "blocks", "compile_backend": "aot_eager", "recompute": "full"}}
    compiled = run(make_config(host, tmp_path / "compiled", corpus, update), host)
    for step in (1, 2, 3):
        assert compiled.losses[step] == pytest.approx(plain.losses[step], rel=1e-5)


def test_attention_by_name_reaches_the_blocks(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", AttentionPlugin())
    base = {"train": {"steps": 2}, "data": {"packing": "concat"}}
    auto = run(make_config(host, tmp_path / "auto", corpus, base), host)
    CALLS.clear()
    named = run(make_config(host, tmp_path / "named", corpus, merge(base, {"train": {"attention": "recording"}})), host)
    assert CALLS and all(shape[1] == 16 for shape in CALLS)  # (B, T, nh, hd) per layer call
    for step in (1, 2):
        assert named.losses[step] == pytest.approx(auto.losses[step], rel=1e-5)
    with pytest.raises(UserError, match="recording") as info:
        run(make_config(host, tmp_path / "bad", corpus, merge(base, {"train": {"attention": "no-such"}})), host)
    assert "\n" not in str(info.value)
