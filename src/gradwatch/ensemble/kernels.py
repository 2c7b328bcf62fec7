"""Kernels: the hand-written step's batched matmuls, from kernels.c compiled for this machine, else torch.

A stacked step multiplies thousands of tiny matrices (10 x 11 by 11 x 32 for the seed's nets), where
MKL's batched GEMM spends about half its time setting up each one. kernels.c keeps a member's rows
in vector registers instead: at E=512 on this project's CPU the forward product takes 26 instead of
95-106 us, a layer's backward (weight and input gradients in one pass over its gradient) 81 instead
of 220-270 us (``torch.bmm``, one thread, operands in cache; equal to 6e-6). The activations and
derivatives it has are applied while a member's block is in cache (``ACTIVATIONS``, ``DERIVATIVES``),
and ``step`` runs a whole training step member after member, so that the layers' buffers for all
members are not streamed through memory between one layer and the next.

It is compiled once per machine with the system's C compiler (``$CC``, else ``cc``; 0.3 s) into the
user's cache, as ``torch.utils.cpp_extension.load`` builds extensions on first use, and called
through ctypes (~2 us a call). Where no compiler works, or with ``GRADWATCH_KERNELS=torch``, every
call made here is torch's (``torch.bmm``, aten's activations), which computes the same numbers to
float rounding, slower, and ``step`` is None.
What torch ships was tried first: ``torch.compile`` of the same products (as broadcast multiply and
sum, which inductor turns into similar loops) ran them about as fast, but cost 20-25 us of Python
per call and 9 s (cached) to 29 s of compiling per step shape, more than a whole 512-member ensemble.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-shared", "-fPIC")  # native: the cache key names the machine


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
                      f"ensembles train through torch, about 1.5x slower", RuntimeWarning, stacklevel=2)
        return None
    P, N = ctypes.c_void_p, ctypes.c_int64
    lib.matmul.argtypes = [P, N, N, N, P, N, N, P, N, N, P, N, N, P, N, N, N, N]
    lib.matmul.restype = None
    lib.backward.argtypes = [P, N, N, P, N, N, P, N, N, P, N, N, P, N, N, P, N, N, P, N, N, N, N, N]
    lib.backward.restype = ctypes.c_int
    lib.step.argtypes = [N, P, P, P, P, P, P, P, P, P, N, N, P, N, P, P, N, P, P, N, N]
    lib.step.restype = ctypes.c_int
    return lib


aten = torch.ops.aten
# Activation module -> its code in kernels.c, which applies the activation to a product's output
# (ACTIVATIONS) or multiplies an input gradient by its derivative, from its output (DERIVATIVES),
# while the member's block is in cache, as aten computes them; and the same by torch, per code.
# Tanh's forward stays aten's: SLEEF's tanhf, which it calls, is not reproduced in kernels.c.
ACTIVATIONS = {"Sigmoid": 1, "ReLU": 3}
DERIVATIVES = {"Sigmoid": 1, "Tanh": 2, "ReLU": 3}
ACTIVATIONS_BY_TORCH = {1: lambda z, a: torch.sigmoid(z, out=a), 3: lambda z, a: torch.clamp_min(z, 0, out=a)}
DERIVATIVES_BY_TORCH = {1: lambda d, a: aten.sigmoid_backward.grad_input(d, a, grad_input=d),
                        2: lambda d, a: aten.tanh_backward.grad_input(d, a, grad_input=d),
                        3: lambda d, a: aten.threshold_backward.grad_input(d, a, 0, grad_input=d)}


def _by_torch(table: dict[int, Callable], kinds: Tensor | None, *operands: Tensor) -> list[functools.partial]:
    """``table``'s calls on the operands of each run of members that share a nonzero code in ``kinds``."""
    calls, start = [], 0
    for code, run in itertools.groupby([] if kinds is None else kinds.tolist()):
        stop = start + len(list(run))
        if code:
            calls.append(functools.partial(table[code], *(t[start:stop] for t in operands)))
        start = stop
    return calls


def _codes(kinds: Tensor | None, table: dict[str, int], a: Tensor | None, like: Tensor) -> bool:
    """Whether ``kinds``, if given, are (E,) int8 codes of ``table`` (or 0) and come with ``a`` shaped as ``like``."""
    return kinds is None or (a is not None and a.shape == like.shape and kinds.shape == like.shape[:1]
                             and kinds.dtype is torch.int8 and kinds.is_contiguous()
                             and set(kinds.tolist()) <= {0, *table.values()})


def _native(*tensors: Tensor) -> bool:
    """Whether kernels.c takes these operands: float32 CPU tensors of 3 dims with contiguous rows, and it was built."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu or t.dim() != 3 or t.stride(2) != 1:
            return False
    return library() is not None


def matmul(w: Tensor, x: Tensor, out: Tensor, a: Tensor | None = None,
           kinds: Tensor | None = None) -> Callable[[], None]:
    """A call that sets ``out[e] = w[e] @ x[e]`` each time it is made: w (E, R, C) in any strides,
    x (E, C, B), out (E, R, B); given ``a`` (E, R, B) and each member's ``ACTIVATIONS`` code ``kinds``
    (E,) int8 (0: none), also ``a[e] = f(out[e])``. The operands are checked and their addresses read
    once, for a step that reuses its buffers (~1 us a call instead of ~10); the call keeps them alive."""
    E, R, C = w.shape
    if x.shape[:2] != (E, C) or out.shape != (E, R, x.shape[2]) or not _codes(kinds, ACTIVATIONS, a, out):
        raise ValueError(f"kernels.matmul: shapes {tuple(w.shape)} @ {tuple(x.shape)} -> {tuple(out.shape)}")
    if not _native(w, x, out, *((a,) if kinds is not None else ())):
        activations = _by_torch(ACTIVATIONS_BY_TORCH, kinds, out, a)

        def by_torch() -> None:
            torch.bmm(w, x, out=out)
            for activate in activations:
                activate()

        return by_torch
    a_ptr, a_e, a_r, kinds_ptr = (a.data_ptr(), a.stride(0), a.stride(1), kinds.data_ptr()) if kinds is not None \
        else (None, 0, 0, None)
    run, args = library().matmul, (w.data_ptr(), *w.stride(), x.data_ptr(), x.stride(0), x.stride(1),
                                   out.data_ptr(), out.stride(0), out.stride(1), a_ptr, a_e, a_r, kinds_ptr,
                                   E, R, C, x.shape[2])

    def call(operands=(w, x, out, a, kinds)) -> None:  # the operands ride along: args holds only their addresses
        run(*args)

    return call


def backward(g: Tensor, h: Tensor, grad: Tensor, w: Tensor | None = None, dh: Tensor | None = None,
             a: Tensor | None = None, kinds: Tensor | None = None) -> Callable[[], None]:
    """A call that runs a Dense layer's backward from g = dL/dz (E, O, B) each time it is made:
    ``grad[e] = g[e] @ h[e].T``, the gradient of [W | b] (E, O, K) from the input with its row of
    ones h (E, K, B), and, given the layer's [W | b] block ``w`` (E, O, >= C), ``dh[e] = w[e, :, :C].T
    @ g[e]`` (E, C, B), the input's gradient; one pass over g for both where kernels.c runs them.
    Given the activations ``a`` (E, C, B) that were this input and each member's ``DERIVATIVES`` code
    ``kinds`` (E,) int8 (0: none), dh is then multiplied by f'(z) in place: dL/dz of the layer below.
    Checked once, as ``matmul``."""
    E, units, B = g.shape
    K = grad.shape[2]
    if h.shape != (E, K, B) or grad.shape[:2] != (E, units) or (dh is not None and (
            w is None or w.shape[:2] != (E, units) or w.shape[2] < dh.shape[1] or dh.shape[::2] != (E, B))) or (
            kinds is not None and (dh is None or not _codes(kinds, DERIVATIVES, a, dh))):
        raise ValueError(f"kernels.backward: shapes g {tuple(g.shape)}, h {tuple(h.shape)}, grad {tuple(grad.shape)}")
    C = 0 if dh is None else dh.shape[1]
    if not _native(g, h, grad, *((w, dh) if dh is not None else ()), *((a,) if kinds is not None else ())):
        # from one output unit an outer product, which MKL's batched GEMM ran 20x slower than a
        # broadcast multiply (440 vs 20 us at E=512, B=32), the same numbers
        inputs = (torch.mul if units == 1 else torch.bmm, w[:, :, :C].transpose(1, 2)) if dh is not None else None
        derivatives = _by_torch(DERIVATIVES_BY_TORCH, kinds, dh, a)

        def by_torch() -> None:
            grad.copy_(torch.bmm(g, h.transpose(1, 2)))
            if inputs is not None:
                inputs[0](inputs[1], g, out=dh)
            for derive in derivatives:
                derive()

        return by_torch
    w_ptr, w_e, w_r, dh_ptr, dh_e, dh_r = (w.data_ptr(), w.stride(0), w.stride(1), dh.data_ptr(), dh.stride(0),
                                           dh.stride(1)) if dh is not None else (None, 0, 0, None, 0, 0)
    a_ptr, a_e, a_r, kinds_ptr = (a.data_ptr(), a.stride(0), a.stride(1), kinds.data_ptr()) if kinds is not None \
        else (None, 0, 0, None)
    run, args = library().backward, (g.data_ptr(), g.stride(0), g.stride(1), h.data_ptr(), h.stride(0), h.stride(1),
                                     grad.data_ptr(), grad.stride(0), grad.stride(1), w_ptr, w_e, w_r, dh_ptr, dh_e,
                                     dh_r, a_ptr, a_e, a_r, kinds_ptr, E, units, K, C, B)

    def call(operands=(g, h, grad, w, dh, a, kinds)) -> None:
        if run(*args):
            raise MemoryError(f"kernels.backward: no memory for {units} sums")

    return call


def step(blocks: list[Tensor], grads: list[Tensor], x: Tensor, y: Tensor, scale: Tensor, out: Tensor,
         kinds: Tensor, taps: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None
         ) -> Callable[[], None] | None:
    """A call that runs a whole training step of a plain MLP's members, member after member, each time
    it is made, or None where kernels.c is not built (the layer by layer calls above then serve).

    ``blocks``: each Dense layer's [W | b] (E, units, inputs + 1), the last one unit wide, its output
    z under a sigmoid with binary cross-entropy against ``y`` (E, B). From the inputs ``x`` (E,
    inputs, B) it writes z into ``out`` (E, 1, B) and into ``grads`` (shaped as ``blocks``) each
    layer's gradient of ``scale[e]`` times the batch's summed BCE-with-logits (scale (E,): 1/B for
    the batch mean, 0 for a retired member): what ``matmul``, ``backward`` and autograd compute for
    it, to the bit where aten's sigmoid runs its vector loop (E x B a multiple of 32; its last
    sigmoids it takes with the C library's exp, an ulp apart), with each member's activations and
    gradients in cache instead of the layers' buffers streamed through memory. ``kinds``: each
    member's activation, a code of ACTIVATIONS that DERIVATIVES has too. Given ``taps``, each layer's
    input with its row of ones (E, inputs + 1, B), pre-activations and their gradient (E, units, B),
    contiguous, it also leaves them there as the layer by layer step does, for the statistics of a
    sampled step."""
    E, _, B = x.shape
    units = [b.shape[1] for b in blocks]
    inputs = [b.shape[2] - 1 for b in blocks]
    both = set(ACTIVATIONS.values()) & set(DERIVATIVES.values())
    if (units[-1] != 1 or inputs[0] != x.shape[1] or inputs[1:] != units[:-1] or out.shape != (E, 1, B)
            or y.shape != (E, B) or scale.shape != (E,) or kinds.shape != (E,) or kinds.dtype is not torch.int8
            or not set(kinds.tolist()) <= both
            or any(g.shape != b.shape for g, b in zip(grads, blocks, strict=True)) or (taps is not None and (
                [t.shape for t in taps[0]] != [(E, b.shape[2], B) for b in blocks]
                or any([t.shape for t in ts] != [(E, u, B) for u in units] for ts in taps[1:])))):
        raise ValueError(f"kernels.step: shapes x {tuple(x.shape)}, blocks {[tuple(b.shape) for b in blocks]}")
    tapped = [t for ts in taps or () for t in ts]
    if not _native(x, out, *blocks, *grads, *tapped) or not all(
            t.is_contiguous() for t in (y, scale, kinds, *tapped)):
        return None
    L, P, N = len(blocks) - 1, ctypes.c_void_p, ctypes.c_int64
    lists = [(P * (L + 1))(*(t.data_ptr() for t in blocks)), (N * (L + 1))(*(b.stride(0) for b in blocks)),
             (N * (L + 1))(*(b.stride(1) for b in blocks)), (P * (L + 1))(*(g.data_ptr() for g in grads)),
             (N * (L + 1))(*(g.stride(0) for g in grads)), (N * (L + 1))(*(g.stride(1) for g in grads)),
             (N * (L + 1))(*units), (N * (L + 1))(*inputs), (P * len(tapped))(*(t.data_ptr() for t in tapped))]
    run = library().step
    args = (L, *lists[:-1], x.data_ptr(), x.stride(0), x.stride(1), y.data_ptr(), y.stride(0), scale.data_ptr(),
            out.data_ptr(), out.stride(0), kinds.data_ptr(), lists[-1] if tapped else None, E, B)

    def call(operands=(blocks, grads, x, y, scale, out, kinds, tapped, lists)) -> None:
        if run(*args):
            raise MemoryError("kernels.step: no memory for a member's buffers")

    return call
