"""Atomic publishing of stage outputs (DESIGN.md, "Publishing").

Every stage writes into a hidden staging folder beside its destination, fills it, and only then
renames it into place as ``<parent>/<version>`` (and, where the stage keeps one, moves the
``CURRENT`` pointer by atomic rename). Readers therefore see a published version or nothing: a crash
leaves at most a hidden ``.staging-*`` folder, which readers and Spark ignore (Hadoop skips names
starting with ``.`` or ``_``) and the next publish of that folder removes (:func:`clean_leftovers`).
Republishing a name swaps the folders in one atomic exchange, so no kill leaves ``CURRENT`` naming a
missing folder. Each published folder carries a manifest with the version, creation
time, input versions, counts, metrics and a SHA-256 of every file, which loaders verify.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno as _errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepclick.errors import DeepclickError
from deepclick.layout import CURRENT, MANIFEST

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_ENOSYS, _EINVAL, _ENOTSUP = _errno.ENOSYS, _errno.EINVAL, _errno.ENOTSUP


def _load_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    return function


_RENAMEAT2 = _load_renameat2()


class PublishError(DeepclickError, RuntimeError):
    """A stage output failed validation and was not published."""


class NotPublishedError(DeepclickError, FileNotFoundError):
    """A reader asked for a version (or CURRENT) that has not been published."""


class IntegrityError(DeepclickError, RuntimeError):
    """A published folder does not match its manifest (missing or altered files)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, manifest_name: str = MANIFEST) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (relative POSIX paths), the manifest excluded."""
    result: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != manifest_name and not path.name.endswith(".crc"):
            result[path.relative_to(folder).as_posix()] = sha256_file(path)
    return result


@dataclass
class Staging:
    """A folder being filled for publication, with the manifest that will describe it."""

    path: Path
    version: str
    manifest: dict[str, Any] = field(default_factory=dict)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder to disk before the rename that makes them visible, so a crash
    right after publishing cannot leave a published version with unwritten pages."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        descriptor = os.open(path, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the kernel or file system cannot, so the caller falls back to two renames."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (_ENOSYS, _EINVAL, _ENOTSUP):
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` so that ``target`` always names a complete folder,
    even if the process dies between any two system calls (issue 12, item 6).

    A new name is one rename. Republishing an existing name exchanges the two folders in one
    atomic step where the kernel offers it (the old contents land in a ``.trash-*`` folder, then
    removed); elsewhere the old folder is renamed aside first, and a crash in that window is
    repaired by :func:`clean_leftovers` at the next publish or read of the folder."""
    if not target.exists():
        os.rename(staging, target)
        return
    trash = target.parent / _leftover_name("trash", target.name)
    if _exchange(staging, target):
        os.rename(staging, trash)
    else:
        os.rename(target, trash)
        try:
            os.rename(staging, target)
        except OSError:
            os.rename(trash, target)
            raise
    shutil.rmtree(trash, ignore_errors=True)


def _leftover_name(kind: str, name: str) -> str:
    """``.staging-<name>-<pid>-<random>`` / ``.trash-<name>-<pid>-<random>``: hidden from readers
    (and Spark), and naming the process that owns it so a later publish knows when it is dead."""
    return f".{kind}-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(parent: Path, name: str) -> list[Path]:
    """Remove the ``.staging-<name>-*`` and ``.trash-<name>-*`` folders that killed publishers
    left beside ``<parent>/<name>``; return what was removed.

    A folder whose owner process is still alive is left alone (a publish in progress). When
    ``<name>`` itself is missing but a dead publisher's trash holds it (a crash between the two
    renames where no atomic exchange exists), the trash is renamed back first, so the published
    version is restored rather than lost."""
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.(staging|trash)-{re.escape(name)}-(\d+)-[0-9a-f]{{8}}$")
    dead: list[tuple[str, Path]] = []
    for path in parent.iterdir():
        match = pattern.match(path.name)
        if match and not _pid_alive(int(match.group(2))):
            dead.append((match.group(1), path))
    target = parent / name
    removed: list[Path] = []
    for kind, path in sorted(dead, key=lambda item: item[1].name):
        if kind == "trash" and not target.exists() and (path / MANIFEST).is_file():
            os.rename(path, target)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def set_current(parent: Path, version: str) -> None:
    """Point ``<parent>/CURRENT`` at ``version`` with one atomic rename."""
    tmp = parent / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(version + "\n")
    os.replace(tmp, parent / CURRENT)


@contextmanager
def publishing(
    parent: Path,
    version: str,
    *,
    target_name: str | None = None,
    manifest_name: str = MANIFEST,
    update_current: bool = True,
    validate: Callable[[Staging], None] | None = None,
) -> Iterator[Staging]:
    """Yield an empty staging folder; publish it as ``<parent>/<target_name or version>`` when the
    block finishes without error and ``validate`` accepts it. On any error the staging folder is
    removed and whatever was published before stays untouched.

    The caller fills ``staging.manifest`` (``inputs``, ``counts``, ``metrics``, ...); ``version``,
    ``created_at`` and ``checksums`` are added here.
    """
    parent.mkdir(parents=True, exist_ok=True)
    name = target_name or version
    clean_leftovers(parent, name)
    staging = Staging(parent / _leftover_name("staging", name), version)
    staging.path.mkdir()
    try:
        yield staging
        if validate is not None:
            validate(staging)
        manifest = {
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **staging.manifest,
            "checksums": checksums(staging.path, manifest_name),
        }
        (staging.path / manifest_name).write_text(json.dumps(manifest, indent=2, default=str))
        _fsync_tree(staging.path)
        _swap_into_place(staging.path, parent / name)
        if update_current:
            set_current(parent, version)
    finally:
        if staging.path.exists():
            shutil.rmtree(staging.path, ignore_errors=True)


def current_version(parent: Path) -> str | None:
    pointer = parent / CURRENT
    return pointer.read_text().strip() if pointer.is_file() else None


def resolve(parent: Path, version: str | None = None, *, what: str = "output") -> Path:
    """The folder of ``version`` (default: CURRENT) under ``parent``, or a clear error."""
    chosen = version or current_version(parent)
    if chosen is None:
        raise NotPublishedError(f"no {what} has been published under {parent} (no CURRENT pointer)")
    folder = parent / chosen
    if not (folder / MANIFEST).is_file():
        raise NotPublishedError(f"{what} version {chosen!r} is not published under {parent}")
    return folder


def published_versions(parent: Path, manifest_name: str = MANIFEST) -> list[str]:
    if not parent.is_dir():
        return []
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / manifest_name).is_file()
    )


def read_manifest(folder: Path, manifest_name: str = MANIFEST) -> dict[str, Any]:
    path = folder / manifest_name
    if not path.is_file():
        raise NotPublishedError(f"{folder} has no {manifest_name}: it was never published")
    return json.loads(path.read_text())


def verify(folder: Path, manifest_name: str = MANIFEST) -> dict[str, Any]:
    """Check every file against the manifest's checksums; return the manifest or raise
    :class:`IntegrityError` naming the first files that differ."""
    manifest = read_manifest(folder, manifest_name)
    expected: dict[str, str] = manifest.get("checksums", {})
    actual = checksums(folder, manifest_name)
    missing = sorted(set(expected) - set(actual))
    changed = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    extra = sorted(set(actual) - set(expected))
    if missing or changed or extra:
        parts = [
            f"{label}: {', '.join(items[:5])}"
            for label, items in (("missing", missing), ("altered", changed), ("unexpected", extra))
            if items
        ]
        raise IntegrityError(f"{folder} does not match its manifest ({'; '.join(parts)})")
    return manifest
