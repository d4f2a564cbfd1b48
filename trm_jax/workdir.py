"""The run directory: checked before anything is built, and locked while a run trains in it.

Two trainings in one directory would overwrite each other's checkpoints,
results and best without a word. ``lock`` (process 0 of a run, for all its
processes) creates ``<workdir>/.lock`` naming the host and pid of the holder;
a second run stops with one line naming them. A lock left by a process that
died on this host (its pid gone, or reused by a process started later) is
taken over with a warning; a lock from another host cannot be checked from
here, so the message says how to remove it. The lock file is made complete
under a temporary name and hard-linked into place, so nobody ever reads a
half-written one and only one of two racing runs gets it.

``check`` turns the ways a directory can be unusable (a file, under a file,
read-only, immutable) into one line before anything is compiled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import socket
import sys
import time

import jax
import numpy as np

from trm_jax import errors

LOCK_FILE = ".lock"


class WorkdirError(errors.UserError):
  """The run directory cannot be used (reported as one line)."""


def _describe(error: OSError) -> str:
  if error.errno in (errno.EROFS,):
    return "it is on a read-only filesystem"
  if error.errno in (errno.EACCES, errno.EPERM):
    return f"it is not writable ({error.strerror}; read-only or immutable?)"
  if error.errno == errno.ENOSPC:
    return "the disk is full"
  return error.strerror or str(error)


def check(workdir: str | os.PathLike, *, create: bool) -> pathlib.Path:
  """The run directory as a path; with ``create``, made (parents too) if missing.

  Raises ``WorkdirError`` naming the directory when it is a file, lies under a
  file, or cannot be created.
  """
  path = pathlib.Path(workdir)
  for parent in [path, *path.parents]:
    if parent.exists() and not parent.is_dir():
      where = "is a file" if parent == path else f"is under {parent}, which is a file"
      raise WorkdirError(f"workdir {path} {where}; pass --workdir=<a directory>")
  if create:
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"workdir {path} cannot be created: {_describe(e)}") from None
  return path


def _start_time(pid: int) -> str | None:
  """The process's start time (Linux: /proc/<pid>/stat field 22), to tell a reused pid."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  now = _start_time(pid)
  return start is None or now is None or now == start


def _holder(lock_path: pathlib.Path) -> dict | None:
  try:
    holder = json.loads(lock_path.read_text())
    return holder if isinstance(holder, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds ``<workdir>/.lock`` (only where ``active``)."""

  def __init__(self, workdir: str | os.PathLike, *, active: bool = True, warn=None):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.active = active
    self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    self._mine: dict | None = None

  def _write_candidate(self) -> pathlib.Path:
    pid = os.getpid()
    self._mine = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tmp = self.path.with_name(f"{LOCK_FILE}.{self._mine['host']}.{pid}.tmp")
    try:
      tmp.write_text(json.dumps(self._mine))
    except OSError as e:
      raise WorkdirError(f"workdir {self.path.parent} is not usable: {_describe(e)}") from None
    return tmp

  def acquire(self) -> None:
    if not self.active:
      return
    tmp = self._write_candidate()
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          return
        except FileExistsError:
          pass
        except OSError as e:
          raise WorkdirError(f"workdir {self.path.parent} is not usable: {_describe(e)}") from None
        holder = _holder(self.path)
        if holder is None:
          continue  # released meanwhile
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid, holder.get("start")):
          self._take_over(holder)
          continue
        if not holder:
          raise WorkdirError(f"workdir {self.path.parent} has an unreadable lock file {self.path}; if no other run "
                             "uses this directory, delete it")
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise WorkdirError(
            f"workdir {self.path.parent} is in use by another run (pid {pid} on {where}, since "
            f"{holder.get('since')}): stop it or use another --workdir; if that run is dead, delete {self.path}")
      raise WorkdirError(f"workdir {self.path.parent}: could not take the lock {self.path} (it keeps changing)")
    finally:
      with contextlib.suppress(OSError):
        tmp.unlink()

  def _take_over(self, holder: dict) -> None:
    """Removes a dead run's lock: moved aside first, and put back if it changed hands meanwhile."""
    aside = self.path.with_name(f"{LOCK_FILE}.{self._mine['host']}.{self._mine['pid']}.stale")
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    try:
      if _holder(aside) != holder:  # another run took the lock between our read and the rename
        with contextlib.suppress(OSError):
          os.link(aside, self.path)
        return
      self._warn(f"taking over the lock of a run that is gone (pid {holder['pid']} on {holder['host']}, "
                 f"since {holder.get('since')}): {self.path}")
    finally:
      with contextlib.suppress(OSError):
        aside.unlink()

  def release(self) -> None:
    if not self.active or self._mine is None:
      return
    if _holder(self.path) == self._mine:
      with contextlib.suppress(OSError):
        self.path.unlink()
    self._mine = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def run_lock(workdir: str | os.PathLike):
  """One lock for every process of a run: process 0 takes it, all of them learn whether it did."""
  lock = WorkdirLock(workdir, active=jax.process_index() == 0)
  error = None
  try:
    lock.acquire()
  except WorkdirError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
    if np.any(failed) and error is None:
      raise WorkdirError(f"workdir {workdir}: process 0 could not take the lock (see its error)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()
