"""hwoptim.distributed.ShardedOptimizer (ZeRO stage 1 over MPI), with real ``mpiexec`` ranks:
tests/mpi_sharded.py runs under ``mpiexec -n R`` for R = 1 to 4 (oversubscribed on small
machines) and checks every rule, float32 and float64, two groups with uneven sizes, against
one process stepping on the averaged gradient, byte for byte; state bytes per rank; the
consolidated state in the wrapped class's format (grads are exact multiples of 2^-6 so the
sum is exact in any order, and the average their sum / R as DDP divides); a bad grad on one rank refused on every
rank with nothing changed; a run saved on 4 ranks resumed on 3, 2 and 1 (consolidated, and
from a checkpoint folder, which a crashed save leaves whole); bfloat16 and int8 state on each
rank's slice (bfloat16: byte for byte; int8: within the map's rounding, 1/R of its bytes);
bfloat16 and float16 params (round-to-nearest modes and master weights byte for byte one
process on the float32-averaged grads rounded once; stochastic rounding near it).

Needs mpi4py and an ``mpiexec`` (the ``distributed`` extra: mpi4py and the MPICH wheel; the
``test`` extra includes it). Without them the tests skip, unless ``HWOPTIM_REQUIRE_MPI=1``
(CI), where they fail.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
PROGRAM = HERE / "mpi_sharded.py"
TIMEOUT = 600


def _mpiexec():
    why = None
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        why = f"mpi4py is not installed ({e}); pip install '.[distributed]'"
    exe = shutil.which("mpiexec", path=os.pathsep.join(
        [str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if why is None and exe is None:
        why = "no mpiexec on PATH (the mpich wheel brings one: pip install '.[distributed]')"
    if why is not None:
        if os.environ.get("HWOPTIM_REQUIRE_MPI") == "1":
            pytest.fail(f"{why}, and HWOPTIM_REQUIRE_MPI=1 requires it", pytrace=False)
        pytest.skip(why)
    return exe


def _env():
    """One Numba thread per rank (ranks share the cores), and this checkout's hwoptim."""
    return dict(os.environ, NUMBA_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))


def _run(n, *args, ok=True, timeout=TIMEOUT):
    cmd = [_mpiexec(), "-n", str(n), sys.executable, str(PROGRAM), *map(str, args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s (a hung collective?):\n"
                    f"{e.stdout}\n{e.stderr}")
    if not ok:
        return res
    assert res.returncode == 0, (f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}\n"
                                 f"{res.stderr[-6000:]}")
    return res.stdout


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_sharded_steps_equal_one_process_on_the_averaged_grads(ranks):
    out = _run(ranks, "check")
    assert f"OK check R={ranks}" in out, out


def test_resharded_resume(tmp_path):
    path = tmp_path / "state.pkl"
    assert "OK save R=4" in _run(4, "save", path)
    for ranks in (3, 2, 1):
        assert f"OK resume R={ranks}" in _run(ranks, "resume", path)


def test_a_single_process_needs_no_mpiexec():
    """The same program as one process without mpiexec (MPI's singleton start)."""
    _mpiexec()
    res = subprocess.run([sys.executable, str(PROGRAM), "check"], capture_output=True,
                         text=True, timeout=TIMEOUT, env=_env())
    assert res.returncode == 0 and "OK check R=1" in res.stdout, res.stderr[-4000:]


def test_sharded_example_trains():
    """README's ``mpiexec -n 4 python examples/sharded_mpi.py``, quick, on 2 ranks."""
    example = HERE.parent / "examples" / "sharded_mpi.py"
    cmd = [_mpiexec(), "-n", "2", sys.executable, str(example), "--quick"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr[-4000:]}"
    assert "weights the same on every rank: True" in res.stdout
    assert "(required: 5x): ok" in res.stdout, res.stdout


def test_sharded_torch_example_trains(torch):
    """README's torch example (hwoptim.torch.AdamW over model.parameters(), max_grad_norm),
    quick, on 2 ranks, under ``python -m mpi4py`` as the README runs it."""
    example = HERE.parent / "examples" / "sharded_torch_mpi.py"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", str(example), "--quick"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr[-4000:]}"
    assert "weights the same on every rank: True" in res.stdout
    assert "(required: 5x): ok" in res.stdout, res.stdout


def test_checkpoint_folder_reshards_and_survives_a_crashed_save(tmp_path):
    """save() on 4 ranks, then a second save that fails before its index is renamed into
    place: the folder still holds the first checkpoint, which resumes on 3 ranks, on 1 rank,
    and in one process without MPI (load_consolidated + the plain class), all the same."""
    path = tmp_path / "ckpt"
    assert "OK checkpoint save R=4" in _run(4, "checkpoint-save", path)
    for ranks in (3, 1):
        assert f"OK checkpoint load R={ranks}" in _run(ranks, "checkpoint-load", path)


@pytest.mark.parametrize("ranks", [1, 3])
def test_torch_tensors_and_a_hwoptim_torch_class(ranks, torch):
    assert f"OK torch R={ranks}" in _run(ranks, "torch")


def test_a_rank_failing_inside_the_update_aborts_every_rank():
    """Rank 1's kernel raises after the grads' reduce-scatter: the others updated their
    slices, so the params could no longer agree; every rank ends (MPI_Abort) at once, with
    a message naming the failed rank, instead of waiting in the all-gather forever."""
    t0 = time.monotonic()
    res = _run(3, "fault", "raise", 120, ok=False, timeout=100)
    assert res.returncode != 0 and "stepped past the fault" not in res.stdout, res.stdout
    assert "step() failed on rank(s) [1] inside the update" in res.stderr, res.stderr[-3000:]
    assert time.monotonic() - t0 < 90       # long before the 120 s timeout


def test_a_rank_that_never_arrives_times_out_every_rank():
    """Rank 1 stops calling step(): the others give up after timeout=3 s with a message
    saying what did not complete, and the job ends (no hang)."""
    t0 = time.monotonic()
    res = _run(3, "fault", "hang", 3, ok=False, timeout=120)
    assert res.returncode != 0 and "stepped past the fault" not in res.stdout, res.stdout
    assert "did not complete within timeout=3.0 s" in res.stderr, res.stderr[-3000:]
    assert time.monotonic() - t0 < 100      # not the 300 s the hung rank sleeps


def test_a_waiting_rank_does_not_spin():
    """Rank 1 arrives 2 s late: rank 0's step waits without spinning a core."""
    out = _run(2, "idle")
    assert "OK idle R=2" in out, out
