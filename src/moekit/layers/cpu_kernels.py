"""Fused CPU elementwise kernels (cpu_kernels.c) for SwiGLU, built on first use.

With aten ops, SwiGLU's elementwise work is 3 passes over each [n, f] hidden block forward and 9 backward; in
W2's layer it was ~12% of forward+backward (a probe skipping it: 1.17x -> 1.03x the best dense, README "Layer
speed"). One C loop does each direction in one pass: per expert block in the blockwise kernel, and under
autograd (``swiglu_hidden``) for MLP, shared experts and the grouped/bmm backends. The C file is compiled once
per machine with the system C compiler into ``$MOEKIT_CACHE`` (default ``~/.cache/moekit``), keyed by the
source, flags and CPU, written atomically, and loaded with ctypes (which releases the GIL during the call, so
pooled workers run in parallel).

No compiler, a failed build or ``MOEKIT_CPU_KERNELS=0``: ``library()`` and ``swiglu_hidden()`` return None and
the callers keep their aten path; the results agree to float32 rounding (tests/layers/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# no -ffast-math: it would link crtfastmath and flush denormals in the whole process
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
NATIVE = ["-march=native"]  # tried first; a compiler without it builds the portable version

_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def enabled() -> bool:
    return os.environ.get("MOEKIT_CPU_KERNELS", "1") != "0"


def cache_dir() -> Path:
    base = os.environ.get("MOEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moekit")
    return Path(base) / "kernels"


def _cpu_id() -> str:
    """What -march=native compiles for: a library built on another CPU must not be loaded here."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cc: str, out: Path) -> bool:
    for extra in (NATIVE, []):
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            so = Path(tmp) / out.name
            r = subprocess.run([cc, *FLAGS, *extra, "-o", str(so), str(SOURCE)], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(so, out)  # atomic: a concurrent builder or a crash never leaves half a library
                return True
            log.debug("moekit cpu kernels: %s %s failed: %s", cc, extra, r.stderr[-500:])
    return False


def _load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.debug("moekit cpu kernels: no C compiler; using aten ops")
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, platform.machine(), _cpu_id()]).encode())
    path = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() and not _compile(cc, path):
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.debug("moekit cpu kernels: %s; using aten ops", e)
        return None
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.swiglu_forward.argtypes = [I, I, P, I, P, I, P, P, I]
    lib.swiglu_backward.argtypes = [I, I, P, I, P, I, P, P, I, P, I, P, I, P, I, P]
    for fn in (lib.swiglu_forward, lib.swiglu_backward):
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None when unavailable or disabled."""
    global _lib
    if not enabled():
        return None
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _load()
    return _lib


def usable(*ts: Tensor) -> bool:
    """The kernels take float32 CPU matrices whose rows are contiguous."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in ts)


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def swiglu_forward(g: Tensor, u: Tensor, s: Tensor | None, out: Tensor) -> Tensor:
    """out = silu(g) * u * s[:, None] ([n, f] each, s [n] or None). Call only when ``library()`` is not None."""
    n, f = g.shape
    library().swiglu_forward(n, f, g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), _ptr(s),
                             out.data_ptr(), out.stride(0))
    return out


def swiglu_backward(g: Tensor, u: Tensor, s: Tensor | None, dh: Tensor, dg: Tensor, du: Tensor,
                    hs: Tensor | None, ds: Tensor | None) -> None:
    """Given dh = d loss / d (silu(g) * u * s): writes dg and du ([n, f]; ``dg`` may be ``dh`` itself), and
    when given hs = silu(g) * u * s ([n, f]) and ds, the row sums of dh * silu(g) * u ([n], contiguous)."""
    n, f = g.shape
    library().swiglu_backward(n, f, g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), _ptr(s),
                              dh.data_ptr(), dh.stride(0), dg.data_ptr(), dg.stride(0), du.data_ptr(),
                              du.stride(0), _ptr(hs), 0 if hs is None else hs.stride(0), _ptr(ds))


PARALLEL_MIN = 1 << 18  # elements: below this, one thread beats waking others
_row_pool: tuple[int, ThreadPoolExecutor] | None = None


def split_rows(kernel, n: int, f: int, *row_tensors: Tensor | None) -> None:
    """kernel(*tensors) over row chunks on torch's thread count: the C loops are single-threaded (the blockwise
    kernel calls them from its own workers, one block each); a dense FFN's [T, H] hidden units are one call."""
    global _row_pool
    threads = torch.get_num_threads()
    if threads < 2 or n * f < PARALLEL_MIN or n < threads:
        kernel(*row_tensors)
        return
    with _lock:
        if _row_pool is None or _row_pool[0] != threads:
            if _row_pool is not None:
                _row_pool[1].shutdown(wait=False)
            _row_pool = (threads, ThreadPoolExecutor(threads - 1, thread_name_prefix="moekit-rows"))
        pool = _row_pool[1]
    bounds = [n * i // threads for i in range(threads + 1)]
    chunks = [[None if t is None else t[a:b] for t in row_tensors] for a, b in zip(bounds[:-1], bounds[1:])]
    futures = [pool.submit(kernel, *c) for c in chunks[1:]]
    kernel(*chunks[0])
    for fut in futures:
        fut.result()


class SwiGLUHidden(torch.autograd.Function):
    """silu(g) * u * s[..., None] under autograd: one pass forward, one backward (aten: 2-3 and 4-6)."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, s: Tensor | None) -> Tensor:
        f = g.shape[-1]
        g2, u2 = g.reshape(-1, f), u.reshape(-1, f)
        s1 = None if s is None else s.reshape(-1).contiguous()
        out = torch.empty_like(g2)
        split_rows(swiglu_forward, g2.shape[0], f, g2, u2, s1, out)
        ctx.save_for_backward(g2, u2, s1)
        return out.view(g.shape)

    @staticmethod
    def backward(ctx, dh: Tensor):
        g2, u2, s1 = ctx.saved_tensors
        dh2 = dh.reshape(g2.shape)
        if dh2.stride(-1) != 1:
            dh2 = dh2.contiguous()
        dg, du = torch.empty_like(g2), torch.empty_like(g2)
        ds = torch.empty_like(s1) if s1 is not None and ctx.needs_input_grad[2] else None
        split_rows(swiglu_backward, g2.shape[0], g2.shape[1], g2, u2, s1, dh2, dg, du, None, ds)
        shape = dh.shape
        return dg.view(shape), du.view(shape), None if ds is None else ds.view(shape[:-1])


def swiglu_hidden(g: Tensor, u: Tensor, s: Tensor | None = None) -> Tensor | None:
    """silu(g) * u (* s[..., None]) through the fused kernel, or None where it does not apply (another dtype
    or device, traced by torch.compile, kernels unavailable): the caller then uses aten ops."""
    if (torch.compiler.is_compiling() or g.shape != u.shape or g.numel() == 0
            or not usable(*(t for t in (g, u, s) if t is not None)) or library() is None):
        return None
    if s is not None and s.shape != g.shape[:-1]:
        return None
    return SwiGLUHidden.apply(g, u, s)
