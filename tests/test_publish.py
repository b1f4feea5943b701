"""Atomic publishing under crashes (issue 12, item 6): ``CURRENT`` names a complete folder after a
kill at any step of a publish, and folders left by killed publishers go at the next publish."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepclick import publish
from deepclick.publish import clean_leftovers, publishing, resolve, verify


def _publish_text(parent: Path, text: str) -> None:
    with publishing(parent, "v1") as staging:
        (staging.path / "data.txt").write_text(text)


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def _publish_and_die_after(parent: str, steps: int) -> None:
    """In a forked child: republish, and kill the process (no clean-up, like kill -9) right
    after its ``steps``-th file-system step that moves a folder or pointer."""
    done = 0

    def dying(function):  # type: ignore[no-untyped-def]
        def step(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal done
            result = function(*args, **kwargs)
            done += 1
            if done == steps:
                os._exit(9)
            return result

        return step

    publish.os.rename = dying(os.rename)  # type: ignore[attr-defined]
    publish.os.replace = dying(os.replace)  # type: ignore[attr-defined]
    publish._exchange = dying(publish._exchange)  # type: ignore[assignment]
    publish.shutil.rmtree = dying(publish.shutil.rmtree)  # type: ignore[attr-defined]
    _publish_text(Path(parent), "new")
    os._exit(0)


def test_kill_at_any_step_of_a_republish_leaves_current_naming_a_complete_folder(
    tmp_path: Path,
) -> None:
    # Issue 12 item 6: killed between the two renames, CURRENT named a missing folder.
    parent = tmp_path / "index"
    _publish_text(parent, "old")
    context = multiprocessing.get_context("fork")
    kills = 0
    for steps in range(1, 10):
        child = context.Process(target=_publish_and_die_after, args=(str(parent), steps))
        child.start()
        child.join(30)
        folder = resolve(parent, what="index")
        verify(folder)
        assert (folder / "data.txt").read_text() in {"old", "new"}
        if child.exitcode == 0:
            break
        assert child.exitcode == 9
        kills += 1
    else:
        pytest.fail("the publish never finished")
    assert kills >= 3  # exchange (or rename aside), rename, removal of the old folder
    assert (resolve(parent) / "data.txt").read_text() == "new"
    _publish_text(parent, "again")  # the next publish cleans whatever the kills left
    assert sorted(p.name for p in parent.iterdir()) == ["CURRENT", "v1"]


def test_leftovers_of_killed_publishers_are_removed_at_the_next_publish_of_that_folder(
    tmp_path: Path,
) -> None:
    parent = tmp_path / "embeddings"
    _publish_text(parent, "old")
    dead = _dead_pid()
    for name in (f".staging-v1-{dead}-0123abcd", f".trash-v1-{dead}-4567abcd"):
        (parent / name).mkdir()
        (parent / name / "part").write_text("half written")
    live = parent / f".staging-v1-{os.getpid()}-89abcdef"  # a publish still running
    live.mkdir()
    other = parent / f".staging-v2-{dead}-0123abcd"  # another folder's leftover: not ours
    other.mkdir()
    _publish_text(parent, "new")
    names = sorted(p.name for p in parent.iterdir())
    assert names == sorted(["CURRENT", "v1", live.name, other.name])
    assert (parent / "v1" / "data.txt").read_text() == "new"


def test_a_dead_publishers_trash_is_restored_when_the_folder_is_missing(tmp_path: Path) -> None:
    # Where no atomic exchange exists, a kill between the two renames leaves only the trash.
    parent = tmp_path / "index"
    _publish_text(parent, "old")
    trash = parent / f".trash-v1-{_dead_pid()}-0123abcd"
    os.rename(parent / "v1", trash)
    assert clean_leftovers(parent, "v1") == []
    verify(parent / "v1")
    assert (resolve(parent) / "data.txt").read_text() == "old"
