"""A seeded corpus of mutated real images, and a decoder run over it in a child process.

`make_corpus` encodes the example photos (downscaled) as JPEG (baseline and progressive), PNG
(RGB, palette, 16-bit grey, RGBA), GIF (animated), WebP (lossy and lossless) and BMP, then mutates
them: bit flips (anywhere, or in the header), truncations, spliced headers (another file's or
another format's), huge declared sizes (in each format's own header fields, with a valid CRC
where the format has one) and overwritten runs of bytes. The same seed gives the same files.

`DECODE_CHILD` decodes every file of a corpus with `retrain.data.decode.decode_image` and reports,
per
file, how long it took, the outcome and the process's peak memory so far: the parent bounds the
time of each file (a hang is named by the file it was on) and the memory of all.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.fault_tools import ROOT, child_env

FORMATS = ("jpeg", "png", "gif", "webp", "bmp")
EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "webp": ".webp", "bmp": ".bmp"}
MUTATIONS = ("bit_flips", "truncation", "spliced_header", "huge_size", "overwritten_run")
# Declared sizes: far beyond any limit, just above the default 100 MP, and just under it (the
# decoder then really tries: a truncated 90 MP image must fail fast, not eat memory).
HUGE_SIZES = ((65535, 65535), (16383, 16383), (12000, 9000), (30000, 3000), (1, 65535))


@dataclass(frozen=True)
class FuzzFile:
    name: str  # <number>-<format>-<mutation><extension>
    fmt: str
    mutation: str
    data: bytes


def _encodings(image: Image.Image) -> dict[str, list[bytes]]:
    """One photo in every format and several of each format's variants."""

    def save(img: Image.Image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, fmt, **options)
        return buffer.getvalue()

    gray16 = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    frames = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "jpeg": [save(image, "JPEG", quality=85), save(image, "JPEG", progressive=True)],
        "png": [
            save(image, "PNG"),
            save(image.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
            save(gray16, "PNG"),
            save(rgba, "PNG"),
        ],
        "gif": [save(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)],
        "webp": [save(image, "WEBP", quality=80), save(image, "WEBP", lossless=True)],
        "bmp": [save(image, "BMP"), save(image.convert("P"), "BMP")],
    }


def base_files(photos: list[Path], side: int = 96) -> dict[str, list[bytes]]:
    """The photos, each scaled to at most `side` pixels, encoded in every format."""
    bases: dict[str, list[bytes]] = {fmt: [] for fmt in FORMATS}
    for photo in photos:
        with Image.open(photo) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
        for fmt, encoded in _encodings(image).items():
            bases[fmt].extend(encoded)
    return bases


def _flip_bits(data: bytearray, rng: random.Random) -> None:
    span = min(len(data), 256) if rng.random() < 0.5 else len(data)
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(span)] ^= 1 << rng.randrange(8)


def _png_with_size(data: bytearray, width: int, height: int, rng: random.Random) -> None:
    data[16:24] = struct.pack(">II", width, height)
    if rng.random() < 0.8:  # a valid CRC, so the header is believed
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


def _jpeg_with_size(data: bytearray, width: int, height: int) -> None:
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return


def _gif_with_size(data: bytearray, width: int, height: int) -> None:
    data[6:10] = struct.pack("<HH", width, height)
    at = data.find(b"\x2c", 13)  # the first image descriptor
    if at >= 0:
        data[at + 5 : at + 9] = struct.pack("<HH", width, height)


def _webp_with_size(data: bytearray, width: int, height: int) -> None:
    kind = bytes(data[12:16])
    if kind == b"VP8 ":
        data[26:30] = struct.pack("<HH", min(width, 16383), min(height, 16383))
    elif kind == b"VP8L":
        bits = (min(width, 16384) - 1) | ((min(height, 16384) - 1) << 14)
        data[21:25] = struct.pack(
            "<I", bits | (int.from_bytes(data[21:25], "little") & ~(2**28 - 1))
        )


def _with_huge_size(data: bytearray, fmt: str, rng: random.Random) -> None:
    width, height = rng.choice(HUGE_SIZES)
    if fmt == "png":
        _png_with_size(data, width, height, rng)
    elif fmt == "jpeg":
        _jpeg_with_size(data, width, height)
    elif fmt == "gif":
        _gif_with_size(data, width, height)
    elif fmt == "webp":
        _webp_with_size(data, width, height)
    else:  # BMP: signed 32-bit sizes, so also a negative (top-down) one
        data[18:26] = struct.pack("<ii", width, rng.choice((height, -height)))


def mutate(data: bytes, fmt: str, mutation: str, rng: random.Random, donors: list[bytes]) -> bytes:
    """`data` (an image in `fmt`) changed by `mutation`, drawing from `rng` and `donors`
    (other encoded images, of any format)."""
    out = bytearray(data)
    if mutation == "bit_flips":
        _flip_bits(out, rng)
    elif mutation == "truncation":
        out = out[: rng.randrange(1, len(out))]
    elif mutation == "spliced_header":
        donor = rng.choice(donors)
        cut = rng.randrange(8, min(len(donor), len(out), 512))
        out = bytearray(donor[:cut]) + out[cut:]
    elif mutation == "huge_size":
        _with_huge_size(out, fmt, rng)
    else:
        start = rng.randrange(len(out))
        fill = rng.choice((b"\0", b"\xff", bytes([rng.randrange(256)])))
        out[start : start + rng.randint(1, 64)] = fill * rng.randint(1, 64)
    return bytes(out)


def make_corpus(photos: list[Path], count: int, seed: int) -> list[FuzzFile]:
    """`count` mutated files, formats and mutations taken in turn, the same for one seed."""
    rng = random.Random(seed)
    bases = base_files(photos)
    donors = [data for encoded in bases.values() for data in encoded]
    corpus = []
    for i in range(count):
        fmt = FORMATS[i % len(FORMATS)]
        mutation = MUTATIONS[(i // len(FORMATS)) % len(MUTATIONS)]
        data = mutate(rng.choice(bases[fmt]), fmt, mutation, rng, donors)
        corpus.append(FuzzFile(f"{i:05d}-{fmt}-{mutation}{EXTENSIONS[fmt]}", fmt, mutation, data))
    return corpus


def write_corpus(corpus: list[FuzzFile], folder: Path) -> list[Path]:
    """The corpus as files in one class folder per format under `folder`; returns the paths."""
    paths = []
    for item in corpus:
        path = folder / item.fmt / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        paths.append(path)
    return paths


DECODE_CHILD = """
import json, sys, time
from retrain.data.decode import ImageDecodeError, decode_image
from tests.fuzz_images import peak_mb
paths = json.load(open(sys.argv[1]))
size = (224, 224)
for i, path in enumerate(paths):
    print(json.dumps({"start": i}), flush=True)
    began = time.perf_counter()
    try:
        outcome = {"ok": True, "shape": list(decode_image(path, size).shape)}
    except ImageDecodeError as err:
        outcome = {"ok": False, "type": "ImageDecodeError", "reason": str(err)}
    except BaseException as err:
        outcome = {"ok": False, "type": type(err).__name__, "reason": str(err)}
    peak = peak_mb()
    outcome.update(i=i, seconds=time.perf_counter() - began, peak_mb=peak)
    print(json.dumps(outcome), flush=True)
"""


def peak_mb() -> float:
    """This process's peak resident memory in MB since it started its program: VmHWM, not
    ru_maxrss, which keeps the peak of the process it was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


@dataclass
class DecodeReport:
    outcomes: list[dict]
    peak_mb: float


def decode_in_child(paths: list[Path], work: Path, timeout: float) -> DecodeReport:
    """Decode `paths` in a child process; fails naming the file the child was on if it does
    not finish within `timeout` seconds or dies."""
    listing = work.absolute() / "paths.json"
    listing.write_text(json.dumps([str(p.absolute()) for p in paths]))
    log = work / "decode.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", DECODE_CHILD, str(listing)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if child.poll() is None:
            child.kill()
            child.wait()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    started = [r["start"] for r in records if "start" in r]
    outcomes = [r for r in records if "seconds" in r]
    if child.returncode != 0 or len(outcomes) != len(paths):
        on = paths[started[-1]] if started else None
        raise AssertionError(
            f"the decoder child ended with {child.returncode} on {on}:\n{log.read_text()[-2000:]}"
        )
    return DecodeReport(outcomes, max(o["peak_mb"] for o in outcomes))
