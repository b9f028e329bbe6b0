"""Test-session setup shared by every test directory.

Without a CUDA device the Triton kernels run under the interpreter; triton reads TRITON_INTERPRET
when a kernel is decorated, so it is set here, before any test module imports boost_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
