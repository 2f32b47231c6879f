import os

# Deterministic, quiet CPU runs; torch shares the 2 cores with XLA.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: E402

torch.set_num_threads(2)
