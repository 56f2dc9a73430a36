"""The history as an ingress sees it: written by the job board alone (each image once), read through it.

Image files live where the board runs (the head node's outputs folder). An ingress on another node
fetches a file once into a small local cache to serve it (the route sends files by path).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdserver.service.history import Entry, History, Page, Query
from sdserver.service.jobs import Job
from sdserver.settings import Settings

from .state import Cluster

CACHED_FILES = 256


class RemoteHistory(History):
    def __init__(self, settings: Settings, cluster: Cluster) -> None:
        local = History.from_settings(settings)
        super().__init__(local.folder, mode=local.mode, max_bytes=local.max_bytes)
        self._cluster = cluster
        self._cache = Path(tempfile.mkdtemp(prefix="sdserver-history-"))

    def track(self, job: Job, *, asked: bool) -> None:
        """The board tracks the jobs it holds."""

    def wait(self, job: Job, timeout: float) -> bool:
        board = self._cluster.board
        ids, warnings = self._cluster.call(board.wait_history.remote(job.id, timeout), timeout=timeout + 5)
        if ids is not None:
            job.history_ids = ids
        if warnings:
            job.warnings[:] = warnings
        return True

    def close(self) -> None:
        shutil.rmtree(self._cache, ignore_errors=True)

    def list(self, query: Query) -> Page:
        page: Page = self._call("list", query)
        return page

    def get(self, entry_id: str, *, owner: str | None = None) -> Entry:
        entry: Entry = self._call("get", entry_id, owner=owner)
        return entry

    def delete(self, entry_id: str, *, owner: str | None = None) -> Entry:
        entry: Entry = self._call("delete", entry_id, owner=owner)
        shutil.rmtree(self._cache / entry.id, ignore_errors=True)
        return entry

    def path(self, entry: Entry) -> Path:
        """A local copy of the image file (fetched from the board's node once)."""
        local = self._cache / entry.id / Path(entry.file).name
        if not local.is_file():
            data: bytes = self._call("read", entry)
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".part")
            partial.write_bytes(data)
            partial.replace(local)
            self._trim()
        return local

    def prune(self) -> int:
        return 0  # the board's history keeps the disk budget

    def _call(self, method: str, *args: object, **kwargs: object) -> Any:
        return self._cluster.call(self._cluster.board.history_call.remote(method, *args, **kwargs))

    def _trim(self) -> None:
        folders = sorted(self._cache.iterdir(), key=lambda folder: folder.stat().st_mtime)
        for folder in folders[:-CACHED_FILES]:
            shutil.rmtree(folder, ignore_errors=True)
