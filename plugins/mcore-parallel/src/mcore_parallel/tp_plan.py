"""What the ``tp`` layout does to each module, read from the model's declarations, and checked first.

Why a module of its own: the plan is pure (no process group, no tensor is touched), so every size
that does not divide is refused, naming the value, the dimension and what would work, before
anything is sharded or allocated (on a model built on the meta device: before any weight exists).

The plan reads ``mcore.params.collect_param_specs(model)`` and ``tp_style``, never module classes
beyond the two torch modules whose math tensor parallelism changes (``nn.Linear``, ``nn.Embedding``):

* an ``nn.Linear`` whose weight is ``column``: rows split (``colwise``), in whole heads when
  ``head_rows`` is declared; a key/value projection with fewer heads than ranks (GQA,
  ``kv_heads < tp``) stays whole on every rank and each rank uses the head its query heads read
  (``head_slices``: rank ``r`` uses head ``r * heads // tp``); its bias goes with it;
* an ``nn.Linear`` whose weight is ``row``: columns split (``rowwise``), bias replicated;
* ``vocab``: an ``nn.Embedding``'s rows split with a vocab-parallel lookup (``vocab_embeddings``);
  the output head's rows split (``vocab_shards``) only when the model's loss head can compute a
  vocab-parallel loss (``LossHead.vocab_parallel``); otherwise the head stays whole, and so does a
  tied embedding (a model with no ``head`` parameter uses an embedding as its output weight);
* ``replicate``: whole on every rank (``whole``), as is anything the plan keeps whole;
* role ``expert`` (stacked expert weights ``(E, out, in)``, dim 0 the experts): kept whole by ``tp``
  (expert TP = 1) and left to an expert-parallel layout (``experts``); the module declaring them is an expert
  block (``expert_blocks``): under ``tp`` each rank routes its own share of the tokens through it
  (``tp_experts``). With ``expert_tp`` the declared ``column`` ones split dim 1 and the ``row`` ones dim 2
  over the ranks (``expert_splits``; expert TP = attention TP).

A matrix without a declared style is an error naming it. Fused weights (``splits``) with ``column``
are refused for now (each logical matrix would have to split alike: not one ``Shard(0)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mcore.params import TP_STYLES, ParamSpec, collect_param_specs, tp_style

__all__ = ["TPPlan", "plan_tp"]


@dataclass(kw_only=True)
class TPPlan:
    """Module names (as ``model.named_modules()`` spells them) by treatment, and parameter names kept whole."""

    colwise: list[str] = field(default_factory=list)
    rowwise: list[str] = field(default_factory=list)
    head_slices: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Column linears kept whole: module name -> ``(heads, head_rows)``."""
    vocab_embeddings: list[str] = field(default_factory=list)
    vocab_shards: list[str] = field(default_factory=list)
    """Parameter names split ``Shard(0)`` without changing any forward (the output head's weight)."""
    whole: list[str] = field(default_factory=list)
    """Parameter names that stay plain tensors, whole on every rank."""
    summed: list[str] = field(default_factory=list)
    """Of ``whole``: the ``partial`` ones, whose gradients the layout sums over the group."""
    experts: list[str] = field(default_factory=list)
    """Parameter names of role ``expert``: not split by ``tp`` (an expert-parallel layout may shard them)."""
    expert_splits: dict[str, int] = field(default_factory=dict)
    """With ``expert_tp``: expert parameter name -> the dim split over the ranks (1: ``column``, 2: ``row``)."""
    expert_blocks: list[str] = field(default_factory=list)
    """Modules declaring ``expert`` parameters (outermost): each rank routes its own tokens through them."""


def _divisors(n: int) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    shown = found if len(found) <= 8 else [*found[:7], "...", found[-1]]
    return ", ".join(str(d) for d in shown)


def _check_rows(name: str, count: int, what: str, tp: int) -> None:
    if count % tp:
        raise ValueError(
            f"tp: {name!r} has {count} {what}, which do not split over tp = {tp}; "
            f"allowed: a tp size dividing {count} ({_divisors(count)})"
        )


def _check_bias(name: str, specs: dict[str, ParamSpec], expected: tuple[str, ...]) -> None:
    """A Linear's bias goes with its weight; a bias that declares another style is a contradiction."""
    spec = specs.get(name)
    if spec is not None and spec.tp is not None and spec.tp not in expected:
        raise ValueError(
            f"tp: bias {name!r} declares tp = {spec.tp!r}, but its Linear's weight is split so that the bias is "
            f"{expected[0]!r}; allowed: tp = {' or '.join(repr(e) for e in expected)} or undeclared"
        )


def _undeclared(name: str, spec: ParamSpec) -> ValueError:
    return ValueError(
        f"tp: parameter {name!r} (role {spec.role!r}) declares no tensor-parallel style; declare "
        f"ParamSpec(..., tp=...) in its module's param_specs() (allowed: {', '.join(TP_STYLES)})"
    )


def plan_tp(model: nn.Module, tp: int, *, vocab_parallel_loss: bool, expert_tp: bool = False) -> TPPlan:
    """The plan for ``model`` over ``tp`` ranks (``ValueError`` naming the first problem; nothing touched).

    ``vocab_parallel_loss``: the model's loss head has ``vocab_parallel(group)``, so the output
    weight may be split by rows. ``expert_tp``: split the experts' FFN over the ranks too.
    """
    specs = collect_param_specs(model)
    params = dict(model.named_parameters())
    ids = {id(p): n for n, p in params.items()}
    untied_head = any(spec.role == "head" for spec in specs.values())
    plan = TPPlan()
    handled: set[str] = set()
    modules = [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    modules.sort(key=lambda item: not isinstance(item[1], nn.Embedding))  # a tied weight is planned as its embedding
    for path, module in modules:
        wname = ids.get(id(module.weight))
        if wname is None or wname in handled:  # a tied weight: planned with its first owner
            continue
        spec = specs[wname]
        style = tp_style(spec)
        if style is None:
            raise _undeclared(wname, spec)
        handled.add(wname)
        bias = getattr(module, "bias", None)
        bname = ids.get(id(bias)) if isinstance(module, nn.Linear) and bias is not None else None
        if bname is not None:
            handled.add(bname)
        if isinstance(module, nn.Embedding):
            _plan_embedding(plan, path, wname, module, style, tp, split=vocab_parallel_loss or untied_head)
        elif style == "column":
            _plan_column(plan, path, wname, module, spec, tp)
            if bname is not None:
                _check_bias(bname, specs, ("column", "replicate") if path in plan.head_slices else ("column",))
        elif style == "row":
            _check_rows(wname, module.in_features, "columns (input features, dim 1)", tp)
            plan.rowwise.append(path)
            if bname is not None:
                _check_bias(bname, specs, ("replicate",))
        elif style == "vocab" and vocab_parallel_loss:
            _check_rows(wname, module.out_features, "rows (vocabulary, dim 0)", tp)
            if bname is not None:
                raise ValueError(f"tp: output head {path!r} has a bias; allowed: a vocab-parallel head without bias")
            plan.vocab_shards.append(wname)
        else:  # replicate, or an output head without a vocab-parallel loss
            plan.whole.extend(n for n in (wname, bname) if n is not None)
    for name, spec in specs.items():
        if name in handled:
            continue
        if spec.role == "expert":  # expert TP = 1: the experts stay whole here
            plan.experts.append(name)
            if expert_tp and spec.tp in ("column", "row"):
                if params[name].dim() != 3:
                    raise ValueError(
                        f"tp: expert weight {name!r} has shape {tuple(params[name].shape)}; allowed with "
                        "parallel.tp.expert_tp = true: stacked (experts, out, in) weights"
                    )
                dim = 1 if spec.tp == "column" else 2
                what = "rows (FFN, dim 1)" if dim == 1 else "columns (FFN, dim 2)"
                _check_rows(name, params[name].shape[dim], what, tp)
                plan.expert_splits[name] = dim
            continue
        style = tp_style(spec)
        if style is None:
            raise _undeclared(name, spec)
        if style == "vocab" and vocab_parallel_loss:
            _check_rows(name, params[name].shape[0] if params[name].dim() else 1, "rows (vocabulary, dim 0)", tp)
            plan.vocab_shards.append(name)
        elif style in ("column", "row"):
            raise ValueError(
                f"tp: parameter {name!r} declares tp = {style!r}, but only the weight of an nn.Linear splits by "
                "column or row; allowed: 'replicate', or make it an nn.Linear's weight"
            )
        else:
            plan.whole.append(name)
            if style == "partial":
                plan.summed.append(name)
    _check_head_slices(plan, model, tp)
    plan.expert_blocks = _expert_blocks(model, plan.experts)
    return plan


def _expert_blocks(model: nn.Module, experts: list[str]) -> list[str]:
    """The outermost modules whose ``param_specs()`` declare some of ``experts`` (in ``named_modules`` order)."""
    if not experts:
        return []
    found: list[str] = []
    for path, module in model.named_modules():
        if any(path == f or path.startswith(f + ".") for f in found):
            continue
        declare = getattr(module, "param_specs", None)
        if not callable(declare):
            continue
        prefix = f"{path}." if path else ""
        if any(f"{prefix}{name}" in experts for name in declare()):
            found.append(path)
    return found


def _plan_embedding(
    plan: TPPlan, path: str, wname: str, module: nn.Embedding, style: str, tp: int, *, split: bool
) -> None:
    if style in ("column", "row"):
        raise ValueError(
            f"tp: embedding {wname!r} declares tp = {style!r}; allowed for an nn.Embedding: 'vocab' or 'replicate'"
        )
    if style == "replicate" or not split:
        plan.whole.append(wname)
        return
    if module.max_norm is not None or module.sparse:
        raise ValueError(
            f"tp: embedding {path!r} uses max_norm or sparse gradients; allowed under tp: neither, or tp = 'replicate'"
        )
    _check_rows(wname, module.num_embeddings, "rows (vocabulary, dim 0)", tp)
    plan.vocab_embeddings.append(path)


def _plan_column(plan: TPPlan, path: str, wname: str, module: nn.Linear, spec: ParamSpec, tp: int) -> None:
    if spec.splits:
        raise ValueError(
            f"tp: {wname!r} is a fused weight (splits {[n for n, _ in spec.splits]}) declared tp = 'column'; "
            "not yet supported: declare separate projections (one nn.Linear per logical matrix)"
        )
    rows = module.out_features
    if spec.head_rows is None:
        _check_rows(wname, rows, "rows (output features, dim 0)", tp)
        plan.colwise.append(path)
        return
    heads = rows // spec.head_rows
    if heads % tp == 0:
        plan.colwise.append(path)
    elif tp % heads == 0:
        plan.head_slices[path] = (heads, spec.head_rows)
    else:
        raise ValueError(
            f"tp: {wname!r} has {heads} heads, which do not split over tp = {tp}; allowed: a tp size dividing "
            f"{heads} ({_divisors(heads)}), or a multiple of {heads} when these are key/value heads shared by query heads"
        )


def _check_head_slices(plan: TPPlan, model: nn.Module, tp: int) -> None:
    """A projection kept whole with fewer heads than ranks needs a sibling split by heads (the queries)."""
    split = set(plan.colwise)
    for path in plan.head_slices:
        parent = path.rpartition(".")[0]
        siblings = [f"{parent}.{n}" if parent else n for n, _ in model.get_submodule(parent).named_children()]
        if not any(s in split for s in siblings):
            heads = plan.head_slices[path][0]
            raise ValueError(
                f"tp: {path!r} has {heads} heads for tp = {tp} ranks and no sibling projection splits by heads over "
                f"the ranks (the query heads that would read them); allowed: a tp size dividing {heads} ({_divisors(heads)})"
            )
