"""`make env-check`: [OK]/[FAIL] for the versions nanokimi needs and how Triton kernels will run here."""

from __future__ import annotations

import sys

from nanokimi.triton_utils import interpreting


def _version(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def main() -> int:
    import numpy
    import torch
    import triton

    rows: list[tuple[bool, str]] = []
    py = sys.version_info
    rows.append((py >= (3, 11), f"Python {py.major}.{py.minor}.{py.micro} (need >= 3.11)"))
    rows.append((_version(torch.__version__) >= (2, 11), f"torch {torch.__version__} (need >= 2.11)"))
    tv = _version(triton.__version__)
    rows.append(((3, 6) <= tv < (3, 9), f"triton {triton.__version__} (need >= 3.6, < 3.9)"))
    nv = _version(numpy.__version__)
    if interpreting():
        ok = tv >= (3, 7) or nv < (2, 4)
        rows.append((ok, f"numpy {numpy.__version__} (the interpreter of triton < 3.7 needs numpy < 2.4)"))
    else:
        rows.append((True, f"numpy {numpy.__version__}"))
    cuda = torch.cuda.is_available()
    rows.append((True, f"CUDA: {torch.cuda.get_device_name() if cuda else 'not available'}"))
    mode = "interpreted on the CPU (TRITON_INTERPRET=1)" if interpreting() else "compiled for the GPU"
    rows.append((cuda or interpreting(), f"Triton kernels: {mode}"))
    for ok, text in rows:
        print(f"[{'OK' if ok else 'FAIL'}] {text}")
    return 0 if all(ok for ok, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
