"""The kernel cache's promises (``hwoptim/backends/diskcache.py``, README "The kernel cache").

- Private by construction: folders 0700 and files 0600 whatever the umask; a folder that is
  not private (as OpenSSH checks ``~/.ssh``) is refused with one warning, and the kernels
  still run from a private fallback or from memory.
- No unverified bytecode: a planted ``.pyc`` beside a kernel file never runs.
- ``HWOPTIM_CACHE_DIR=off``: nothing on disk.
- Robust: impossible or read-only folders fall back; truncated or garbled kernel and Numba
  files are rebuilt in place with one warning; eight threads, or several processes, building
  the same kernels at once all succeed.

Claims about processes run real processes (a fresh Python per claim), each stepping real
optimizers and checking the result against the NumPy reference.
"""
from __future__ import annotations

import importlib.util
import json
import marshal
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import hwoptim  # noqa: E402
from hwoptim import backends  # noqa: E402
from hwoptim.backends import diskcache  # noqa: E402

if "numba" not in backends.available():
    pytest.skip(f"numba backend unavailable: {backends.unavailable('numba')}",
                allow_module_level=True)

ROOT = str(Path(hwoptim.__file__).resolve().parent.parent)
UID = os.getuid() if hasattr(os, "getuid") else None
posix = pytest.mark.skipif(UID is None, reason="folder owners and modes are POSIX")

# One process: steps each rule named in argv at a serial and a parallel size, compares with
# the NumPy reference, and prints what it saw as JSON (last line).
STEP = textwrap.dedent('''
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        import numpy as np
        import hwoptim
        from hwoptim.backends import diskcache
        err = 0.0
        for rule in sys.argv[1:] or ["SGD", "Adam"]:
            for n in (1000, 65536):
                w = np.linspace(-1, 1, n, dtype=np.float32)
                ref = w.copy()
                for x, backend in ((w, None), (ref, "numpy")):
                    opt = getattr(hwoptim, rule)(x, lr=0.1, backend=backend)
                    for _ in range(3):
                        opt.step(np.cos(x) + 0.5)
                err = max(err, float(np.max(np.abs(w - ref) / (np.abs(ref) + 1e-3))))
    kernels = [m for k, m in sys.modules.items() if k.startswith("hwoptim_kernel_")]
    ds = [d for m in kernels for d in (m.parallel, m.serial) if d.signatures]
    where = diskcache.folder()
    print(json.dumps({
        "err": err, "folder": None if where is None else str(where),
        "warnings": [f"{w.category.__name__}: {w.message}" for w in seen],
        "hits": sum(sum(d.stats.cache_hits.values()) for d in ds),
        "misses": sum(sum(d.stats.cache_misses.values()) for d in ds),
        "numba_folders": sorted({str(d.stats.cache_path) for d in ds}),
        "kernel_files": sorted(str(m.__file__) for m in kernels)}))
''')


def env_for(tmp_path: Path, **changes) -> dict:
    """The environment of a child: this checkout first on the path; HOME and TMPDIR inside
    ``tmp_path`` (so a fallback never touches the real ones); ``changes`` on top (None
    removes a variable)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HWOPTIM_CACHE_DIR", "NUMBA_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("home", "tmp"):
        (tmp_path / name).mkdir(mode=0o700, exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def child(env: dict, *rules: str, script: str = STEP, prefix: list[str] = (),
          cwd=None) -> dict:
    r = subprocess.run([*prefix, sys.executable, "-c", script, *rules], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def cache_warnings(out: dict) -> list[str]:
    return [w for w in out["warnings"] if w.startswith("CacheWarning")]


def assert_steps_right(out: dict) -> None:
    assert out["err"] < 1e-5, out


def tree(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


# -- no unverified bytecode

def plant_bytecode(py: Path, marker: Path) -> Path:
    """A ``__pycache__`` ``.pyc`` for ``py`` that Python's import system accepts (its header
    carries ``py``'s mtime and size) and that writes ``marker`` before running the kernel."""
    source = f"open({str(marker)!r}, 'w').write('planted code ran')\n" + py.read_text()
    code = compile(source, str(py), "exec")
    st = py.stat()
    header = (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
              + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
              + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    pyc = Path(importlib.util.cache_from_source(str(py)))
    pyc.parent.mkdir(mode=0o700, exist_ok=True)
    pyc.write_bytes(header + marshal.dumps(code))
    return pyc


IMPORT_THE_FILE = textwrap.dedent('''
    import importlib.util, sys
    path = sys.argv[1]
    spec = importlib.util.spec_from_file_location("k", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    print("{}")
''')


def test_planted_bytecode_beside_a_kernel_never_runs(tmp_path):
    cache = tmp_path / "cache"
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=cache)
    first = child(env, "SGD")
    sources = sorted((cache / "numba").glob("hwoptim_kernel_sgd_*.py"))
    assert sources and [str(p) for p in sources] == first["kernel_files"]
    marker = tmp_path / "planted-code-ran"
    for py in sources:
        plant_bytecode(py, marker)
    # the plant works: importing the kernel file as Python does (hwoptim did, before) runs it
    child(env, str(sources[0]), script=IMPORT_THE_FILE)
    assert marker.exists()
    marker.unlink()
    out = child(env, "SGD")
    assert not marker.exists(), "the planted bytecode ran"
    assert_steps_right(out)
    assert out["hits"] >= 1 and out["misses"] == 0    # and Numba's cache is still used
    assert not cache_warnings(out)


# -- private by construction

def _owned_by_another_user(p: Path) -> None:
    if UID != 0:
        pytest.skip("giving a folder to another user needs root")
    os.chown(p, 4242, 4242)


def _folder(tmp_path, mode=0o700, above=0o700, give=False, give_above=False):
    parent = tmp_path / "above"
    parent.mkdir()
    os.chmod(parent, above)
    folder = parent / "cache"
    folder.mkdir()
    os.chmod(folder, mode)
    if give:
        _owned_by_another_user(folder)
    if give_above:
        _owned_by_another_user(parent)
    return folder


@posix
@pytest.mark.parametrize("case, make, reason", [
    ("private", lambda t: _folder(t), None),
    ("under a sticky world-writable folder", lambda t: _folder(t, above=0o1777), None),
    ("world-writable", lambda t: _folder(t, mode=0o777), "writable by group and others"),
    ("group-writable", lambda t: _folder(t, mode=0o770), "writable by group"),
    ("others-writable", lambda t: _folder(t, mode=0o702), "writable by others"),
    ("another user's", lambda t: _folder(t, give=True), "owned by uid 4242"),
    ("under a world-writable folder", lambda t: _folder(t, above=0o777),
     "above it, is writable by group and others without the sticky bit"),
    ("under another user's folder", lambda t: _folder(t, give_above=True),
     "above it, is owned by uid 4242"),
    ("a link to a world-writable folder",
     lambda t: _link(t / "link", _folder(t, mode=0o777)), "writable by group and others"),
    ("a file", lambda t: _file(t / "file"), "not a folder"),
    ("missing", lambda t: t / "missing", "FileNotFoundError"),
])
def test_only_private_folders_pass_the_check(case, make, reason, tmp_path):
    why = diskcache.unsafe_reason(make(tmp_path))
    if reason is None:
        assert why is None, why
    else:
        assert why is not None and reason in why, why


def _link(link: Path, to: Path) -> Path:
    link.symlink_to(to)
    return link


def _file(p: Path) -> Path:
    p.write_text("not a folder")
    return p


@posix
@pytest.mark.parametrize("case", ["world-writable", "group-writable", "another user's"])
def test_a_cache_folder_others_can_write_is_refused_and_steps_still_work(case, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    if case == "another user's":
        _owned_by_another_user(shared)
    os.chmod(shared, {"world-writable": 0o777, "group-writable": 0o770}.get(case, 0o700))
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=shared)
    out = child(env, "Adam")
    assert_steps_right(out)
    [warning] = cache_warnings(out)
    assert str(shared / "numba") in warning and "HWOPTIM_CACHE_DIR" in warning, warning
    assert os.listdir(shared) == []                         # nothing written there
    spare = tmp_path / "tmp" / f"hwoptim-{UID}" / "numba"
    assert out["folder"] == str(spare)                      # a private per-user folder
    assert list(spare.glob("hwoptim_kernel_adam_*.py"))
    again = child(env, "Adam")                              # which later processes reuse
    assert again["hits"] >= 1 and again["misses"] == 0
    assert len(cache_warnings(again)) == 1


@posix
def test_with_no_private_folder_at_all_kernels_compile_in_memory(tmp_path):
    for name in ("shared", "tmp"):
        (tmp_path / name).mkdir()
        os.chmod(tmp_path / name, 0o777)                   # the fallback's folder too
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=tmp_path / "shared")
    out = child(env, "Adam")
    assert_steps_right(out)
    [warning] = cache_warnings(out)
    assert "no disk cache" in warning and "HWOPTIM_CACHE_DIR" in warning, warning
    assert out["folder"] is None and out["numba_folders"] == ["None"]
    assert tree(tmp_path / "shared") == tree(tmp_path / "tmp") == []


UMASK_0 = "import os; os.umask(0)\n" + STEP


@posix
def test_new_folders_are_0700_and_files_0600_whatever_the_umask(tmp_path):
    cache = tmp_path / "new" / "deeper"
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=cache)
    for _ in range(2):                                      # cold, then warm
        assert_steps_right(child(env, "SGD", "Adam", script=UMASK_0))
    made = tree(tmp_path / "new")
    assert any(p.suffix == ".nbc" for p in made) and any(p.suffix == ".nbi" for p in made)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in made}
    modes["new"] = stat.S_IMODE((tmp_path / "new").stat().st_mode)
    want = {k: 0o700 if (tmp_path / k).is_dir() else 0o600 for k in modes}
    assert modes == want


def test_off_keeps_nothing_on_disk(tmp_path):
    (tmp_path / "cwd").mkdir()
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR="off")
    out = child(env, "SGD", "Adam", cwd=tmp_path / "cwd")
    assert_steps_right(out)
    assert out["folder"] is None and not out["warnings"]
    assert out["numba_folders"] == ["None"]               # Numba's disk cache is off
    assert not any(Path(f).exists() for f in out["kernel_files"])
    for name in ("home", "tmp", "cwd"):
        assert tree(tmp_path / name) == [], name


# -- robust

READ_ONLY = ["sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"']


def _read_only_prefix(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` is read-only, even for root (a read-only bind
    mount in a new mount namespace), or skip."""
    if UID is None:
        pytest.skip("POSIX only")
    if UID != 0:
        os.chmod(folder, 0o500)
        return []
    prefix = ["unshare", "-m", *READ_ONLY, str(folder)]
    if shutil.which("unshare") is None or subprocess.run(
            [*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder as root here (unshare -m, mount)")
    return prefix


@pytest.mark.parametrize("case", ["under a regular file", "HOME under a regular file",
                                  "read-only"])
def test_an_impossible_cache_folder_falls_back_with_one_warning(case, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    prefix = []
    if case == "under a regular file":
        wanted = tmp_path / "file" / "cache" / "numba"
        env = env_for(tmp_path, HWOPTIM_CACHE_DIR=tmp_path / "file" / "cache")
    elif case == "HOME under a regular file":
        wanted = tmp_path / "file" / ".cache" / "hwoptim" / "numba"
        env = env_for(tmp_path, HOME=tmp_path / "file")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o700)
        wanted = ro / "numba"
        env = env_for(tmp_path, HWOPTIM_CACHE_DIR=ro)
        prefix = _read_only_prefix(ro)
    out = child(env, "Adam", prefix=prefix)
    assert_steps_right(out)
    [warning] = cache_warnings(out)
    assert str(wanted) in warning and "HWOPTIM_CACHE_DIR" in warning, warning
    assert out["folder"] == str(tmp_path / "tmp" / f"hwoptim-{UID}" / "numba")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    rng = np.random.default_rng(len(data))
    path.write_bytes(data[:len(data) // 2] if how == "truncated" else
                     b"\xff" + rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """A cache folder filled by one process stepping Adam."""
    base = tmp_path_factory.mktemp("warm")
    out = child(env_for(base, HWOPTIM_CACHE_DIR=base / "cache"), "Adam")
    assert out["misses"] >= 2 and not out["warnings"]
    return base / "cache"


@pytest.mark.parametrize("how", ["truncated", "garbled"])
@pytest.mark.parametrize("which", ["kernel .py", "Numba index .nbi", "Numba data .nbc"])
def test_damaged_cache_files_are_rebuilt_in_place_with_one_warning(which, how, warm_cache,
                                                                   tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    pattern = {"kernel .py": "hwoptim_kernel_adam_*.py",
               "Numba index .nbi": "__pycache__/hwoptim_kernel_adam_*.parallel-*.nbi",
               "Numba data .nbc": "__pycache__/hwoptim_kernel_adam_*.parallel-*.1.nbc"}[which]
    [damaged] = (cache / "numba").glob(pattern)
    _damage(damaged, how)
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=cache)
    out = child(env, "Adam")
    assert_steps_right(out)
    [warning] = cache_warnings(out)
    assert str(damaged) in warning, warning
    again = child(env, "Adam")                      # repaired: no warning, all from the cache
    assert not again["warnings"] and again["hits"] >= 2 and again["misses"] == 0, again


THREADS = textwrap.dedent('''
    import json, sys, threading
    import numpy as np
    import hwoptim
    from hwoptim import codegen
    from hwoptim.backends import diskcache
    n, barrier, errors, err, modules = 8, threading.Barrier(8), [], [0.0], []
    rules = ["Adam", "SGD", "RMSprop", "Adagrad"]

    def optimizer(i):
        try:
            barrier.wait()
            w = np.linspace(-1, 1, 1000 if i % 2 else 65536, dtype=np.float32)
            ref = w.copy()
            for x, backend in ((w, None), (ref, "numpy")):
                getattr(hwoptim, rules[i % 4])(x, lr=0.1, backend=backend).step(np.cos(x))
            err[0] = max(err[0], float(np.max(np.abs(w - ref) / (np.abs(ref) + 1e-3))))
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {e}")

    def plan_of(rule):
        return codegen.plan(rule, rule.static_flags(
            {k: h.default for k, h in rule.hypers.items()}, dict(rule.options)))

    plans = [plan_of(r) for r in hwoptim.RULES.values()]

    def direct(i):      # straight through the cache module, with no lock of the backend's
        try:
            for plan in plans:
                barrier.wait()
                mod = diskcache.load_module(
                    lambda cache: codegen.numba_source(plan, "float64", cache=cache),
                    f"direct_{plan.key}")
                args = ([np.empty(0) for _ in plan.arrays]
                        + [np.float64(0)] * len(plan.all_scalars))
                diskcache.first_call(mod, mod.parallel if i % 2 else mod.serial, args)
                modules.append((plan.key, id(mod)))
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {e}")
            barrier.abort()

    for target in (optimizer, direct):
        ts = [threading.Thread(target=target, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    one_each = len(set(modules)) == len(plans) and len(modules) == n * len(plans)
    print(json.dumps({"errors": errors, "err": err[0], "same_module": one_each}))
''')


def test_eight_threads_building_kernels_at_once_all_succeed(tmp_path):
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=tmp_path / "cache")
    for _ in range(2):                                     # empty cache, then warm
        out = child(env, script=THREADS)
        assert out["errors"] == [] and out["same_module"], out
        assert_steps_right(out)


def test_several_processes_fill_one_empty_cache(tmp_path):
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, "-c", STEP, "SGD", "Adam"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        out = json.loads(stdout.strip().splitlines()[-1])
        assert_steps_right(out)
        assert not out["warnings"], out
    later = child(env, "SGD", "Adam")
    assert later["hits"] >= 4 and later["misses"] == 0 and not later["warnings"], later


@posix
def test_numba_cache_dir_must_be_private_too(tmp_path):
    shared = tmp_path / "numba-shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    cache = tmp_path / "cache"
    env = env_for(tmp_path, HWOPTIM_CACHE_DIR=cache, NUMBA_CACHE_DIR=shared)
    out = child(env, "Adam")
    assert_steps_right(out)
    [warning] = cache_warnings(out)
    assert "NUMBA_CACHE_DIR" in warning and str(shared) in warning, warning
    assert out["numba_folders"] == ["None"]
    assert not [p for p in tree(shared) + tree(cache) if p.suffix in (".nbi", ".nbc")]
    # a private one is used
    os.chmod(shared, 0o700)
    for _ in range(2):
        out = child(env, "Adam")
        assert_steps_right(out)
        assert not out["warnings"]
    assert out["hits"] >= 2 and out["misses"] == 0
    assert [p for p in tree(shared) if p.suffix == ".nbi"]


AFTER_THE_FIRST_STEP = textwrap.dedent('''
    import numpy as np
    import hwoptim
    from hwoptim.backends import diskcache
    w, g = np.ones(1000, np.float32), np.ones(1000, np.float32)
    opt = hwoptim.Adam(w)
    opt.step(g)

    def no(*a, **k):
        raise AssertionError("the disk cache was consulted after the first step")

    for name in ("folder", "load_module", "first_call", "unsafe_reason"):
        setattr(diskcache, name, no)
    for _ in range(3):
        opt.step(g)
    print("{}")
''')


def test_the_checks_cost_nothing_per_step(tmp_path):
    child(env_for(tmp_path, HWOPTIM_CACHE_DIR=tmp_path / "cache"), script=AFTER_THE_FIRST_STEP)
