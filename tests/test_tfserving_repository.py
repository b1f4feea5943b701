"""TF Serving's repository holds champions only: a promoted version appears there whole and
verified, older champions are pruned except the one the live release still asks for, and a
version that does not match its manifest is refused with the repository unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepclick.publish import IntegrityError, current_version, publishing, verify
from lifecycle.tfserving_repository import publish_champion

MANIFEST = "deepclick_manifest.json"


def exported(repository: Path, version: str) -> Path:
    """A published model version folder (a stand-in SavedModel: the files are opaque here)."""
    with publishing(repository, version, manifest_name=MANIFEST) as staging:
        (staging.path / "saved_model.pb").write_bytes(f"model {version}".encode())
        (staging.path / "variables").mkdir()
        (staging.path / "variables" / "variables.index").write_text(version)
        staging.manifest = {"model_name": "ranker"}
    return repository / version


def versions(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and p.name.isdigit())


def test_champions_only_and_the_live_version_is_kept(tmp_path: Path) -> None:
    repository, served = tmp_path / "model_repository", tmp_path / "tfserving" / "ranker"
    for version in ("20240101", "20240102", "20240103", "20240104"):
        exported(repository, version)

    publish_champion(repository / "20240101", served, MANIFEST)
    assert versions(served) == ["20240101"]
    # 20240102 and 20240103 were refused: they are never published here
    publish_champion(repository / "20240104", served, MANIFEST, serving="20240101")
    assert versions(served) == ["20240101", "20240104"]
    assert current_version(served) == "20240104"
    manifest = verify(served / "20240104", MANIFEST)
    assert manifest["model_name"] == "ranker"
    assert manifest == verify(repository / "20240104", MANIFEST)  # the same manifest, untouched
    # the next promotion, once the release serves 20240104, prunes 20240101
    publish_champion(repository / "20240102", served, MANIFEST, serving="20240104")
    assert versions(served) == ["20240102", "20240104"]


def test_republishing_the_champion_changes_nothing(tmp_path: Path) -> None:
    repository, served = tmp_path / "model_repository", tmp_path / "served"
    first, second = exported(repository, "1"), exported(repository, "2")
    publish_champion(first, served, MANIFEST)
    publish_champion(second, served, MANIFEST, serving="1")
    before = (served / "2" / "saved_model.pb").stat().st_ino
    publish_champion(second, served, MANIFEST, serving="2")
    assert versions(served) == ["1", "2"]
    assert (served / "2" / "saved_model.pb").stat().st_ino == before


def test_a_version_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    repository, served = tmp_path / "model_repository", tmp_path / "served"
    publish_champion(exported(repository, "1"), served, MANIFEST)
    broken = exported(repository, "2")
    (broken / "saved_model.pb").write_bytes(b"truncated")
    with pytest.raises(IntegrityError, match=r"altered: saved_model\.pb"):
        publish_champion(broken, served, MANIFEST, serving="1")
    assert versions(served) == ["1"]
    assert current_version(served) == "1"
    assert not [p for p in served.iterdir() if p.name.startswith(".")]  # no staging left behind
