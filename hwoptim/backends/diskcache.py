"""Where the Numba backend keeps its generated kernels: one ``.py`` file per kernel in the
cache folder (``HWOPTIM_CACHE_DIR``, default ``~/.cache/hwoptim``, plus ``/numba``), with
Numba's own index (``.nbi``) and machine-code (``.nbc``) files beside it in ``__pycache__``.

What the cache trusts, and why the folder must be private: Numba's files are pickles, and
loading a pickle can run any code, so whoever can write into the folder could run code in
every process that uses hwoptim. hwoptim therefore

- uses a folder only if it passes :func:`unsafe_reason` (the check OpenSSH makes of
  ``~/.ssh``: owned by this user, not writable by group or others, and no folder above it
  writable by others without the sticky bit), and creates its folders 0700 and files 0600
  whatever the umask. A folder that fails is not used: one :class:`CacheWarning`, then a
  private per-user folder in the temporary directory, or no disk cache;
- never imports a kernel file, nor any ``.pyc``: it compiles the source it generated in
  memory (with the file's path as its filename, so Numba finds its index beside it);
- with ``HWOPTIM_CACHE_DIR=off`` keeps nothing on disk (kernels built with ``cache=False``).

Where folders have no POSIX owner and mode (Windows), the ownership and mode checks are
skipped.

A kernel file that does not hold the expected source, or Numba files that fail to load
(truncated, garbled), are rebuilt in place with one warning. Loading is safe from many
threads (one lock per kernel) and many processes (unique temporary names, atomic renames).
All of this runs when a kernel is first built in a process, never per step.

The Numba backend uses three calls: :func:`folder`, :func:`load_module` and
:func:`first_call`.
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

ENV = "HWOPTIM_CACHE_DIR"
_UID = os.getuid() if hasattr(os, "getuid") else None   # None: no POSIX owners (Windows)
_NUMBA_FILES = (".nbi", ".nbc")


class CacheWarning(UserWarning):
    """hwoptim did not use (part of) its kernel cache; the kernels still run correctly."""


_lock = threading.Lock()                 # guards the tables below
_folder_lock = threading.Lock()
_kernel_locks: dict[str, threading.RLock] = {}
_modules: dict[tuple, types.ModuleType] = {}   # (name, folder) -> loaded module
_folders: dict[tuple, Path | None] = {}        # (setting, home) -> folder chosen
_warned: set = set()


def _warn(key, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, CacheWarning, stacklevel=3)


def _kernel_lock(name: str) -> threading.RLock:
    with _lock:
        return _kernel_locks.setdefault(name, threading.RLock())


# ----------------------------------------------------------------------------- the folder

def unsafe_reason(path) -> str | None:
    """Why ``path`` must not hold kernel files, or ``None`` when it may.

    It must be a folder owned by this user and not writable by group or others; every
    folder above it must be owned by this user or root and not writable by group or others
    unless its sticky bit is set (as ``/tmp``'s is). Symbolic links are followed: the folder
    they lead to is the one checked, and the one to use."""
    if _UID is None:
        return None
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if st.st_uid != _UID:
        return f"it is owned by uid {st.st_uid}, not by this user (uid {_UID})"
    if st.st_mode & 0o022:
        return f"it is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):o})"
    return _unsafe_above(os.path.dirname(path))


def _unsafe_above(above: str) -> str | None:
    """Why folder ``above`` or one above it lets others replace what it holds, or ``None``."""
    while True:
        try:
            st = os.stat(above)
        except OSError as e:
            return f"{above}, above it: {type(e).__name__}: {e.strerror}"
        if st.st_uid not in (0, _UID):
            return (f"{above}, above it, is owned by uid {st.st_uid}, neither this user "
                    f"(uid {_UID}) nor root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return (f"{above}, above it, is writable by {_who(st.st_mode)} without the sticky "
                    f"bit (mode {stat.S_IMODE(st.st_mode):o})")
        if os.path.dirname(above) == above:
            return None
        above = os.path.dirname(above)


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


def _make_folders(path: Path) -> str | None:
    """Create ``path`` and the folders missing above it, each 0700 whatever the umask, unless
    the folder they would go in is not safe: then the reason, and nothing is created."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    if missing and _UID is not None:
        why = _unsafe_above(os.path.realpath(path))
        if why:
            return why
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:       # another thread or process made it: checked later
            continue
        os.chmod(p, 0o700)           # mkdir's mode is cut by the umask (0200 would give 0500)
    return None


def _prepare(wanted: Path) -> tuple[Path | None, str | None]:
    """``(folder, None)`` when ``wanted`` is created or found private and writable, with a
    private ``__pycache__`` for Numba's files; ``(None, reason)`` when not."""
    try:
        why = _make_folders(wanted) or unsafe_reason(wanted)
        if why:
            return None, why
        real = Path(os.path.realpath(wanted))
        # Numba would make __pycache__ with the umask's mode (0777 under umask 0)
        why = _make_folders(real / "__pycache__") or unsafe_reason(real / "__pycache__")
        if why:
            return None, f"its __pycache__: {why}"
        for d in (real, real / "__pycache__"):         # a read-only file system passes the
            fd, probe = tempfile.mkstemp(dir=d, prefix=".probe-")   # checks, not this
            os.close(fd)
            os.unlink(probe)
        return real, None
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}"


def folder() -> Path | None:
    """The checked, private folder for kernel files, or ``None`` for no disk cache.

    ``HWOPTIM_CACHE_DIR`` (default ``~/.cache/hwoptim``) plus ``/numba``; ``off`` for none.
    When that folder cannot be made private and writable: one :class:`CacheWarning`, then
    ``<temporary directory>/hwoptim-<uid>/numba`` if that one can, else ``None``. Decided once
    per process (per setting)."""
    setting = os.environ.get(ENV, "").strip()
    key = (setting, os.path.expanduser("~"))
    found = _folders.get(key, False)
    if found is not False:
        return found
    with _folder_lock:
        if key not in _folders:
            _folders[key] = _choose(setting)
        return _folders[key]


def _choose(setting: str) -> Path | None:
    if setting.lower() == "off":
        return None
    root = setting or os.path.join(os.path.expanduser("~"), ".cache", "hwoptim")
    wanted = Path(root) / "numba"
    got, why = _prepare(wanted)
    if got is not None:
        return got
    told = (f"hwoptim: not using the kernel cache folder {wanted} ({ENV}={setting or '(unset)'}"
            f"): {why}.")
    advice = (f"Set {ENV} to a folder only you can write to, or {ENV}=off to keep no disk "
              f"cache.")
    spare = Path(tempfile.gettempdir()) / f"hwoptim-{_UID if _UID is not None else 'user'}" \
        / "numba"
    got, why_spare = _prepare(spare) if spare != wanted else (None, why)
    if got is not None:
        _warn(("folder", str(wanted)),
              f"{told} Kernels are cached in {got} instead. {advice}")
        return got
    _warn(("folder", str(wanted)),
          f"{told} The fallback {spare} cannot be used either ({why_spare}): kernels are "
          f"compiled in memory in every process, with no disk cache. {advice}")
    return None


# ----------------------------------------------------------------------------- the kernels

def load_module(make_source, stem: str):
    """The kernel module for generated source ``make_source(cache)`` (``cache``: whether its
    kernels may use Numba's disk cache), with its Numba dispatchers as attributes.

    With a cache folder, the source is written (atomically, 0600) to a file named after
    its content unless that file already holds exactly these bytes, and the module is
    compiled from the source in memory under that file's name, so nothing read from the
    folder is executed except through Numba's own files. Without one (or when the file
    cannot be written) the kernels are built with ``cache=False``."""
    where = folder()
    source = make_source(where is not None)
    name = f"hwoptim_kernel_{stem}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    mod = _modules.get((name, where))
    if mod is not None:
        return mod
    with _kernel_lock(name):
        mod = _modules.get((name, where))
        if mod is None:
            path = _write_source(where, name, source) if where is not None else None
            if path is None:
                source = make_source(False)
            mod = _compile(name, source, path)
            if path is not None and not _numba_folders_private(mod, where):
                mod = _compile(name, make_source(False), None)
            _modules[(name, where)] = mod
            sys.modules[name] = mod            # only once it is complete
    return mod


def _write_source(where: Path, name: str, source: str) -> Path | None:
    path = where / f"{name}.py"
    data = source.encode()
    try:
        try:
            with open(path, "rb") as f:
                old = f.read(len(data) + 1)      # enough to tell, however large the file
        except FileNotFoundError:
            old = None
        if old == data:
            return path
        if old is not None:
            _warn(("source", str(path)),
                  f"hwoptim: the kernel file {path} did not hold the source hwoptim generates "
                  f"for it ({len(old)} bytes, expected {len(data)}); rewrote it.")
        fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{name}.", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)   # atomic: no process ever reads half a file
        except BaseException:
            _unlink(tmp)
            raise
        return path
    except OSError as e:
        _warn(("write", str(where)),
              f"hwoptim: cannot write kernel files to {where} ({type(e).__name__}: "
              f"{e.strerror or e}); such kernels are compiled in memory, with no disk cache. "
              f"{ENV} chooses the folder.")
        return None


def _compile(name: str, source: str, path: Path | None) -> types.ModuleType:
    mod = types.ModuleType(name)
    filename = str(path) if path is not None else f"<hwoptim kernel {name}>"
    mod.__file__ = filename
    mod.__hwoptim_disk_cache__ = path is not None
    exec(compile(source, filename, "exec", dont_inherit=True), mod.__dict__)
    return mod


def _dispatchers(mod):
    return [v for v in vars(mod).values() if hasattr(v, "py_func") and hasattr(v, "_cache")]


def _numba_folder(dispatcher) -> str | None:
    return getattr(getattr(dispatcher, "_cache", None), "cache_path", None)


def _numba_folders_private(mod, where: Path) -> bool:
    """Whether Numba keeps ``mod``'s files in a private folder: ours, or one that passes
    :func:`unsafe_reason` (``NUMBA_CACHE_DIR`` puts them elsewhere)."""
    ours = os.path.realpath(where / "__pycache__")
    for d in _dispatchers(mod):
        there = _numba_folder(d)
        if there is None or os.path.realpath(there) == ours:
            continue
        why = unsafe_reason(there)
        if why:
            _warn(("numba folder", there),
                  f"hwoptim: Numba would keep kernel machine code in {there} (NUMBA_CACHE_DIR="
                  f"{os.environ.get('NUMBA_CACHE_DIR', '(unset)')}), which is not private: "
                  f"{why}. hwoptim's kernels are compiled in memory instead. Unset "
                  f"NUMBA_CACHE_DIR or make it a folder only you can write to.")
            return False
    return True


def first_call(mod, dispatcher, args) -> None:
    """Call ``dispatcher`` (a kernel of ``mod``) once with ``args``, so that it is compiled,
    or loaded from Numba's disk cache, for their types.

    Numba's files for this kernel that are not this user's regular files are deleted first
    (with one warning), and its own are made 0600, before and after the call. Files that
    Numba fails to load (truncated, garbled) are deleted with one warning and the kernel
    compiled again."""
    there = _numba_folder(dispatcher) if getattr(mod, "__hwoptim_disk_cache__", False) else None
    if there is None:
        dispatcher(*args)
        return
    prefix = f"{mod.__name__}.{dispatcher.py_func.__qualname__}-"
    with _kernel_lock(mod.__name__):
        _make_private(there, prefix)
        try:
            dispatcher(*args)
        except Exception as e:
            if not _raised_in_numba_cache(e):
                raise
            files = [p for p, _ in _numba_files(there, prefix)]
            _warn(("numba files", prefix),
                  f"hwoptim: Numba could not load its cache files for kernel "
                  f"{mod.__name__}.{dispatcher.py_func.__qualname__} ({type(e).__name__}: "
                  f"{e}); deleted {', '.join(files) or 'them'} and compiled it again.")
            for p in files:
                _unlink(p)
            try:
                dispatcher(*args)
            except Exception as e2:          # still failing to save: run without the cache
                if not _raised_in_numba_cache(e2):
                    raise
                dispatcher._cache.disable()
                dispatcher(*args)
        _make_private(there, prefix)


def _numba_files(there: str, prefix: str):
    """(path, lstat) of Numba's index and data files in ``there`` named ``prefix...``."""
    out = []
    try:
        names = os.listdir(there)
    except OSError:
        return out
    for n in names:
        if n.startswith(prefix) and n.endswith(_NUMBA_FILES):
            p = os.path.join(there, n)
            try:
                out.append((p, os.lstat(p)))
            except FileNotFoundError:
                pass
    return out


def _make_private(there: str, prefix: str) -> None:
    """Delete Numba files named ``prefix...`` in ``there`` that are not this user's regular
    files; make the others 0600 (Numba writes them with the umask's mode: 0666 under umask
    0)."""
    for p, st in _numba_files(there, prefix):
        if not stat.S_ISREG(st.st_mode) or (_UID is not None and st.st_uid != _UID):
            _warn(("foreign", p), f"hwoptim: deleted {p}: not a regular file of this user, "
                  f"so not trusted as Numba cache data.")
            _unlink(p)
        elif _UID is not None and st.st_mode & 0o177:
            os.chmod(p, 0o600)


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _raised_in_numba_cache(e: BaseException) -> bool:
    """Whether ``e`` came from Numba's disk cache (loading or saving its files)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("numba", "core", "caching.py")):
            return True
        tb = tb.tb_next
    return False
