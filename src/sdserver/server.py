"""`sdserver serve` under uvicorn: the port bound first, models loading behind an open port, and a
shutdown that drains on the first Ctrl-C or SIGTERM and stops at once on the second Ctrl-C.

Draining: new work gets 503 and /ready turns 503, while everything else (job status, images, events,
the running requests' own responses) is still served, until the queued and running work is done (at
most --drain-timeout seconds). Then the server lingers a moment, so that clients polling the jobs API
can fetch what finished, and exits 0. A second Ctrl-C answers every unfinished request with a 503
and exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from sdserver.api.app import create_app
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings

log = logging.getLogger("sdserver")
LINGER_S = 3.0  # after a drain in which work finished: time for pollers to fetch their results
STOP_NOW_GRACE_S = 1  # after a second Ctrl-C: time to send the 503s


class Server(uvicorn.Server):
    """uvicorn's Server with sdserver's shutdown: see the module docstring."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.app, self.drain_timeout = app, drain_timeout
        self.exit_code = 0
        self._draining = False
        self._stopping_now = False

    def fail(self, code: int) -> None:
        """Stop serving (no drain), and exit with `code`."""
        self.exit_code = code
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining:
            self._draining = True
            self._begin_drain()
        elif not self._stopping_now:
            self._stopping_now = True
            self._stop_now()

    def _scheduler(self) -> Scheduler | None:
        scheduler: Scheduler | None = getattr(self.app.state, "scheduler", None)
        return scheduler

    def _begin_drain(self) -> None:
        scheduler = self._scheduler()
        if scheduler is None:
            log.info("stopping (the models were still loading)")
            self.should_exit = True
            return
        scheduler.stop_accepting()
        running, queued = scheduler.running_count, scheduler.queue_depth
        if running + queued == 0:
            log.info("stopping: no work in progress")
            self.should_exit = True
            return
        log.warning(
            "stopping: waiting for %d running and %d queued request(s) to finish (at most %gs, --drain-timeout); "
            "new work gets 503. Press Ctrl-C again to stop now.",
            running,
            queued,
            self.drain_timeout,
        )
        threading.Thread(target=self._drain, args=(scheduler,), name="sdserver-drain", daemon=True).start()

    def _drain(self, scheduler: Scheduler) -> None:
        deadline = time.monotonic() + self.drain_timeout
        finished = scheduler.drain(self.drain_timeout)
        if scheduler.stopping:
            return  # a second Ctrl-C (or a dead worker) took over
        if finished:
            log.info("stopping: all work finished")
            time.sleep(max(0.0, min(LINGER_S, deadline - time.monotonic())))
        else:
            log.warning("stopping: the drain timeout (%gs) passed; unfinished requests get 503", self.drain_timeout)
            scheduler.stop(timeout=0, at_once=True)
        self.should_exit = True

    def _stop_now(self) -> None:
        log.warning("stopping now: unfinished requests get 503")
        scheduler = self._scheduler()
        if scheduler is not None:
            scheduler.stop(timeout=0, at_once=True)
        self.config.timeout_graceful_shutdown = STOP_NOW_GRACE_S  # then open connections are cut
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured signal after shutting down, so the process would die "by
        # signal"; after a graceful drain, supervisors should see a clean exit.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def run(settings: Settings, sock: socket.socket) -> int:
    """Serve on `sock` until stopped; the exit code (0 stopped, 1 the worker died, 2 cannot start)."""
    server: Server | None = None

    def on_fatal() -> None:
        log.error("exiting because the worker thread died (a supervisor should restart the server)")
        if server is not None:
            server.fail(1)

    def on_load_error() -> None:
        if server is not None:
            server.fail(2)

    app = create_app(settings, on_fatal=on_fatal, wait_for_models=False, on_load_error=on_load_error)
    server = Server(
        uvicorn.Config(
            app,
            log_config=None,  # our handlers and levels (sdserver.logs)
            access_log=False,  # our RequestLog writes the structured line
            timeout_graceful_shutdown=int(settings.drain_timeout) + 5,
        ),
        app,
        settings.drain_timeout,
    )
    server.run(sockets=[sock])
    return server.exit_code


__all__ = ["Server", "run"]
