import multiprocessing
import os

import numpy as np

from retrain.bottlenecks.cache import (
    BottleneckCache,
    file_content_key,
    file_key,
    module_cache_key,
)
from tests.conftest import write_image

DIM = 8


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def _keys(i: int) -> tuple[bytes, bytes]:
    return i.to_bytes(16, "big"), (i + 10**6).to_bytes(16, "big")


def _fill(root, n, start=0, shard_rows=4):
    cache = BottleneckCache(root, "m", DIM)
    with cache.writer(shard_rows) as writer:
        for i in range(start, start + n):
            writer.add(*_keys(i), _vec(i))
    return cache


def test_roundtrip_through_shards(tmp_path):
    _fill(tmp_path, 10)
    cache = BottleneckCache(tmp_path, "m", DIM)
    assert len(cache) == 10
    assert len(list((tmp_path / "m").glob("*.idx.npy"))) == 3  # 4 + 4 + 2
    locations = [cache.find(None, _keys(i)[0]) for i in range(10)]
    vectors, ok = cache.read(locations)
    assert ok.all()
    np.testing.assert_array_equal(vectors, np.stack([_vec(i) for i in range(10)]))
    assert cache.find(_keys(3)[1], None) == locations[3]  # by file key too
    cache.release_index()
    assert cache._index[1] is None  # the sorted keys are freed...
    assert cache.find(None, _keys(7)[0]) == locations[7]  # ...and rebuilt when needed


def test_float16_cache_stores_half_and_checks_its_rows(tmp_path):
    cache = BottleneckCache(tmp_path, "h", DIM, description={"test": True}, dtype="float16")
    with cache.writer(4) as writer:
        for i in range(6):
            writer.add(*_keys(i), _vec(i))
    reopened = BottleneckCache(tmp_path, "h", DIM, dtype="float16")
    locations = [reopened.find(None, _keys(i)[0]) for i in range(6)]
    vectors, ok = reopened.read(locations)
    assert ok.all() and vectors.dtype == np.float32
    expected = np.stack([_vec(i) for i in range(6)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(vectors, expected)
    shards = {len(np.load(p)): p for p in (tmp_path / "h").glob("*.vec.npy")}
    assert sorted(shards) == [2, 4] and np.load(shards[4]).dtype == np.float16
    shard = shards[4]  # rows 0-3
    assert '"dtype": "float16"' in (tmp_path / "h" / "module.json").read_text()
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0xFF  # row 3 fails its checksum
    shard.write_bytes(bytes(data))
    _, ok = BottleneckCache(tmp_path, "h", DIM, dtype="float16").read(locations)
    assert ok.tolist() == [True, True, True, False, True, True]
    # Shards of another precision in the folder are set aside, never read as these.
    mixed = BottleneckCache(tmp_path, "h", DIM)
    assert len(mixed) == 0 and "expected float32" in mixed.warnings[0]


def test_orphaned_vectors_from_a_killed_writer_are_ignored(tmp_path):
    _fill(tmp_path, 4)
    folder = tmp_path / "m"
    # A writer killed between its two renames leaves vectors without an index,
    # and one killed mid-write leaves only a temporary file.
    (folder / "killed.vec.npy").write_bytes(b"partial")
    (folder / ".x.vec.npy.123.tmp").write_bytes(b"partial")
    cache = BottleneckCache(tmp_path, "m", DIM)
    assert len(cache) == 4 and len(cache.shards) == 1


def test_damaged_shard_is_set_aside_with_a_warning(tmp_path):
    _fill(tmp_path, 4)
    vec_file = next((tmp_path / "m").glob("*.vec.npy"))
    vec_file.write_bytes(vec_file.read_bytes()[:-10])  # wrong length
    cache = BottleneckCache(tmp_path, "m", DIM)
    assert len(cache) == 0
    assert cache.warnings and "damaged" in cache.warnings[0]
    assert list((tmp_path / "m").glob("*.damaged"))


def test_bad_checksum_row_is_reported_and_forgotten(tmp_path):
    _fill(tmp_path, 4)
    vec_file = next((tmp_path / "m").glob("*.vec.npy"))
    data = bytearray(vec_file.read_bytes())
    data[-4] ^= 0xFF  # flip bits in the last row
    vec_file.write_bytes(bytes(data))
    cache = BottleneckCache(tmp_path, "m", DIM)
    locations = [cache.find(None, _keys(i)[0]) for i in range(4)]
    _, ok = cache.read(locations)
    assert ok.tolist() == [True, True, True, False]
    cache.forget(locations[3])
    assert cache.find(*reversed(_keys(3))) is None


def test_keys_change_with_bytes_and_module(tmp_path):
    path = write_image(tmp_path / "a.png")
    before = (file_key(path), file_content_key(path))
    write_image(path, color=(1, 2, 3))
    os.utime(path, ns=(1, 1))
    after = (file_key(path), file_content_key(path))
    assert before[0] != after[0] and before[1] != after[1]
    assert module_cache_key("a", "p") != module_cache_key("b", "p")
    assert module_cache_key("a", "p") != module_cache_key("a", "q")


def _writer_process(root: str, start: int) -> None:
    _fill(root, 40, start=start, shard_rows=3)


def test_concurrent_writers_share_one_folder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), s)) for s in (0, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = BottleneckCache(tmp_path, "m", DIM)
    assert len(cache) == 60  # 0..59, the overlap 20..39 written twice, harmlessly
    locations = [cache.find(None, _keys(i)[0]) for i in range(60)]
    vectors, ok = cache.read(locations)
    assert ok.all()
    np.testing.assert_array_equal(vectors, np.stack([_vec(i) for i in range(60)]))
