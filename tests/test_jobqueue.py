"""SqliteJobQueue: states, idempotency, backoff, leases, and several processes on one file."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

import pytest

from ct_ai_node.jobqueue import (
    Job,
    JobNotFound,
    JobQueue,
    JobState,
    JobStateError,
    LeaseLost,
    SqliteJobQueue,
    backoff_delay,
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def q(tmp_path, clock) -> SqliteJobQueue:
    with SqliteJobQueue(tmp_path / "node.db", backoff_initial_s=5, backoff_max_s=300, clock=clock) as queue:
        yield queue


def test_satisfies_protocol(q):
    assert isinstance(q, JobQueue)


def test_pragmas(q, tmp_path):
    db = sqlite3.connect(tmp_path / "node.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is per connection: check the queue's own
    assert q._connect().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_enqueue_claim_complete(q, clock):
    job_id = q.enqueue("analyse", {"series": "a/b/c", "destinations": ["pacs"]})
    job = q.get(job_id)
    assert isinstance(job, Job)
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.max_attempts == 5
    assert job.payload == {"series": "a/b/c", "destinations": ["pacs"]}
    assert job.created_at == job.next_run_at == clock.now

    assert q.claim(["forward"], "w1", 60) is None  # other kind
    got = q.claim(["analyse", "forward"], "w1", 60)
    assert got.id == job_id and got.state is JobState.RUNNING and got.attempts == 1
    assert got.lease_owner == "w1" and got.lease_until == clock.now + 60
    assert q.claim(["analyse"], "w2", 60) is None  # leased

    q.set_state(job_id, "sending", owner="w1")
    assert q.get(job_id).state is JobState.SENDING and q.get(job_id).lease_owner == "w1"
    q.complete(job_id, owner="w1")
    done = q.get(job_id)
    assert done.state is JobState.DONE and done.lease_owner is None and done.lease_until is None
    assert q.counts() == {"queued": 0, "running": 0, "sending": 0, "done": 1, "failed": 0, "dead": 0}
    assert q.get(12345) is None


def test_claim_takes_oldest_due_job(q, clock):
    later = q.enqueue("deliver", {"n": 1}, run_at=clock.now + 30)
    first = q.enqueue("deliver", {"n": 2})
    second = q.enqueue("deliver", {"n": 3})
    assert q.claim(["deliver"], "w", 60).id == first
    assert q.claim(["deliver"], "w", 60).id == second
    assert q.claim(["deliver"], "w", 60) is None  # `later` is not due
    clock.advance(30)
    assert q.claim(["deliver"], "w", 60).id == later


def test_idempotent_enqueue_by_key(q):
    a = q.enqueue("analyse", {"x": 1}, key="series-1:chest-ct")
    b = q.enqueue("analyse", {"x": 2}, key="series-1:chest-ct")
    c = q.enqueue("analyse", {"x": 3}, key="series-2:chest-ct")
    assert a == b != c
    assert q.get(a).payload == {"x": 1} and q.get(a).key == "series-1:chest-ct"
    assert len(q.list()) == 2
    # no key: no deduplication
    assert q.enqueue("analyse", {"x": 1}) != q.enqueue("analyse", {"x": 1})


def test_backoff_schedule_pure():
    assert [backoff_delay(n, 5, 300) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(0, 5, 300) == 0
    assert backoff_delay(10_000, 5, 300) == 300  # no overflow


def test_fail_backs_off_then_dead_with_reason(q, clock):
    job_id = q.enqueue("deliver", {"dest": "pacs"}, max_attempts=4)
    delays = []
    for attempt in range(1, 4):
        job = q.claim(["deliver"], "w", 60)
        assert job.id == job_id and job.attempts == attempt
        assert q.fail(job_id, f"peer down\n(attempt {attempt})", owner="w") == "queued"
        job = q.get(job_id)
        assert job.state is JobState.QUEUED and job.lease_owner is None
        assert job.last_error == f"peer down (attempt {attempt})"  # one line
        delays.append(job.next_run_at - clock.now)
        clock.advance(delays[-1] - 0.5)
        assert q.claim(["deliver"], "w", 60) is None  # not yet due
        clock.advance(0.5)
    assert delays == [5, 10, 20]
    assert q.claim(["deliver"], "w", 60).attempts == 4
    assert q.fail(job_id, "still down", owner="w") == "dead"
    dead = q.get(job_id)
    assert dead.state is JobState.DEAD and dead.last_error == "still down" and dead.attempts == 4
    clock.advance(10_000)
    assert q.claim(["deliver"], "w", 60) is None


def test_backoff_capped(tmp_path, clock):
    queue = SqliteJobQueue(tmp_path / "q.db", backoff_initial_s=100, backoff_max_s=150, clock=clock)
    job_id = queue.enqueue("deliver", {}, max_attempts=10)
    for expected in (100, 150, 150):
        queue.claim(["deliver"], "w", 60)
        queue.fail(job_id, "x")
        assert queue.get(job_id).next_run_at - clock.now == expected
        clock.advance(expected)


def test_not_retryable_is_dead_at_once(q):
    job_id = q.enqueue("deliver", {})
    q.claim(["deliver"], "w", 60)
    assert q.fail(job_id, "0xA900 data set does not match SOP class", retryable=False) == "dead"
    job = q.get(job_id)
    assert job.state is JobState.DEAD and job.attempts == 1 and "0xA900" in job.last_error


def test_lease_expiry_reclaimed_by_another_owner(q, clock):
    job_id = q.enqueue("analyse", {})
    assert q.claim(["analyse"], "w1", 30).attempts == 1
    clock.advance(20)
    assert q.renew(job_id, "w1", 30) is True  # lease now ends at +50
    clock.advance(29)
    assert q.claim(["analyse"], "w2", 30) is None  # still leased
    clock.advance(2)  # w1 crashed: no renewal
    job = q.claim(["analyse"], "w2", 30)
    assert job.id == job_id and job.lease_owner == "w2" and job.attempts == 2
    # the old owner has lost it: renew says so, and it cannot overwrite w2's result
    assert q.renew(job_id, "w1", 30) is False
    with pytest.raises(LeaseLost):
        q.complete(job_id, owner="w1")
    with pytest.raises(LeaseLost):
        q.fail(job_id, "late", owner="w1")
    assert q.get(job_id).state is JobState.RUNNING
    q.complete(job_id, owner="w2")
    assert q.renew(job_id, "w2", 30) is False  # done: nothing to renew
    assert q.get(job_id).state is JobState.DONE


def test_sending_job_with_expired_lease_is_reclaimed(q, clock):
    job_id = q.enqueue("analyse", {})
    q.claim(["analyse"], "w1", 30)
    q.set_state(job_id, JobState.SENDING, owner="w1")
    clock.advance(31)
    job = q.claim(["analyse"], "w2", 30)
    assert job.id == job_id and job.state is JobState.RUNNING and job.lease_owner == "w2"


def test_crash_loop_ends_dead(q, clock):
    job_id = q.enqueue("analyse", {}, max_attempts=2)
    for owner in ("w1", "w2"):
        assert q.claim(["analyse"], owner, 10).id == job_id
        clock.advance(11)  # worker killed every time
    assert q.claim(["analyse"], "w3", 10) is None
    job = q.get(job_id)
    assert job.state is JobState.DEAD and "lease of w2 expired" in job.last_error


def test_requeue_resets_attempts(q, clock):
    job_id = q.enqueue("deliver", {}, max_attempts=1)
    q.claim(["deliver"], "w", 60)
    assert q.fail(job_id, "refused") == "dead"
    q.requeue(job_id)
    job = q.get(job_id)
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.next_run_at == clock.now
    assert q.claim(["deliver"], "w", 60).attempts == 1
    with pytest.raises(JobStateError):
        q.requeue(job_id)  # running: not while a worker holds it
    with pytest.raises(JobNotFound):
        q.requeue(999)


def test_children_and_parent_failed(q):
    parent = q.enqueue("analyse", {"series": "s"})
    q.claim(["analyse"], "w", 60)
    kids = [q.enqueue("deliver", {"dest": d}, key=f"{parent}:{d}", parent_id=parent)
            for d in ("pacs", "web")]
    # a re-run of the parent re-enqueues the same children: no duplicates
    assert [q.enqueue("deliver", {"dest": d}, key=f"{parent}:{d}", parent_id=parent)
            for d in ("pacs", "web")] == kids
    q.set_state(parent, "sending", owner="w")
    assert [c.id for c in q.children(parent)] == kids
    assert all(c.parent_id == parent for c in q.children(parent))
    assert q.children(kids[0]) == []

    q.claim(["deliver"], "d", 60)
    q.complete(kids[0], owner="d")
    q.claim(["deliver"], "d", 60)
    q.fail(kids[1], "409 Conflict", retryable=False, owner="d")
    states = {c.state for c in q.children(parent)}
    assert states == {JobState.DONE, JobState.DEAD}
    q.mark_failed(parent, "deliver to web: 409 Conflict")
    job = q.get(parent)
    assert job.state is JobState.FAILED and job.last_error == "deliver to web: 409 Conflict"
    assert job.lease_owner is None


def test_list_filters(q):
    a = q.enqueue("analyse", {})
    b = q.enqueue("forward", {})
    c = q.enqueue("analyse", {})
    q.claim(["forward"], "w", 60)
    assert [j.id for j in q.list()] == [c, b, a]  # newest first
    assert [j.id for j in q.list(kind="analyse")] == [c, a]
    assert [j.id for j in q.list(state="running")] == [b]
    assert [j.id for j in q.list(state=JobState.QUEUED, kind="analyse", limit=1)] == [c]
    assert q.counts()["queued"] == 2 and q.counts()["running"] == 1


def test_survives_reopening(tmp_path, clock):
    path = tmp_path / "node.db"
    first = SqliteJobQueue(path, clock=clock)
    job_id = first.enqueue("analyse", {"k": [1, 2]}, key="k1")
    first.claim(["analyse"], "w1", 60)
    first.close()

    again = SqliteJobQueue(path, clock=clock)
    job = again.get(job_id)
    assert job.state is JobState.RUNNING and job.lease_owner == "w1" and job.payload == {"k": [1, 2]}
    assert again.enqueue("analyse", {}, key="k1") == job_id
    clock.advance(61)  # the process that held it is gone
    assert again.claim(["analyse"], "w2", 60).id == job_id
    again.close()


def _claim_all(db_path: str, owner: str, start, out) -> None:
    queue = SqliteJobQueue(db_path)
    start.wait()
    got = []
    while (job := queue.claim(["deliver", "analyse"], owner, 300)) is not None:
        got.append(job.id)
        time.sleep(0.002)  # "work" outside the lock, so the others get their turn
        queue.complete(job.id, owner=owner)
    out.put((owner, got))
    queue.close()


def test_processes_never_claim_the_same_job(tmp_path):
    path = tmp_path / "node.db"
    queue = SqliteJobQueue(path)
    ids = [queue.enqueue("deliver" if n % 2 else "analyse", {"n": n}) for n in range(300)]
    ctx = mp.get_context("spawn")  # like real workers: fresh interpreters, no inherited connection
    start, out = ctx.Barrier(4), ctx.Queue()  # all open the db, then all claim at once
    procs = [ctx.Process(target=_claim_all, args=(str(path), f"w{i}", start, out)) for i in range(4)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = [job_id for got in results.values() for job_id in got]
    assert len(claimed) == len(set(claimed)) == len(ids)  # each job exactly once
    assert set(claimed) == set(ids)
    assert queue.counts()["done"] == 300
    assert all(queue.get(j).attempts == 1 for j in ids)
    assert sum(1 for got in results.values() if got) >= 2  # they really did compete


def _claim_inherited(queue: SqliteJobQueue, out) -> None:
    job = queue.claim(["analyse"], "child", 60)  # the inherited connection is replaced
    out.put(job.id if job else None)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork here")
def test_queue_object_inherited_through_fork(tmp_path):
    queue = SqliteJobQueue(tmp_path / "node.db")
    job_id = queue.enqueue("analyse", {})
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_claim_inherited, args=(queue, out))
    proc.start()
    assert out.get(timeout=30) == job_id
    proc.join(timeout=30)
    assert queue.get(job_id).lease_owner == "child"
    assert queue.claim(["analyse"], "parent", 60) is None


def test_threads_share_one_queue(tmp_path):
    import threading

    queue = SqliteJobQueue(tmp_path / "node.db")
    ids = {queue.enqueue("deliver", {"n": n}) for n in range(100)}
    got: list[int] = []

    def drain(owner: str) -> None:
        while (job := queue.claim(["deliver"], owner, 60)) is not None:
            got.append(job.id)
            queue.complete(job.id, owner=owner)

    threads = [threading.Thread(target=drain, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == sorted(ids)
