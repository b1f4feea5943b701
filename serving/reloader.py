"""Hot reload: a watcher thread that follows ``releases/CURRENT`` and swaps releases atomically.

Every ``reload_interval_s`` the watcher reads ``releases/CURRENT`` and the published folder's
manifest digest; when they name a release other than the one served, it loads and validates it
(``serving.release.load_release``: checksums, pairings, warmup) in this background thread — off the
request path — and then replaces one reference in :class:`ReleaseHolder`. Reading or replacing an
attribute is atomic in CPython, so a request that took the old release keeps using that object to
the end (its mmaps, model and backend stay alive while referenced), and the next request gets the
new one. No request waits and none is lost.

A release that fails validation is refused: one log line, ``deepclick_release_reloads{outcome=
"refused"}``, and the old release keeps serving; the same broken folder is not retried until
CURRENT (or the folder) changes. A release whose ranker did not answer the warmup (a TF Serving
that has not loaded the version yet) is retried at the next poll (``outcome="retry"``).

A process that serves nothing yet never stays empty-handed when something could answer (issue
12): if CURRENT's release is refused it serves the newest other release that loads (last known
good, ``outcome="fallback"``), and if only the ranker is down it serves the release degraded —
retrieval order — rather than 503 (``outcome="degraded"``). :attr:`Reloader.note` says which.
Retired releases are closed after a grace period longer than any request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from deepclick.publish import NotPublishedError, published_versions
from deepclick.settings import Settings

from .metrics import ServingMetrics
from .release import (
    RELEASES,
    LoadedRelease,
    ReleaseError,
    ReleaseWarmupError,
    current_release_folder,
    load_release,
    release_key,
)

log = logging.getLogger(__name__)

RETIRE_GRACE_S = 30.0
"""Seconds a replaced release stays open for requests that started on it."""


class ReleaseHolder:
    """The one reference every request reads; swapped whole, never mutated."""

    def __init__(self, release: LoadedRelease | None = None) -> None:
        self._current = release
        self._lock = threading.Lock()  # serialises writers; readers need no lock

    @property
    def current(self) -> LoadedRelease | None:
        return self._current

    def swap(self, release: LoadedRelease) -> LoadedRelease | None:
        """Serve ``release`` from now on; return the one it replaces."""
        with self._lock:
            old, self._current = self._current, release
        return old


Loader = Callable[[Path, Settings], LoadedRelease]


class Reloader:
    """Polls ``<root>/releases/CURRENT`` and swaps in new releases (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        holder: ReleaseHolder,
        metrics: ServingMetrics,
        *,
        loader: Loader | None = None,
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.metrics = metrics
        self.loader: Loader = loader or (lambda folder, s: load_release(folder, s))
        self.interval_s = settings.serving.reload_interval_s
        self.last_error: str | None = None
        self.note: str | None = None
        """Why the release served is not plainly CURRENT's (a fallback, a degraded start)."""
        self._refused_key: str | None = None
        self._retired: list[tuple[float, LoadedRelease]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> str:
        """One check; returns ``none``, ``unchanged``, ``loaded``, ``refused``, ``retry``,
        ``degraded`` (served without a warm ranker) or ``skipped`` (a release already refused)."""
        self._close_retired()
        folder = current_release_folder(self.settings.root)
        if folder is None:
            return "none"
        current = self.holder.current
        try:
            key = release_key(folder)
        except (NotPublishedError, OSError) as exc:
            outcome = self._refuse(None, f"CURRENT names {folder}, which is not published: {exc}")
            if current is None:
                self._fall_back(folder.name)
            return outcome
        if current is not None and current.key == key:
            return "unchanged"
        if key == self._refused_key:
            return "skipped"
        try:
            release = self.loader(folder, self.settings)
        except ReleaseWarmupError as exc:
            self.last_error = str(exc)
            if current is None and exc.release is not None:
                note = (
                    f"serving release {folder.name} degraded (retrieval order) until its "
                    f"ranker answers: {exc}"
                )
                self._serve(exc.release, note, outcome="degraded")
                return "degraded"
            if exc.release is not None:
                exc.release.close()
            self.metrics.reloads.labels("retry").inc()
            log.warning("release %s not loaded yet, will retry: %s", folder.name, exc)
            return "retry"
        except (ReleaseError, OSError, ValueError, RuntimeError) as exc:
            served = current.version if current else "nothing"
            outcome = self._refuse(
                key, f"release {folder.name} refused, still serving {served}: {exc}"
            )
            if current is None:
                self._fall_back(folder.name)
            return outcome
        self._serve(release, None)
        self.last_error = None
        self._refused_key = None
        return "loaded"

    def _serve(self, release: LoadedRelease, note: str | None, outcome: str = "loaded") -> None:
        old = self.holder.swap(release)
        self.note = note
        self.metrics.set_release(release.versions)
        self.metrics.reloads.labels(outcome).inc()
        if note:
            log.warning("%s", note)
        else:
            log.info(
                "serving release %s (%s) after %.1f s of loading",
                release.version, release.versions, release.load_seconds,
            )  # fmt: skip
        if old is not None:
            self._retired.append((time.monotonic() + RETIRE_GRACE_S, old))

    def _fall_back(self, refused: str) -> None:
        """Last known good (issue 12): a process that serves nothing while ``CURRENT`` names a
        refused release serves the newest other published release that loads (degraded if only
        its ranker is down), and says so in ``/readyz``, ``/v1/release`` and the log."""
        releases = self.settings.root / RELEASES
        for version in sorted(published_versions(releases), reverse=True):
            if version == refused:
                continue
            try:
                release = self.loader(releases / version, self.settings)
            except ReleaseWarmupError as exc:
                if exc.release is None:
                    continue
                release = exc.release
            except (ReleaseError, OSError, ValueError, RuntimeError) as exc:
                log.error("last known good: release %s refused too: %s", version, exc)
                continue
            note = (
                f"CURRENT names release {refused}, which was refused; serving the newest "
                f"release that loads, {version}"
            )
            self._serve(release, note, outcome="fallback")
            return
        log.error("last known good: no published release loads; serving nothing")

    def _refuse(self, key: str | None, message: str) -> str:
        self._refused_key = key
        self.last_error = message
        self.metrics.reloads.labels("refused").inc()
        log.error("%s", message)
        return "refused"

    def _close_retired(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for deadline, release in self._retired:
            if everything or now >= deadline:
                release.close()
            else:
                keep.append((deadline, release))
        self._retired = keep

    def _run(self) -> None:
        while True:
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any surprise; requests keep serving
                log.exception("release watcher: unexpected error")
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        """Start watching; the first poll (the initial load) runs at once in the thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="release-watcher", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._close_retired(everything=True)
