"""nanokimi: from-scratch references and Triton kernels for the techniques behind Kimi.

Without a CUDA device the Triton kernels run under the Triton interpreter (NumPy on CPU tensors); the
interpreter is chosen when ``@triton.jit`` decorates a kernel, so ``TRITON_INTERPRET=1`` is set here,
before any chapter's kernel module is imported, unless the variable is already set.
"""

import os as _os

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"
