import os

import torch

# The Triton interpreter must be chosen before triton is first imported; without a GPU the Triton
# kernels run on CPU tensors through it (fp32/fp16 only: it cannot do bf16 arithmetic).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
