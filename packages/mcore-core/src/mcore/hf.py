"""Hugging Face model families as a registered kind: which plugin reads and writes which ``model_type``.

A family (``llama``, ``qwen2``, ``deepseek_v3``...) is registered under kind ``"hf"`` by the
plugin whose blocks it maps, named by the Hugging Face ``model_type`` it reads, so a MoE or
hybrid plugin brings its own families and the model plugin never imports them. The object
registered implements ``HFFamily``. The core chooses it:

* to import, by ``config.json``'s ``model_type`` (``load_hf``);
* to export, by the model factory's ``hf_family(config)`` (``export_family``).

Everything read from a model directory stays inside it: ``model_file`` refuses absolute names,
``..`` and symbolic links that leave it (a Hugging Face cache snapshot's links into its
repository's ``blobs`` are allowed).

A block that a family does not own (a MoE plugin's ``moe`` in a model plugin's ``deepseek_v3``)
maps its own part of the checkpoint through an ``hf`` class attribute implementing
``HFBlockMapping``; the family finds it with ``block_lookup(name).hf`` on import and
``type(module).hf`` on export, so plugins never import each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mcore.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["HFBlockMapping", "HFFamily", "block_mapping", "export_family", "load_hf", "model_file", "read_hf_config"]


@runtime_checkable
class HFFamily(Protocol):
    """One Hugging Face ``model_type``, mapped to and from an mcore model.

    ``model`` is the registered model it builds (``"gpt"``). ``load(path, device, block_lookup)``
    reads a model directory (``config.json`` + safetensors, every file through ``model_file``) into
    ``(model config, model)``; ``export(model, config, out_dir)`` writes ``config.json`` and the
    weights. Both raise ``UserError``/``ValueError`` naming what does not map; the core turns a
    ``ValueError`` into a one-line ``UserError`` (``load_hf``, ``mcore export``).
    """

    model: str

    def load(self, path: Path, *, device: Any, block_lookup: Any) -> tuple[Any, nn.Module]: ...

    def export(self, model: nn.Module, config: Any, out_dir: Path) -> None: ...


@runtime_checkable
class HFBlockMapping(Protocol):
    """How one block maps to its part of a Hugging Face checkpoint (the ``hf`` attribute of its class).

    The family owns the skeleton (embeddings, attention, norms, which layers hold the block, and the
    module the block sits in, e.g. ``model.layers.3.mlp.``); the block's mapping owns the rest, for
    each ``model_type`` it supports, and raises ``ValueError`` naming the key and value it cannot map:

    * ``config_from_hf(hf, model_type)``: the block's ``Config`` from ``config.json`` (``hf``);
    * ``config_to_hf(config, model_type)``: the ``config.json`` keys that describe the block;
    * ``state_from_hf(take, config, model_type)``: the block's tensors by our names relative to the block
      (``router.weight``), read through ``take(name)``, which pops the Hugging Face tensor ``name``
      relative to the block's module (``gate.weight``) and raises a ``UserError`` naming it when missing;
    * ``state_to_hf(state, config, model_type)``: the Hugging Face tensors relative to the block's
      module, from ``state`` (our names relative to the block, as ``state_dict`` gives them).

    Export then import gives back the same tensors and an equal ``Config``.
    """

    def config_from_hf(self, hf: Mapping[str, Any], model_type: str) -> Any: ...

    def config_to_hf(self, config: Any, model_type: str) -> dict[str, Any]: ...

    def state_from_hf(self, take: Callable[[str], Tensor], config: Any, model_type: str) -> dict[str, Tensor]: ...

    def state_to_hf(self, state: Mapping[str, Tensor], config: Any, model_type: str) -> dict[str, Tensor]: ...


def block_mapping(block_cls: Any, name: str, model_type: str) -> HFBlockMapping:
    """Block ``name``'s ``HFBlockMapping`` (its class's ``hf`` attribute); a ``UserError`` when it has none."""
    mapping = getattr(block_cls, "hf", None)
    if not isinstance(mapping, HFBlockMapping):
        raise UserError(
            f"block {name!r} ({getattr(block_cls, '__qualname__', block_cls)!r}) has no Hugging Face mapping "
            f"(an 'hf' attribute implementing mcore.hf.HFBlockMapping), so model_type {model_type!r} cannot map it"
        )
    return mapping


def _allowed_roots(path: Path) -> list[Path]:
    """Where the files of model directory ``path`` may resolve to: the directory, and for a Hugging Face
    cache snapshot (``.../snapshots/<revision>``, whose files link to ``../../blobs``) that ``blobs``."""
    root = path.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def model_file(path: Path, name: str, *, named_in: str = "") -> Path:
    """``path / name`` resolved, refused (``UserError``) unless it stays inside the model directory ``path``.

    ``name`` may come from files of the model (``model.safetensors.index.json``), which anyone can
    write: absolute paths, ``..`` and symbolic links that leave the directory are refused.
    """
    where = f" (named in {named_in})" if named_in else ""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in relative.parts:
        raise UserError(
            f"{path}: file {name!r}{where} is outside the model directory; only plain file names inside it are allowed"
        )
    resolved = (path / relative).resolve()
    if not any(resolved.is_relative_to(root) for root in _allowed_roots(path)):
        raise UserError(
            f"{path}: {name!r}{where} resolves to {resolved}, outside the model directory (a symbolic link); "
            "copy the file into the directory instead"
        )
    if not resolved.is_file():
        raise UserError(f"{path}: file {name!r}{where} does not exist")
    return resolved  # opened by its resolved path: a link swapped after this check is not followed


def read_hf_config(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict (a one-line ``UserError`` when missing or not a JSON object)."""
    file = model_file(Path(path), "config.json")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: arrays nested too deep
        raise UserError(f"{file}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(value).__name__}")
    _check_field_types(value, file)
    return value


#: ``config.json`` fields every family reads as counts or sizes (an int; ``true`` is not 1) and as real numbers.
_INT_FIELDS = frozenset(
    {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
     "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size", "num_experts",
     "num_local_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts", "sliding_window"}
)  # fmt: skip
_REAL_FIELDS = frozenset({"rope_theta", "rms_norm_eps", "layer_norm_eps", "initializer_range"})


def _check_field_types(config: dict[str, Any], file: Path) -> None:
    """A one-line ``UserError`` naming the field when a well-known size is not an int or a rate not a number."""
    for key, kind, ok in (
        *((k, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)) for k in _INT_FIELDS),
        *((k, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)) for k in _REAL_FIELDS),
    ):
        if key in config and config[key] is not None and not ok(config[key]):
            raise UserError(f"{file}: {key} = {json.dumps(config[key])[:80]}; allowed: {kind}")


def load_hf(path: Path, host: Any, *, device: Any = "cpu") -> tuple[str, Any, nn.Module]:
    """``(model name, model config, model)`` read from Hugging Face directory ``path`` by the family
    registered for its ``model_type``."""
    path = Path(path)
    model_type = read_hf_config(path).get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(
            f"{path}/config.json has no model_type; installed families: {', '.join(host.registry.names('hf'))}"
        )
    family = host.load("hf", model_type)
    try:
        config, model = family.load(path, device=device, block_lookup=lambda name: host.load("block", name))
    except UserError:
        raise
    except ValueError as exc:  # a config.json the family cannot map: one line naming the directory
        raise UserError(f"{path}: {' '.join(str(exc).split())}") from None
    return family.model, config, model


def export_family(factory: Any, model_name: str, config: Any, host: Any) -> Any:
    """The registered family model ``model_name`` exports as (``factory.hf_family(config)``)."""
    choose = getattr(factory, "hf_family", None)
    family_name = choose(config) if callable(choose) else None
    if not family_name:
        raise UserError(
            f"model {model_name!r} has no Hugging Face mapping (its factory names no hf_family); "
            "only models that name one can be exported"
        )
    family = host.load("hf", family_name)
    if getattr(family, "model", None) != model_name:
        raise UserError(
            f"Hugging Face family {family_name!r} maps model {getattr(family, 'model', None)!r}, not {model_name!r}"
        )
    return family
