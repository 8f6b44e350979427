"""``adamw``: AdamW over a model as the layouts left it (plain, data-parallel replicas, or FSDP DTensors).

Each parameter is updated where it lives: a replicated parameter in full (its gradient
already averaged by the layout), a ``DTensor`` parameter on this rank's shard only (AdamW
is elementwise, so the sharded update is the whole update). Low-precision parameters get
fp32 master weights (``master_weights``); the moments are fp32. One param group per role;
by default norms, biases and embeddings get no weight decay. Roles are the model's
declarations (``roles.classify``), with the user's ``role_overrides``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch

from mcore.errors import UserError
from mcore_optim import state as state_format
from mcore_optim.adamw_math import adamw_step
from mcore_optim.dist import like_param, local
from mcore_optim.groups import make_groups, zero_grad
from mcore_optim.roles import ROLES, NamedParam, check_role_overrides, check_roles, classify, mup_lr_multiplier

if TYPE_CHECKING:
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.params import ParamSpec
    from mcore.protocols.layout import ParallelLayout

IMPLS = ("auto", "foreach", "fused", "triton")


class GroupTensors(NamedTuple):
    """One param group's tensors for an update, parameters without a gradient left out: the fp32 weight (the
    master where there is one), gradient, moments, step count, and the low-precision parameter the master is
    copied into (``None`` where the weight is the parameter)."""

    weights: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    targets: list[torch.Tensor | None]


class AdamW:
    """The ``MeshOptimizer`` of ``adamw`` (also the AdamW half of ``muon`` and the inner step of
    the sharded optimizers, which hand it only the parameters their rank updates).

    ``named`` are the parameters this object updates; ``model_params`` (default: ``named``)
    are all of the model's, which the state dict records and checks on load.
    """

    algorithm: ClassVar[str] = "adamw"

    def __init__(
        self,
        named: Sequence[NamedParam],
        *,
        settings: Mapping[str, Mapping[str, float]],
        betas: tuple[float, float],
        eps: float,
        fused: bool,
        master_weights: bool,
        model_params: Sequence[NamedParam] | None = None,
        triton: bool = False,
    ) -> None:
        self._named = list(named)
        self._model_params = list(model_params) if model_params is not None else self._named
        self.param_groups = make_groups(self._named, settings) if self._named else []
        self.betas, self.eps, self.fused = betas, eps, fused
        self.triton = triton  # adamw_triton's one-pass kernel where triton_takes (CUDA, fp32 state)
        self._triton_tables: dict[int, dict[Any, Any]] = {}  # per param group: the kernel's address tables
        self.master_weights = master_weights
        with torch.no_grad():
            self.state: dict[str, dict[str, torch.Tensor]] = {n.name: self._new_state(n) for n in self._named}

    def _new_state(self, n: NamedParam) -> dict[str, torch.Tensor]:
        """``n``'s fresh state: step count, moments and (low precision, ``master_weights``) an fp32 master, laid out
        like what this rank holds of it (``zero_pieces`` keeps only its piece)."""
        p = local(n.param)
        moments_dtype = torch.float32 if self.master_weights and p.dtype.itemsize < 4 else p.dtype
        st = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=moments_dtype),
            "exp_avg_sq": torch.zeros_like(p, dtype=moments_dtype),
        }
        if self.master_weights and p.dtype.itemsize < 4:
            st["master"] = p.detach().to(torch.float32, copy=True)
        return st

    @torch.no_grad()
    def step(self) -> None:
        self._update(None)

    @torch.no_grad()
    def step_scaled(self, grad_scale: torch.Tensor) -> None:
        """``step()`` on the gradients times ``grad_scale`` (a 0-d fp32 tensor on their device: the run loop's
        clipping factor, no host sync); ``.grad`` may be left unscaled (``mcore.protocols.optimizer.ScaledStep``)."""
        self._update(grad_scale)

    @torch.no_grad()
    def step_guarded(self, ok: torch.Tensor, grad_scale: torch.Tensor | None = None) -> bool:
        """``step_scaled(grad_scale)`` (``step()`` without it) where the 0-d bool device tensor ``ok`` is true, nothing
        where it is false, decided on the device (``mcore.protocols.optimizer.GuardedStep``): on the Triton path
        only; ``False`` (nothing done) where a group would take a torch path."""
        groups = [self._group_tensors(group) for group in self.param_groups]
        takes = (triton_takes(g.weights, g.grads, g.exp_avgs, g.exp_avg_sqs, g.targets) for g in groups if g.weights)
        if not self.triton or not all(takes):
            return False
        self._update(grad_scale, ok=ok, groups=groups)
        return True

    def _group_tensors(self, group: Mapping[str, Any]) -> GroupTensors:
        """A group's (weights, grads, exp_avgs, exp_avg_sqs, steps, low-precision targets) of parameters with a
        gradient: the weight is the fp32 master where there is one (then the target is the parameter)."""
        out = GroupTensors([], [], [], [], [], [])
        weights, grads, exp_avgs, exp_avg_sqs, steps, targets = out
        for name, p in zip(group["names"], group["params"]):
            if p.grad is None:
                continue
            st = self.state[name]
            weights.append(st.get("master", local(p)))
            grads.append(local(p.grad))
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
            targets.append(local(p) if "master" in st else None)
        return out

    def _update(
        self,
        grad_scale: torch.Tensor | None,
        *,
        ok: torch.Tensor | None = None,
        groups: list[GroupTensors] | None = None,
    ) -> None:
        beta1, beta2 = self.betas
        groups = [self._group_tensors(g) for g in self.param_groups] if groups is None else groups
        for index, (group, tensors) in enumerate(zip(self.param_groups, groups, strict=True)):
            weights, grads, exp_avgs, exp_avg_sqs, steps, targets = tensors
            if not weights:
                continue
            hyper = {
                "lr": float(group["lr"]),
                "beta1": beta1,
                "beta2": beta2,
                "eps": self.eps,
                "weight_decay": float(group["weight_decay"]),
            }
            # a guarded update (ok given) comes from step_guarded, which checked every group already
            if self.triton and (ok is not None or triton_takes(weights, grads, exp_avgs, exp_avg_sqs, targets)):
                from mcore_optim.adamw_triton import adamw_step_triton, chunked_layout  # CUDA only: imports Triton

                cache = self._triton_tables.setdefault(index, {})
                # the kernel writes contiguous and chunked low-precision parameters (views of a packed buffer, one
                # table row per run); any other strided one gets its master copied in after
                strided = {
                    i: t
                    for i, t in enumerate(targets)
                    if t is not None and not t.is_contiguous() and chunked_layout(t) is None
                }
                adamw_step_triton(
                    weights,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    steps,
                    [None if i in strided else t for i, t in enumerate(targets)],
                    grad_scale=grad_scale,
                    ok=ok,
                    cache=cache,
                    lr=hyper["lr"],
                    beta1=hyper["beta1"],
                    beta2=hyper["beta2"],
                    eps=hyper["eps"],
                    weight_decay=hyper["weight_decay"],
                )
                if strided:
                    torch._foreach_copy_(list(strided.values()), [weights[i] for i in strided])
                continue
            grads = [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, weights)]
            if grad_scale is not None:  # clipping, as clip_grads_ would have done on .grad
                torch._foreach_mul_(grads, grad_scale.to(grads[0].dtype))
            adamw_step(weights, grads, exp_avgs, exp_avg_sqs, steps, fused=self.fused, **hyper)
            masters = [w for w, t in zip(weights, targets) if t is not None]
            if masters:
                torch._foreach_copy_([t for t in targets if t is not None], masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad(self.param_groups, set_to_none)

    # -- state ----------------------------------------------------------------------------
    def schema(self, n: NamedParam) -> dict[str, torch.dtype | None]:
        """The state keys this optimizer keeps for ``n`` (updated here or not) and their dtypes;
        ``None`` marks the 0-d step count, every other entry has the parameter's shape."""
        low = self.master_weights and n.param.dtype.itemsize < 4
        moments = torch.float32 if low else n.param.dtype
        out: dict[str, torch.dtype | None] = {"step": None, "exp_avg": moments, "exp_avg_sq": moments}
        if low:
            out["master"] = torch.float32
        return out

    def state_entries(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-name state, laid out like each parameter (DTensor where the parameter is one)."""
        out = {}
        for n in self._named:
            st = self.state[n.name]
            out[n.name] = {k: (v if k == "step" else like_param(v, n.param)) for k, v in st.items()}
        return out

    def load_entries(self, saved: Mapping[str, Any]) -> None:
        with torch.no_grad():
            wanted = [
                (n.name, k, v, None if k == "step" else n.param)
                for n in self._named
                for k, v in self.state[n.name].items()
            ]
            pieces = state_format.take_all(saved, wanted)  # every check, then one batched look-up of row splits
            for (name, k, _, _), v in zip(wanted, pieces):
                self.state[name][k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {
            **state_format.header(self.algorithm, self._model_params, self.param_groups),
            "state": self.state_entries(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_format.check(state_dict, self.algorithm, self._model_params, self.param_groups)
        self.load_entries(state_dict["state"])
        state_format.restore_groups(self.param_groups, state_dict["groups"])


#: Largest learning rate or weight decay: the update multiplies them (lr * wd, lr / (1 - beta1**t), Muon's
#: scale) into float32 scalars, which a larger value overflows (a torch "cannot be converted" traceback mid-step).
MAX_RATE = 1e6

#: Smallest eps: float32's smallest normal number (a smaller one rounds to 0 or loses precision in the update).
MIN_EPS = 1.1754943508222875e-38


def check_rate(key: str, value: Any) -> None:
    """A learning rate or weight decay: a finite number in [0, ``MAX_RATE``] (NaN and inf would poison every
    weight; a huge one overflows float32 in the update)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= MAX_RATE):
        raise ValueError(f"{key} = {value!r}; allowed: a finite number >= 0 and <= {MAX_RATE:g} (float32 math)")


def check_eps(key: str, value: Any) -> None:
    """An eps added to a denominator: a finite number in [``MIN_EPS``, ``MAX_RATE``], representable in float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (MIN_EPS <= value <= MAX_RATE):
        raise ValueError(
            f"{key} = {value!r}; allowed: a finite number > 0, from {MIN_EPS:.3g} to {MAX_RATE:g} (float32 math)"
        )


def check_common(config: Any) -> None:
    """Checks shared by every optimizer config here (``ValueError`` naming key, value, allowed)."""
    for key in ("lr", "weight_decay"):
        check_rate(key, getattr(config, key))
    check_roles("no_decay_roles", config.no_decay_roles)
    check_role_overrides(config.role_overrides)
    mup_lr_multiplier("matrix", base_width=config.mup_base_width, width=config.mup_width)


def check_betas(key: str, betas: Any, eps_key: str, eps: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"{key} = {betas!r}; allowed: two numbers in [0, 1)")
    check_eps(eps_key, eps)
    return float(betas[0]), float(betas[1])


def adamw_state_bytes(shape: Sequence[int], param_dtype: torch.dtype, *, master_weights: bool) -> int:
    """Bytes of ``AdamW``'s state for one whole parameter (see ``AdamW.schema``)."""
    low = master_weights and param_dtype.itemsize < 4
    moments = 4 if low else param_dtype.itemsize
    return 4 + math.prod(shape) * (2 * moments + (4 if low else 0))


def use_fused(impl: str, named: Sequence[NamedParam]) -> bool:
    """torch's fused kernel: ``fused``, or ``auto``/``triton`` with every parameter on CUDA (the fallback of
    ``triton`` for what its kernel does not take)."""
    if impl not in IMPLS:
        raise ValueError(f"impl = {impl!r}; allowed: {list(IMPLS)}")
    if impl in ("auto", "triton"):
        return bool(named) and all(local(n.param).is_cuda for n in named)
    return impl == "fused"


def use_triton(impl: str, named: Sequence[NamedParam]) -> bool:
    """``adamw_triton``'s kernel: ``triton`` (a one-line ``UserError`` without CUDA parameters or Triton) or
    ``auto`` where every parameter is on CUDA and Triton imports."""
    if impl not in ("auto", "triton"):
        return False
    cuda = bool(named) and all(local(n.param).is_cuda for n in named)
    available = cuda and importlib.util.find_spec("triton") is not None
    if impl == "triton" and not available:
        raise UserError(
            "impl = 'triton' needs CUDA parameters and Triton installed; allowed here: auto, foreach, fused"
        )
    return available


def triton_takes(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    targets: list[torch.Tensor | None],
) -> bool:
    """Whether ``adamw_triton`` can run this group: fp32 weights and moments, everything contiguous (the kernel
    walks each tensor's elements in one flat order) and on CUDA. A low-precision target (the parameter behind an
    fp32 master) may be strided (a view of a packed buffer): the kernel writes a chunked one
    (``adamw_triton.chunked_layout``), ``_update`` copies the master into any other after."""
    state = [*weights, *exp_avgs, *exp_avg_sqs]
    if any(t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cuda for t in state):
        return False
    return all(g.is_contiguous() and g.is_cuda for g in grads) and all(t is None or t.is_cuda for t in targets)


class AdamWFactory:
    """Registered as optimizer ``adamw``: ``AdamWFactory(config).build(model, mesh=..., layouts=...)``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-3
        """Peak learning rate (finite, >= 0); the schedule scales it each step."""
        weight_decay: float = 0.1
        """Decoupled weight decay (finite, >= 0), except for the no_decay_roles."""
        betas: tuple[float, float] = (0.9, 0.95)
        """Decay rates of the first and second moment, each in [0, 1)."""
        eps: float = 1e-8
        """Added to the root of the second moment (finite, > 0)."""
        impl: Literal["auto", "foreach", "fused", "triton"] = "auto"
        """'triton' (one pass a parameter: cast, clipping, update, low-precision copy), 'fused' (torch's kernel),
        'foreach' (the reference path here), 'auto' (triton on CUDA with Triton installed, else fused on CUDA)."""
        master_weights: bool = True
        """Keep fp32 master copies of low-precision parameters (fp32 parameters need none)."""
        no_decay_roles: tuple[str, ...] = ("norm", "bias", "embedding")
        """Parameter roles without weight decay (roles: embedding, matrix, expert, router, head, norm, bias)."""
        role_overrides: dict[str, str] = field(default_factory=dict)
        """Roles that replace the model's declarations: {regex searched in the parameter name: role}; first match wins."""
        mup_base_width: int | None = None
        """muP: matrix parameters' lr is multiplied by mup_base_width / mup_width (set both or neither)."""
        mup_width: int | None = None
        """muP: the width of this model (set with mup_base_width)."""

        def __post_init__(self) -> None:
            check_common(self)
            check_betas("betas", self.betas, "eps", self.eps)
            if self.impl not in IMPLS:
                raise ValueError(f"impl = {self.impl!r}; allowed: {list(IMPLS)}")

    def __init__(self, config: AdamWFactory.Config | None = None) -> None:
        self.config = config if config is not None else AdamWFactory.Config()
        self.betas = check_betas("betas", self.config.betas, "eps", self.config.eps)

    def settings(self) -> dict[str, dict[str, float]]:
        """lr and weight decay of each role."""
        c = self.config
        return {
            role: {
                "lr": c.lr * mup_lr_multiplier(role, base_width=c.mup_base_width, width=c.mup_width),
                "weight_decay": 0.0 if role in c.no_decay_roles else c.weight_decay,
            }
            for role in ROLES
        }

    def make(self, named: Sequence[NamedParam], model_params: Sequence[NamedParam] | None = None) -> AdamW:
        return AdamW(
            named,
            settings=self.settings(),
            betas=self.betas,
            eps=self.config.eps,
            fused=use_fused(self.config.impl, model_params or named),
            master_weights=self.config.master_weights,
            model_params=model_params,
            triton=use_triton(self.config.impl, model_params or named),
        )

    def build(self, model: nn.Module, *, mesh: ParallelMesh, layouts: Sequence[ParallelLayout]) -> AdamW:
        return self.make(classify(model, role_overrides=self.config.role_overrides))

    # -- OptimizerStateSize (read by ``mcore plan``) -----------------------------------------
    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        """Step count (fp32), two moments (fp32 with master weights, else the parameter's dtype),
        and an fp32 master copy of a low-precision parameter when ``master_weights``."""
        return adamw_state_bytes(shape, param_dtype, master_weights=self.config.master_weights)

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        return False  # each replica keeps the state of every parameter (or shard) it holds
