"""Recipe ``torchao-float8``: torchao's float8 training (``convert_to_float8_training``) on the linears our FP8
recipes quantise, so that torchao can be chosen by name and compared with ``fp8-current`` on the same model, run
loop and data (issue 19's "faster than torchao's float8 training on the same model in the same run").

What it swaps: the ``nn.Linear``s whose weight's declared role is ``matrix`` outside the first/last N layers
(``fp8.fp8_linear_names``, the same set ``fp8-current`` swaps; embedding, head, router and experts stay in high
precision) become torchao ``Float8Linear``s with torchao's recipe ``scaling``: ``tensorwise`` (dynamic per-tensor
scales, E4M3 inputs and weights, E5M2 output gradients: the same format as ``fp8-current``, whose linear agrees with
torchao's to fp32 rounding), ``rowwise`` or ``rowwise_with_gw_hp`` (the weight gradient in high precision).
Parameters are cast to ``params`` (bf16 by default; the optimizer keeps fp32 masters), as the other recipes do.

torchao is an optional dependency (``pip install 'mcore-precision[torchao]'``); without it the recipe is refused
in one line. Weights gather in high precision under ``fsdp`` (torchao's float8 all-gather is written for torch's
FSDP2, not for this layout), and ``tp > 1`` is refused as for the other FP8 recipes. Which GEMM runs is torchao's
choice (``torch._scaled_mm`` on cards with FP8 tensor cores, its emulation elsewhere).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mcore.errors import ConfigError
from mcore.precision.basic import PlainRecipe
from mcore_precision.fp8 import _choice, _FP8Recipe, _QuantizedRecipe, fp8_linear_names

SCALINGS = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def _torchao_float8() -> Any:
    """torchao's ``float8`` module, or a one-line ``ConfigError`` naming how to install it."""
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as exc:
        raise ConfigError(
            f"precision.recipe = 'torchao-float8' needs torchao ({exc}); install it with "
            "pip install 'mcore-precision[torchao]', or choose fp8-current (the same format, our kernels)"
        ) from None


class TorchaoFloat8(PlainRecipe):
    """torchao's float8 training on the matrix linears (module docstring)."""

    name: ClassVar[str] = "torchao-float8"
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @dataclass(kw_only=True, slots=True)
    class Config(_QuantizedRecipe.Config):
        scaling: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"
        """torchao's float8 recipe: per-tensor dynamic scales, per-row scales, or per-row with a bf16 weight gradient."""

        def __post_init__(self) -> None:
            _QuantizedRecipe.Config.__post_init__(self)
            _choice("scaling", self.scaling, SCALINGS)

    config: Any

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else type(self).Config()
        self.param_dtype = torch.bfloat16 if self.config.params == "bf16" else torch.float32
        self.float8 = _torchao_float8()  # refused at build time, before the model exists
        self.converted: list[str] = []  # module paths now torchao Float8Linears

    @staticmethod
    def check_run(config: Any, run: Any) -> None:
        """Before launch: as the FP8 recipes, no ``tp > 1`` (whole weights' amaxes)."""
        _FP8Recipe.check_run(config, run)

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        model = model.to(dtype=self.param_dtype)
        names = set(
            fp8_linear_names(model, first_layers_bf16=cfg.first_layers_bf16, last_layers_bf16=cfg.last_layers_bf16)
        )
        float8 = self.float8
        config = float8.Float8LinearConfig.from_recipe_name(cfg.scaling)
        float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda _module, fqn: fqn in names)
        linear_class = importlib.import_module("torchao.float8.float8_linear").Float8Linear
        self.converted = sorted(path for path, module in model.named_modules() if isinstance(module, linear_class))
        return model
