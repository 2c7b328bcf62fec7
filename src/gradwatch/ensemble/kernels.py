"""Kernels: the hand-written step's batched matmuls, from kernels.c compiled for this machine, else torch.

A stacked step multiplies thousands of tiny matrices (10 x 11 by 11 x 32 for the seed's nets), where
MKL's batched GEMM spends about half its time setting up each one. kernels.c keeps a member's rows
in vector registers instead: at E=512 on this project's CPU the forward product takes 45 instead of
95-106 us, the input gradient 45-49 instead of 104-109 us and the weight gradient 56-58 instead of
115 us (``torch.bmm``, one thread, operands in cache; equal to 6e-6). A layer's two backward
products run in one pass over its gradient, which a step otherwise streams from memory twice.

It is compiled once per machine with the system's C compiler (``$CC``, else ``cc``; 0.3 s) into the
user's cache, as ``torch.utils.cpp_extension.load`` builds extensions on first use, and called
through ctypes (~2 us a call). Where no compiler works, or with ``GRADWATCH_KERNELS=torch``, every
call made here is ``torch.bmm``'s, which computes the same numbers to float rounding, slower.
What torch ships was tried first: ``torch.compile`` of the same products (as broadcast multiply and
sum, which inductor turns into similar loops) ran them about as fast, but cost 20-25 us of Python
per call and 9 s (cached) to 29 s of compiling per step shape, more than a whole 512-member ensemble.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")  # native: the cache key names the machine


def _cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradwatch"


@functools.cache
def library() -> ctypes.CDLL | None:
    """kernels.c as a shared library built for this machine, or None (with one warning) where it can't be."""
    if os.environ.get("GRADWATCH_KERNELS") == "torch":
        return None
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join(s.encode() for s in (compiler, *FLAGS, platform.node(), platform.machine()))
                         + SOURCE.read_bytes()).hexdigest()[:16]
    try:
        path = _cache() / f"kernels-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(f".{os.getpid()}.part")  # then renamed: a parallel worker never loads half a file
            subprocess.run([compiler, *FLAGS, "-o", str(part), str(SOURCE)], check=True, capture_output=True,
                           timeout=120)
            os.replace(part, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # RuntimeError: no home directory
        said = (getattr(error, "stderr", None) or b"").decode(errors="replace").strip().splitlines()
        warnings.warn(f"gradwatch: kernels.c not built ({error}{': ' + said[0] if said else ''}); stacked "
                      f"ensembles use torch.bmm, about 1.4x slower", RuntimeWarning, stacklevel=2)
        return None
    P, N = ctypes.c_void_p, ctypes.c_int64
    lib.matmul.argtypes = [P, N, N, N, P, N, N, P, N, N, N, N, N, N]
    lib.matmul.restype = None
    lib.backward.argtypes = [P, N, N, P, N, N, P, N, N, P, N, N, P, N, N, N, N, N, N, N]
    lib.backward.restype = ctypes.c_int
    return lib


def _native(*tensors: Tensor) -> bool:
    """Whether kernels.c takes these operands: float32 CPU tensors of 3 dims with contiguous rows, and it was built."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu or t.dim() != 3 or t.stride(2) != 1:
            return False
    return library() is not None


def matmul(w: Tensor, x: Tensor, out: Tensor) -> Callable[[], None]:
    """A call that sets ``out[e] = w[e] @ x[e]`` each time it is made: w (E, R, C) in any strides,
    x (E, C, B), out (E, R, B). The operands are checked and their addresses read once, for a step
    that reuses its buffers (~1 us a call instead of ~10); the call keeps them alive."""
    E, R, C = w.shape
    if x.shape[:2] != (E, C) or out.shape != (E, R, x.shape[2]):
        raise ValueError(f"kernels.matmul: shapes {tuple(w.shape)} @ {tuple(x.shape)} -> {tuple(out.shape)}")
    if not _native(w, x, out):
        return functools.partial(torch.bmm, w, x, out=out)
    run, args = library().matmul, (w.data_ptr(), *w.stride(), x.data_ptr(), x.stride(0), x.stride(1),
                                   out.data_ptr(), out.stride(0), out.stride(1), E, R, C, x.shape[2])

    def call(operands=(w, x, out)) -> None:  # the operands ride along: args holds only their addresses
        run(*args)

    return call


def backward(g: Tensor, h: Tensor, grad: Tensor, w: Tensor | None = None,
             dh: Tensor | None = None) -> Callable[[], None]:
    """A call that runs a Dense layer's backward from g = dL/dz (E, O, B) each time it is made:
    ``grad[e] = g[e] @ h[e].T``, the gradient of [W | b] (E, O, K) from the input with its row of
    ones h (E, K, B), and, given the layer's [W | b] block ``w`` (E, O, >= C), ``dh[e] = w[e, :, :C].T
    @ g[e]`` (E, C, B), the input's gradient; one pass over g for both where kernels.c runs them.
    Checked once, as ``matmul``."""
    E, units, B = g.shape
    K = grad.shape[2]
    if h.shape != (E, K, B) or grad.shape[:2] != (E, units) or (dh is not None and (
            w is None or w.shape[:2] != (E, units) or w.shape[2] < dh.shape[1] or dh.shape[::2] != (E, B))):
        raise ValueError(f"kernels.backward: shapes g {tuple(g.shape)}, h {tuple(h.shape)}, grad {tuple(grad.shape)}")
    C = 0 if dh is None else dh.shape[1]
    if not _native(g, h, grad, *((w, dh) if dh is not None else ())):
        # from one output unit an outer product, which MKL's batched GEMM ran 20x slower than a
        # broadcast multiply (440 vs 20 us at E=512, B=32), the same numbers
        inputs = (torch.mul if units == 1 else torch.bmm, w[:, :, :C].transpose(1, 2)) if dh is not None else None

        def by_torch() -> None:
            grad.copy_(torch.bmm(g, h.transpose(1, 2)))
            if inputs is not None:
                inputs[0](inputs[1], g, out=dh)

        return by_torch
    w_ptr, w_e, w_r, dh_ptr, dh_e, dh_r = (w.data_ptr(), w.stride(0), w.stride(1), dh.data_ptr(), dh.stride(0),
                                           dh.stride(1)) if dh is not None else (None, 0, 0, None, 0, 0)
    run, args = library().backward, (g.data_ptr(), g.stride(0), g.stride(1), h.data_ptr(), h.stride(0), h.stride(1),
                                     grad.data_ptr(), grad.stride(0), grad.stride(1), w_ptr, w_e, w_r, dh_ptr, dh_e,
                                     dh_r, E, units, K, C, B)

    def call(operands=(g, h, grad, w, dh)) -> None:
        if run(*args):
            raise MemoryError(f"kernels.backward: no memory for {units} sums")

    return call
