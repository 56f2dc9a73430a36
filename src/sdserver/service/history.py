"""Kept images: PNG files (with their generation parameters) in an outputs folder, indexed in SQLite.

Layout: `<outputs>/history.sqlite3`, and each image as `<outputs>/<YYYY-MM-DD>/<HHMMSS>-<seed>-<id8>.png`.

Saving runs on a writer thread of its own, never on the worker that owns the device. A failed write
(disk full, a read-only folder) is logged and added to the job's `warnings`; it never fails the job,
whose images stay in memory for the jobs API as before. Past the disk budget the oldest images go.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdserver import metadata
from sdserver.core.errors import NotFound, StorageError
from sdserver.core.types import GeneratedImage
from sdserver.imaging import encode_png
from sdserver.service.jobs import Job, JobStatus
from sdserver.settings import Settings

log = logging.getLogger(__name__)

Mode = Literal["api", "all", "off"]
DB_NAME = "history.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    job_id TEXT,
    owner TEXT,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    nsfw INTEGER NOT NULL,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    parameters TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_created ON images (created_at);
"""
_COLUMNS = "id, created_at, job_id, owner, model, task, prompt, negative_prompt, seed, width, height, nsfw, file, "
_COLUMNS += "bytes, parameters"


@dataclass(frozen=True)
class Entry:
    """One saved image."""

    id: str
    created_at: float  # Unix seconds
    job_id: str | None
    owner: str | None  # the API key that made it; None: made with no auth
    model: str
    task: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    nsfw: bool
    file: str  # relative to the outputs folder
    bytes: int
    parameters: dict[str, Any]  # the PNG's parameters_json


@dataclass(frozen=True)
class Query:
    model: str | None = None
    text: str | None = None  # in the prompt, case-insensitively
    since: float | None = None  # created at or after (Unix seconds)
    until: float | None = None  # created before
    owner: str | None = None  # only this API key's images; None: everyone's
    limit: int = 50
    offset: int = 0


@dataclass
class Page:
    entries: list[Entry]
    total: int  # matching the query, over all pages


@dataclass
class _Pending:
    settled: threading.Event = field(default_factory=threading.Event)
    handed_over: bool = False


class History:
    """Thread-safe. `track(job)` saves a job's images when it succeeds; the rest reads and deletes."""

    def __init__(self, folder: Path, *, mode: Mode = "api", max_bytes: int | None = None) -> None:
        self.folder, self.mode, self.max_bytes = folder, mode, max_bytes
        self.db_path = folder / DB_NAME
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdserver-history")
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._schema_ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> History:
        max_bytes = None if settings.history_max_gb is None else int(settings.history_max_gb * 1e9)
        folder = Path(settings.outputs_dir).expanduser().resolve()
        return cls(folder, mode=settings.history, max_bytes=max_bytes)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def wants(self, asked: bool) -> bool:
        """Is an image kept? `asked`: the client asked for it (the jobs API and the studio always do)."""
        return self.mode == "all" or (self.mode == "api" and asked)

    # -- saving ---------------------------------------------------------------------------------
    def track(self, job: Job, *, asked: bool) -> None:
        """Save the job's images once it succeeds, if the mode (and the client's asking) says so."""
        if not self.wants(asked):
            return
        with self._lock:
            self._pending[job.id] = _Pending()

        def on_change(changed: Job) -> None:  # on the device's worker thread: only hand over
            if not changed.done or not self._hand_over(changed.id):
                return
            changed.remove_listener(on_change)
            if changed.status is not JobStatus.SUCCEEDED:
                self._settle(changed.id)
                return
            try:
                self._executor.submit(self._save_job, changed)
            except RuntimeError:  # closed: the server is shutting down
                changed.warnings.append("history: not saved, the server was shutting down")
                self._settle(changed.id)

        job.add_listener(on_change)

    def wait(self, job: Job, timeout: float) -> bool:
        """Wait until the job's images are saved (or failed to); True if nothing is pending."""
        with self._lock:
            pending = self._pending.get(job.id)
        return pending is None or pending.settled.wait(timeout)

    def close(self) -> None:
        """Finish the writes already handed over, then stop the writer."""
        self._executor.shutdown(wait=True, cancel_futures=False)

    def _hand_over(self, job_id: str) -> bool:
        """True the first time only (a listener may be called twice for a job that ends as it is added)."""
        with self._lock:
            pending = self._pending.get(job_id)
            if pending is None or pending.handed_over:
                return False
            pending.handed_over = True
            return True

    def _settle(self, job_id: str) -> None:
        with self._lock:
            pending = self._pending.pop(job_id, None)
        if pending is not None:
            pending.settled.set()

    def _save_job(self, job: Job) -> None:
        try:
            assert job.result is not None
            ids: list[str | None] = []
            for index, image in enumerate(job.result.images):
                ids.append(self._save_or_warn(job, index, image))
            job.history_ids = ids
            if any(ids):
                self._prune_quietly()
        finally:
            self._settle(job.id)

    def _save_or_warn(self, job: Job, index: int, image: GeneratedImage) -> str | None:
        try:
            return self.save(image, job_id=job.id, owner=job.owner, task=job.request.task.value)
        except (OSError, sqlite3.Error) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug of ours must not take the writer thread or the job down
            log.exception("history: saving image %d of job %s failed", index, job.id)
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("history: image %d of job %s not saved to %s: %s", index, job.id, self.folder, reason)
        job.warnings.append(f"history: image {index} was not saved ({reason}); it is still in this job")
        return None

    def save(self, out: GeneratedImage, *, job_id: str | None, owner: str | None, task: str) -> str:
        """Write one image (PNG with its parameters) and index it; returns its id. Raises OSError or
        sqlite3.Error, leaving no half-written file behind."""
        entry_id, now = uuid.uuid4().hex, time.time()
        local = time.localtime(now)
        relative = f"{time.strftime('%Y-%m-%d', local)}/{time.strftime('%H%M%S', local)}-{out.seed}-{entry_id[:8]}.png"
        path = self.folder / relative
        data = encode_png(out.image)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        try:
            partial.write_bytes(data)
            os.replace(partial, path)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        params = metadata.params_of(out.image) or {}
        row = (
            entry_id,
            now,
            job_id,
            owner,
            str(params.get("model") or ""),
            task,
            str(params.get("prompt") or ""),
            str(params.get("negative_prompt") or ""),
            out.seed,
            out.image.width,
            out.image.height,
            int(out.nsfw),
            relative,
            len(data),
            json.dumps(params, ensure_ascii=False),
        )
        try:
            with self._connect(create=True) as db:
                db.execute(f"INSERT INTO images ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", row)
        except sqlite3.Error:
            path.unlink(missing_ok=True)
            raise
        return entry_id

    def _prune_quietly(self) -> None:
        try:
            self.prune()
        except (OSError, sqlite3.Error) as exc:
            log.warning("history: pruning to the disk budget failed: %s", exc)

    def prune(self) -> int:
        """Delete the oldest images while the saved bytes are over the budget; returns how many."""
        if self.max_bytes is None or not self.db_path.exists():
            return 0
        removed = 0
        with self._connect() as db:
            total = int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM images").fetchone()[0])
            rows = db.execute("SELECT id, file, bytes FROM images ORDER BY created_at, rowid")
            doomed: list[tuple[str, str]] = []
            for entry_id, relative, size in rows:
                if total <= self.max_bytes:
                    break
                doomed.append((entry_id, relative))
                total -= int(size)
        for entry_id, relative in doomed:
            (self.folder / relative).unlink(missing_ok=True)
            with self._connect() as db:
                db.execute("DELETE FROM images WHERE id = ?", (entry_id,))
            removed += 1
        if removed:
            log.info("history: deleted the %d oldest images to stay within %.2f GB", removed, self.max_bytes / 1e9)
        return removed

    # -- reading and deleting -------------------------------------------------------------------
    def list(self, query: Query) -> Page:
        if not self.db_path.exists():
            return Page([], 0)
        where, args = _where(query)
        try:
            with self._connect() as db:
                total = int(db.execute(f"SELECT COUNT(*) FROM images {where}", args).fetchone()[0])
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM images {where} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                    [*args, query.limit, query.offset],
                ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"the history index {self.db_path} cannot be read: {exc}") from exc
        return Page([_entry(row) for row in rows], total)

    def get(self, entry_id: str, *, owner: str | None = None) -> Entry:
        """The entry, if it exists and `owner` (when given) made it; NotFound otherwise."""
        if self.db_path.exists():
            try:
                with self._connect() as db:
                    row = db.execute(f"SELECT {_COLUMNS} FROM images WHERE id = ?", (entry_id,)).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"the history index {self.db_path} cannot be read: {exc}") from exc
            if row is not None and (owner is None or row[3] == owner):
                return _entry(row)
        raise NotFound(f"history item {entry_id!r} not found", field="id")

    def path(self, entry: Entry) -> Path:
        path = (self.folder / entry.file).resolve()
        if not path.is_relative_to(self.folder.resolve()) or not path.is_file():
            raise NotFound(f"the image file of history item {entry.id!r} is gone from {self.folder}", field="id")
        return path

    def delete(self, entry_id: str, *, owner: str | None = None) -> Entry:
        """Remove the entry and its file."""
        entry = self.get(entry_id, owner=owner)
        try:
            (self.folder / entry.file).unlink(missing_ok=True)
            with self._connect() as db:
                db.execute("DELETE FROM images WHERE id = ?", (entry.id,))
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"history item {entry_id!r} could not be deleted: {exc}") from exc
        return entry

    @contextmanager
    def _connect(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection per use (SQLite's belong to one thread), committed and closed after; WAL mode, so
        reads never wait for the writer."""
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, timeout=10.0)
        try:
            if create and not self._schema_ready:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                self._schema_ready = True
            with db:  # commits, or rolls back on an error
                yield db
        finally:
            db.close()


def _where(query: Query) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if query.model:
        clauses.append("model = ?")
        args.append(query.model)
    if query.text:
        escaped = query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append("prompt LIKE ? ESCAPE '\\'")
        args.append(f"%{escaped}%")
    if query.since is not None:
        clauses.append("created_at >= ?")
        args.append(query.since)
    if query.until is not None:
        clauses.append("created_at < ?")
        args.append(query.until)
    if query.owner is not None:
        clauses.append("owner = ?")
        args.append(query.owner)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _entry(row: tuple[Any, ...]) -> Entry:
    values = list(row)
    try:
        values[14] = json.loads(values[14])
    except (TypeError, json.JSONDecodeError):
        values[14] = {}
    values[11] = bool(values[11])
    return Entry(*values)
