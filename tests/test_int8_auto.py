"""`--extraction_backend auto` takes the int8 model on a CPU with int8 dot products (issue 37,
item 4): the detection over /proc/cpuinfo's text, the choice, its log line and metrics, and a
bottleneck folder used on CPUs with and without VNNI keeping the two kinds of vectors apart."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import retrain
from retrain.bottlenecks import auto, backends
from retrain.bottlenecks.stage import cached_bottlenecks, extraction_metrics
from retrain.utils.cpu import int8_dot_product, read_cpuinfo
from tests.conftest import write_image
from tests.fault_tools import save_tiny_module

AVX2 = "fpu vme de pse tsc msr pae sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"


def cpuinfo(*flag_lines: str) -> str:
    """/proc/cpuinfo's text for processors with these flags, as x86 Linux writes it."""
    return "\n".join(
        f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: EPYC\nflags\t\t: {flags}\n"
        for i, flags in enumerate(flag_lines)
    )


VNNI_CPU = cpuinfo(*[f"{AVX2} avx512f avx512bw avx512_vnni avx512_bf16"] * 2)
AVX2_CPU = cpuinfo(AVX2, AVX2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VNNI_CPU, "AVX512_VNNI"),
        (cpuinfo(f"{AVX2} avx_vnni"), "AVX_VNNI"),  # Alder Lake and later: VEX-encoded VNNI
        (cpuinfo(f"{AVX2} avx_vnni avx512_vnni"), "AVX512_VNNI"),
        (AVX2_CPU, None),  # this machine: AVX2 only
        (cpuinfo(f"{AVX2} avx512_vnni", AVX2), None),  # one processor without it
        (cpuinfo(f"{AVX2} avx512_vnnix avx_vnni_int8"), None),  # whole flags only
        ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", None),  # ARM: another story
        ("", None),  # no /proc/cpuinfo
    ],
)
def test_int8_dot_products_are_read_from_every_processors_flags(text, expected):
    assert int8_dot_product(text) == expected


def test_an_unreadable_cpuinfo_is_empty(tmp_path):
    assert read_cpuinfo(tmp_path / "missing") == ""
    assert read_cpuinfo(tmp_path) == ""  # a folder


def test_auto_takes_int8_only_on_a_vnni_cpu_without_gpu_or_conflict():
    picked = auto.auto_choice("AVX512_VNNI", gpu=False, conflict=None)
    assert picked.backend == "tflite_int8"
    assert picked.reason.startswith("this CPU has AVX512_VNNI: int8 about 2.3x float")
    assert auto.auto_choice(None, gpu=False, conflict=None) == auto.AutoChoice("auto", "")
    on_gpu = auto.auto_choice("AVX_VNNI", gpu=True, conflict=None)
    assert on_gpu == auto.AutoChoice("auto", "this CPU has AVX_VNNI, but a GPU is present")
    held = auto.auto_choice("AVX512_VNNI", gpu=False, conflict="fine_tuning.steps needs floats")
    assert held.backend == "auto" and held.reason.endswith("but fine_tuning.steps needs floats")


def test_auto_keeps_float_vectors_where_the_conversion_would_not_pay():
    small = auto.auto_choice("AVX512_VNNI", gpu=False, conflict=None, images=3_670)
    assert small == auto.AutoChoice(
        "auto",
        "this CPU has AVX512_VNNI, but converting to int8 pays back from about 10,000 images, "
        "and there are 3,670",
    )
    large = auto.auto_choice("AVX512_VNNI", gpu=False, conflict=None, images=10_000)
    assert large.backend == "tflite_int8"


def settings_for(config, text, gpu=False, images=auto.INT8_PAYS_FROM_IMAGES):
    settings, choice = auto.extraction_settings(config, images, cpuinfo=text, gpu=gpu)
    return settings.extraction_backend, choice


def test_the_config_resolves_auto_and_says_why(caplog):
    caplog.set_level(logging.INFO, logger="retrain")
    config = retrain.RetrainConfig(image_dir="unused")
    assert settings_for(config, VNNI_CPU)[0] == "tflite_int8"
    assert (
        "Extraction: tflite_int8 (this CPU has AVX512_VNNI: int8 about 2.3x float; features at "
        "cosine 0.99 of float, accuracy within noise: docs/benchmarks.md); "
        "module.extraction_backend=tflite forces float" in caplog.text
    )
    caplog.clear()
    assert settings_for(config, VNNI_CPU, images=200)[0] == "auto"
    assert caplog.messages == [
        "Extraction: float, not tflite_int8: this CPU has AVX512_VNNI, but converting to int8 "
        "pays back from about 10,000 images, and there are 200"
    ]
    caplog.clear()
    assert settings_for(config, AVX2_CPU) == ("auto", auto.AutoChoice("auto"))
    assert settings_for(config, VNNI_CPU, gpu=True)[0] == "auto"
    assert caplog.messages == [
        "Extraction: float, not tflite_int8: this CPU has AVX512_VNNI, but a GPU is present"
    ]
    for backend in ("tflite", "tensorflow", "tflite_int8"):  # asked for by name: as asked
        named = retrain.RetrainConfig(
            image_dir="unused", module=retrain.ModuleConfig(extraction_backend=backend)
        )
        assert settings_for(named, VNNI_CPU) == (backend, None)
        assert settings_for(named, AVX2_CPU) == (backend, None)


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"fine_tuning": retrain.FineTuningConfig(steps=10)}, "fine_tuning.steps"),
        (
            {"distortions": retrain.DistortionConfig(flip_left_right=True)},
            "distortions.copies",
        ),
        (
            {"distribution": retrain.DistributionConfig(strategy="mirrored")},
            "distribution.strategy",
        ),
    ],
)
def test_configs_int8_cannot_serve_keep_float_vectors(change, setting):
    config = retrain.RetrainConfig(image_dir="unused", **change)
    backend, choice = settings_for(config, VNNI_CPU)
    assert backend == "auto"
    assert choice.reason == f"this CPU has AVX512_VNNI, but {setting} needs float vectors"
    copies = retrain.DistortionConfig(flip_left_right=True, copies=1)
    assert settings_for(retrain.RetrainConfig(image_dir="unused", distortions=copies), VNNI_CPU)[
        0
    ] == ("tflite_int8")


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


def test_a_folder_used_on_cpus_with_and_without_vnni_never_mixes_vectors(
    tmp_path, tiny_module, monkeypatch, caplog
):
    """The same bottleneck folder on a VNNI CPU, then one without, then the VNNI one again:
    int8 vectors, then float ones computed afresh beside them, then the int8 ones reused."""
    root = tmp_path / "images"
    for i in range(8):
        write_image(root / "red" / f"r{i}.png", color=(200, 20 + 9 * i, 20))
        write_image(root / "blue" / f"b{i}.png", color=(20, 20 + 9 * i, 200))
    config = retrain.RetrainConfig(
        image_dir=str(root),
        data=retrain.DataConfig(25, 0),
        module=retrain.ModuleConfig(handle=str(tiny_module), cache_dir=str(tmp_path / "modules")),
        cache=retrain.CacheConfig(bottleneck_dir=str(tmp_path / "cache")),
        training=retrain.HeadTrainingConfig(how_many_training_steps=20),
    )
    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    monkeypatch.setattr(auto, "INT8_PAYS_FROM_IMAGES", 16)  # as if 16 photos were many
    caplog.set_level(logging.INFO, logger="retrain")

    def run_on(text: str) -> dict:  # the audit's start: the vectors a run reads, no training
        monkeypatch.setattr(auto, "read_cpuinfo", lambda: text)
        with cached_bottlenecks(config) as cached:
            b = cached.bottlenecks
            return {"computed": b.computed, **extraction_metrics(config, None, b)}

    monkeypatch.setattr(auto, "read_cpuinfo", lambda: VNNI_CPU)
    first = retrain.run(config)  # the whole run: its log line and metrics
    assert "Extraction: tflite_int8 (this CPU has AVX512_VNNI" in caplog.text
    assert first.bottlenecks_computed == 16
    metrics = first.metrics()["extraction"]
    assert metrics["auto"]["backend"] == "tflite_int8"
    assert metrics["auto"]["reason"].startswith("this CPU has AVX512_VNNI: int8 about 2.3x")
    assert (metrics["requested"], metrics["model"], metrics["backend"]) == (
        "auto",
        "int8",
        "tflite_int8",
    )
    assert metrics["reason"].startswith("calibrated on ")
    caplog.clear()
    other = run_on(AVX2_CPU)
    assert "tflite_int8" not in caplog.text
    assert (other["computed"], other["model"]) == (16, "float")
    assert other["backend"] in ("tflite", "tensorflow")
    assert len(list((tmp_path / "cache").rglob("module.json"))) == 2  # a folder for each
    again = run_on(VNNI_CPU)
    assert (again["computed"], again["model"], again["backend"]) == (0, "int8", None)
