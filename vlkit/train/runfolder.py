"""Run folders: what counts as one, which ``--out`` a new run may take, and the lock that keeps
one writer per run.

A folder is a vlkit run when its ``config.json`` is vlkit's (``model``, ``config`` and
``vlkit_version`` fields). A new run (no ``--resume``) takes a folder that does not exist, an
empty one, or a vlkit run that stopped before its first checkpoint; it refuses a folder holding
anything else (someone's ``config.json`` / ``model.safetensors``), a run with checkpoints, and a
finished run even if its ``checkpoints/`` was removed. ``--resume`` needs a vlkit run with a
whole checkpoint.

The lock is ``RUN/.vlkit.lock``: a POSIX record lock (``fcntl.lockf``) on it, held from the start
of training to the end, with the holder's PID, host and start time written inside. The kernel
drops the lock when its holder dies, however it dies, so a crashed run never leaves the folder
stuck: a lock file whose lock nobody holds is stale and is taken over (with a note). On a file
system without POSIX locks the PID and host written in the file decide: a holder on this host
that is no longer running is stale. The lock is re-entrant within a process (a recipe's stages,
an evaluation after training).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint import CONFIG, WEIGHTS, checkpoint_dirs, latest_checkpoint

LOCK = ".vlkit.lock"
# files a run writes when it ends: a run with any of them has finished (or been evaluated)
FINISHED = (WEIGHTS, "train_summary.json", "eval.json")
# files a run writes as it goes, cleared when a run that stopped before its first checkpoint
# is started again
PROGRESS = ("metrics.jsonl", "curve.jsonl")


class RunLocked(ValueError):
    """Another live process holds the run folder."""


def is_vlkit_run(path: str | Path) -> bool:
    """True when ``path/config.json`` is a vlkit run config (not someone's Hugging Face config)."""
    file = Path(path) / CONFIG
    try:
        obj = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"model", "config", "vlkit_version"} <= set(obj)


# a recipe run's own entries beside its last stage's run (vlkit/train/recipe.py)
RECIPE_FILES = ("recipe.toml", "stages")


def _contents(run: Path) -> list[str]:
    """What the folder holds besides the lock (and, in a recipe run, the recipe's own files)."""
    if not run.is_dir():
        return []
    names = sorted(p.name for p in run.iterdir() if p.name != LOCK)
    if (run / RECIPE_FILES[0]).is_file():
        names = [n for n in names if n not in RECIPE_FILES]
    return names


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_output_path(path: str | Path, option: str = "--out") -> None:
    """A ValueError (one line) when ``path`` cannot be created: the nearest existing folder
    above it is a file, or is not writable."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    if parent.is_dir() and not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in {parent} (permission denied)")


def check_out_folder(run: str | Path, resume: bool) -> bool:
    """Refuse (ValueError, one line) an ``--out`` a run may not write; returns True when the
    folder is a vlkit run that stopped before its first checkpoint (started again: its progress
    files are cleared by ``clear_progress``). Reads only: nothing is written."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run}: is a file, not a folder")
    check_output_path(run)
    names = _contents(run)
    if resume:
        if not names:
            raise ValueError(f"--resume: {run} holds no run to resume (start it without --resume)")
        if not is_vlkit_run(run):
            raise ValueError(f"--resume: {run} is not a vlkit run (no vlkit {CONFIG}); nothing to resume")
        if latest_checkpoint(run) is None:
            what = "no whole checkpoint in checkpoints/" if checkpoint_dirs(run) else "no checkpoints/"
            raise ValueError(f"--resume: {run} has {what}; nothing to resume from")
        return False
    if not names:
        return False
    if not is_vlkit_run(run):
        raise ValueError(f"--out {run}: the folder is not empty ({_listing(names)}) and is not a vlkit "
                         "run; give a new or empty folder")
    if checkpoint_dirs(run):
        raise ValueError(f"--out {run} already holds a run (checkpoints/); use --resume to continue it, "
                         "or another --out")
    done = [name for name in FINISHED if (run / name).exists()]
    if done:
        raise ValueError(f"--out {run} holds a finished run ({done[0]}); give another --out "
                         "(or delete the folder to train it again)")
    return True


def clear_progress(run: str | Path) -> None:
    """Remove the progress files of a run that stopped before its first checkpoint."""
    for name in PROGRESS:
        path = Path(run) / name
        if path.is_file():
            path.unlink()


def remove_if_untouched(run: str | Path) -> None:
    """Remove a folder this process created that holds nothing but an unheld lock file."""
    run = Path(run)
    if os.path.realpath(run) in _held or not run.is_dir() or _contents(run):
        return
    try:
        (run / LOCK).unlink(missing_ok=True)
        run.rmdir()
    except OSError:
        pass


# ---- the lock ---------------------------------------------------------------------------------

_held: dict[str, list] = {}  # real path of the run -> [file descriptor, depth]


def _holder_text(info: dict) -> str:
    pid, host = info.get("pid", "?"), info.get("host", "?")
    since = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"PID {pid} on {host}{when}"


def _read_info(fd: int) -> dict:
    """The holder written in the lock file ({} when empty: nobody held it last)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
    except OSError:
        return {}
    if not data.strip():
        return {}
    try:
        info = json.loads(data.decode())
    except ValueError:
        info = None
    return info if isinstance(info, dict) else {"pid": "?"}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_info(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)


def acquire(run: str | Path) -> None:
    """Take the run folder's lock (creating the folder), or raise ``RunLocked`` naming the
    holder. Re-entrant: a process that holds it takes it again (``release`` once for each)."""
    run = Path(run)
    key = os.path.realpath(run)
    if key in _held:
        _held[key][1] += 1
        return
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK
    try:  # never through a link: the holder's details are written into the file
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise ValueError(f"{path}: is a symbolic link, not vlkit's lock file; remove it") from None
        raise
    try:
        import fcntl
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        posix = True
    except (OSError, ImportError) as e:
        posix = False
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EAGAIN):
            info = _read_info(fd)
            os.close(fd)
            raise RunLocked(f"{run} is in use by another vlkit process ({_holder_text(info)}); "
                            "wait for it to end, or use another --out") from None
    previous = _read_info(fd)
    if not posix and previous.get("pid") not in (None, os.getpid()):
        # no POSIX locks here: the PID and host in the file decide
        here = previous.get("host") == socket.gethostname()
        if not here or _alive(previous.get("pid")):
            os.close(fd)
            raise RunLocked(f"{run} is in use by another vlkit process ({_holder_text(previous)}); "
                            f"wait for it to end, or use another --out (if it is gone, delete {path})")
    if previous.get("pid") not in (None, os.getpid()):
        print(f"note: {path}: the lock of process {previous.get('pid')}, which is no longer running, "
              "was taken over", file=sys.stderr)
    _write_info(fd)
    _held[key] = [fd, 1]


def release(run: str | Path) -> None:
    key = os.path.realpath(Path(run))
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd = entry[0]
    try:
        os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
    except OSError:
        pass
    os.close(fd)  # drops the POSIX lock


@contextmanager
def run_lock(run: str | Path):
    """``with run_lock(RUN):`` hold RUN's lock for the block."""
    acquire(run)
    try:
        yield
    finally:
        release(run)
