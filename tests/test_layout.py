"""The package layout: the core (``hwoptim/``, ``hwoptim/backends``, ``hwoptim/rules``)
imports neither the benchmark (``hwoptim.bench``) nor the lesson (``hwoptim.lesson``), and
the modules' old paths still give the modules themselves."""
from __future__ import annotations

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

import hwoptim

PKG = pathlib.Path(hwoptim.__file__).parent
CORE = sorted([*PKG.glob("*.py"), *(PKG / "backends").glob("*.py"), *(PKG / "rules").glob("*.py")])
OUTSIDE_CORE = ("hwoptim.bench", "hwoptim.lesson")

OLD_PATHS = {
    "hwoptim.landscapes": "hwoptim.lesson.landscapes",
    "hwoptim.trajectories": "hwoptim.lesson.trajectories",
    "hwoptim.batching": "hwoptim.lesson.batching",
    "hwoptim.viz": "hwoptim.lesson.viz",
    "hwoptim.report": "hwoptim.bench",
    "hwoptim.gpubench": "hwoptim.bench.gpu",
}


# a private attribute of a core module, as in ``optim._kernels`` or ``hwoptim._compat``
PRIVATE_USE = re.compile(r"\b(?:hwoptim|optim|backends|codegen|spec|rules|threads|flat)"
                         r"\._[a-z]\w*")


def _imported_modules(path: pathlib.Path) -> set:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ("hwoptim." + ".".join(path.relative_to(PKG).parent.parts)).rstrip(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_the_core_folders_hold_modules():
    assert len(CORE) > 10 and PKG / "optim.py" in CORE and PKG / "backends" / "numba.py" in CORE


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
def test_the_core_imports_neither_the_benchmark_nor_the_lesson(path):
    bad = sorted(m for m in _imported_modules(path)
                 if any(m == o or m.startswith(o + ".") for o in OUTSIDE_CORE))
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_import_hwoptim_loads_neither_the_benchmark_nor_the_lesson():
    code = ("import sys, hwoptim\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('hwoptim.bench', "
            "'hwoptim.lesson')) or m in " + repr(tuple(OLD_PATHS)) + ")\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("old,new", OLD_PATHS.items())
def test_old_paths_give_the_same_module(old, new):
    module = importlib.import_module(new)
    assert importlib.import_module(old) is module
    assert sys.modules[old] is module
    assert getattr(hwoptim, old.rsplit(".", 1)[1]) is module
    assert module.__spec__.name == new        # the module keeps its own name


def test_old_paths_in_a_fresh_process():
    code = ("import hwoptim.landscapes as L, hwoptim.lesson.landscapes as L2\n"
            "from hwoptim import batching, report\n"
            "import hwoptim, hwoptim.lesson.batching, hwoptim.bench\n"
            "assert L is L2 and batching is hwoptim.lesson.batching\n"
            "assert report is hwoptim.bench and report.measure is hwoptim.bench.timing.measure\n"
            "import hwoptim.gpubench as g\n"
            "assert g.count_launches is hwoptim.bench.gpu.kernels.count_launches\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attribute_access_imports_an_old_path_only_when_asked():
    code = ("import sys, hwoptim\n"
            "assert 'hwoptim.lesson.viz' not in sys.modules\n"
            "assert hwoptim.viz is sys.modules['hwoptim.lesson.viz']\n"
            "try:\n"
            "    hwoptim.no_such_module\n"
            "except AttributeError as e:\n"
            "    assert 'no_such_module' in str(e)\n"
            "else:\n"
            "    raise SystemExit('no AttributeError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_m_gpubench_still_answers():
    """``python -m hwoptim.gpubench`` runs the GPU benchmark's command (here: its help)."""
    out = subprocess.run([sys.executable, "-m", "hwoptim.gpubench", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "python -m hwoptim.bench.gpu" in out and "--budget" in out


def test_the_benchmark_and_the_lesson_use_the_core_through_its_public_api():
    """No module outside the core imports a private (``_``) module of the core; the one
    private use left (the GPU launch counter empties the kernel cache) is listed."""
    allowed = {PKG / "bench" / "gpu" / "kernels.py"}
    for path in sorted([*(PKG / "bench").rglob("*.py"), *(PKG / "lesson").rglob("*.py")]):
        text = path.read_text()
        private = sorted(m for m in _imported_modules(path)
                         if m.startswith("hwoptim.") and not m.startswith(OUTSIDE_CORE)
                         and any(p.startswith("_") and not p.startswith("__")
                                 for p in m.split(".")[1:]))
        assert not private, f"{path.relative_to(PKG.parent)} imports {private}"
        if path not in allowed:
            used = PRIVATE_USE.findall(text)
            assert not used, f"{path.relative_to(PKG.parent)} uses {used}"


@pytest.mark.parametrize("package", ["hwoptim.bench", "hwoptim.bench.gpu", "hwoptim.lesson"])
def test_no_name_hides_a_module_of_its_package(package):
    """``import hwoptim.bench.X as m`` gives the module X, not a function re-exported as X."""
    pkg = importlib.import_module(package)
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        if path.stem.startswith("__"):
            continue
        module = importlib.import_module(f"{package}.{path.stem}")
        assert getattr(pkg, path.stem) is module, f"{package}.{path.stem}"
