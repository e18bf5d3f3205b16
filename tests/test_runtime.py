"""Process-level helpers: handing freed C-heap memory back to the system."""

import platform
import subprocess
import sys
import textwrap

import pytest

from retrain.utils import runtime
from retrain.utils.runtime import return_free_memory

# In a child process, so that its malloc settings stay there: 200 MB freed on glibc's heap in
# holes between live blocks (so free() cannot give it back by shrinking the heap's top) stays
# resident until return_free_memory hands the pages back.
HELD_BY_THE_HEAP = textwrap.dedent(
    """
    import ctypes
    from retrain.utils.runtime import return_free_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD: blocks of 1 MB come from the heap

    def resident_mb():
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS"))
        return int(line.split()[1]) // 1024

    blocks = [libc.malloc(1 << 20) for _ in range(400)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    before = resident_mb()
    for block in blocks[::2]:
        libc.free(block)
    freed = resident_mb()
    return_free_memory()
    print(before, freed, resident_mb())
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap only")
def test_freed_heap_memory_goes_back_to_the_system():
    child = subprocess.run(
        [sys.executable, "-c", HELD_BY_THE_HEAP], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    before, freed, returned = map(int, child.stdout.split())
    assert freed > before - 20  # free() alone kept the pages
    assert returned < freed - 150  # return_free_memory gave them back


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS"))
    except OSError:
        return None
    return int(line.split()[1]) / 1024


def test_return_free_memory_is_safe_to_call_again_and_again(monkeypatch):
    """Call after call, between allocations that free memory for it to trim: it returns None
    and raises nothing, what is alive stays intact, the heap goes on serving allocations and
    memory does not grow. On glibc each call really trims (pinned below); where the C library
    has no malloc_trim it does nothing, just as safely."""
    trim, trims = runtime._malloc_trim(), []
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None
    if trim is not None:  # count the real calls the loop makes
        monkeypatch.setattr(
            runtime, "_malloc_trim", lambda: lambda pad: trims.append(pad) or trim(pad)
        )
    live = [bytes([i % 256]) * 10_000 for i in range(1_000)]  # 10 MB that must survive
    return_free_memory()
    start, trims[:] = resident_mb(), []
    for _ in range(100):
        scratch = [bytearray(64 << 10) for _ in range(64)]  # 4 MB freed before each call
        del scratch
        assert return_free_memory() is None
    after = resident_mb()
    assert trims == ([0] * 100 if trim is not None else [])  # each call really trimmed
    assert all(block == bytes([i % 256]) * 10_000 for i, block in enumerate(live))
    assert bytearray(32 << 20)[-1] == 0  # the heap still serves a large allocation
    if start is not None:
        assert after < start + 16  # 100 rounds of 4 MB freed and trimmed: nothing piles up
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: None)  # a C library without it
    for _ in range(3):
        assert return_free_memory() is None


def test_tensorflow_imports_without_scikit_learn_which_still_imports_after():
    pytest.importorskip("cleanlab")  # the audit's library, which needs scikit-learn
    code = textwrap.dedent(
        """
        import sys
        from retrain.utils.runtime import import_tensorflow_quietly

        import_tensorflow_quietly()
        print("sklearn" in sys.modules)
        import sklearn.base
        import cleanlab
        print(sklearn.base.BaseEstimator.__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "BaseEstimator"]


def test_a_run_imports_neither_keras_3_nor_pandas_which_still_import_after():
    code = textwrap.dedent(
        """
        import sys
        from retrain.utils.runtime import import_tensorflow_quietly

        import_tensorflow_quietly()
        from retrain.training.optim import make_optimizer

        make_optimizer("adam", 0.01)
        print("keras" in sys.modules, "pandas" in sys.modules)
        import keras.src.optimizers
        print(keras.src.optimizers.Adam.__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "Adam"]


def test_limiting_the_c_heaps_arenas_works_on_glibc_and_threads_still_allocate():
    code = textwrap.dedent(
        """
        import platform, threading
        from retrain.utils.runtime import limit_malloc_arenas

        print(limit_malloc_arenas() or platform.libc_ver()[0] != "glibc")
        blocks = []
        workers = [
            threading.Thread(target=lambda: blocks.append(bytearray(8 << 20))) for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(len(blocks))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "8"]
