"""Micro-batching in process: requests that reach the ranker together are scored in one call.

A ranker call has a fixed cost (feeding ~35 tensors, dispatching the graph) beside its per-row
work, so two requests scored as one 1,000-row call cost less CPU than two 500-row calls. The
batcher adds no waiting by default (``max_wait_ms`` 0, "natural" batching): one request at a
time is scored alone, exactly as without the batcher, and requests that arrive while a call is
running queue up and go together in the next call. With ``max_wait_ms`` > 0 the first request
of a batch also waits that long for company (useful only when many requests are in flight).

Mechanics (leader/follower, no extra thread): the first request to find the ranker idle becomes
the leader, takes up to ``max_rows`` candidate rows from the queue (whole requests, oldest
first), calls the backend with the per-row ``serving_default`` signature (different users cannot
share one ``rank`` call) and hands each request its slice; a batch of one request keeps the
backend's own signature. Each request keeps its deadline: a follower whose time runs out leaves
with :class:`RankerTimeout`, a batch's call gets the shortest deadline of its members (no request
waits past its own), and a batch's failure is every member's failure.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .backends import RankerBackend, RankerError, RankerTimeout, signature_inputs

BATCH_SIGNATURE = "serving_default"


@dataclass
class _Waiting:
    common: Mapping[str, np.ndarray]
    candidates: Mapping[str, np.ndarray]
    rows: int
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class BatchingBackend(RankerBackend):
    """A :class:`RankerBackend` in front of another that scores concurrent requests together."""

    kind = "batching"  # replaced by the inner backend's kind: answers name the real backend

    def __init__(  # no super().__init__: the inner backend holds the settings
        self, inner: RankerBackend, *, max_rows: int, max_wait_ms: float = 0.0
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.takes_candidate_index = inner.takes_candidate_index  # type: ignore[misc]
        self.ranker = inner.ranker
        self.signature = inner.signature
        self.timeout_s = inner.timeout_s
        self.max_rows = max_rows
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: deque[_Waiting] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self.batches = 0
        self.batched_requests = 0
        """Counters for benchmarks: calls made, and requests they answered."""

    def describe(self) -> dict[str, str]:
        return {
            **self.inner.describe(),
            "batching": f"max_rows={self.max_rows}, max_wait_ms={self.max_wait_s * 1000:g}",
        }

    def close(self) -> None:
        self.inner.close()

    def candidate_index(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        return self.inner.candidate_index(inputs)

    def _call(self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str) -> np.ndarray:
        return self.inner.call(inputs, timeout_s, signature=signature)

    def predict(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """``pctr`` per candidate, as :meth:`RankerBackend.predict`, possibly in a shared call."""
        n = len(next(iter(candidates.values()))) if candidates else 0
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        budget = self.timeout_s if timeout_s is None else timeout_s
        me = _Waiting(common, candidates, n, time.monotonic() + budget)
        with self._cond:
            self._queue.append(me)
        while True:
            with self._cond:
                while not me.done.is_set() and self._busy:
                    left = me.deadline - time.monotonic()
                    if left <= 0:  # past its deadline, queued or in another's running batch
                        if me in self._queue:
                            self._queue.remove(me)
                        raise RankerTimeout(
                            f"{self.kind} ranker: no answer within {budget * 1000:.0f} ms "
                            "(batched with other requests)"
                        )
                    self._cond.wait(left)
                if me.done.is_set():
                    break
                self._busy = True  # the leader: score the oldest requests, then hand over
            self._lead()
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    def _lead(self) -> None:
        try:
            if self.max_wait_s > 0:
                until = time.monotonic() + self.max_wait_s
                with self._cond:
                    while sum(w.rows for w in self._queue) < self.max_rows:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
            with self._cond:
                batch = [self._queue.popleft()]
                rows = batch[0].rows
                while self._queue and rows + self._queue[0].rows <= self.max_rows:
                    rows += self._queue[0].rows
                    batch.append(self._queue.popleft())
            self._run(batch)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _run(self, batch: list[_Waiting]) -> None:
        timeout = max(min(w.deadline for w in batch) - time.monotonic(), 0.001)
        try:
            if len(batch) == 1:
                scores = [
                    self.inner.predict(batch[0].common, batch[0].candidates, timeout_s=timeout)
                ]
            else:
                scores = self._together(batch, timeout)
        except (RankerError, RankerTimeout) as exc:
            for waiting in batch:
                waiting.error = exc
                waiting.done.set()
            return
        self.batches += 1
        self.batched_requests += len(batch)
        for waiting, result in zip(batch, scores, strict=True):
            waiting.result = result
            waiting.done.set()

    def _together(self, batch: list[_Waiting], timeout: float) -> list[np.ndarray]:
        """One ``serving_default`` call over every request's rows, split back per request."""
        parts = [signature_inputs(BATCH_SIGNATURE, w.common, w.candidates, w.rows) for w in batch]
        # inputs every request has (precomputed candidate rows may be missing from some)
        names = [name for name in parts[0] if all(name in p for p in parts)]
        inputs = {name: np.concatenate([p[name] for p in parts]) for name in names}
        total = sum(w.rows for w in batch)
        raw = self.inner.call(inputs, timeout, signature=BATCH_SIGNATURE)
        scores = self.inner.checked_scores(raw, total)
        return np.split(scores, np.cumsum([w.rows for w in batch])[:-1])
