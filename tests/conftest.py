import os

import torch

# Several test processes (and services they start) share few cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
