"""The package's shape: packages by concern, each importing only those below it, and light
imports for what must start fast (`import retrain`, label-image)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Bottom to top: data flows up this list (data -> bottlenecks -> heads/training ->
# evaluation -> export; reporting reads a run); a module imports only from its own layer or
# those below it.
LAYERS = (
    "retrain.errors",
    "retrain.utils",
    "retrain.config",
    "retrain.data",
    "retrain.models",
    "retrain.bottlenecks",
    "retrain.heads",
    "retrain.training",
    "retrain.export",
    "retrain.results",
    "retrain.reporting",
    "retrain.pipeline",
    "retrain",  # the public surface: retrain/__init__.py
    "retrain.cli",
    "retrain.__main__",
)
# Imports against the flow, each with its reason. Config's check of a module handle asks the
# model registry whether a bundled name exists and its weights are installed; the registry
# imports nothing at module level, so importing config stays light.
ALLOWED_UPWARD = {("retrain.config.checks", "retrain.models.registry")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest entry that `module` is or lies under."""
    matches = [
        i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")
    ]
    return max(matches, key=lambda i: len(LAYERS[i]))


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of the nodes under `if TYPE_CHECKING:` blocks: imports that never run."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def runtime_imports(path: Path) -> set[str]:
    """The retrain modules `path` imports when it runs (not those imported only for type
    checking): `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    known = {module_name(p) for p in (ROOT / "retrain").rglob("*.py")}
    tree = ast.parse(path.read_text())
    typing_only = type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "retrain")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "retrain":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return found


def package_files() -> list[Path]:
    return sorted((ROOT / "retrain").rglob("*.py"))


def test_every_module_sits_in_a_layer():
    for path in package_files():
        assert layer_of(module_name(path)) >= 0


@pytest.mark.parametrize("path", package_files(), ids=lambda p: module_name(p))
def test_packages_import_only_those_below_them(path):
    importer = module_name(path)
    upward = sorted(
        imported
        for imported in runtime_imports(path)
        if layer_of(imported) > layer_of(importer)
        and (importer, imported) not in ALLOWED_UPWARD
        and imported != "retrain"
    )
    assert not upward, f"{importer} imports from above its layer: {upward}"


def test_the_layer_checker_sees_an_upward_import():
    assert layer_of("retrain.data.scan") < layer_of("retrain.bottlenecks.stage")
    assert layer_of("retrain.cli.flags") == len(LAYERS) - 2
    assert runtime_imports(ROOT / "retrain" / "bottlenecks" / "stage.py") >= {
        "retrain.bottlenecks.extract"
    }


def imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(out.stdout.split())


HEAVY = {"tensorflow", "tf_keras", "tensorflow_hub", "apache_beam", "cleanlab", "faiss"}


def test_import_retrain_imports_no_tensorflow_and_no_stage():
    loaded = imported_after("import retrain")
    assert not loaded & HEAVY
    stages = ("bottlenecks", "heads", "training", "export", "reporting", "pipeline", "cli")
    assert not {m for m in loaded if m.split(".")[:2][-1] in stages and m.startswith("retrain.")}


def test_label_image_imports_only_what_it_uses():
    """label-image on a .tflite starts without TensorFlow and without the training stages:
    it decodes (data), loads exported models (export.loading) and nothing else of retrain."""
    loaded = imported_after("import label_image.cli")
    assert not loaded & HEAVY
    ours = {m for m in loaded if m.startswith("retrain.")}
    unused = ("retrain.bottlenecks", "retrain.training", "retrain.reporting", "retrain.pipeline")
    assert not {m for m in ours if m.startswith(unused)}, sorted(ours)


def test_a_console_script_installed_before_the_packages_still_starts():
    """An editable install made before the move has `retrain = retrain.cli:run` as its
    script: that name still resolves to the command."""
    from retrain.cli import main, run
    from retrain.cli import retrain as command

    assert (main, run) == (command.main, command.run)
