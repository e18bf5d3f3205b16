"""Process-level helpers: handing freed C-heap memory back to the system."""

import platform
import subprocess
import sys
import textwrap

import pytest

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


def test_return_free_memory_is_safe_to_call_again_and_again():
    for _ in range(3):
        return_free_memory()
