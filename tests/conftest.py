import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared cases module

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; the
    # variable is read when triton is first imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
