"""Checkpoints that cannot hurt: no code run from a crafted ``.metadata``, no file read outside
the checkpoint directory, corruption caught by checksums, a manifest written last, pruning that
an interruption cannot turn into a "complete" checkpoint, no non-finite state saved, and every
failure a one-line ``UserError`` (also through ``mcore generate`` / ``mcore export``, exit 2).

Checkpoints are written with ``CheckpointManager`` directly (a tiny model, one process), so
each test takes well under a second; one 2-process gloo test covers the collective parts.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_loop import make_config

import mcore.plugins
from mcore.checkpoint.manifest import MANIFEST, read_manifest
from mcore.checkpoint.safe_reader import ALLOWED_GLOBALS, SafeFileSystemReader, unpickle_metadata
from mcore.checkpoint.store import (
    CheckpointManager,
    CheckpointSaveError,
    LegacyCheckpointWarning,
    NonFiniteStateError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
)
from mcore.errors import UserError
from mcore.plugins import hookimpl
from mcore.precision.basic import FP32
from mcore.train.build import build_model
from mcore_testing import distributed
from mcore_testing.hosts import isolated_host

# -- a second optimizer, registered like a plugin's --------------------------------------------


class NamedSGD:
    """SGD with momentum; its state (``momentum`` per parameter) is not AdamW's."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.inner = torch.optim.SGD([p for _, p in self.named], lr=lr, momentum=0.9)
        self.param_groups = self.inner.param_groups
        for group in self.param_groups:
            group["role"] = "all"

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        buf = {n: self.inner.state[p]["momentum_buffer"] for n, p in self.named if p in self.inner.state}
        return {"momentum": buf, "lr": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, p in self.named:
            if name in state_dict["momentum"]:
                self.inner.state[p]["momentum_buffer"] = state_dict["momentum"][name].clone()


class SGDFactory:
    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-2

    def __init__(self, config: SGDFactory.Config | None = None) -> None:
        self.config = config or SGDFactory.Config()

    def build(self, model: torch.nn.Module, *, mesh: Any, layouts: Any) -> NamedSGD:
        return NamedSGD(model, self.config.lr)


class SGDPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("optimizer", "test-sgd", SGDFactory, summary="SGD with momentum, tests")


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin", SGDPlugin())


@dataclass
class Run:
    config: Any
    model: torch.nn.Module
    optimizer: Any
    precision: Any
    root: Path

    def manager(self, **kw: Any) -> CheckpointManager:
        opts: dict[str, Any] = {"keep_last": 10, "async_save": False, "rank": 0, "world_size": 1}
        return CheckpointManager(self.root, **{**opts, **kw})

    def save(self, step: int, manager: CheckpointManager | None = None) -> Path:
        m = manager or self.manager()
        meta = {"config": self.config.to_dict(), "model_name": self.config.model.name, "format": "mcore-checkpoint-1"}
        m.save(step, model=self.model, optimizer=self.optimizer, precision=self.precision, meta=meta, rank_extra={})
        return self.root / f"step_{step:08d}"

    def load(self, path: Path, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return load_checkpoint(path, model=self.model, optimizer=self.optimizer, precision=self.precision, **kw)


def make_run(host: Any, out: Path, optimizer: str = "reference-adamw") -> Run:
    config = make_config(host, out, str(out / "no-data"), {"optimizer": {"name": optimizer, "lr": 1e-2}})
    torch.manual_seed(0)
    model, _ = build_model(config, host, "cpu")
    opt = config.optimizer.instantiate().build(model, mesh=None, layouts=[])
    tokens = torch.randint(0, 257, (2, 8))
    model(tokens, labels=tokens).backward()
    opt.step()  # so the optimizer has state
    return Run(config, model, opt, FP32(), out / "checkpoints")


@pytest.fixture
def run(host: Any, tmp_path: Path) -> Run:
    return make_run(host, tmp_path / "run")


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def distcp(ckpt: Path) -> Path:
    (found,) = ckpt.glob("*.distcp")
    return found


# -- 1. the metadata unpickler ----------------------------------------------------------------


def _str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def call_then(module: str, name: str, arg: str, tail: bytes) -> bytes:
    """A protocol-4 pickle calling ``module.name(arg)``, dropping the result, then unpickling ``tail``
    (real metadata without its PROTO opcode): the object is the real metadata, so it "loads normally"."""
    return b"\x80\x04" + _str(module) + _str(name) + b"\x93" + _str(arg) + b"\x85R0" + tail


def payloads(real: bytes, marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    return {
        "dotted os.system via filesystem": call_then(
            "torch.distributed.checkpoint.filesystem", "os.system", cmd, real[2:]
        ),
        "dotted os.system via metadata": call_then("torch.distributed.checkpoint.metadata", "os.system", cmd, real[2:]),
        "builtins.eval": call_then("builtins", "eval", f"__import__('os').system({cmd!r})", real[2:]),
        "posix.system": call_then("posix", "system", cmd, real[2:]),
        "a __reduce__ class": pickle.dumps(_Evil(cmd)) + real,
    }


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> Any:
        return (os.system, (self.cmd,))


def test_allow_list_is_exact_pairs_found_in_real_checkpoints(run: Run) -> None:
    ckpt = run.save(1)
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(open(ckpt / ".metadata", "rb")).load()  # noqa: SIM115
    assert seen and seen <= ALLOWED_GLOBALS
    assert all("." not in name for _, name in ALLOWED_GLOBALS)  # no dotted lookup is ever allowed
    assert not any(module in ("os", "posix", "builtins", "subprocess") for module, _ in ALLOWED_GLOBALS)


def test_crafted_metadata_never_runs_code(run: Run, tmp_path: Path) -> None:
    ckpt = run.save(1)
    real = (ckpt / ".metadata").read_bytes()
    marker = tmp_path / "pwned"
    make_legacy(ckpt)  # a crafted checkpoint need not carry a manifest (a valid one is checked the same)
    for what, data in payloads(real, marker).items():
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            unpickle_metadata(data)
        assert not marker.exists(), what
        (ckpt / ".metadata").write_bytes(data)
        with pytest.warns(LegacyCheckpointWarning), pytest.raises(UserError, match="not allowed") as exc:
            run.load(ckpt)
        one_line(exc)
        assert not marker.exists(), what
    (ckpt / ".metadata").write_bytes(real)
    assert unpickle_metadata(real).state_dict_metadata  # the genuine file still loads


@pytest.fixture
def cli_host(host: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


@pytest.mark.parametrize("command", ["generate", "export"])
def test_crafted_metadata_through_the_cli_exits_2(
    cli_host: Any, host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from mcore.train import export, generate

    ckpt = make_run(host, tmp_path / "run").save(1)
    marker = tmp_path / "pwned"
    real = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes(payloads(real, marker)["dotted os.system via filesystem"])
    make_legacy(ckpt)
    args = [str(ckpt), "--prompt", "x"] if command == "generate" else [str(ckpt), "--out", str(tmp_path / "hf")]
    with pytest.warns(LegacyCheckpointWarning):
        code = (generate.main if command == "generate" else export.main)(args)
    err = capsys.readouterr().err
    assert code == 2 and "not allowed" in err and "Traceback" not in err
    assert not marker.exists()


# -- 2. confinement ---------------------------------------------------------------------------


def _redirect(ckpt: Path, target: str) -> None:
    """Rewrite the metadata so every tensor is read from ``target``."""
    metadata = SafeFileSystemReader(str(ckpt)).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = target
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_metadata_pointing_outside_the_checkpoint_is_refused(run: Run, tmp_path: Path, how: str) -> None:
    ckpt = run.save(1)
    outside = tmp_path / "outside.distcp"
    shutil.copy(distcp(ckpt), outside)  # a file the loader would happily parse
    _redirect(ckpt, str(outside) if how == "absolute" else "../../../outside.distcp")
    make_legacy(ckpt)  # as an attacker would; with a manifest it is refused as unlisted too
    with pytest.warns(LegacyCheckpointWarning), pytest.raises(UserError, match="outside its directory") as exc:
        run.load(ckpt)
    one_line(exc)


def test_symlink_leading_out_of_the_checkpoint_is_refused(run: Run, tmp_path: Path) -> None:
    ckpt = run.save(1)
    data = distcp(ckpt)
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(data, outside)
    data.symlink_to(outside)  # same bytes, so the checksums would pass
    with pytest.raises(UserError, match="link leading outside") as exc:
        run.load(ckpt)
    one_line(exc)


def test_a_checkpoint_directory_linked_from_elsewhere_is_not_listed(run: Run, tmp_path: Path) -> None:
    """``checkpoints/step_99999999 -> another run's checkpoint``: resume and generate loaded weights from outside the
    run directory (found by trying it); a linked step directory is not one of the run's checkpoints."""
    from mcore.checkpoint.store import latest_checkpoint, list_checkpoints

    ckpt = run.save(1)
    other = tmp_path / "other_run" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copytree(ckpt, other / "step_00000005")
    (ckpt.parent / "step_99999999").symlink_to(other / "step_00000005")
    assert list_checkpoints(ckpt.parent) == [ckpt] and latest_checkpoint(ckpt.parent) == ckpt


def test_metadata_naming_a_file_the_manifest_does_not_list_is_refused(run: Run) -> None:
    ckpt = run.save(1)
    data = distcp(ckpt)
    shutil.copy(data, ckpt / "other.distcp")
    _redirect(ckpt, "other.distcp")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    from mcore.checkpoint.manifest import checksum_files

    manifest["files"][".metadata"]["crc32"] = list(checksum_files(ckpt, [".metadata"])[".metadata"].blocks)
    manifest["files"][".metadata"]["size"] = (ckpt / ".metadata").stat().st_size
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not list") as exc:
        run.load(ckpt)
    one_line(exc)


# -- 3. the manifest, pruning, legacy checkpoints ---------------------------------------------


def test_manifest_lists_every_file_and_is_written_last(run: Run) -> None:
    ckpt = run.save(1)
    manifest = read_manifest(ckpt)
    assert manifest is not None
    on_disk = {p.name for p in ckpt.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk and {".metadata", "meta.json", "rank_00000.json"} <= on_disk
    for name, entry in manifest.files.items():
        assert entry.size == (ckpt / name).stat().st_size
    newest = max((ckpt / n).stat().st_mtime_ns for n in on_disk)
    assert (ckpt / MANIFEST).stat().st_mtime_ns >= newest
    assert read_meta(ckpt)["manifest"] == MANIFEST


def test_only_checkpoints_with_a_manifest_count(run: Run) -> None:
    first, second = run.save(1), run.save(2)
    assert list_checkpoints(run.root) == [first, second]
    (second / MANIFEST).unlink()  # a kill right after pruning deleted the manifest
    assert list_checkpoints(run.root) == [first] and latest_checkpoint(run.root) == first
    with pytest.raises(UserError, match="incomplete: its manifest.json is missing") as exc:
        run.load(second)
    one_line(exc)


def test_kill_during_pruning_leaves_nothing_listed_as_complete(run: Run) -> None:
    first, second, third = run.save(1), run.save(2), run.save(3)
    # a kill mid-prune of step 1: its manifest gone and part of the rest
    (first / MANIFEST).unlink()
    distcp(first).unlink()
    assert list_checkpoints(run.root) == [second, third]
    # a kill after the rename of step 2 (the next prune finishes the job)
    (second / MANIFEST).unlink()
    os.replace(second, second.with_name(second.name + ".deleting"))
    assert list_checkpoints(run.root) == [third]
    run.save(4, run.manager(keep_last=1))
    assert [p.name for p in list_checkpoints(run.root)] == ["step_00000004"]
    assert not list(run.root.glob("*.deleting"))
    assert first.exists()  # pruning only removes checkpoints listed as complete: this one is left to the user


def test_pruning_deletes_the_manifest_first(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    run.save(1)
    seen: list[bool] = []
    real_unlink = Path.unlink

    def spy(path: Path, *args: Any, **kwargs: Any) -> None:
        if path.parent.name == "step_00000001.deleting":
            seen.append((path.parent / MANIFEST).exists())
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", spy)
    run.save(2, run.manager(keep_last=1))
    assert seen and not any(seen)


def test_protected_checkpoints_are_never_pruned(run: Run) -> None:
    resumed_from = run.save(1)
    manager = run.manager(keep_last=1)
    manager.protect.add(resumed_from)
    run.save(2, manager)
    run.save(3, manager)
    assert [p.name for p in list_checkpoints(run.root)] == ["step_00000001", "step_00000003"]


def make_legacy(ckpt: Path) -> None:
    (ckpt / MANIFEST).unlink()
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["manifest"]
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_legacy_checkpoint_is_not_latest_but_loads_by_path_with_a_warning(run: Run) -> None:
    ckpt = run.save(1)
    make_legacy(ckpt)
    assert latest_checkpoint(run.root) is None
    with pytest.warns(LegacyCheckpointWarning, match="no checksums"):
        meta, _ = run.load(ckpt)
    assert meta["step"] == 1


# -- 4. checksums -----------------------------------------------------------------------------


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))


def test_overwritten_bytes_are_caught(run: Run) -> None:
    ckpt = run.save(1)
    _overwrite_middle(distcp(ckpt))
    with pytest.raises(UserError, match=f"{distcp(ckpt).name} does not match its checksum") as exc:
        run.load(ckpt)
    one_line(exc)


def test_truncated_file_is_caught(run: Run) -> None:
    ckpt = run.save(1)
    data = distcp(ckpt)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{data.name} has 100 bytes.*truncated") as exc:
        run.load(ckpt)
    one_line(exc)


def test_zeroed_file_is_caught(run: Run) -> None:
    ckpt = run.save(1)
    data = distcp(ckpt)
    data.write_bytes(bytes(data.stat().st_size))
    with pytest.raises(UserError, match=f"{data.name} does not match its checksum") as exc:
        run.load(ckpt)
    one_line(exc)


def test_missing_rank_json_is_caught(run: Run) -> None:
    ckpt = run.save(1)
    (ckpt / "rank_00000.json").unlink()
    with pytest.raises(UserError, match="rank_00000.json is missing") as exc:
        run.load(ckpt)
    one_line(exc)
    make_legacy(ckpt)  # and without a manifest to say so
    with pytest.warns(LegacyCheckpointWarning), pytest.raises(UserError, match="rank_00000.json is missing") as exc:
        run.load(ckpt)
    one_line(exc)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '"a string"',
        '{"step": "x", "config": {}}',
        "\udcff",
        '{"step": -5, "config": {}}',  # was an IndexError traceback on resume
        '{"step": 1, "config": {"model": "x"}}',  # was an IndexError traceback on resume
    ],
)
def test_malformed_meta_json_is_one_line(run: Run, text: str) -> None:
    ckpt = run.save(1)
    (ckpt / "meta.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match="meta.json") as exc:
        run.load(ckpt)  # its checksum no longer matches
    one_line(exc)
    with pytest.raises(UserError, match="meta.json is (corrupt|malformed)") as exc:
        read_meta(ckpt)  # what generate/export read first
    one_line(exc)


def test_malformed_manifest_is_one_line(run: Run) -> None:
    ckpt = run.save(1)
    (ckpt / MANIFEST).write_text('{"format": "mcore-manifest-1", "files": 3}')
    with pytest.raises(UserError, match="manifest.json is malformed") as exc:
        run.load(ckpt)
    one_line(exc)


def test_dcp_failures_without_checksums_are_one_line(run: Run) -> None:
    ckpt = run.save(1)
    _overwrite_middle(distcp(ckpt))
    data = distcp(ckpt)
    data.write_bytes(data.read_bytes()[:200])
    with pytest.raises(UserError, match="could not be read") as exc:
        run.load(ckpt, verify_checksums=False)
    one_line(exc)


# -- 5. non-finite state ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_state_is_never_saved(run: Run, where: str) -> None:
    manager = run.manager()
    good = run.save(1, manager)
    with torch.no_grad():
        if where == "model":
            run.model.get_parameter("layers.1.mlp.down.weight")[0, 0] = float("nan")
        else:
            state = run.optimizer.inner.state[run.model.get_parameter("embed.weight")]
            state["exp_avg"][3] = float("inf")
    key = "model/layers.1.mlp.down.weight" if where == "model" else "optimizer/state/embed.weight/exp_avg"
    with pytest.raises(NonFiniteStateError, match=f"'{key}' holds inf or nan.*nothing was written") as exc:
        run.save(2, manager)
    one_line(exc)
    assert isinstance(exc.value, UserError)
    assert [p.name for p in run.root.iterdir()] == [good.name] and manager.last_good == good


# -- 6. another optimizer ---------------------------------------------------------------------


def test_resume_with_another_optimizer_is_one_line(host: Any, tmp_path: Path) -> None:
    adamw = make_run(host, tmp_path / "a")
    ckpt = adamw.save(1)
    sgd = make_run(host, tmp_path / "b", optimizer="test-sgd")
    kwargs = {"model": sgd.model, "optimizer": sgd.optimizer, "precision": sgd.precision}
    with pytest.raises(UserError, match="optimizer 'reference-adamw', this run's optimizer is 'test-sgd'") as exc:
        load_checkpoint(ckpt, config=sgd.config.to_dict(), **kwargs)
    assert "--optimizer.name=reference-adamw" in one_line(exc)
    with pytest.raises(UserError, match="'reference-adamw'.*NamedSGD.*KeyError: 'momentum'") as exc:
        load_checkpoint(ckpt, **kwargs)  # without the run's config: the optimizer's class is named
    one_line(exc)
    # and the other way round
    ckpt = sgd.save(1)
    with pytest.raises(UserError, match="optimizer 'test-sgd', this run's optimizer is 'reference-adamw'") as exc:
        load_checkpoint(
            ckpt, model=adamw.model, optimizer=adamw.optimizer, precision=adamw.precision, config=adamw.config.to_dict()
        )
    one_line(exc)


def test_another_precision_recipe_is_one_line(run: Run) -> None:
    class Scaled(FP32):
        name = "scaled"

        def state_dict(self) -> dict[str, Any]:
            return {"scale": torch.tensor(1024.0)}

    run.precision = Scaled()
    ckpt = run.save(1)
    run.precision = FP32()
    with pytest.raises(UserError, match="precision state .*does not load.*keeps no state") as exc:
        run.load(ckpt, config=run.config.to_dict())
    one_line(exc)


# -- 7. permissions, 8. the same step saved again ---------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_checkpoint_files_get_normal_permissions(run: Run, umask_022: None) -> None:
    ckpt = run.save(1)
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    for path in ckpt.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_same_step_replaces_only_a_checkpoint_of_ours(run: Run) -> None:
    first = run.save(3)
    (first / "left-over.txt").write_text("x")
    with pytest.warns(UserWarning, match="left-over.txt, which mcore did not write"):
        again = run.save(3)  # ours: replaced, but a file it did not write is kept beside it
    assert again == first and read_manifest(again) is not None and not (again / "left-over.txt").exists()
    assert (run.root / "step_00000003.kept" / "left-over.txt").read_text() == "x"
    foreign = run.root / "step_00000004"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointSaveError, match="not an mcore checkpoint.*does not replace it") as exc:
        run.save(4)
    one_line(exc)
    assert (foreign / "notes.txt").read_text() == "mine" and not list(run.root.glob("*.tmp"))


# -- the collective parts, on 2 gloo processes ------------------------------------------------


class _StatelessOpt:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state == {}


@distributed(2, timeout=120)
def test_two_ranks_share_verification_and_agree(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    weight = torch.arange(24, dtype=torch.float32).view(6, 4)
    model = torch.nn.Module()
    local = weight.clone() if rank == 1 else weight[:0].clone()  # ragged: rank 1 holds every row
    model.ragged = torch.nn.Parameter(
        DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=weight.shape, stride=weight.stride())
    )
    model.even = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))
    opt, prec = _StatelessOpt(), FP32()
    group = dist.new_group(backend="gloo")
    manager = CheckpointManager(root, keep_last=5, async_save=True, rank=rank, world_size=2, group=group)
    meta = {"config": {"optimizer": {"name": "none"}}}
    manager.save(1, model=model, optimizer=opt, precision=prec, meta=meta, rank_extra={})
    ckpt = manager.wait()
    assert ckpt is not None and read_manifest(ckpt) is not None
    kwargs = {"model": model, "optimizer": opt, "precision": prec, "rank": rank, "world_size": 2, "group": group}
    load_checkpoint(ckpt, **kwargs)
    dist.barrier()
    # a corrupt block checked by one rank only: both ranks raise the same error
    items = sorted(read_manifest(ckpt).files)  # type: ignore[union-attr]
    victim = items[1]  # verified by rank 1 (blocks r::2; one block per file here)
    if rank == 0:
        _overwrite_middle(ckpt / victim)
    dist.barrier()
    with pytest.raises(UserError, match=f"{victim} does not match its checksum"):
        load_checkpoint(ckpt, **kwargs)
    # a non-finite shard on one rank: neither saves
    if rank == 1:
        with torch.no_grad():
            model.ragged.to_local()[2, 1] = float("nan")  # type: ignore[attr-defined]
    with pytest.raises(NonFiniteStateError, match="'model/ragged' holds inf or nan"):
        manager.save(2, model=model, optimizer=opt, precision=prec, meta=meta, rank_extra={})
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001"]
