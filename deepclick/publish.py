"""Atomic publishing of stage outputs (DESIGN.md, "Publishing").

Every stage writes into a hidden staging folder beside its destination, fills it, and only then
renames it into place as ``<parent>/<version>`` (and, where the stage keeps one, moves the
``CURRENT`` pointer by atomic rename). Readers therefore see a published version or nothing: a crash
leaves at most a hidden ``.staging-*`` folder, which readers and Spark ignore (Hadoop skips names
starting with ``.`` or ``_``). Each published folder carries a manifest with the version, creation
time, input versions, counts, metrics and a SHA-256 of every file, which loaders verify.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CURRENT = "CURRENT"


class PublishError(RuntimeError):
    """A stage output failed validation and was not published."""


class NotPublishedError(FileNotFoundError):
    """A reader asked for a version (or CURRENT) that has not been published."""


class IntegrityError(RuntimeError):
    """A published folder does not match its manifest (missing or altered files)."""


def version_for(date: dt.date | str) -> str:
    """The version name of everything built for one day: ``YYYYMMDD`` (an integer, as TF Serving
    requires for model versions, and sortable)."""
    day = dt.date.fromisoformat(date) if isinstance(date, str) else date
    return day.strftime("%Y%m%d")


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


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging``. Each rename is atomic; the old folder is renamed aside
    (not deleted) before the new one takes its name, so at no moment is a partial folder visible."""
    trash: Path | None = None
    if target.exists():
        trash = target.parent / f".trash-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
    try:
        os.rename(staging, target)
    except OSError:
        if trash is not None:
            os.rename(trash, target)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


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
    staging = Staging(parent / f".staging-{name}-{uuid.uuid4().hex[:8]}", version)
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
