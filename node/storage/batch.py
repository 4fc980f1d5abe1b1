"""The batching index writer: received instances are indexed off the C-STORE path.

The store is the source of truth. An instance is durable in its segment before Success is
answered; its index row follows, written by this thread together with every row that arrived in
the meantime, in one transaction (one commit, one sync, however many associations are sending).
If the process dies before, reconciliation indexes the segment's records
(:func:`node.storage.ingest.reconcile_segments`, at start and when a receiver is restarted). Rows the
index cannot take now (locked or unreachable: transient) wait and are tried again; when too many
wait, new instances are refused with 0xA700 rather than held without bound.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from node.errors import AinodeError, OutOfResourcesError
from node.storage.index import Index, NewInstance
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

MAX_BATCH = 1000
LINGER_S = 0.1
"""How long the writer lets rows gather before a commit: one commit (and its sync, and its share
of the interpreter lock) for several instances rather than one each."""
RETRY_S = (0.05, 0.2, 1.0, 2.0)


class IndexWriter:
    """Writes :class:`NewInstance` rows to ``index`` in batches, on its own thread.

    Parameters
    ----------
    index, store
        Where the rows go, and where a duplicate SOP instance's second copy is deleted.
    max_pending
        Rows that may wait before :meth:`submit` refuses more.
    """

    def __init__(self, index: Index, store: ObjectStore, max_pending: int = 100_000) -> None:
        self.index, self.store, self.max_pending = index, store, max_pending
        self._queue: deque[NewInstance] = deque()
        self._busy = 0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ainode-index-writer", daemon=True)
        self._thread.start()

    def submit(self, item: NewInstance) -> None:
        """Queue a row (it is written within a commit or two). The writer is woken only when the
        queue starts (or fills a batch): not once per instance while it lets rows gather, which
        took the interpreter lock from the associations' threads for each.

        Raises
        ------
        OutOfResourcesError
            ``max_pending`` rows are waiting already (the index has been unavailable for long).
        """
        with self._cond:
            if len(self._queue) >= self.max_pending:
                raise OutOfResourcesError(f"{len(self._queue)} received instances wait for the index; retry later")
            self._queue.append(item)
            if len(self._queue) == 1 or len(self._queue) >= MAX_BATCH:  # what the writer waits for
                self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Rows not yet written."""
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every submitted row is written; returns whether that happened in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Write what is queued, then stop the thread; returns whether everything was written."""
        written = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return written

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return
                self._cond.wait_for(lambda: len(self._queue) >= MAX_BATCH or self._closing, LINGER_S)
                batch = [self._queue[i] for i in range(min(MAX_BATCH, len(self._queue)))]
                self._busy = len(batch)
            try:
                added = self.index.add_instances(batch)
            except Exception as exc:  # the rows stay queued, durable in the store meanwhile
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                if isinstance(exc, AinodeError):
                    logger.warning("index write deferred: %s; trying again in %.2f s", exc, delay)
                else:
                    logger.exception("index write failed; trying again in %.2f s", delay)
                with self._cond:
                    self._busy = 0
                    self._cond.wait(delay)
                continue
            failures = 0
            for item, indexed in zip(batch, added, strict=True):
                if not indexed:  # a duplicate SOP instance: the first copy stays
                    self.store.delete(item.row.object_id)
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._busy = 0
                self._cond.notify_all()
