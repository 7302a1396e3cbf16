"""nanokimi: from-scratch references and Triton kernels for the techniques behind Kimi.

Without a CUDA device the Triton kernels run under the Triton interpreter (NumPy on CPU tensors); the
interpreter is chosen when ``@triton.jit`` decorates a kernel, so ``TRITON_INTERPRET=1`` is set here,
before any chapter's kernel module is imported, unless the variable is already set.
"""

import os as _os
import sys as _sys
import warnings as _warnings

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    if "triton" in _sys.modules:
        # triton.language's own @jit helpers (tl.cdiv, tl.sigmoid, ...) were decorated in compiled mode already,
        # and calling them from an interpreted kernel fails with "Cannot call @triton.jit'd outside of the scope
        # of a kernel".
        _warnings.warn(
            "triton was imported before nanokimi on a machine without CUDA: import nanokimi first (or set "
            "TRITON_INTERPRET=1 before starting Python), otherwise interpreted kernels can fail",
            RuntimeWarning,
            stacklevel=2,
        )
    _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"
