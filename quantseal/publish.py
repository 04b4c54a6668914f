"""Publishing an output folder (a checkpoint, a board) so that its path always holds a complete one.

Whatever moment a ``kill -9`` hits, ``out`` holds either the old complete folder or the new
complete folder, never nothing and never a half-written one:

1. everything is written into a temporary folder beside ``out``,
   ``.NAME.quantseal-tmp-PID-XXXX`` (same filesystem), and every file and folder in it is fsynced;
2. publishing is one atomic step:

   * ``out`` absent: ``rename(tmp, out)``;
   * ``out`` a folder: ``renameat2(tmp, out, RENAME_EXCHANGE)`` (Linux ≥ 3.15; ext4, xfs, btrfs,
     tmpfs, ...) swaps the two in one step, then the old folder, now at ``tmp``, is deleted;
   * ``out`` a symbolic link (or, without RENAME_EXCHANGE, a new ``out``): the temporary folder is
     renamed to a versioned ``.NAME.quantseal-v-PID-XXXX``, a new link to it replaces ``out`` by
     ``rename`` (atomic), then the previous version is deleted;
   * a folder where RENAME_EXCHANGE is refused (another OS, an exotic filesystem): two renames,
     ``out`` → ``.NAME.quantseal-old-PID-XXXX`` then ``tmp`` → ``out``.  Not atomic: a kill between
     them leaves the old folder under that name, and :func:`collect_orphans` (the next publish, or
     ``quantseal gc``) moves it back;
3. the parent folder is fsynced.

Temporary names carry the writer's process id; :func:`collect_orphans` removes those whose
process is gone (a running writer's folder is left alone).

:func:`check_output_folder` validates an output path before any compute.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import BadInput

TMP, VERSION, OLD = "quantseal-tmp", "quantseal-v", "quantseal-old"
_ORPHAN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>quantseal-tmp|quantseal-v|quantseal-old)-(?P<pid>\d+)-[^/]+$")
_RENAME_EXCHANGE = 1 << 1
_AT_FDCWD = -100
_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")


# ----------------------------------------------------------------------------- fsync
def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every folder (deepest first), then ``root``."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(dirpath))


# ----------------------------------------------------------------------------- renameat2
def _libc_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (both must exist).  False when the system or the
    filesystem does not offer RENAME_EXCHANGE; any other failure raises ``OSError``."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ----------------------------------------------------------------------------- orphans
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def collect_orphans(folder: Path, name: str | None = None) -> list[str]:
    """Clean what killed writers left in ``folder`` (only entries named ``name`` when given):
    temporary and unreferenced versioned folders are deleted; an old folder set aside by the
    non-atomic fallback is moved back when its path is empty.  Returns what was done, one line per
    entry."""
    folder = Path(folder)
    done = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return done
    for p in entries:
        m = _ORPHAN.match(p.name)
        if m is None or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["kind"] == VERSION and target.is_symlink() and os.readlink(target) == p.name:
            continue  # the live version
        if m["kind"] == OLD and not target.exists() and not target.is_symlink():
            os.rename(p, target)
            done.append(f"restored {target} from {p.name}")
            continue
        _remove(p)
        done.append(f"removed {p}")
    if done:
        fsync_path(folder)
    return done


def temp_folder(out: Path) -> Path:
    """A fresh, empty folder beside ``out`` to write into (orphans of ``out`` are cleaned first)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    collect_orphans(out.parent, out.name)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{TMP}-{os.getpid()}-", dir=out.parent))


# ----------------------------------------------------------------------------- publish
def publish_folder(tmp: Path, out: Path, use_exchange: bool = True) -> str:
    """Replace ``out`` by the fully written folder ``tmp`` (see the module notes); returns the way
    taken: ``"rename"``, ``"exchange"``, ``"symlink"`` or ``"two-renames"``.  ``use_exchange=False``
    forces the portable symlink path (tests)."""
    tmp, out = Path(tmp), Path(out)
    parent = out.parent
    fsync_tree(tmp)
    if out.is_symlink() or (not out.exists() and not use_exchange):
        how = "symlink"
        version = parent / tmp.name.replace(f".{TMP}-", f".{VERSION}-", 1)
        os.rename(tmp, version)
        previous = os.readlink(out) if out.is_symlink() else None
        link = parent / (tmp.name + ".link")
        os.symlink(version.name, link)
        os.rename(link, out)  # atomic: the link is replaced, never absent
        fsync_path(parent)
        if previous and _ORPHAN.match(previous) and "/" not in previous:
            _remove(parent / previous)
    elif not out.exists():
        how = "rename"
        os.rename(tmp, out)
        fsync_path(parent)
    elif use_exchange and exchange(tmp, out):
        how = "exchange"
        fsync_path(parent)
        shutil.rmtree(tmp)  # the old folder, now under the temporary name
    else:
        how = "two-renames"
        old = parent / tmp.name.replace(f".{TMP}-", f".{OLD}-", 1)
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_path(parent)
        shutil.rmtree(old)
    fsync_path(parent)
    return how


# ----------------------------------------------------------------------------- validation
def check_output_folder(out: str | Path, marker: str, what: str) -> Path:
    """Refuse an output folder path before any compute: under /proc, /sys or /dev; an existing
    entry that is not a folder, or a folder without ``marker`` (not a ``what`` to replace); a
    parent that is not a folder or not writable.  Missing parents are fine (they are created)."""
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise BadInput(f"{out}: give a folder name for the {what}")
    real = os.path.realpath(out)
    for root in _FORBIDDEN_ROOTS:
        if real == root or real.startswith(root + "/"):
            raise BadInput(f"{out}: cannot write a {what} under {root}")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BadInput(f"{out}: exists and is not a folder; refusing to overwrite it")
        if not (out / marker).is_file():
            raise BadInput(f"{out}: exists and is not a quantseal {what}; refusing to overwrite it")
    anc = out.parent if str(out.parent) else Path(".")
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():
            raise BadInput(f"{anc}: a dangling link")
        anc = anc.parent
    if not anc.is_dir():
        raise BadInput(f"{anc}: not a folder, so {out} cannot be written")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BadInput(f"{anc}: not writable, so {out} cannot be written")
    st = os.stat(anc)
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{anc}: not a folder")
    return out
