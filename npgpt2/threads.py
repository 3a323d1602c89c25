"""Threads: how many cores npgpt2 uses, for BLAS and for its own work.

NumPy's elementwise functions (``np.tanh``, ``np.exp``, ``+=`` ...) run on one core, and its BLAS
runs matrix products on several. The fast forward pass (fast.py) splits each layer into row tiles
and heads, and gives them to a pool of Python threads (NumPy releases the GIL inside its loops), each
calling a single-threaded BLAS: then both kinds of work use every core, and a tile's intermediates
stay in the processor's cache.

    npgpt2.set_num_threads(2)     # like torch.set_num_threads: npgpt2's pool and BLAS's
    npgpt2.get_num_threads()

The default is the number of threads BLAS uses when npgpt2 is imported (OpenBLAS and MKL read
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS; usually one per core). The tiles do not
depend on the number of threads, so from ``fast.MIN_ROWS`` rows (batch x position) up every setting
gives the same numbers, bit for bit; below, the products run whole on BLAS's threads (see next),
and one thread and two can differ in the last bits.

BLAS's thread count belongs to the whole process, not to a thread, and BLAS rounds a product
differently on one thread and on two. So the model's products (forward and backward, on either
path) never take BLAS as they find it: from ``fast.MIN_ROWS`` rows up they run in pieces on the
pool, BLAS at one thread; below, on the calling thread, under ``own_blas``, BLAS at npgpt2's
thread count, while no tiled work (which holds BLAS at one thread for the whole process) runs
beside them. A call gives the same bits whatever other threads are doing. (Products in your own
code, or in analysis code outside the model's calls, take BLAS as they find it.)

OpenBLAS's threads, once a product is done, wait for the next by spinning, 2**28 processor cycles
(about 0.1 s) by default, before they sleep: a tiled computation that follows a product run on
BLAS's threads (a small input's) then shares the cores with them, at about half its speed. So,
unless ``OPENBLAS_THREAD_TIMEOUT`` is set, npgpt2 shortens the spin to ``BLAS_SPIN`` = 2**20
cycles (under a millisecond; a sequence of products, as in generation, still finds the threads
awake) when it is imported: it sets that variable, OpenBLAS reads it again and restarts its threads.

BLAS's thread count is set through its own C function (``openblas_set_num_threads`` or
``MKL_Set_Num_Threads``), found among the libraries this process has loaded. Where no known BLAS is
found, npgpt2 cannot keep BLAS off the cores its threads use, and works on one Python thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

# (setter, getter) symbol names, per BLAS build: numpy's own wheels carry a prefixed OpenBLAS
_BLAS_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
)


class _Blas:
    """numpy's BLAS, as the C functions that set and read its thread count."""

    def __init__(self):
        self._set, self._get, self._lib = None, None, None
        np.ones((2, 2)) @ np.ones((2, 2))  # make sure BLAS is loaded
        for path in _loaded_libraries():
            if not any(word in os.path.basename(path).lower() for word in ("blas", "mkl")):
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for set_name, get_name in _BLAS_SYMBOLS:
                if hasattr(lib, set_name) and hasattr(lib, get_name):
                    self._set, self._get, self._lib = getattr(lib, set_name), getattr(lib, get_name), lib
                    self._get.restype = ctypes.c_int
                    return

    @property
    def found(self) -> bool:
        return self._set is not None

    def get(self) -> int:
        return int(self._get()) if self.found else 1

    def set(self, n: int) -> None:
        if self.found:
            self._set(ctypes.c_int(n))


@lru_cache(maxsize=4)
def axpby(dtype):
    """BLAS's ``axpby`` for float32 or float64 arrays, as ``f(alpha, x, beta, y)``: y = alpha x +
    beta y in place, in one pass (x, y: contiguous 1-D arrays of ``dtype``, of one length); or None
    where numpy's BLAS has none. (A multiply and an add, fused: NumPy would take three passes.)"""
    letter = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}.get(np.dtype(dtype))
    if letter is None or _blas._lib is None:
        return None
    for name, integer in ((f"scipy_cblas_{letter}axpby64_", ctypes.c_int64), (f"scipy_cblas_{letter}axpby", ctypes.c_int),
                          (f"cblas_{letter}axpby64_", ctypes.c_int64), (f"cblas_{letter}axpby", ctypes.c_int)):
        fn = getattr(_blas._lib, name, None)
        if fn is not None:
            break
    else:
        return None
    real = ctypes.c_float if letter == "s" else ctypes.c_double
    fn.restype = None
    fn.argtypes = [integer, real, ctypes.c_void_p, integer, real, ctypes.c_void_p, integer]

    def call(alpha: float, x: np.ndarray, beta: float, y: np.ndarray) -> None:
        fn(y.size, alpha, x.ctypes.data, 1, beta, y.ctypes.data, 1)
    return call


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries this process has loaded (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line and ".so" in line}
    except OSError:  # not Linux
        return []
    return sorted(paths)


BLAS_SPIN = 20  # OpenBLAS's idle threads spin 2**BLAS_SPIN cycles before they sleep (see above)


def _shorten_blas_spin(blas: _Blas) -> None:
    """OpenBLAS's idle threads: spin 2**BLAS_SPIN cycles, not its default 2**28, unless the user
    set ``OPENBLAS_THREAD_TIMEOUT``. OpenBLAS reads the variable when it starts its threads, so
    they are stopped and started again (no BLAS call is running while a module is imported)."""
    lib = blas._lib
    functions = [getattr(lib, name, None) for name in ("openblas_read_env", "blas_thread_shutdown_", "blas_thread_init")]
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or lib is None or None in functions:
        return
    read_env, shutdown, start = functions
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(BLAS_SPIN)  # (processes started from this one inherit it)
    read_env()
    shutdown()
    start()


_blas = _Blas()
_shorten_blas_spin(_blas)
_num_threads = max(1, _blas.get()) if _blas.found else 1
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()  # one tiled computation at a time owns the pool and BLAS's setting


def set_num_threads(n: int) -> None:
    """Use ``n`` threads: npgpt2's own pool, and BLAS's (outside npgpt2's tiled work too)."""
    global _num_threads, _pool
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads({n!r}): expected a whole number of threads >= 1")
    with _lock:
        _num_threads = int(n)
        _blas.set(_num_threads)
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def get_num_threads() -> int:
    """The number of threads npgpt2 uses (see ``set_num_threads``)."""
    return _num_threads


@lru_cache(maxsize=64)
def ranges(n: int, parts: int) -> tuple[range, ...]:
    """[0, n) in ``parts`` contiguous ranges of about equal length (pieces of work to share out)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return tuple(range(a, b) for a, b in zip(bounds[:-1], bounds[1:]))


@contextlib.contextmanager
def worker_pool():
    """For one tiled computation: yields ``run(fn, items)``, which calls ``fn(item)`` for every
    item, spread over the pool's threads, with BLAS on one thread meanwhile (restored after).

    Items are independent pieces of work (row tiles, heads); their results are written by ``fn``
    into disjoint parts of preallocated arrays, so the order they run in changes nothing.
    """
    global _pool
    with _blas_held(1):  # the tiles' products, each on the thread that runs the tile
        n = _num_threads if _blas.found else 1
        if n > 1 and _pool is None:
            _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="npgpt2")
        yield _runner(_pool if n > 1 else None, n)


@contextlib.contextmanager
def own_blas():
    """For a product outside the pool (fast.py's small inputs): BLAS at npgpt2's thread count, and
    no tiled work beside it, which sets BLAS to one thread for the whole process meanwhile. Then the
    product's bits do not depend on what other threads are doing."""
    with _blas_held(_num_threads):
        yield


@contextlib.contextmanager
def _blas_held(n: int):
    """BLAS at ``n`` threads, and the lock that every holder of BLAS's setting takes (restored after)."""
    with _lock:
        before = _blas.get()
        if before != n:
            _blas.set(n)
        try:
            yield
        finally:
            if before != n:
                _blas.set(before)


def _runner(pool, n: int):
    """``run(fn, items)``: the calling thread and the pool's n - 1 threads take the items one at a
    time from a shared list until none is left: the caller works too, and each pool thread is
    handed the call once, not each item (a hand-over costs tens of microseconds)."""
    def run(fn, items):
        items = list(items)
        if pool is None or len(items) == 1:
            for item in items:
                fn(item)
            return
        left = iter(items)
        taking = threading.Lock()

        def take():
            while True:
                with taking:
                    item = next(left, _NONE_LEFT)
                if item is _NONE_LEFT:
                    return
                fn(item)

        helpers = [pool.submit(take) for _ in range(min(n, len(items)) - 1)]
        try:
            take()
        finally:  # (after an error too: the helpers stop at the next item, and are waited for)
            with taking:
                for _ in left:
                    pass
            for helper in helpers:
                helper.result()  # re-raises a helper's exception here
    return run


_NONE_LEFT = object()
