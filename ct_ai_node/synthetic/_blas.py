"""Keep numpy's OpenBLAS single-threaded while a phantom is generated.

The generator does many small matrix products (field interpolation); on a small,
shared CPU, OpenBLAS worker threads that spin-wait against other processes made
these 10-20x slower than single-threaded calls. This is what threadpoolctl does,
reduced to the one library numpy ships.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading

_lock = threading.Lock()
_funcs: tuple | None = None


def _find():
    global _funcs
    if _funcs is not None:
        return _funcs
    _funcs = ()
    try:
        import numpy  # noqa: F401  (make sure its BLAS is loaded)

        with open("/proc/self/maps") as f:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
        for path in paths:
            lib = ctypes.CDLL(path)
            for suffix in ("64_", "", "_64"):
                for pre in ("scipy_openblas", "openblas"):
                    get = getattr(lib, f"{pre}_get_num_threads{suffix}", None)
                    set_ = getattr(lib, f"{pre}_set_num_threads{suffix}", None)
                    if get is not None and set_ is not None:
                        get.restype = ctypes.c_int
                        set_.argtypes = [ctypes.c_int]
                        _funcs = _funcs + ((get, set_),)
                        break
                else:
                    continue
                break
    except Exception:  # pragma: no cover - not Linux, or another BLAS
        _funcs = ()
    return _funcs


@contextlib.contextmanager
def single_threaded_blas():
    funcs = _find()
    with _lock:
        old = [get() for get, _ in funcs]
        for _, set_ in funcs:
            set_(1)
    try:
        yield
    finally:
        with _lock:
            for (_, set_), n in zip(funcs, old):
                set_(n)
