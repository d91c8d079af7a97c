"""Shared test helpers, kept small and generic.

* ``torch`` (fixture) / ``import_torch()``: torch.optim for conformance tests. Without torch the
  test skips with the reason, unless ``HWOPTIM_REQUIRE_TORCH=1`` (CI), where it fails.
* ``rng`` (fixture): a NumPy generator seeded from the test's id and ``HWOPTIM_TEST_SEED``
  (default 0), so every test draws its own random inputs and a failure reproduces.
* ``observed`` (fixture): records the largest error ratios a test saw; they are written as
  JSON to ``HWOPTIM_TEST_OBSERVED`` (default ``/tmp/hwoptim-test-observed.json``) and
  summarised at the end of the run.
* Hypothesis profiles (tests/test_properties.py): "ci", derandomized, loaded when ``CI`` is
  set or ``HYPOTHESIS_PROFILE=ci``; "dev" otherwise, random. Both fit the file's budget of
  about a minute; ``HYPOTHESIS_PROFILE=thorough`` runs ten times ci's examples. No example
  database: a failure prints the example and how to reproduce it.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

SEED = int(os.environ.get("HWOPTIM_TEST_SEED", "0"))
OBSERVED_PATH = os.environ.get("HWOPTIM_TEST_OBSERVED", "/tmp/hwoptim-test-observed.json")

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:       # only tests/test_properties.py needs it, and skips without it
    _hypothesis_settings = None
if _hypothesis_settings is not None:
    _examples = {"dev": 150, "ci": 600, "thorough": 6000}
    for _name, _n in _examples.items():
        _hypothesis_settings.register_profile(
            _name, max_examples=_n, deadline=None, database=None, print_blob=True,
            derandomize=_name == "ci")
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                                      or ("ci" if os.environ.get("CI") else "dev"))


def snapshot(opt, params):
    """(copies of ``params``, ``opt.state_dict()``): what a skipped or refused step must
    leave exactly as it was (compare with :func:`assert_same_snapshot`)."""
    return [p.copy() for p in params], opt.state_dict()


def assert_same_snapshot(a, b):
    """Two snapshots (:func:`snapshot`) are the same bits: params, step, carried scalars,
    state."""
    (pa, sa), (pb, sb) = a, b
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(pa, pb))
    assert sa["step"] == sb["step"] and sa.get("carry") == sb.get("carry")
    for x, y in zip(sa["state"], sb["state"]):
        assert x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k], equal_nan=True) for k in x)


def import_torch():
    """``torch``; skip without it, or fail when ``HWOPTIM_REQUIRE_TORCH=1``."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install (OSError from its libraries)
        why = f"torch cannot be imported ({type(e).__name__}: {e})"
        if os.environ.get("HWOPTIM_REQUIRE_TORCH") == "1":
            pytest.fail(f"{why}, and HWOPTIM_REQUIRE_TORCH=1 requires it", pytrace=False)
        pytest.skip(f"{why}; pip install '.[compare]' to compare with torch.optim")
    return torch


@pytest.fixture(scope="session")
def torch():
    return import_torch()


@pytest.fixture
def rng(request):
    seed = zlib.crc32(request.node.nodeid.encode()) ^ SEED
    return np.random.default_rng(seed)


class _Observed:
    """Largest value seen per (table, key)."""

    def __init__(self):
        self.tables: dict[str, dict[str, float]] = {}

    def max(self, table: str, key: str, value) -> None:
        t = self.tables.setdefault(table, {})
        value = float(value)
        if key not in t or not value <= t[key]:
            t[key] = value


_OBSERVED = _Observed()


@pytest.fixture(scope="session")
def observed():
    return _OBSERVED


def pytest_report_header(config):
    return f"hwoptim tests: HWOPTIM_TEST_SEED={SEED}"


def pytest_sessionfinish(session, exitstatus):
    if not _OBSERVED.tables:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = OBSERVED_PATH + (f".{worker}" if worker else "")
    try:
        with open(path, "w") as f:
            json.dump(_OBSERVED.tables, f, indent=1, sort_keys=True)
    except OSError:
        pass


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _OBSERVED.tables:
        return
    tr = terminalreporter
    tr.section("largest observed values: error ratios, timings (full table: %s)"
               % OBSERVED_PATH)
    for table, rows in sorted(_OBSERVED.tables.items()):
        if not rows:
            continue
        key, worst = max(rows.items(), key=lambda kv: (np.nan_to_num(kv[1], nan=np.inf)))
        tr.write_line(f"{table}: max {worst:.3g} ({key}) over {len(rows)} entries")
