"""Checksums of a checkpoint's files: written with it, checked before it is trusted.

Orbax commits a checkpoint by renaming a complete temporary directory, so a
crash never leaves a half-written step. It cannot tell whether a committed
step was damaged afterwards (a truncated or deleted file, a flipped bit on
disk), and restoring such a step fails deep inside TensorStore or, worse,
succeeds with one wrong value. So every step carries ``trm_integrity.json``:
the size and SHA-256 of each of its files, written into the temporary
directory just before Orbax renames it (``post_finalization_callback``), so
the manifest is committed with the step or not at all.

``verify`` returns ``None`` for an intact step or one line naming the bad file.
A step without a manifest (written before manifests existed) is checked for
its structure only: every item directory and its root file present, the JSON
items readable.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

MANIFEST = "trm_integrity.json"
FORMAT = "trm-jax/checkpoint-integrity/v1"
# Files Orbax itself rewrites after the manifest is written (commit time
# stamps, commit markers): left out of it.
_UNTRACKED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
_CHUNK = 1 << 22


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _tracked_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in _UNTRACKED)


def write_manifest(step_dir: str | pathlib.Path, step: int) -> None:
  """Records every file of ``step_dir`` (written atomically: a temporary name, then a rename)."""
  step_dir = pathlib.Path(step_dir)
  files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
           for p in _tracked_files(step_dir)}
  tmp = step_dir / (MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT, "step": int(step), "files": files}, f, indent=0)
    f.flush()
  tmp.rename(step_dir / MANIFEST)


def _check_structure(step_dir: pathlib.Path, items: tuple[str, ...]) -> str | None:
  for item in items:
    item_dir = step_dir / item
    if not item_dir.is_dir():
      return f"{item}/ is missing"
    roots = [p for p in ("manifest.ocdbt", "metadata") if (item_dir / p).is_file()]
    if not roots:
      return f"{item}/ has neither manifest.ocdbt nor metadata"
    if roots[0] == "metadata":
      try:
        json.loads((item_dir / "metadata").read_text())
      except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{item}/metadata is not readable JSON ({e.__class__.__name__})"
  return None


def verify(step_dir: str | pathlib.Path, items: tuple[str, ...]) -> str | None:
  """``None`` if the step is intact, else what is wrong with it (naming the file)."""
  step_dir = pathlib.Path(step_dir)
  manifest_path = step_dir / MANIFEST
  if not manifest_path.exists():
    return _check_structure(step_dir, items)
  try:
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
      raise ValueError(manifest.get("format"))
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
    return f"{MANIFEST} is unreadable"
  for item in items:  # a deleted item directory, named as such rather than by its first file
    if not (step_dir / item).is_dir():
      return f"{item}/ is missing"
  for name, expected in files.items():
    path = step_dir / name
    try:
      size = path.stat().st_size
    except FileNotFoundError:
      return f"{name} is missing"
    except OSError as e:
      return f"{name} cannot be read ({e.strerror})"
    if size != expected.get("size"):
      return f"{name} has {size} bytes, {expected.get('size')} were written"
    try:
      digest = _sha256(path)
    except OSError as e:
      return f"{name} cannot be read ({e.strerror})"
    if digest != expected.get("sha256"):
      return f"{name} does not match its checksum (changed since it was written)"
  return None
