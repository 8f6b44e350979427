"""The FP64 recipe: the fp32 recipe with every dtype doubled."""

import torch

from mcore.precision.basic import FP32


class FP64(FP32):
    name = "fp64"
    param_dtype = master_dtype = reduce_dtype = torch.float64
