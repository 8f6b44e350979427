import sys
from pathlib import Path

import torch

# ``helpers`` sits beside the tests; spawned ranks import test modules by name and need it too.
sys.path.insert(0, str(Path(__file__).parent))

# Tiny models: one intra-op thread is as fast, and on a shared, busy CPU spinning OpenMP
# threads made single tests 10x slower.
torch.set_num_threads(1)
