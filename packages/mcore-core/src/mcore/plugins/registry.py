"""The registry of implementations: (kind, name) -> lazy reference, with its provenance.

Lookups that fail explain themselves: an unknown name lists what exists (with the
distribution and version providing each) and the nearest match; a name registered by two
distributions names both and how to choose.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcore.errors import DuplicateNameError, UnknownNameError, UserError

#: Kinds of implementation, and what each is. Registering another kind is an error.
KINDS: Mapping[str, str] = {
    "layout": "parallel layout (ParallelLayout)",
    "dispatcher": "MoE token dispatcher (TokenDispatcher)",
    "optimizer": "optimizer factory (OptimizerFactory)",
    "precision": "precision recipe (PrecisionRecipe)",
    "block": "model block (ModelBlock)",
    "attention": "attention kernel behind attention blocks (AttentionBackend)",
    "model": "model (ModelFactory)",
    "preset": "model preset (mcore.presets.Preset)",
    "hf": "Hugging Face model family, named by its model_type (mcore.hf.HFFamily)",
    "router": "MoE router",
    "lr_schedule": "learning-rate schedule",
    "data_source": "training data source",
    "engine": "inference engine behind `mcore generate` (GenerationEngine)",
}


@dataclass(frozen=True)
class Source:
    """Where an implementation comes from: a distribution and its version (or how it was added)."""

    distribution: str
    version: str
    plugin: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


@dataclass
class Implementation:
    """One registered implementation; ``load()`` imports it on first use."""

    kind: str
    name: str
    ref: Any
    source: Source
    summary: str = ""
    _loaded: Any = field(default=None, repr=False)

    @property
    def ref_text(self) -> str:
        if isinstance(self.ref, str):
            return self.ref
        return f"{getattr(self.ref, '__module__', '?')}:{getattr(self.ref, '__qualname__', repr(self.ref))}"

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = resolve_ref(self.ref) if isinstance(self.ref, str) else self.ref
        return self._loaded


def resolve_ref(ref: str) -> Any:
    """Import ``"package.module:attr.path"`` and return the object."""
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reference {ref!r} must look like 'package.module:attribute'")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def _parse_preferences(text: str) -> dict[tuple[str, str], str]:
    """``"layout:fsdp=mcore-fsdp,precision:fp8=acme"`` -> ``{("layout", "fsdp"): "mcore-fsdp", ...}``."""
    prefs: dict[tuple[str, str], str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, dist = item.partition("=")
        kind, colon, name = key.partition(":")
        if not (eq and colon and kind and name and dist):
            raise UserError(
                f"MCORE_PREFER entry {item!r} is malformed; write 'kind:name=distribution', "
                "e.g. 'layout:fsdp=mcore-fsdp'"
            )
        prefs[(kind.strip(), name.strip())] = dist.strip()
    return prefs


class Registry:
    """All registered implementations, by kind and name.

    Duplicates do not fail registration (one plugin must not break another); looking the
    name up does, unless ``prefer`` (from ``MCORE_PREFER``) names the distribution to use.
    """

    def __init__(self, prefer: str = "") -> None:
        self._entries: dict[tuple[str, str], list[Implementation]] = {}
        self._prefer = _parse_preferences(prefer)

    # -- registration -------------------------------------------------------------------
    def add(self, kind: str, name: str, ref: Any, *, source: Source, summary: str = "") -> None:
        if kind not in KINDS:
            nearest = difflib.get_close_matches(kind, list(KINDS), n=1)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
            raise UserError(f"unknown implementation kind {kind!r}; allowed kinds: {', '.join(KINDS)}{hint}")
        if not isinstance(name, str) or not name or name != name.strip():
            raise UserError(f"implementation name {name!r} for kind {kind!r} must be a non-empty string")
        if isinstance(ref, str) and ":" not in ref:
            raise UserError(f"reference {ref!r} for {kind} {name!r} must look like 'package.module:attribute'")
        entries = self._entries.setdefault((kind, name), [])
        if any(e.source.distribution == source.distribution for e in entries):
            raise UserError(f"{kind} {name!r} is registered twice by {source}")
        entries.append(Implementation(kind, name, ref, source, summary))

    def remove_source(self, plugin: str) -> None:
        """Drop everything one plugin registered (used when its hook fails midway)."""
        for key in list(self._entries):
            kept = [e for e in self._entries[key] if e.source.plugin != plugin]
            if kept:
                self._entries[key] = kept
            else:
                del self._entries[key]

    # -- lookup ---------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self._entries if k == kind)

    def __iter__(self) -> Iterator[Implementation]:
        for key in sorted(self._entries):
            yield from self._entries[key]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def get(self, kind: str, name: str) -> Implementation:
        """The implementation of ``kind`` named ``name``, or an error a user can act on."""
        if kind not in KINDS:
            raise UserError(f"unknown implementation kind {kind!r}; allowed kinds: {', '.join(KINDS)}")
        entries = self._entries.get((kind, name))
        if not entries:
            raise UnknownNameError(self._unknown_message(kind, name))
        if len(entries) == 1:
            return entries[0]
        preferred = self._prefer.get((kind, name))
        chosen = [e for e in entries if e.source.distribution == preferred]
        if chosen:
            return chosen[0]
        providers = " and ".join(f"{e.source} ({e.ref_text})" for e in entries)
        first = entries[0].source.distribution
        raise DuplicateNameError(
            f"{kind} {name!r} is registered by two distributions: {providers}. "
            f"Uninstall one, or choose with MCORE_PREFER='{kind}:{name}={first}'"
        )

    def load(self, kind: str, name: str) -> Any:
        return self.get(kind, name).load()

    def _unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        if not available:
            return (
                f"unknown {kind} {name!r}: no {KINDS[kind]} implementations are installed; "
                "install a plugin that provides one and check `mcore plugins`"
            )
        nearest = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
        hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
        listing = ", ".join(f"{n} ({', '.join(str(e.source) for e in self._entries[(kind, n)])})" for n in available)
        return f"unknown {kind} {name!r}{hint}; available {kind} implementations: {listing}"


@dataclass
class ScopedRegistrar:
    """What a plugin's ``mcore_register`` hook receives: ``add`` stamped with the plugin's source."""

    registry: Registry
    source: Source

    def add(self, kind: str, name: str, ref: Any, *, summary: str = "") -> None:
        self.registry.add(kind, name, ref, source=self.source, summary=summary)
