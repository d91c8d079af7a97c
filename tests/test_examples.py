"""The examples in ``examples/`` run, in their ``--quick`` form, and say what they promise:
the NumPy MLP learns (and imports no torch); the torch MLP trained with
``hwoptim.torch.AdamW`` follows ``torch.optim.AdamW`` within the stated tolerance (float64:
1e-12, float32: 1e-4) and prints its timing table. Each example is imported by path and its
``main(argv)`` called, so a failure shows its output."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import re

import pytest

from conftest import import_torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hwoptim_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _imports(path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _float(pattern, text) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_numpy_mlp_learns_with_one_flat_buffer(capsys):
    assert "torch" not in _imports(EXAMPLES / "numpy_mlp.py")
    mod = _load("numpy_mlp")
    assert mod.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert _float(r"largest relative error ([\d.e+-]+)", out) <= mod.GRAD_TOL
    assert "FlatParams(6 arrays" in out
    before = _float(r"before: train loss ([\d.]+)", out)
    after = _float(r"after: +train loss ([\d.]+)", out)
    assert before / after >= mod.LOSS_FACTOR
    assert _float(r"after: .*test accuracy ([\d.]+)", out) > 0.9
    assert re.search(r"loss reduced [\d.]+x \(required: 10x\): ok", out)


@pytest.mark.torch
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
def test_torch_digits_follows_torch_optim(capsys, dtype, tol):
    import_torch()
    mod = _load("torch_digits")
    assert mod.TOL[dtype] == tol
    # on a CUDA machine the float32 case also runs the autocast comparison
    assert mod.main(["--quick", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    rel = [float(v) for v in re.findall(r"largest relative difference of the loss curves: "
                                        r"([\d.e+-]+)", out)]
    assert rel and rel[0] <= tol
    assert "all within tolerance" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "AdamW" in ln]
    names = [r.split("|")[1].strip() for r in rows]
    assert any(n.startswith("torch.optim.AdamW (default)") for n in names), out
    assert any(n.startswith("hwoptim.torch.AdamW") for n in names), out
    for r in rows:                           # opt.step() is part of the whole step
        cells = [c.strip() for c in r.split("|")[1:-1]]
        step, whole = (float(c.split()[0].replace(",", "")) for c in cells[1:3])
        assert 0 < step < whole
    test_acc = [float(v) for v in re.findall(r"hwoptim [\d.]+/([\d.]+)", out)]
    assert test_acc and test_acc[0] > 0.8
