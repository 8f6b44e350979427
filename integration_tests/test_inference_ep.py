"""Integration: expert-parallel serving (``ep2``) of a ``gpt`` with ``moe`` layers through ``LockstepEngine``.

Two gloo ranks each hold the dense weights and half the experts (mcore-moe's ``ep`` layout, ``allgatherv``);
each runs an ``LLMEngine`` (mcore-inference) over the same requests: rank 0 adds and aborts, rank 1
``follow()``s, and every moe block all-gathers the step's tokens over both. Checked, in one spawned group
(fp32, CPU): greedy tokens on rank 0, for ragged prompts arriving at different steps with chunked prefill, equal
the single-process full forward's argmax (eagerly and through the static decode path); rank 1 replays every step
with the same outputs (the records' digests) and request ids; an abort on rank 0 frees the blocks on both ranks
at the next step; the follower returns at the stop record with every block free; sampling (temperature 1, the
engine's seeded generator) draws the same tokens on both ranks, and a follower that draws others raises; a
follower whose leader goes silent fails at the group's timeout instead of hanging; bad setups are refused in one
line. Over HTTP: rank 0 serves ``/v1/completions`` with ``build_app`` over its ``LockstepEngine`` while rank 1
follows; the server's shutdown stops the follower.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
import torch
import torch.distributed as dist
import uvicorn
from engine_helpers import greedy_reference, run_arrivals
from mcore_inference.engine import LLMEngine
from mcore_inference.lockstep import LockstepDiverged, LockstepEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.app import build_app
from torch.distributed.device_mesh import init_device_mesh

from mcore.data.tokenizer import ByteTokenizer
from mcore.errors import UserError
from mcore.mesh import ParallelMesh
from mcore_models.gpt import GPT, GPTConfig
from mcore_moe.ep import EPLayout
from mcore_testing.dist import run_distributed
from mcore_testing.hosts import isolated_host

VOCAB = 64
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
PROMPTS = (7, 19, 1, 12, 4)  # lengths; arriving before steps ARRIVE
ARRIVE = (0, 0, 1, 3, 3)
ENGINE: dict[str, Any] = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 9, "seed": 0}


def _config(vocab: int = VOCAB) -> GPTConfig:
    """Dense attention/swiglu, then attention/moe: 8 experts (4 a rank), top-2, a shared expert."""
    moe = {"num_experts": 8, "top_k": 2, "moe_ffn_hidden_size": 16, "num_shared_experts": 1}
    return GPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_layers=2,
        layers=["attention/swiglu", "attention/moe"],
        max_position_embeddings=128,
        blocks={"attention": {"num_heads": 4, "num_kv_heads": 2}, "swiglu": {"ffn_hidden_size": 48}, "moe": moe},
    )


def _lookup(name: str) -> Any:
    return isolated_host("mcore_models.plugin", "mcore_moe.plugin").load("block", name)


def _full_model(vocab: int = VOCAB) -> torch.nn.Module:
    return GPT.build(_config(vocab), seed=3, block_lookup=_lookup).eval()


def _ep_model(mesh: ParallelMesh, vocab: int = VOCAB, device: str = "cpu", dtype: Any = None) -> torch.nn.Module:
    """The same weights, the experts split over ``ep`` (this rank keeps 4 of 8)."""
    whole = _full_model(vocab).to(device=device, dtype=dtype)
    model: Any = EPLayout(EPLayout.Config(dispatcher="allgatherv")).apply(whole, mesh)
    experts = model.layers[1].mlp.experts
    assert experts.gate.to_local().shape[0] == 4, "the ep layout did not split the experts"
    return model


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _lead(lock: LockstepEngine, prompts: list[list[int]], arrive: tuple[int, ...]) -> list[list[int]]:
    """Rank 0: add prompt ``i`` before step ``arrive[i]``, step until all finished; each prompt's output tokens
    (the blocks are checked on every rank by the callers)."""
    return run_arrivals(lock, prompts, arrive, GREEDY, check_free=False)


def _free_blocks(engine: LLMEngine, group: Any) -> list[int]:
    """Every rank's free blocks (a collective)."""
    mine = torch.tensor([engine.cache.num_free_blocks()])
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t) for t in out]


def _greedy_case(mesh: ParallelMesh, group: Any, want: list[list[int]], static: bool) -> None:
    """Ragged arrivals, prefill chunked to 9 tokens: rank 0's tokens are the full forward's argmax; rank 1 runs
    the same steps (a divergence raises in ``follow``); every block is free afterwards on both ranks."""
    kwargs = dict(ENGINE)
    if static:
        kwargs |= {"static_decode": True, "graph_batch_sizes": (1, 2, 4)}
    engine = LLMEngine(_ep_model(mesh), lockstep_group=group, **kwargs)
    lock = LockstepEngine(engine)
    if lock.is_leader:
        with lock:
            got = _lead(lock, _prompts(1, PROMPTS), ARRIVE)
        assert got == want, f"static {static}: ep2 served {got}, the full forward's argmax is {want}"
    else:
        assert lock.follow() > 0 and lock.stopped
    steps = torch.tensor([lock.lockstep_steps])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)
    assert lock.lockstep_steps == int(steps), "the ranks ran different numbers of steps"
    assert engine.cache.all_free(), "blocks or slots held after every request finished"
    if static:
        assert engine.decoder is not None and engine.decoder.num_static >= 3, "no static decode step ran"


def _abort_case(mesh: ParallelMesh, group: Any) -> None:
    """Rank 0 aborts a decoding request and a waiting one; rank 1 aborts them before the next step: both free
    the same blocks at once, the rest finish with the same outputs, and a stop with a pending abort is replayed."""
    engine = LLMEngine(_ep_model(mesh), lockstep_group=group, **(ENGINE | {"max_num_seqs": 2}))
    lock = LockstepEngine(engine)
    free = engine.cache.num_free_blocks()
    if lock.is_leader:
        long, short, queued = _prompts(2, (17, 3, 6))
        a = lock.add_request(long, GREEDY)
        b = lock.add_request(short, GREEDY)
        c = lock.add_request(queued, GREEDY)  # waits: two sequences at most
        for _ in range(4):  # prefill of 17 + 3 at 9 tokens a step, then decodes
            lock.step()
        assert {s.seq_id for s in engine.scheduler.running} == {a, b}
        held = engine.cache.num_free_blocks()
        aborted = lock.abort(a)
        assert aborted is not None and aborted.finish_reason == "abort" and aborted.token_ids
        assert lock.abort(c) is not None and lock.abort(12345) is None
        assert engine.cache.num_free_blocks() > held, "the abort freed no block on rank 0"
        lock.step()  # rank 1 aborts both before this step
    else:
        lock.follow(max_steps=5)
    after = _free_blocks(engine, group)
    assert after[0] == after[1], f"free blocks differ after the abort: {after}"
    assert not any(s.seq_id in (0, 2) for s in [*engine.scheduler.running, *engine.scheduler.waiting])
    if lock.is_leader:
        while lock.has_unfinished():
            lock.step()
        d = lock.add_request(_prompts(3, (5,))[0], GREEDY)
        lock.abort(d)  # sent with the stop record
        lock.stop()
    else:
        lock.follow()
    assert engine.cache.all_free() and engine.cache.num_free_blocks() == free
    assert not engine.has_unfinished()


def _sampled_case(mesh: ParallelMesh, group: Any) -> None:
    """Temperature 1 without per-request seeds: both ranks draw from the engine's generator (the same seed), so
    rank 1 replays rank 0's tokens (a different draw would raise in ``follow``)."""
    engine = LLMEngine(_ep_model(mesh), lockstep_group=group, **ENGINE)
    lock = LockstepEngine(engine)
    if lock.is_leader:
        params = SamplingParams(max_tokens=6, temperature=1.0)
        with lock:
            ids = [lock.add_request(p, params) for p in _prompts(4, (3, 11, 6))]
            lengths: dict[int, int] = {}
            while lock.has_unfinished():
                lengths |= {o.request_id: len(o.token_ids) for o in lock.step()}
        assert lengths == dict.fromkeys(ids, 6)
    else:
        lock.follow()
    assert engine.cache.all_free()


def _divergence_case(mesh: ParallelMesh, group: Any) -> None:
    """A follower whose draws differ (its generator reseeded behind the engine's back) raises ``LockstepDiverged``
    at the next record instead of serving other tokens."""
    engine = LLMEngine(_ep_model(mesh), lockstep_group=group, **ENGINE)
    lock = LockstepEngine(engine)
    if lock.is_leader:
        params = SamplingParams(max_tokens=1, temperature=1.0)
        for p in _prompts(5, (4, 6, 2, 5)):
            lock.add_request(p, params)
        lock.step()  # one prefill step: every request samples its one token and finishes
        lock.stop()
    else:
        engine.sampler.seed = 1  # the generator is made on first use
        with pytest.raises(LockstepDiverged, match=r"rank 1 after step 1 differs from the leader"):
            lock.follow()


def _refusals(mesh: ParallelMesh, group: Any) -> None:
    """One line each: a sharded model without a group; a group but no seed; engines configured differently."""
    model = _ep_model(mesh)
    with pytest.raises(UserError, match=r"parameter '.*experts.*' is sharded over 2 ranks .* give lockstep_group"):
        LLMEngine(model, block_size=4, num_blocks=16)
    with pytest.raises(UserError, match=r"the engine has no lockstep_group"):
        LockstepEngine(LLMEngine(_full_model(), block_size=4, num_blocks=16))
    with pytest.raises(UserError, match=r"seed is None .* allowed: LLMEngine\(seed=<int>\)"):
        LockstepEngine(LLMEngine(model, block_size=4, num_blocks=16, lockstep_group=group))
    blocks = 16 + dist.get_rank(group)
    with pytest.raises(UserError, match=r"engine num_blocks = 17 on rank 1 but 16 on rank 0"):
        LockstepEngine(LLMEngine(model, block_size=4, num_blocks=blocks, seed=0, lockstep_group=group))
    lock = LockstepEngine(LLMEngine(model, block_size=4, num_blocks=16, seed=0, lockstep_group=group))
    call = lock.follow if lock.is_leader else lock.step
    with pytest.raises(RuntimeError, match=r"the leader \(group rank 0\)"):
        call()
    lock.stop() if lock.is_leader else lock.follow()


def _silent_leader(group: Any) -> None:
    """A follower whose leader sends nothing fails at the group's timeout (2 s here), not never."""
    short = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    lock = LockstepEngine(LLMEngine(_full_model(), block_size=4, num_blocks=16, seed=0, lockstep_group=short))
    if not lock.is_leader:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"(?i)timed out|timeout"):
            lock.follow()
        assert time.monotonic() - start < 30
    dist.barrier(group=group)  # the leader waits here (the short group is not used again)


@contextmanager
def _live_server(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 at a free port, in a thread, until the block ends; its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _http_case(mesh: ParallelMesh, group: Any) -> None:
    """Rank 0 serves ``/v1/completions`` (``build_app`` over its ``LockstepEngine``), rank 1 follows: concurrent
    requests and a stream give the full forward's greedy text; idle, the engine thread sends keepalives; the
    server's shutdown sends the stop record, and every block is free on both ranks."""
    tokenizer = ByteTokenizer()
    engine = LLMEngine(_ep_model(mesh, tokenizer.vocab_size), tokenizer=tokenizer, lockstep_group=group, **ENGINE)
    lock = LockstepEngine(engine, keepalive_s=0.3)
    if not lock.is_leader:
        with pytest.raises(UserError, match=r"rank 1 of the lockstep group follows"):
            build_app(lock, model_name="ep")
        lock.follow()
    else:
        full = _full_model(tokenizer.vocab_size)
        texts = ["def f(x):", "mixture of experts", "a"]
        want = [tokenizer.decode(greedy_reference(full, tokenizer.encode(t).tolist(), 6)) for t in texts]
        body: dict[str, Any] = {"model": "ep", "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
        with _live_server(build_app(lock, model_name="ep")) as url, httpx.Client(base_url=url, timeout=60) as http:
            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(lambda t: http.post("/v1/completions", json=body | {"prompt": t}), texts[:2]))
            assert [a.json()["choices"][0]["text"] for a in answers] == want[:2]
            with http.stream("POST", "/v1/completions", json=body | {"prompt": texts[2], "stream": True}) as events:
                chunks = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: {")]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want[2]
            before = lock.lockstep_steps
            time.sleep(1.0)  # idle: keepalive records, no model call
            assert lock.lockstep_steps > before
        assert lock.stopped
    assert engine.cache.all_free()


def _all_cases() -> None:
    torch.set_num_threads(1)
    mesh = ParallelMesh(("ep",), (2,), "cpu", init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)))
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    full = _full_model()
    want = [greedy_reference(full, p, GREEDY.max_tokens) for p in _prompts(1, PROMPTS)]
    _greedy_case(mesh, group, want, static=False)
    _greedy_case(mesh, group, want, static=True)
    _abort_case(mesh, group)
    _sampled_case(mesh, group)
    _divergence_case(mesh, group)
    _refusals(mesh, group)
    _http_case(mesh, group)
    _silent_leader(group)


def test_ep2_lockstep_serving_equals_full_forward_and_follows_aborts() -> None:
    run_distributed(_all_cases, 2, timeout=120)


def _two_gpus() -> None:
    """ep2 over NCCL (the lockstep records over a gloo group), bf16: decode steps captured as CUDA graphs on both
    ranks (each graph holds the moe block's all-gathers) give the tokens of the same static steps run eagerly."""
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    mesh = ParallelMesh(("ep",), (2,), "cuda", init_device_mesh("cuda", (2,), mesh_dim_names=("ep",)))
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=120))
    batch = _prompts(2, (5, 40, 1, 17, 33, 2))
    arrive = (0, 0, 1, 3, 3, 8)
    kwargs: dict[str, Any] = {"block_size": 16, "num_blocks": 64, "max_num_batched_tokens": 64, "seed": 0}
    kwargs |= {"graph_batch_sizes": (1, 2, 4, 8), "lockstep_group": group}
    tokens = {}
    for graphs in (True, False):
        model = _ep_model(mesh, device="cuda", dtype=torch.bfloat16)
        engine = LLMEngine(model, cuda_graphs=graphs, static_decode=not graphs, **kwargs)
        lock = LockstepEngine(engine)
        if lock.is_leader:
            with lock:
                tokens[graphs] = _lead(lock, batch, arrive)
        else:
            lock.follow()
        assert engine.cache.all_free() and engine.decoder is not None and engine.decoder.num_static >= 5
        assert engine.decoder.num_replays >= 5 if graphs else engine.decoder.num_replays == 0
    if rank == 0:
        assert tokens[True] == tokens[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ep2_cuda_graph_tokens_equal_eager_static_tokens_on_two_gpus() -> None:
    run_distributed(_two_gpus, 2, backend="nccl", timeout=300)
