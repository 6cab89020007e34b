import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared cases module

# What the mhd-fast command sets for itself (cli.main), set here for the test process before
# torch loads OpenMP: spinning OpenMP waits take the cores of a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; the
    # variable is read when triton is first imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
