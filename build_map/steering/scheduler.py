"""Batching concurrent requests: gather the ones that arrive together, run each batch in a worker.

``submit`` queues a job; a scheduler thread gathers the jobs that arrive within
``BatchingConfig.window_s`` (up to ``max_batch_rows`` rows) into one batch and hands it to
``run_batch`` in a worker thread. Batches are static: a job arriving while
``max_concurrent_batches`` batches run waits for one of them to finish. A failure of a batch, of
whatever type, reaches every consumer of that batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from build_map.steering.requests import BatchingConfig, SteeringError
from build_map.steering.streaming import Job

logger = logging.getLogger(__name__)


class BatchScheduler:
    def __init__(self, config: BatchingConfig, run_batch: Callable[[list[Job]], None]):
        self.config = config
        self.run_batch = run_batch
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(config.max_concurrent_batches)
        self._closed = False
        self._scheduler: threading.Thread | None = None
        self._running: dict[threading.Thread, list[Job]] = {}  # batches in flight, joined by close()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise SteeringError("the steering engine is closed; create a new one.")
            self._jobs.append(job)
            self._cond.notify_all()
            if not self.alive():
                self._scheduler = threading.Thread(
                    target=self._schedule, name="steering-scheduler", daemon=True
                )
                self._scheduler.start()

    def alive(self) -> bool:
        return self._scheduler is not None and self._scheduler.is_alive()

    def close(self, timeout: float | None) -> None:
        """Refuse new jobs, serve the queued ones and wait for running batches; batches still
        running after ``timeout`` seconds are cancelled first."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in [self._scheduler, *list(self._running)]:
            if thread is not None:
                thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        running = dict(self._running)
        if running:
            logger.warning("closing the steering engine: cancelling %d running batches", len(running))
            for thread, jobs in running.items():
                for job in jobs:
                    job.handle.cancel()
                thread.join(10.0)  # a cancelled batch stops within one decoding step

    def _schedule(self) -> None:
        while True:
            self._slots.acquire()
            batch = self._next_batch()
            if batch is None:
                self._slots.release()
                return
            worker = threading.Thread(target=self._serve, args=(batch,), name="steering-batch", daemon=True)
            self._running[worker] = batch
            worker.start()
            for job in batch:
                job.handle._worker = worker

    def _next_batch(self) -> list[Job] | None:
        limit = self.config.max_batch_rows
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.config.window_s
            while sum(job.rows for job in self._jobs) < limit and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch, rows = [], 0
            while self._jobs and rows + self._jobs[0].rows <= limit:
                job = self._jobs.popleft()
                batch.append(job)
                rows += job.rows
            return batch

    def _serve(self, jobs: list[Job]) -> None:
        try:
            live = []
            for job in jobs:
                if job.handle.cancel_event.is_set():
                    job.handle.finish_reasons = ["cancelled"] * job.rows
                    job.handle._finish("cancelled")
                else:
                    job.handle.status = "running"
                    live.append(job)
            if live:
                self.run_batch(live)
        except BaseException as exc:  # every failure reaches the consumers, whatever its type
            logger.debug("steering batch failed", exc_info=True)
            for job in jobs:
                if not job.handle.done:
                    job.handle._fail(exc)
        finally:
            self._running.pop(threading.current_thread(), None)
            self._slots.release()
