"""Test-session setup shared by every test directory.

Without a CUDA device the Triton kernels run under the interpreter; triton reads TRITON_INTERPRET
when a kernel is decorated, so it is set here, before any test module imports boost_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs of the CPU preset set 1 torch thread (tiny models, a busy CPU); every test ends with the
    process's own setting back, so no test's thread count leaks into the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
