import torch

# Tiny models on a 2-core machine: one intra-op thread is several times faster than two (less contention).
torch.set_num_threads(1)
