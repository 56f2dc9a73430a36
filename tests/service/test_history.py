"""The history service: what is kept, where, how it is found again, and that a failed write never
costs a generation."""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from sdserver import metadata
from sdserver.core.errors import NotFound
from sdserver.core.types import GeneratedImage, GenerationRequest, GenerationResult, Task
from sdserver.service.history import History, Query
from sdserver.service.jobs import Job, JobStatus
from tests.support.history import generated


def finished_job(history: History, *images: GeneratedImage, asked: bool = True) -> Job:
    job = Job(request=GenerationRequest(prompt="x", seed=1, width=16, height=16, model="tiny"))
    history.track(job, asked=asked)
    job.mark_running()
    job.succeed(GenerationResult(model="tiny", images=list(images)))
    assert history.wait(job, 10)
    return job


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    kept = History(tmp_path / "outputs")
    yield kept
    kept.close()


def test_a_succeeded_job_is_kept_as_pngs_with_their_parameters(history: History) -> None:
    job = finished_job(history, generated(seed=5), generated(seed=6))
    assert job.warnings == [] and job.history_ids is not None and all(job.history_ids)
    page = history.list(Query())
    assert page.total == 2 and [entry.seed for entry in page.entries] == [6, 5]  # newest first
    entry = history.get(job.history_ids[0])
    assert (entry.prompt, entry.model, entry.task, entry.width, entry.job_id) == (
        "a red circle",
        "tiny",
        "txt2img",
        16,
        job.id,
    )
    path = history.path(entry)
    assert path.parent.parent == history.folder and path.suffix == ".png" and path.stat().st_size == entry.bytes
    text, params, _ = metadata.read_info(path.read_bytes())
    assert params == entry.parameters and params is not None and params["seed"] == 5
    assert text is not None and "Seed: 5" in text  # A1111's infotext too


def test_what_is_kept_follows_the_mode_and_the_client(tmp_path: Path) -> None:
    cases = [("api", True, 1), ("api", False, 0), ("all", False, 1), ("all", True, 1), ("off", True, 0)]
    for index, (mode, asked, kept) in enumerate(cases):
        history = History(tmp_path / str(index), mode=mode)  # type: ignore[arg-type]
        job = finished_job(history, generated(), asked=asked)
        assert history.list(Query()).total == kept, (mode, asked)
        assert (job.history_ids is not None) == bool(kept)
        assert history.enabled == (mode != "off")
        history.close()
    assert not (tmp_path / "4").exists()  # off: not even a folder


def test_failed_and_cancelled_jobs_keep_nothing(history: History) -> None:
    from sdserver.core.errors import Cancelled, GenerationError

    for error in (GenerationError("boom"), Cancelled("stop")):
        job = Job(request=GenerationRequest(prompt="x", seed=1))
        history.track(job, asked=True)
        job.fail(error)
        assert history.wait(job, 1)
    assert history.list(Query()).total == 0


def test_saving_runs_on_the_history_thread_not_the_workers(history: History, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real_save = history.save

    def spy(*args: object, **kwargs: object) -> str:
        threads.append(threading.current_thread().name)
        return real_save(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(history, "save", spy)
    finished_job(history, generated())
    assert threads and all(name.startswith("sdserver-history") for name in threads)
    assert threading.current_thread().name not in threads


def test_a_folder_that_cannot_be_written_is_a_warning_and_the_images_stay(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the outputs folder should be")
    history = History(blocked)
    image = generated()
    job = finished_job(history, image)
    assert job.status is JobStatus.SUCCEEDED and job.result is not None and job.result.images == [image]
    assert job.history_ids == [None]
    assert (
        len(job.warnings) == 1 and "image 0 was not saved" in job.warnings[0] and "still in this job" in job.warnings[0]
    )
    history.close()


def test_an_index_that_cannot_be_written_leaves_no_file_behind(tmp_path: Path) -> None:
    folder = tmp_path / "outputs"
    (folder / "history.sqlite3").mkdir(parents=True)  # a folder where the database should be
    history = History(folder)
    job = finished_job(history, generated())
    assert job.history_ids == [None] and "not saved" in job.warnings[0]
    assert list(folder.rglob("*.png")) == [] and list(folder.rglob("*.part")) == []
    history.close()


def test_filters_and_paging(history: History) -> None:
    for seed, (prompt, model) in enumerate(
        [("a Red circle", "alpha"), ("a blue square", "alpha"), ("100% red_ish", "beta"), ("a red square", "beta")]
    ):
        history.save(generated(prompt, seed, model), job_id=None, owner=None, task=Task.TXT2IMG.value)
    with sqlite3.connect(history.db_path) as db:  # spread them over four days, oldest first
        for day, (entry_id,) in enumerate(db.execute("SELECT id FROM images ORDER BY rowid").fetchall()):
            db.execute("UPDATE images SET created_at = ? WHERE id = ?", (1_000_000 + day * 86_400, entry_id))
    prompts = lambda **q: [e.prompt for e in history.list(Query(**q)).entries]  # noqa: E731
    assert prompts() == ["a red square", "100% red_ish", "a blue square", "a Red circle"]
    assert prompts(text="RED") == ["a red square", "100% red_ish", "a Red circle"]
    assert prompts(text="100%") == ["100% red_ish"] and prompts(text="d_i") == ["100% red_ish"]  # literal % and _
    assert prompts(model="alpha") == ["a blue square", "a Red circle"]
    assert prompts(since=1_000_000 + 86_400, until=1_000_000 + 3 * 86_400) == ["100% red_ish", "a blue square"]
    assert prompts(limit=2, offset=1) == ["100% red_ish", "a blue square"]
    assert history.list(Query(limit=1, text="red")).total == 3


def test_owners_see_only_their_own(history: History) -> None:
    alice = history.save(generated("alice's"), job_id=None, owner="alice", task="txt2img")
    bob = history.save(generated("bob's"), job_id=None, owner="bob", task="txt2img")
    assert [e.prompt for e in history.list(Query(owner="alice")).entries] == ["alice's"]
    assert history.list(Query()).total == 2  # no owner given: everyone's (no auth, or an admin)
    with pytest.raises(NotFound):
        history.get(bob, owner="alice")
    with pytest.raises(NotFound):
        history.delete(bob, owner="alice")
    assert history.path(history.get(bob)).exists()
    assert history.get(alice, owner="alice").owner == "alice"


def test_delete_removes_the_record_and_the_file(history: History) -> None:
    entry_id = history.save(generated(), job_id=None, owner=None, task="txt2img")
    path = history.path(history.get(entry_id))
    history.delete(entry_id)
    assert not path.exists()
    with pytest.raises(NotFound):
        history.get(entry_id)


def test_a_file_removed_by_hand_is_a_clear_404(history: History) -> None:
    entry_id = history.save(generated(), job_id=None, owner=None, task="txt2img")
    history.path(history.get(entry_id)).unlink()
    with pytest.raises(NotFound, match="gone"):
        history.path(history.get(entry_id))
    history.delete(entry_id)  # and it can still be deleted


def test_past_the_disk_budget_the_oldest_go(tmp_path: Path) -> None:
    history = History(tmp_path / "outputs")
    ids = [history.save(generated(seed=seed, size=64), job_id=None, owner=None, task="txt2img") for seed in range(5)]
    sizes = [history.get(entry_id).bytes for entry_id in ids]
    history.max_bytes = sum(sizes[-2:])  # room for the newest two
    assert history.prune() == 3
    assert [e.id for e in history.list(Query()).entries] == [ids[4], ids[3]]
    assert len(list(history.folder.rglob("*.png"))) == 2
    job = finished_job(history, generated(seed=9, size=64))  # pruning also follows each save
    assert history.list(Query()).entries[0].id == job.history_ids[0]  # type: ignore[index]
    assert history.list(Query()).total == 2
    history.close()


def test_a_new_instance_finds_what_an_earlier_one_kept(tmp_path: Path) -> None:
    first = History(tmp_path / "outputs")
    job = finished_job(first, generated("still here"))
    first.close()
    second = History(tmp_path / "outputs")
    entry = second.get(job.history_ids[0])  # type: ignore[index]
    assert entry.prompt == "still here"
    assert Image.open(io.BytesIO(second.path(entry).read_bytes())).size == (16, 16)
