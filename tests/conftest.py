import os

import torch

# The suite runs services as subprocesses next to the test process on a small machine: one
# torch thread each keeps them from oversubscribing the cores (OpenMP spin-waits make an
# oversubscribed multi-threaded process many times slower, not just a little).
torch.set_num_threads(1)
os.environ.setdefault("TANDEM_TORCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be
# chosen before Triton is first imported (tests/unit/test_triton_attention.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    """Build the CPU kernels once, before any test: on a fresh machine the first service
    process to start would otherwise compile them (about a minute) inside a test's start-up
    timeout, with every other worker process waiting on the build lock."""
    from shared.engine.model import cpu_kernels

    cpu_kernels.load()
