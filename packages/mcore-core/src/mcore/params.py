"""Declared parameter roles and fused layouts: what each parameter of a model *is*.

Optimizers (Muon orthogonalises matrices, not embeddings or the head), precision recipes
(embedding, head and router stay in high precision), tensor-parallel plans and muP all need
to know which parameter is the head, an embedding, an expert, or a fused ``[q | k | v]``.
Guessing that from names (``lm_head|output``) silently misses a model that says ``head``, so
models and blocks declare it here, and consumers read the declaration.

Declaring: any module (a block or a whole model) may define::

    def param_specs(self) -> Mapping[str, ParamSpec]:
        return {"qkv.weight": ParamSpec("matrix", splits=(("q", 512), ("k", 128), ("v", 128)), head_rows=64)}

keyed by the names of parameters under that module, relative to it (``"weight"``,
``"qkv.weight"``). Declare only what the module itself creates (its own parameters and those
of plain children such as an ``nn.Linear``), so the names stay right when layouts or recompute
transform other parts of the model.

Reading: ``collect_param_specs(model)`` gives every parameter's spec by its fully qualified
name, as ``model.named_parameters()`` spells it (a tied parameter appears once, under that
name). It walks ``named_modules()``: a declaration of an outer module overrides one of an
inner module; parameters nobody declares get a role from their structure (the weight of an
``nn.Embedding``: ``embedding``; 0-D and 1-D: ``bias`` when the name ends in ``bias``, else
``norm``; anything else: ``matrix``). Layouts that keep module paths and the module's class
(``fully_shard`` of torch and of mcore-fsdp swap a module's class for a subclass and its
parameters for ``DTensor``s of the same global shape) keep the declarations valid.
``apply_role_overrides(specs, {regex: role})`` applies a user's overrides.

Roles (``ROLES``):

* ``embedding``: looked-up rows (token, position embeddings);
* ``head``: the output projection to the vocabulary (a tied head is the embedding: one parameter);
* ``matrix``: a hidden weight matrix (attention and MLP projections);
* ``norm`` / ``bias``: scales of norms, biases;
* ``expert``: the weights of MoE experts (with 3+ dims, dim 0 indexes the experts);
* ``router``: the weights that score experts (kept in high precision).

Fused layouts: ``splits`` says how a parameter's matrix rows split into logical matrices, in
order: ``(("q", 512), ("k", 128), ("v", 128))`` for a fused QKV weight laid out
``[all Q | K | V]`` (its bias splits the same way). ``head_rows`` is the number of rows per
attention head inside each logical matrix (or inside the whole matrix, without splits). The
rows are dim 0, or dim 1 for an ``expert`` parameter with 3+ dims (dim 0 indexes the experts;
see ``matrix_shape``).

Initial values: ``init`` declares how a parameter is initialised, as an ``Init``
(``Init("normal", std=0.02)``, ``Init("trunc_normal", std=0.02, a=-0.04, b=0.04)``,
``Init("uniform", a=-k, b=k)``, ``Init("zeros")``, ``Init("ones")``, ``Init("constant", value=0.5)``).
``mcore.construct`` reads it to fill each rank's own part of every parameter with values drawn by
``mcore.init_rng`` (keyed by the seed and the parameter's name), so a model built on the meta
device and sharded by layouts gets the same weights for every layout and world size.

Tensor parallelism: ``tp`` declares how a ``tp`` layout splits the parameter over its ranks
(``TP_STYLES``), so the layout reads a declaration instead of matching module classes, and a
third-party block declares its own:

* ``column``: dim 0 (output features) split evenly, in whole heads when ``head_rows`` is declared
  (a rank holds whole heads; key/value projections with fewer heads than ranks are replicated
  over the ranks that share a head); with ``splits``, each logical matrix is split alike. The
  block's forward sees its rows and produces its slice of the outputs (heads counted with ``-1``).
  A column-parallel weight's bias is ``column`` too.
* ``row``: dim 1 (input features) split; the block's output is a partial sum the layout reduces.
  Its bias is ``replicate`` (added once, after the reduction).
* ``vocab``: an embedding's or output head's rows (the vocabulary) split; lookups and the loss
  combine over the ranks (vocab-parallel embedding and cross-entropy).
* ``replicate``: whole on every rank (norm scales, biases after a reduction, MLA's latent
  down-projections); its gradient is whole and the same on every rank.
* ``partial``: whole on every rank, but each rank's gradient is a part of the true one (it acts
  on the rank's heads only: a QK-norm scale): the layout sums the gradients over its ranks.

Undeclared (``None``): ``tp_style`` answers by role (embedding and head ``vocab``; norm and bias
``replicate``); a matrix without a declaration is the layout's error, not a guess.

This module imports no torch at import time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "INIT_KINDS",
    "ROLES",
    "TP_STYLES",
    "Init",
    "ParamSpec",
    "apply_role_overrides",
    "check_param_specs",
    "check_spec_shape",
    "collect_param_specs",
    "logical_blocks",
    "matrix_shape",
    "structural_spec",
    "tp_style",
]

#: Every role a parameter may have.
ROLES: tuple[str, ...] = ("embedding", "head", "matrix", "norm", "bias", "expert", "router")


#: How tensor parallelism may split a parameter (``ParamSpec.tp``; module docstring).
TP_STYLES: tuple[str, ...] = ("column", "row", "vocab", "replicate", "partial")

#: Every way an ``Init`` may initialise a parameter.
INIT_KINDS: tuple[str, ...] = ("normal", "trunc_normal", "uniform", "zeros", "ones", "constant")

#: The fields each kind takes (others must stay ``None``).
_INIT_FIELDS: dict[str, tuple[str, ...]] = {
    "normal": ("mean", "std"),
    "trunc_normal": ("mean", "std", "a", "b"),
    "uniform": ("a", "b"),
    "zeros": (),
    "ones": (),
    "constant": ("value",),
}


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Init: {name} = {value!r}; allowed: a finite number")
    return float(value)


@dataclass(frozen=True, slots=True)
class Init:
    """How one parameter is initialised (the distribution, not the values: those come from the seed).

    * ``normal``: N(``mean``, ``std``**2), ``mean`` 0 unless given, ``std`` required;
    * ``trunc_normal``: the normal truncated to ``[a, b]``: absolute bounds, as
      ``torch.nn.init.trunc_normal_`` (default ``-2``, ``2``);
    * ``uniform``: U[``a``, ``b``) (default ``0``, ``1``);
    * ``zeros``, ``ones``; ``constant``: every element ``value``.

    A field that the kind does not take, a missing ``std`` or ``value``, a ``std <= 0`` or bounds
    with ``a >= b`` is a ``ValueError`` naming it.
    """

    kind: str
    std: float | None = None
    mean: float | None = None
    a: float | None = None
    b: float | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ValueError(f"Init: kind = {self.kind!r}; allowed: {', '.join(INIT_KINDS)}")
        takes = _INIT_FIELDS[self.kind]
        for name in ("std", "mean", "a", "b", "value"):
            value = getattr(self, name)
            if value is None:
                continue
            if name not in takes:
                allowed = ", ".join(takes) or "no fields"
                raise ValueError(f"Init({self.kind!r}) does not take {name} = {value!r}; allowed: {allowed}")
            _finite(name, value)
        if self.kind in ("normal", "trunc_normal") and (self.std is None or not self.std > 0):
            raise ValueError(f"Init({self.kind!r}): std = {self.std!r}; allowed: a finite number > 0")
        if self.kind == "constant" and self.value is None:
            raise ValueError("Init('constant'): value = None; allowed: a finite number")
        if self.kind in ("uniform", "trunc_normal"):
            a, b = self.bounds
            if not a < b:
                raise ValueError(f"Init({self.kind!r}): a = {a!r}, b = {b!r}; allowed: a < b")

    @property
    def bounds(self) -> tuple[float, float]:
        """``(a, b)`` with the kind's defaults filled in (uniform ``0, 1``; trunc_normal ``-2, 2``)."""
        low, high = (0.0, 1.0) if self.kind == "uniform" else (-2.0, 2.0)
        return (low if self.a is None else float(self.a), high if self.b is None else float(self.b))


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """What one parameter is: its ``role`` and, for a fused weight, how its rows split.

    ``splits``: ``(name, rows)`` pairs, in row order; the rows sum to the parameter's matrix rows.
    ``head_rows``: rows per attention head inside each logical matrix (for optimizers that treat
    heads separately); it divides every split's rows (or the matrix rows, without splits).
    Construction checks what can be checked without the parameter (``ValueError``);
    ``check_param_specs`` checks the rest against the parameter's shape.
    ``init``: how the parameter is initialised (``Init``); ``None``: the owning module's
    ``reset_parameters(generator)`` does it (possible only while the parameter is whole).
    ``tp``: how tensor parallelism splits it (``TP_STYLES``; ``None``: by role, ``tp_style``).
    """

    role: str
    splits: tuple[tuple[str, int], ...] = ()
    head_rows: int | None = None
    init: Init | None = None
    tp: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role = {self.role!r} is not a parameter role; allowed: {', '.join(ROLES)}")
        if self.tp is not None and self.tp not in TP_STYLES:
            raise ValueError(f"tp = {self.tp!r}; allowed: {', '.join(TP_STYLES)} or None")
        if self.init is not None and not isinstance(self.init, Init):
            raise ValueError(f"init = {self.init!r}; allowed: an mcore.params.Init or None")
        names = [name for name, _ in self.splits]
        for name, rows in self.splits:
            if not isinstance(name, str) or not name:
                raise ValueError(f"splits = {self.splits!r}: a split name must be a non-empty string")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ValueError(f"splits = {self.splits!r}: split {name!r} has {rows!r} rows; allowed: a positive int")
        if len(set(names)) != len(names):
            raise ValueError(f"splits = {self.splits!r}: split names must be distinct")
        if self.head_rows is not None:
            if isinstance(self.head_rows, bool) or not isinstance(self.head_rows, int) or self.head_rows < 1:
                raise ValueError(f"head_rows = {self.head_rows!r}; allowed: a positive int or None")
            bad = [name for name, rows in self.splits if rows % self.head_rows]
            if bad:
                raise ValueError(f"head_rows = {self.head_rows} does not divide the rows of split {bad[0]!r}")


def matrix_shape(shape: Iterable[int], role: str) -> tuple[int, int, int]:
    """``(count, rows, cols)``: the parameter seen as ``count`` stacked matrices of ``rows x cols``.

    An ``expert`` parameter with 3+ dims is one matrix per expert (dim 0); every other parameter
    is one matrix whose rows are dim 0 and whose columns are the other dims flattened (a bias:
    one column; a 0-D parameter: ``(1, 1, 1)``).
    """
    shape = tuple(shape)
    if not shape:
        return 1, 1, 1
    if role == "expert" and len(shape) >= 3:
        return shape[0], shape[1], math.prod(shape[2:])
    return 1, shape[0], math.prod(shape[1:])


def logical_blocks(spec: ParamSpec, rows: int, *, by_head: bool = False) -> list[tuple[str, int, int]]:
    """``(name, first_row, rows)`` of each logical matrix in a matrix of ``rows`` rows, in order.

    Without splits the whole matrix is one block named ``""``; with ``by_head`` each block with
    ``head_rows`` is cut further into heads (named ``"q.0"``, ``"q.1"``, ...).
    """
    splits = spec.splits or (("", rows),)
    out = []
    first = 0
    for name, count in splits:
        if by_head and spec.head_rows is not None and count % spec.head_rows == 0:
            for h in range(count // spec.head_rows):
                label = f"{name}.{h}" if name else str(h)
                out.append((label, first + h * spec.head_rows, spec.head_rows))
        else:
            out.append((name, first, count))
        first += count
    return out


def tp_style(spec: ParamSpec) -> str | None:
    """How tensor parallelism splits a parameter: its declared ``tp``, else by role (embedding and
    head ``vocab``, norm and bias ``replicate``), else ``None`` (undeclared matrices, experts, routers)."""
    if spec.tp is not None:
        return spec.tp
    return {"embedding": "vocab", "head": "vocab", "norm": "replicate", "bias": "replicate"}.get(spec.role)


def structural_spec(name: str, param: object, embeddings: set[int]) -> ParamSpec:
    """The role of an undeclared parameter, from its structure (see the module docstring)."""
    if id(param) in embeddings:
        return ParamSpec("embedding")
    if getattr(param, "ndim", 2) <= 1:
        return ParamSpec("bias" if name.endswith("bias") else "norm")
    return ParamSpec("matrix")


def _declarations(model: nn.Module) -> Iterator[tuple[str, nn.Module, Mapping[str, ParamSpec]]]:
    for prefix, module in model.named_modules():
        declare = getattr(module, "param_specs", None)
        if callable(declare):
            specs = declare()
            if not isinstance(specs, Mapping):
                raise TypeError(
                    f"{type(module).__name__}.param_specs() returned {type(specs).__name__}; expected a mapping"
                )
            yield prefix, module, specs


def collect_param_specs(model: nn.Module) -> dict[str, ParamSpec]:
    """Every parameter's ``ParamSpec``, keyed like ``model.named_parameters()``, in its order.

    Declarations come from the ``param_specs()`` of ``model`` and of every module under it; an
    outer module's declaration wins over an inner one's; a declared name that
    ``model.named_parameters()`` does not yield (a tied duplicate, an absent optional bias) is
    ignored. Undeclared parameters get a role from their structure.
    """
    from torch import nn

    named = dict(model.named_parameters())
    declared: dict[str, ParamSpec] = {}
    for prefix, _, specs in _declarations(model):  # parents come before their children
        for key, spec in specs.items():
            full = f"{prefix}.{key}" if prefix else key
            if full in named and full not in declared:
                if not isinstance(spec, ParamSpec):
                    raise TypeError(f"param_specs() of {prefix or 'the model'!r} gives {key!r} a {type(spec).__name__}")
                declared[full] = spec
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: declared.get(name) or structural_spec(name, p, embeddings) for name, p in named.items()}


def check_param_specs(model: nn.Module) -> dict[str, ParamSpec]:
    """``collect_param_specs``, strictly: every declared name is a parameter of the module that
    declares it, and every split fits its parameter's shape. Raises ``ValueError`` naming the
    first problem (for conformance tests and model authors; training uses the lenient form)."""
    for prefix, module, specs in _declarations(model):
        own = {name for name, _ in module.named_parameters(remove_duplicate=False)}
        where = f"{type(module).__name__}.param_specs()" + (f" (at {prefix!r})" if prefix else "")
        for key, spec in specs.items():
            if key not in own:
                raise ValueError(f"{where} declares {key!r}, which is not one of its parameters: {sorted(own)}")
            if not isinstance(spec, ParamSpec):
                raise ValueError(f"{where} gives {key!r} a {type(spec).__name__}; expected a ParamSpec")
    specs = collect_param_specs(model)
    params = dict(model.named_parameters())
    for name, spec in specs.items():
        check_spec_shape(name, spec, tuple(params[name].shape))
    return specs


def check_spec_shape(name: str, spec: ParamSpec, shape: tuple[int, ...]) -> None:
    """``ValueError`` naming parameter ``name`` unless ``spec``'s splits, head rows and tp style fit ``shape``."""
    if spec.tp in ("row", "vocab") and len(shape) < 2:
        raise ValueError(
            f"{name!r}: tp = {spec.tp!r} splits dim {1 if spec.tp == 'row' else 0} of a matrix, but its shape is {list(shape)}"
        )
    if spec.tp == "column" and len(shape) < 1:
        raise ValueError(f"{name!r}: tp = 'column' splits rows, but the parameter is 0-D")
    if not (spec.splits or spec.head_rows):
        return
    if not shape:
        raise ValueError(f"{name!r} is 0-D: splits and head_rows need a parameter with rows")
    _, rows, _ = matrix_shape(shape, spec.role)
    if spec.splits and sum(r for _, r in spec.splits) != rows:
        raise ValueError(
            f"{name!r}: splits {spec.splits!r} sum to {sum(r for _, r in spec.splits)} rows, "
            f"but the parameter has {rows} (shape {list(shape)})"
        )
    if spec.head_rows and not spec.splits and rows % spec.head_rows:
        raise ValueError(f"{name!r}: head_rows = {spec.head_rows} does not divide its {rows} rows")


def apply_role_overrides(specs: Mapping[str, ParamSpec], overrides: Mapping[str, str]) -> dict[str, ParamSpec]:
    """``specs`` with the role of every parameter whose name matches a pattern replaced.

    ``overrides`` maps a regular expression (``re.search`` on the fully qualified parameter
    name) to a role; the first matching pattern, in the order given, wins. Splits are kept. A
    bad pattern or an unknown role is a ``ValueError`` naming it.
    """
    compiled = []
    for pattern, role in overrides.items():
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"role_overrides: {pattern!r} is not a valid regular expression: {exc}") from None
        if role not in ROLES:
            raise ValueError(f"role_overrides: {pattern!r} = {role!r} is not a role; allowed: {', '.join(ROLES)}")
        compiled.append((regex, role))
    out = dict(specs)
    for name, spec in specs.items():
        for regex, role in compiled:
            if regex.search(name):
                if role != spec.role:
                    out[name] = replace(spec, role=role)
                break
    return out
