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

Callers on the event loop (the API's ``async`` route) use :meth:`BatchingBackend.predict_async`:
the same policy (whole requests, oldest first, up to ``max_rows``; a batch of one keeps the
backend's signature) with the waiting done by the loop — requests queue while a call is running,
and one drain task scores them in turn — so no thread is parked per request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .backends import RankerBackend, RankerError, RankerTimeout, rows_of, signature_inputs

BATCH_SIGNATURE = "serving_default"


@dataclass(eq=False)  # found in a queue by identity (its arrays have no truth value)
class _Waiting:
    common: Mapping[str, np.ndarray]
    candidates: Mapping[str, np.ndarray]
    rows: int
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None
    answer: asyncio.Future | None = None
    """The loop's future of an awaiting caller (``predict_async``)."""


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
        self._waiting: deque[_Waiting] = deque()  # awaiting callers (one event loop)
        self._drain: asyncio.Task | None = None
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
        n = rows_of(candidates)
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
                batch = self._take(self._queue)
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

    def _take(self, queue: deque[_Waiting]) -> list[_Waiting]:
        """The next batch: whole requests from the queue's head, oldest first, up to
        ``max_rows`` rows (at least one request)."""
        batch = [queue.popleft()]
        rows = batch[0].rows
        while queue and rows + queue[0].rows <= self.max_rows:
            rows += queue[0].rows
            batch.append(queue.popleft())
        return batch

    def _together(self, batch: list[_Waiting], timeout: float) -> list[np.ndarray]:
        """One ``serving_default`` call over every request's rows, split back per request."""
        inputs = self._joined(batch)
        raw = self.inner.call(inputs, timeout, signature=BATCH_SIGNATURE)
        return self._split(raw, batch)

    @staticmethod
    def _joined(batch: list[_Waiting]) -> dict[str, np.ndarray]:
        """The ``serving_default`` inputs of every request's rows, one after the other."""
        parts = [signature_inputs(BATCH_SIGNATURE, w.common, w.candidates, w.rows) for w in batch]
        # inputs every request has (precomputed candidate rows may be missing from some)
        names = [name for name in parts[0] if all(name in p for p in parts)]
        return {name: np.concatenate([p[name] for p in parts]) for name in names}

    def _split(self, raw: np.ndarray, batch: list[_Waiting]) -> list[np.ndarray]:
        scores = self.inner.checked_scores(raw, sum(w.rows for w in batch))
        return np.split(scores, np.cumsum([w.rows for w in batch])[:-1])

    # ----------------------------------------------------------------- on the event loop

    async def predict_async(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """:meth:`predict` for callers on one event loop: queue, let the drain task score the
        queue in batches, and wait for this request's slice at most until its deadline."""
        n = rows_of(candidates)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        budget = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        me = _Waiting(common, candidates, n, time.monotonic() + budget, answer=loop.create_future())
        self._waiting.append(me)
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._drain_waiting())
        assert me.answer is not None
        try:
            return await asyncio.wait_for(asyncio.shield(me.answer), budget)
        except TimeoutError:
            raise RankerTimeout(
                f"{self.kind} ranker: no answer within {budget * 1000:.0f} ms "
                "(batched with other requests)"
            ) from None
        finally:  # timed out or cancelled: leave the queue; a late answer has no one to tell
            if not me.answer.done():
                me.answer.cancel()
            if me in self._waiting:
                self._waiting.remove(me)

    async def _drain_waiting(self) -> None:
        """Score the awaiting requests, a batch per call, until none is left: requests that
        arrive during a call go together in the next one (with ``max_wait_ms``, the first of a
        batch waits that long for company)."""
        while self._waiting:
            if self.max_wait_s > 0:
                until = time.monotonic() + self.max_wait_s
                while sum(w.rows for w in self._waiting) < self.max_rows:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(left, 0.001))
            batch = self._take(self._waiting)
            timeout = max(min(w.deadline for w in batch) - time.monotonic(), 0.001)
            try:
                if len(batch) == 1:
                    one = batch[0]
                    alone = self.inner.predict_async(one.common, one.candidates, timeout_s=timeout)
                    scores = [await alone]
                else:
                    raw = await self.inner.call_async(
                        self._joined(batch), timeout, signature=BATCH_SIGNATURE
                    )
                    scores = self._split(raw, batch)
            except Exception as exc:  # every member's failure; the drain goes on
                if not isinstance(exc, RankerError):
                    exc = RankerError(f"{self.kind} ranker: batched call failed: {exc}")
                for waiting in batch:
                    if waiting.answer is not None and not waiting.answer.done():
                        waiting.answer.set_exception(exc)
                continue
            self.batches += 1
            self.batched_requests += len(batch)
            for waiting, result in zip(batch, scores, strict=True):
                if waiting.answer is not None and not waiting.answer.done():
                    waiting.answer.set_result(result)
