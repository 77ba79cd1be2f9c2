"""Suite-wide settings.

One intra-op thread: the models under test are tiny, so a second thread gains little,
and on a loaded 2-core machine OpenMP's spinning threads slow UNet calls down by
orders of magnitude (measured: 20-40 ms per tiny-UNet forward with 1 thread versus
1-3 s with 2 under load). Child processes (servers started by tests) inherit it.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # SDK-only environments
    torch = None
if torch is not None:
    torch.set_num_threads(1)
