"""mcore-precision's quantised FSDP gather (``mcore_precision.fsdp_gather``) under mcore-fsdp's ``fully_shard`` on 2
gloo ranks: for ``fp8-current``, ``fp8-delayed``, ``fp8-blockwise``, ``mxfp8`` and ``nvfp4`` a tiny transformer's
matrix weights are all-gathered as codes + scales (per-tensor scales from the global amax, one all-reduce per
gather), the linears' GEMMs read them without quantising the weight again, and losses and gradients over 3 SGD
steps equal the single-process run of the same recipe (which quantises each whole weight) bit for bit. Both runs feed the
same batch on every rank, so the activations' and gradients' scales agree too; the emulated GEMMs then see the same
operands (fp32 parameters, and ``fp8-current`` once with bf16 parameters).

Weights whose rows per rank would cut a block (``fp8-blockwise``'s 128-row blocks: everything but ``gate_up``)
are gathered in high precision, with the recipe's warning, and quantised by the linear as before.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mcore.precision.quantized import QuantizedWeight
from mcore_fsdp import fully_shard
from mcore_fsdp.layout import describe_params
from mcore_precision import fp8_linear, fsdp_gather
from mcore_precision.fp8 import FP8Blockwise, FP8Current, FP8Delayed
from mcore_precision.fp8_linear import FP8Linear
from mcore_precision.microscaling import MXFP8, NVFP4
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

CFG = TinyConfig(hidden_size=64, ffn_size=256, num_heads=4)  # gate_up (512, 64): 256 rows per rank
STEPS = 3


def _recipes() -> dict[str, Any]:
    fp8 = {"params": "fp32", "gemm": "emulated"}
    return {
        "fp8-current": lambda: FP8Current(FP8Current.Config(**fp8)),  # type: ignore[arg-type]
        "fp8-delayed": lambda: FP8Delayed(FP8Delayed.Config(**fp8, amax_history_len=2)),  # type: ignore[arg-type]
        "fp8-blockwise": lambda: FP8Blockwise(FP8Blockwise.Config(**fp8)),  # type: ignore[arg-type]
        "mxfp8": lambda: MXFP8(MXFP8.Config(params="fp32")),
        "nvfp4": lambda: NVFP4(NVFP4.Config(params="fp32")),
        # bf16 parameters (gathered bf16 shards quantised; bf16 gradients): bit-exact too
        "fp8-current-bf16": lambda: FP8Current(FP8Current.Config(params="bf16", gemm="emulated")),
    }


# per recipe: the weights gathered quantised (the others' rows per rank cut the format's blocks)
GATHERED = {
    "fp8-current": ("qkv", "proj", "gate_up", "down"),
    "fp8-delayed": ("qkv", "proj", "gate_up", "down"),
    "fp8-blockwise": ("gate_up",),
    "mxfp8": ("qkv", "proj", "gate_up", "down"),
    "nvfp4": ("qkv", "proj", "gate_up", "down"),
    "fp8-current-bf16": ("qkv", "proj", "gate_up", "down"),
}

# bytes per weight element gathered, at most: FP8 codes + scales; MXFP8 both copies (forward's row-wise, dgrad's
# column-wise) + E8M0 bytes per 32; NVFP4 half a byte + an E4M3 byte per 16x16 block
BYTES = {
    "fp8-current": 1.01,
    "fp8-delayed": 1.01,
    "fp8-blockwise": 1.01,
    "mxfp8": 2.07,
    "nvfp4": 0.51,
    "fp8-current-bf16": 1.01,
}


class _Spy:
    """Counts, per linear, the weights quantised by the linear itself and those read from a gathered payload
    (recording what was gathered: dtype and bytes of the codes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.own: dict[str, int] = {}
        self.payloads: list[QuantizedWeight] = []
        for path, module in model.named_modules():
            if isinstance(module, FP8Linear):
                self.own[path] = 0
                module.scheme.quantize = self._counting(path, module.scheme.quantize)  # type: ignore[method-assign]

    def _counting(self, path: str, quantize: Any) -> Any:
        def counted(t: torch.Tensor, operand: str, gemm: str) -> Any:
            self.own[path] += operand == "weight"
            return quantize(t, operand, gemm)

        return counted

    def operands(self, weight: QuantizedWeight) -> Any:
        self.payloads.append(weight)
        return fsdp_gather.operands(weight)


def _train(model: torch.nn.Module, recipe: Any) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    for tokens, labels in tiny_batches(STEPS, seq_len=8, vocab_size=CFG.vocab_size, seed=3):
        loss = model(tokens, labels=labels)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
        recipe.update()
        recipe.after_step(model)
    return losses, grads


def _check(name: str, make: Any) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = make()
    reference = recipe.prepare(TinyTransformer(CFG, seed=0))
    ref_losses, ref_grads = _train(reference, recipe)

    recipe = make()
    model = recipe.prepare(TinyTransformer(CFG, seed=0))
    spy = _Spy(model)
    mesh = init_device_mesh("cpu", (world,))
    shard = {"mesh": mesh, "gather_recipe": recipe, "describe_param": describe_params(model)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in model.layers:
            fully_shard(layer, **shard)
        fully_shard(model, **shard)
        original, fp8_linear.fsdp_gather = fp8_linear.fsdp_gather, spy  # type: ignore[assignment]
        try:
            losses, grads = _train(model, recipe)
        finally:
            fp8_linear.fsdp_gather = original
    gathered = GATHERED[name]
    refused = {str(w.message).split(" ")[1] for w in caught if "gathered in high precision" in str(w.message)}
    for path, own in spy.own.items():
        leaf = path.rpartition(".")[2]
        if leaf in gathered:  # every forward and backward GEMM read the gathered weight: none quantised here
            assert own == 0, (name, path, own)
        else:
            assert own > 0 and f"{path}.weight" in refused, (name, path, own, refused)
    per_step = CFG.num_layers * len(gathered)
    assert len(spy.payloads) == STEPS * per_step, (name, len(spy.payloads))
    for weight in spy.payloads:  # what crossed the wire: one byte per element (FP8), half a byte (NVFP4)
        codes, (f, k) = weight.tensors[0], weight.shape
        padded = world * -(-f // world)
        assert codes.dtype == torch.uint8, (name, codes.dtype)
        assert codes.numel() == padded * (-(-k // 2) if name == "nvfp4" else k), (name, codes.shape, (f, k))
        total = sum(t.element_size() * t.numel() for t in weight.tensors)  # codes + scales, bytes
        assert total <= BYTES[name] * padded * k, (name, total, (f, k))
    for step in range(STEPS):  # bit-exact: the same operands into the same emulated GEMMs; (g + g) / 2 is exact
        assert losses[step] == ref_losses[step], (name, step, losses[step], ref_losses[step])
        for key, grad in ref_grads[step].items():
            assert_rel_close(grads[step][key], grad, 1e-5, name=f"{name} grad {key} step {step} (rank {rank})")
            assert torch.equal(grads[step][key], grad), f"{name} grad {key} step {step} (rank {rank}): not bit-exact"


@distributed(2, timeout=240)
def test_quantized_fsdp_gather_equals_one_process() -> None:
    torch.set_num_threads(1)
    for name, make in _recipes().items():
        _check(name, make)
