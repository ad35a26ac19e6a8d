"""Index and fit as background jobs: one at a time, in one worker thread with its own Library,
so reads (served by the server's Library) are answered while a job runs.

At most `MAX_PENDING` jobs wait or run at once: a further submit raises `QueueFull` (HTTP 429),
so a client cannot pile up fits. A job is `queued`, then `running` (with progress: the stage and images done of total), then
`done` (with the result the Python API returns) or `failed` (with a one-line error). Jobs live
in memory, the last `KEEP` of them: a restarted server forgets them; the library itself keeps
what they committed (index runs and fits resume or redo safely).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from piaa_index.catalog.store import utcnow


def now() -> str:
    """RFC 3339, UTC, with its zone: `2026-11-23T07:01:02.123456Z`."""
    from piaa_index_plugins.http_api.models import utc_text

    return utc_text(utcnow()) or ""


if TYPE_CHECKING:
    from piaa_index.library.core import Library

log = logging.getLogger("piaa.http")

KINDS = ("index", "fit")
KEEP = 200
MAX_PENDING = 4  # jobs queued or running at once


class QueueFull(Exception):
    """Too many jobs are queued or running to accept another."""


class Cancelled(Exception):
    """Raised in a running job's progress callback when the server stops."""


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    state: str = "queued"
    progress: dict[str, Any] = field(default_factory=lambda: {"stage": None, "done": 0, "total": 0})
    result: Any = None
    error: str | None = None
    created_at: str = field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "params": deepcopy(self.params),
            "progress": dict(self.progress),
            "result": deepcopy(self.result),
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobRunner:
    """Queues jobs and runs them one at a time on a Library from `open_library` (opened on the
    worker thread at its first job, closed by `close`)."""

    def __init__(self, open_library: Callable[[], Library], max_pending: int = MAX_PENDING):
        self._open_library = open_library
        self._max_pending = max_pending
        self._library: Library | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(kind)
        with self._lock:
            if self._closed:
                raise RuntimeError("the job runner is closed")
            pending = sum(1 for j in self._jobs.values() if j.state in ("queued", "running"))
            if pending >= self._max_pending:
                raise QueueFull(
                    f"{pending} jobs are already queued or running (at most "
                    f"{self._max_pending}); wait for one to finish"
                )
            job = Job(id=str(next(self._ids)), kind=kind, params=params)
            self._jobs[job.id] = job
            for old in list(self._jobs)[:-KEEP]:
                if self._jobs[old].state in ("done", "failed"):
                    del self._jobs[old]
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="piaa-jobs", daemon=True)
                self._thread.start()
            self._queue.put(job)
            return job.as_dict()

    def full(self) -> bool:
        """Whether a submit now would raise QueueFull (a route checks before writing)."""
        with self._lock:
            pending = sum(1 for j in self._jobs.values() if j.state in ("queued", "running"))
            return self._closed or pending >= self._max_pending

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.as_dict()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [job.as_dict() for job in reversed(self._jobs.values())]

    def wait(self, job_id: str, timeout: float = 60) -> dict[str, Any] | None:
        """Block until the job ends (tests and scripts); its final state."""

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if job is None or job["state"] in ("done", "failed"):
                return job
            time.sleep(0.02)
        return self.get(job_id)

    def close(self, timeout: float = 10) -> None:
        """No new jobs; queued ones fail; the running one stops at its next chunk (an index
        run resumes next time, a fit is redone); then its Library is closed."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.state == "queued":
                    job.state, job.error = "failed", "the server stopped before the job ran"
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("a job was still running at shutdown; it resumes on the next run")
                return
        if self._library is not None:
            self._library.close()

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.state != "queued":
                    continue
                job.state, job.started_at = "running", now()
            try:
                result = self._run(job)
            except Cancelled as exc:
                with self._lock:
                    job.state, job.error = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 - reported on the job, never raised
                from piaa_index_plugins.http_api.errors import from_exception

                with self._lock:
                    job.state, job.error = "failed", from_exception(exc).message
            else:
                with self._lock:
                    job.state, job.result = "done", result
            finally:
                with self._lock:
                    job.finished_at = now()

    def _run(self, job: Job) -> Any:
        from piaa_index_plugins.http_api.errors import jsonable

        if self._library is None:
            self._library = self._open_library()
        library = self._library

        def report(stage: str, done: int, total: int) -> None:
            with self._lock:
                job.progress = {"stage": stage, "done": done, "total": total}
                if self._closed:  # the server is stopping: end the pass at this chunk
                    raise Cancelled("cancelled: the server stopped (an index run resumes)")

        if job.kind == "index":
            out = library.index(job.params["paths"], prune=job.params["prune"], progress=report)
            result = out.as_dict()
            # Tag what was added with the current classifier now, in the job, rather than in
            # the next read (a stale vocabulary waits for a fit job).
            if library.is_fitted() and not library.is_stale():
                library.ensure_tags(progress=report)
            return jsonable(result)
        report("fitting", 0, 0)
        return jsonable(library.fit(progress=report).as_dict())
