import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # toy_model, beside the tests
torch.set_num_threads(1)  # tiny models; a shared, busy CPU
