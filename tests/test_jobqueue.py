"""The job queue on both engines (SQLite file, PostgreSQL server): states, idempotency, backoff,
leases, priorities, lanes, and several processes claiming at once."""

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
from ct_ai_node.jobqueue.postgres import PostgresJobQueue

BACKENDS = ("sqlite", "postgres")


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


def open_queue(target, **kw):
    """The queue at ``target``: a PostgreSQL URL or an SQLite file."""
    if isinstance(target, str) and target.startswith("postgresql://"):
        return PostgresJobQueue(target, **kw)
    return SqliteJobQueue(target, **kw)


@pytest.fixture(params=BACKENDS)
def target(request, tmp_path):
    """Where a queue lives: the node's SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return tmp_path / "node.db"


@pytest.fixture()
def q(target, clock):
    with open_queue(target, backoff_initial_s=5, backoff_max_s=300, clock=clock) as queue:
        yield queue


def test_satisfies_protocol(q):
    assert isinstance(q, JobQueue)


def test_pragmas(tmp_path):
    q = SqliteJobQueue(tmp_path / "node.db")
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


def test_backoff_capped(target, clock):
    queue = open_queue(target, backoff_initial_s=100, backoff_max_s=150, clock=clock)
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


def test_survives_reopening(target, clock):
    path = target
    first = open_queue(path, clock=clock)
    job_id = first.enqueue("analyse", {"k": [1, 2]}, key="k1")
    first.claim(["analyse"], "w1", 60)
    first.close()

    again = open_queue(path, clock=clock)
    job = again.get(job_id)
    assert job.state is JobState.RUNNING and job.lease_owner == "w1" and job.payload == {"k": [1, 2]}
    assert again.enqueue("analyse", {}, key="k1") == job_id
    clock.advance(61)  # the process that held it is gone
    assert again.claim(["analyse"], "w2", 60).id == job_id
    again.close()


def _claim_all(db_path: str, owner: str, start, out) -> None:
    queue = open_queue(db_path)
    start.wait()
    got = []
    while (job := queue.claim(["deliver", "analyse"], owner, 300)) is not None:
        got.append(job.id)
        time.sleep(0.002)  # "work" outside the lock, so the others get their turn
        queue.complete(job.id, owner=owner)
    out.put((owner, got))
    queue.close()


def test_processes_never_claim_the_same_job(target):
    path = target
    queue = open_queue(path)
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


def _claim_inherited(queue, out) -> None:
    job = queue.claim(["analyse"], "child", 60)  # the inherited connection is replaced
    out.put(job.id if job else None)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork here")
def test_queue_object_inherited_through_fork(target):
    queue = open_queue(target)
    job_id = queue.enqueue("analyse", {})
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_claim_inherited, args=(queue, out))
    proc.start()
    assert out.get(timeout=30) == job_id
    proc.join(timeout=30)
    assert queue.get(job_id).lease_owner == "child"
    assert queue.claim(["analyse"], "parent", 60) is None


def test_threads_share_one_queue(target):
    import threading

    queue = open_queue(target)
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


# -- priorities and lanes (both engines) -------------------------------------------------------

def test_urgent_first_then_normal_then_background(q, clock):
    from ct_ai_node.jobqueue import BACKGROUND, NORMAL, URGENT

    batch = [q.enqueue("analyse", {"n": n}, priority=BACKGROUND) for n in range(4)]
    clock.advance(1)
    normal = q.enqueue("analyse", {}, priority=NORMAL)
    clock.advance(1)
    urgent = q.enqueue("analyse", {}, priority=URGENT)
    order = [q.claim(["analyse"], "w", 60).id for _ in range(6)]
    assert order == [urgent, normal, *batch]
    assert q.get(urgent).priority == URGENT


def test_waiting_work_is_not_starved(target, clock):
    """A background job that has waited two aging periods ranks with a fresh urgent one
    (and goes first, being older)."""
    from ct_ai_node.jobqueue import BACKGROUND, URGENT

    queue = open_queue(target, clock=clock, priority_aging_s=100)
    old = queue.enqueue("analyse", {}, priority=BACKGROUND)
    clock.advance(150)
    urgent_1 = queue.enqueue("analyse", {}, priority=URGENT)
    assert queue.claim(["analyse"], "w", 60).id == urgent_1  # 1.5 levels of waiting are not enough
    clock.advance(60)
    urgent_2 = queue.enqueue("analyse", {}, priority=URGENT)
    assert queue.claim(["analyse"], "w", 60).id == old  # 2.1 levels: ahead of the fresh urgent job
    assert queue.claim(["analyse"], "w", 60).id == urgent_2


def test_lanes_pin_jobs_to_their_workers(q):
    anywhere = q.enqueue("deliver", {"n": 0})
    on_a = q.enqueue("deliver", {"n": 1}, lane="host-a:/var/out")
    on_b = q.enqueue("deliver", {"n": 2}, lane="host-b:/var/out")
    assert q.get(on_a).lane == "host-a:/var/out"
    assert q.claim(["deliver"], "wb", 60, lanes=["host-b:/var/out"]).id == anywhere
    assert q.claim(["deliver"], "wb", 60, lanes=["host-b:/var/out"]).id == on_b
    assert q.claim(["deliver"], "wb", 60, lanes=["host-b:/var/out"]) is None  # a's files are not on b
    assert q.claim(["deliver"], "any", 60) is None  # no lane served: only lane-less jobs
    assert q.claim(["deliver"], "wa", 60, lanes="host-a:/var/out").id == on_a


def test_old_sqlite_file_gains_the_new_columns(tmp_path):
    path = tmp_path / "node.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
        payload TEXT NOT NULL, key TEXT UNIQUE, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL, next_run_at REAL NOT NULL, lease_owner TEXT, lease_until REAL,
        parent_id INTEGER REFERENCES jobs(id), last_error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL);
        INSERT INTO jobs (kind, payload, state, max_attempts, next_run_at, created_at, updated_at)
        VALUES ('analyse', '{}', 'queued', 5, 0, 0, 0);""")
    db.close()
    queue = SqliteJobQueue(path)
    job = queue.claim(["analyse"], "w", 60)
    assert job.id == 1 and job.priority == 1 and job.lane is None


# -- PostgreSQL only ---------------------------------------------------------------------------

def test_postgres_leases_use_the_server_clock(pg_url):
    """Without a clock the server's time counts, so hosts with drifting clocks agree."""
    import psycopg

    queue = PostgresJobQueue(pg_url)
    job_id = queue.enqueue("analyse", {})
    job = queue.claim(["analyse"], "w", 60)
    with psycopg.connect(pg_url) as conn:
        server_now = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
    assert job.id == job_id and abs(job.lease_until - 60 - server_now) < 5
    assert isinstance(queue, JobQueue)


def test_postgres_outage_pauses_calls_until_the_server_returns(postgres, pg_url):
    """The server stops for a while: calls wait and then succeed; nothing is lost."""
    import threading

    queue = PostgresJobQueue(pg_url, reconnect_s=60)
    first = queue.enqueue("analyse", {"n": 1})
    postgres.pause()
    try:
        result: dict = {}
        caller = threading.Thread(target=lambda: result.update(id=queue.enqueue("analyse", {"n": 2})))
        caller.start()
        time.sleep(3)
        assert caller.is_alive()  # waiting for the server, not failed
    finally:
        postgres.resume()
    caller.join(30)
    assert not caller.is_alive() and result["id"] != first
    assert [j.payload["n"] for j in reversed(queue.list())] == [1, 2]


def test_postgres_gives_up_after_reconnect_s(postgres, pg_url):
    from ct_ai_node.jobqueue.shared_db import DatabaseUnavailable

    queue = PostgresJobQueue(pg_url, reconnect_s=1)
    postgres.pause()
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="unreachable for 1 s"):
            queue.counts()
        assert time.monotonic() - started < 10
    finally:
        postgres.resume()
    assert queue.counts()["queued"] == 0
