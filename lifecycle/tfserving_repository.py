"""The model repository TF Serving loads: champions only.

Every daily run exports its ranker into ``<root>/model_repository/<name>/<version>``, whether the
gate promotes it or not (the evaluation needs the exported model). TF Serving's
``latest { num_versions: N }`` policy loads the N highest version folders it finds, so pointing it
at that repository would load refused challengers and, after two refusals, unload the champion
that the serving release still asks for. TF Serving therefore watches a second repository,
``<root>/tfserving_repository/<name>/``, that holds exactly the current champion and the one before
it (the release being replaced keeps answering while the new one warms up). Promotion publishes the
new champion there (hard links, no copy, when on the same file system) and prunes older versions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from deepclick import layout
from deepclick.layout import TFSERVING_REPOSITORY
from deepclick.publish import (
    IntegrityError,
    NotPublishedError,
    current_version,
    publishing,
    set_current,
    verify,
)
from deepclick.settings import Settings
from serving.release import RELEASE_FILE, current_release_folder

REPOSITORY = TFSERVING_REPOSITORY
"""Under the state root; deploy/compose.yaml mounts it where models.config points (``latest`` 2)."""


def tfserving_repository(settings: Settings) -> Path:
    return layout.tfserving_repository(settings.root)


def live_ranker_version(root: Path) -> str | None:
    """The ranker version of the release serving now (None before the first release)."""
    folder = current_release_folder(root)
    if folder is None or not (folder / RELEASE_FILE).is_file():
        return None
    return json.loads((folder / RELEASE_FILE).read_text())["ranker"]["version"]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system: a real copy
        shutil.copy2(source, target)


def publish_champion(
    exported: Path, parent: Path, manifest_name: str, serving: str | None = None
) -> Path:
    """Publish the exported model version ``exported`` as ``<parent>/<version>`` (atomically,
    verified against its manifest first), point ``CURRENT`` at it, and remove every version but
    it and ``serving``, the version the live release still asks for until it is replaced.
    Re-publishing the current champion changes nothing.

    Call it before the release that uses the new version is published: TF Serving then loads
    and warms the version up while the old release keeps answering from ``serving``.

    Raises:
        deepclick.publish.IntegrityError: ``exported`` does not match its manifest.
    """
    manifest = verify(exported, manifest_name)
    version = exported.name
    previous = current_version(parent) if parent.exists() else None
    target = parent / version
    published = _matches(target, manifest_name)
    if previous == version and published:
        return target
    if not published:
        with publishing(parent, version, manifest_name=manifest_name) as staging:
            staging.path.rmdir()
            shutil.copytree(exported, staging.path, copy_function=_link_or_copy)
            (staging.path / manifest_name).unlink()
            staging.manifest = {k: v for k, v in manifest.items() if k != "checksums"}
    else:
        set_current(parent, version)
    kept = {version, serving}
    for name in _versions(parent):
        if name not in kept:
            shutil.rmtree(parent / name, ignore_errors=True)
    return target


def _matches(folder: Path, manifest_name: str) -> bool:
    try:
        verify(folder, manifest_name)
    except (IntegrityError, NotPublishedError, OSError, ValueError):
        return False
    return True


def _versions(parent: Path) -> list[str]:
    """The integer-named folders: what TF Serving would load."""
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and p.name.isdigit())
