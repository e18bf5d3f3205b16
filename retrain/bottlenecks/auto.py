"""`auto`'s choice between float and int8 vectors, made before the bottleneck cache is opened.

On a CPU with int8 dot products (AVX512_VNNI or AVX_VNNI) the int8 module runs about 2.3x
faster than the float one, its features at a cosine of about 0.99 to float ones, and the
layer trained on them as accurate within noise (docs/benchmarks.md, "int8 extraction"): there
`auto` extracts with `tflite_int8`. Elsewhere, with a GPU, or where the int8 backend cannot
serve the config (`config.checks.int8_conflict`), `auto` keeps float vectors and chooses
between TFLite and TensorFlow as before (`backends.choose_backend`).

The int8 model is calibrated on the photo set's own training images, so each set pays one
conversion (about 6 s plus 0.08 s a calibration image on 2 cores: about 30 s for 300 images);
at 2.9 ms saved an image (198 -> 465 images/s) that pays back from about 10,000 images, and
`auto` keeps float vectors for smaller sets (`INT8_PAYS_FROM_IMAGES`).

int8 and float vectors live in different folders of the cache (`stage.open_cache`), so a
bottleneck folder used on CPUs with and without VNNI holds both and a run reads one kind only.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from retrain.config import INT8, ModuleConfig, RetrainConfig
from retrain.config.checks import int8_conflict
from retrain.errors import setting_name
from retrain.utils.cpu import int8_dot_product, read_cpuinfo

__all__ = ["AutoChoice", "auto_choice", "extraction_settings"]

log = logging.getLogger("retrain")

# The photo sets from which the int8 conversion pays for itself (see above; docs/benchmarks.md,
# "int8 extraction"): a set's count decides, so its runs agree on the kind of vectors they read.
INT8_PAYS_FROM_IMAGES = 10_000

# Measured figures the log line quotes (docs/benchmarks.md, "int8 extraction").
WHY_INT8 = (
    "int8 about 2.3x float; features at cosine 0.99 of float, accuracy within noise: "
    "docs/benchmarks.md"
)


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` extracts with: `backend` is INT8 or "auto" (float vectors: TFLite or
    TensorFlow, `backends.choose_backend` decides); `reason` says why (empty on a CPU without
    int8 dot products, where nothing changed)."""

    backend: str
    reason: str = ""


def auto_choice(
    cpu_flag: str | None, gpu: bool, conflict: str | None, images: int = INT8_PAYS_FROM_IMAGES
) -> AutoChoice:
    """`auto`'s choice on a CPU whose int8 dot-product flag is `cpu_flag` (None: none, or not
    known), with or without a `gpu`, for a config the int8 backend cannot serve because of
    `conflict` (None: it can), on a photo set of `images`. Pure."""
    if cpu_flag is None:
        return AutoChoice("auto")
    if gpu:
        return AutoChoice("auto", f"this CPU has {cpu_flag}, but a GPU is present")
    if conflict is not None:
        return AutoChoice("auto", f"this CPU has {cpu_flag}, but {conflict}")
    if images < INT8_PAYS_FROM_IMAGES:
        return AutoChoice(
            "auto",
            f"this CPU has {cpu_flag}, but converting to int8 pays back from about "
            f"{INT8_PAYS_FROM_IMAGES:,} images, and there are {images:,}",
        )
    return AutoChoice(INT8, f"this CPU has {cpu_flag}: {WHY_INT8}")


def extraction_settings(
    config: RetrainConfig, images: int, cpuinfo: str | None = None, gpu: bool | None = None
) -> tuple[ModuleConfig, AutoChoice | None]:
    """`config.module` with `auto` resolved to INT8 where `auto_choice` says so for a photo
    set of `images`, and that choice (None when the backend was asked for by name). `cpuinfo`
    is the text of /proc/cpuinfo (default: read it); `gpu` whether a GPU is visible (default:
    ask TensorFlow, only on a CPU with int8 dot products). Logs one line when the CPU has
    them."""
    settings = config.module
    if settings.extraction_backend != "auto":
        return settings, None
    flag = int8_dot_product(read_cpuinfo() if cpuinfo is None else cpuinfo)
    if flag is not None and gpu is None:
        from retrain.bottlenecks.backends import gpu_present  # imports TensorFlow

        gpu = gpu_present()
    conflict = int8_conflict(config)  # its last field is the setting that needs float vectors
    needs_float = f"{setting_name(conflict.fields[-1])} needs float vectors" if conflict else None
    choice = auto_choice(flag, bool(gpu), needs_float, images)
    if choice.backend == INT8:
        log.info(
            "Extraction: %s (%s); %s=tflite forces float",
            INT8,
            choice.reason,
            setting_name("module.extraction_backend"),
        )
        return dataclasses.replace(settings, extraction_backend=INT8), choice
    if choice.reason:
        log.info("Extraction: float, not %s: %s", INT8, choice.reason)
    return settings, choice
