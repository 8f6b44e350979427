"""How a run ends when something goes wrong: a diverging lr, a bad-step streak, a stopped rank,
SIGTERM, out of memory; and what it shows and restores on the way (eval loss, environment)."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_train_loop import NaNAt, make_config, make_corpus, merge

import mcore.checkpoint.store as store
from mcore.checkpoint.store import list_checkpoints
from mcore.errors import UserError
from mcore.plugins import hookimpl
from mcore.train import run
from mcore.train.generate import load_for_inference
from mcore.train.hangs import CollectiveTimeout
from mcore.train.health import TrainingHalted
from mcore.train.oom import OutOfMemory
from mcore.train.signals import StopSignal
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import LayoutsPlugin


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin")


class WrappedTiny:
    """A plugin registering ``reference-tiny`` under ``name`` with ``wrap(forward, call)`` around each real forward."""

    MCORE_PLUGIN_API = 1

    def __init__(self, name: str, wrap: Any, *, init: Any = None) -> None:
        self.name, self.wrap, self.init = name, wrap, init

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        wrap, init = self.wrap, self.init

        class Factory(TinyModelFactory):
            @staticmethod
            def build(config: Any, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> Any:
                model = TinyModelFactory.build(config, seed=seed, device=device)
                if str(device) == "meta":  # mcore plan's fake model: left alone
                    return model
                if init is not None:
                    init(model)
                inner, calls = model.forward, [0]

                def forward(tokens: Any, *, labels: Any = None, ctx: Any = None) -> Any:
                    calls[0] += 1
                    wrap(calls[0])
                    return inner(tokens, labels=labels, ctx=ctx)

                model.forward = forward
                return model

        registry.add("model", self.name, Factory)


# -- numerics: a diverging run stops at a checkpoint a sane lr can train on from ---------------


def test_huge_lr_names_a_checkpoint_that_a_sane_lr_trains_on_from(host: Any, corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "r"
    common = {"train": {"steps": 8, "warmup_steps": 0, "nan_policy": "stop"}, "checkpoint": {"every": 1}}
    run(
        make_config(host, out, corpus, merge(common, {"train": {"steps": 4}, "checkpoint": {"save_final": True}})), host
    )
    # lr 1e38: step 5's update makes the weights huge (still finite) and step 6 overflows. The
    # state after step 5 replays step 6 on every resume, whatever the lr: it is not "last good".
    with pytest.raises(TrainingHalted) as info:
        run(make_config(host, out, corpus, merge(common, {"optimizer": {"lr": 1e38}})), host)
    message = str(info.value)
    assert "\n" not in message
    found = re.match(
        r"training stopped at step 6: .* followed by a good step is (\S+); moved step_00000005, which ", message
    )
    assert found is not None, message
    named = Path(found.group(1))
    assert named == out / "checkpoints" / "step_00000004" and message.endswith("and run again; it resumes there")
    model, *_ = load_for_inference(named, host)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (aside,) = (out / "previous").iterdir()  # moved, not deleted
    assert [c.name for c in list_checkpoints(aside / "checkpoints")] == ["step_00000005"]
    # the same command with a sane lr: resumes from the named checkpoint and trains on
    resumed = run(make_config(host, out, corpus, common), host)
    assert resumed.start_step == 4 and resumed.steps_done == 8
    assert all(math.isfinite(loss) for loss in resumed.losses.values())


def test_bad_step_counter_restarts_when_the_settings_change(corpus: str, tmp_path: Path) -> None:
    out, skip_one = tmp_path / "r", {"model": {"name": "nan-tiny"}, "train": {"max_skipped_steps": 1}}
    first = isolated_host("mcore_testing.plugin", NaNAt({5, 6}))  # step 3 is bad (2 micro-batches a step)
    with pytest.warns(RuntimeWarning, match="step 3 skipped"):
        run(
            make_config(first, out, corpus, merge(skip_one, {"checkpoint": {"save_final": True}})),
            first,
            stop_at_step=3,
        )
    shutil.copytree(out, tmp_path / "copy")
    bad_again = isolated_host("mcore_testing.plugin", NaNAt({1, 2}))  # the first step after the resume (4) is bad
    # same settings: the streak of bad steps goes on from the checkpoint (1 + 1 > max_skipped_steps)
    with pytest.raises(TrainingHalted, match="stopped at step 4: 2 bad steps in a row"):
        run(make_config(bad_again, out, corpus, skip_one), bad_again)
    # a lower lr (what the message asks for): counted afresh, so step 4 is skipped and the run goes on
    lower = merge(skip_one, {"optimizer": {"lr": 1e-3}})
    with pytest.warns(RuntimeWarning, match="step 4 skipped"):
        result = run(make_config(bad_again, tmp_path / "copy", corpus, lower), bad_again)
    assert result.start_step == 3 and result.steps_done == 6


def test_a_checkpoint_holding_inf_is_refused_on_resume(
    corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def poison(model: Any) -> None:
        with torch.no_grad():
            model.lm_head.weight[0, 0] = math.inf

    host = isolated_host("mcore_testing.plugin", WrappedTiny("inf-tiny", lambda call: None, init=poison))
    cfg = {"model": {"name": "inf-tiny"}, "train": {"steps": 1}, "checkpoint": {"save_final": True}}
    monkeypatch.setattr(store, "check_finite", lambda *a, **k: None)  # as an mcore that did not check saved it
    with pytest.warns(RuntimeWarning, match="skipped"):
        run(make_config(host, tmp_path / "r", corpus, cfg), host)
    monkeypatch.undo()
    with pytest.raises(UserError, match="holds inf or nan values \\('model/lm_head.weight'\\)"):
        run(make_config(host, tmp_path / "r", corpus, merge(cfg, {"train": {"steps": 2}})), host)


# -- no silent hangs -------------------------------------------------------------------------------

TIMEOUT_S = 3.0
ASLEEP_AT_MOST_S = 30.0  # how long the late rank stays stopped unless released


def _sleep_on_rank_1(root: Path) -> Any:
    def wrap(call: int) -> None:
        if dist.get_rank() == 1 and call == 2:  # the forward of step 2
            (root / "asleep").write_text(str(time.time()))
            deadline = time.time() + ASLEEP_AT_MOST_S
            while not (root / "released").exists() and time.time() < deadline:
                time.sleep(0.05)

    return wrap


def _one_rank_is_late(root: str, corpus: str) -> None:
    # No store address: no heartbeat (test_heartbeat.py covers it), so this is the process group's timeout
    # path, the one a run launched without MASTER_ADDR (an init_method URL) relies on.
    os.environ.pop("MASTER_ADDR")
    root_path = Path(root)
    host = isolated_host(
        "mcore_testing.plugin", LayoutsPlugin(), WrappedTiny("sleepy-tiny", _sleep_on_rank_1(root_path))
    )
    cfg = make_config(
        host,
        root_path / "run",
        corpus,
        {
            "model": {"name": "sleepy-tiny"},
            "parallel": {"layouts": ["test-ddp"], "timeout_s": TIMEOUT_S},
            "train": {"steps": 4},
        },
    )
    with pytest.raises(CollectiveTimeout) as info:
        run(cfg, host)
    if dist.get_rank() == 1:  # woken after rank 0 gave up: its peer is gone or times out in turn
        return
    waited = time.time() - float((root_path / "asleep").read_text())
    (root_path / "released").touch()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"rank 0: gradient sync of step 2 waited more than parallel.timeout_s = {TIMEOUT_S:g} s for the other ranks; "
        "late: rank 1"
    ), message
    # It gave up after the timeout and while rank 1 was still stopped (it sleeps until released or
    # ASLEEP_AT_MOST_S): no tighter wall-clock bound, which a loaded CI machine would break.
    assert TIMEOUT_S <= waited < ASLEEP_AT_MOST_S


def test_a_stopped_rank_ends_the_others_with_a_message_naming_it(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_one_rank_is_late, 2, str(tmp_path), corpus, timeout=90)


# -- SIGTERM ---------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(host: Any, corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "--model.name=reference-tiny",
        "--model.vocab_size=257",
        "--model.hidden_size=32",
        "--model.max_seq_len=32",
        "--optimizer.name=reference-adamw",
        "--optimizer.lr=0.003",
        "--train.steps=100000",
        "--train.seq_len=16",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=4",
        "--train.cpu_threads=1",
        f"--train.out_dir={out}",
        f"--data.source={corpus}",
        "--data.workers=0",
        "--log.progress=lines",
        "--log.every=1",
        "--log.tensorboard=false",
        "--log.plot=false",
    ]
    env = {**os.environ, "MCORE_PLUGINS": "mcore_testing.plugin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcore", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    timer = threading.Timer(120, proc.kill)  # never hang the test suite
    timer.start()
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate()
    finally:
        timer.cancel()
    assert proc.returncode == 0, "".join(seen) + stderr
    lines = stdout.splitlines()
    assert lines[0] == f"starting a fresh run in {out}"
    found = re.search(
        r"^stopped by SIGTERM at step (\d+); checkpoint (\S+); resume with the same command$", stdout, re.M
    )
    assert found is not None, stdout
    step, checkpoint = int(found.group(1)), Path(found.group(2))
    assert checkpoint == out / "checkpoints" / f"step_{step:08d}" and checkpoint in list_checkpoints(checkpoint.parent)
    resumed = run(make_config(host, out, corpus, {"train": {"steps": step + 2}}), host)
    assert resumed.start_step == step and resumed.steps_done == step + 2


def test_stop_signal_handler_is_scoped_and_a_second_signal_is_fatal() -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while stop.requested is None and time.time() < deadline:
                time.sleep(0.01)
            assert stop.requested == "SIGTERM"
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the next one ends the process
        assert signal.getsignal(signal.SIGTERM) is mine
        installed: list[Any] = []

        def elsewhere() -> None:
            with StopSignal():
                installed.append(signal.getsignal(signal.SIGTERM))

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        assert installed == [mine]  # off the main thread nothing is installed
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- out of memory, eval loss, environment ------------------------------------------------------


def _oom_at_step_2(call: int) -> None:
    if call == 3:  # 2 micro-batches per step
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
            "1.02 GiB is free. Of the allocated memory 70.00 GiB is allocated by PyTorch"
        )


def test_out_of_memory_is_one_line_with_what_to_change(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", WrappedTiny("oom-tiny", _oom_at_step_2))
    with pytest.raises(OutOfMemory) as info:
        run(make_config(host, tmp_path / "r", corpus, {"model": {"name": "oom-tiny"}}), host)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("out of memory in step 2: the device could not allocate 2.00 GiB; ")
    assert "train.micro_batch_size (now 4)" in message and "train.recompute" in message and "fsdp" in message
    assert re.search(r"`mcore plan` estimates a peak of \d+\.\d+ [MG]iB per rank for this run$", message), message


def test_eval_loss_is_shown(host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {"train": {"steps": 2, "eval_every": 2}, "log": {"progress": "lines", "every": 1}}
    result = run(make_config(host, tmp_path / "r", corpus, cfg), host)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert "eval" not in lines[0]
    assert f"eval loss {result.eval_losses[2]:.4f}" in lines[1]


def test_deterministic_mode_restores_the_environment(
    host: Any, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run(make_config(host, tmp_path / "r", corpus, {"train": {"steps": 1, "deterministic": True}}), host)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
