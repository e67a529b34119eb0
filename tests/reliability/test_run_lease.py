"""One run per name (issue 17, item 7): the lease on the run folder, locally and on S3 (moto's
conditional put), two concurrent starts, takeover of an expired or dead holder's lease."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from orchestrator import storage
from orchestrator.train.lease import LEASE_DIR, RunLease, RunNameInUse


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "exp" / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/exp/run"


def _race(run_dir: str, n: int = 2) -> tuple[list[RunLease], list[Exception]]:
    leases = [RunLease(run_dir, ttl_s=60) for _ in range(n)]
    won, lost = [], []
    barrier = threading.Barrier(n)

    def start(lease):
        barrier.wait()
        try:
            won.append(lease.acquire())
        except RunNameInUse as e:
            lost.append(e)

    threads = [threading.Thread(target=start, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won, lost


def test_exclusive_create_is_exclusive(run_dir):
    uri = storage.join(run_dir, "x.json")
    storage.create_exclusive(uri, b"1")
    with pytest.raises(storage.AlreadyExists):
        storage.create_exclusive(uri, b"2")
    assert storage.read_text(uri) == "1"


def test_threads_of_one_process_racing_on_local_files(tmp_path):
    """Writers in one process share a pid: each needs its own temporary file (CI caught a race where
    two threads' exclusive creates shared one, and the loser failed with FileNotFoundError)."""
    uri, n = str(tmp_path / "d" / "x.json"), 8
    outcomes: list[object] = []
    barrier = threading.Barrier(n)

    def create(i):
        barrier.wait()
        try:
            storage.create_exclusive(uri, str(i).encode())
            outcomes.append("won")
        except Exception as e:  # anything but AlreadyExists is the bug
            outcomes.append(e)

    def write(i):
        barrier.wait()
        storage.write_text(str(tmp_path / "d" / "y.json"), str(i))

    def race(target):
        threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    for _ in range(20):
        outcomes.clear()
        race(create)
        assert outcomes.count("won") == 1, outcomes
        assert all(isinstance(o, storage.AlreadyExists) for o in outcomes if o != "won"), outcomes
        race(write)
        assert int(storage.read_text(str(tmp_path / "d" / "y.json"))) in range(n)
        assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.json", "y.json"]  # no temporary left
        (tmp_path / "d" / "x.json").unlink()


def test_two_concurrent_starts_one_wins_the_other_gets_a_clear_error(run_dir):
    for _ in range(3):  # three rounds of the race: always exactly one winner
        won, lost = _race(run_dir, 2)
        assert len(won) == 1 and len(lost) == 1, (won, lost)
        assert "run name in use" in str(lost[0]) and run_dir in str(lost[0])
        won[0].release()


def test_a_live_lease_refuses_and_a_released_one_is_free(run_dir):
    a = RunLease(run_dir, ttl_s=60).acquire()
    with pytest.raises(RunNameInUse, match="generation 1"):  # no "valid for N s": that compared clocks (issue 31)
        RunLease(run_dir, ttl_s=60).acquire()
    a.release()
    b = RunLease(run_dir, ttl_s=60).acquire()
    assert b.record.generation == 2
    b.release()


def test_an_expired_lease_of_a_holder_elsewhere_is_taken_over(run_dir, caplog):
    # expired = not renewed for the TTL while we watch it (issue 31: never judged by the wall clocks)
    dead = {"owner": "otherhost:123:abcd", "host": "otherhost", "pid": 123, "pid_started": 1.0,
            "expires": time.time() - 1, "released": False}
    storage.write_text(storage.join(run_dir, LEASE_DIR, "00000004.json"), json.dumps(dead))
    lease = RunLease(run_dir, ttl_s=1.0).acquire()
    assert lease.record.generation == 5
    assert "taking over the lease of otherhost:123:abcd" in caplog.text
    lease.release()


def test_an_unexpired_lease_of_a_holder_elsewhere_is_respected(run_dir):
    # unexpired = renewed while we watch it (issue 31: a heartbeat, not a wall-clock expiry)
    live = {"owner": "otherhost:123:abcd", "host": "otherhost", "pid": 123, "pid_started": 1.0,
            "expires": time.time() + 600, "released": False}
    uri = storage.join(run_dir, LEASE_DIR, "00000001.json")
    storage.write_text(uri, json.dumps(live))
    stop = threading.Event()

    def heartbeat():
        beat = 0
        while not stop.wait(0.2):
            beat += 1
            storage.write_text(uri, json.dumps({**live, "beat": beat}))

    t = threading.Thread(target=heartbeat, daemon=True)
    t.start()
    try:
        with pytest.raises(RunNameInUse, match="otherhost:123:abcd"):
            RunLease(run_dir, ttl_s=60).acquire()
    finally:
        stop.set()
        t.join()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(run_dir):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a driver that was killed: its pid is gone, its lease not yet expired
    gone = {"owner": f"{socket.gethostname()}:{proc.pid}:dead", "host": socket.gethostname(), "pid": proc.pid,
            "pid_started": time.time() - 5, "expires": time.time() + 600, "released": False}
    storage.write_text(storage.join(run_dir, LEASE_DIR, "00000001.json"), json.dumps(gone))
    RunLease(run_dir, ttl_s=60).acquire().release()


def test_the_heartbeat_renews_and_a_holder_that_was_taken_over_knows(run_dir, monkeypatch):
    a = RunLease(run_dir, ttl_s=1.5, renew_every_s=0.3).acquire()
    first = a.record.expires
    time.sleep(1.0)
    assert a.record.expires > first  # renewed by the heartbeat
    assert a.current().expires == pytest.approx(a.record.expires)
    a._stop.set()  # the holder stalls: it stops renewing
    a._thread.join()
    # b runs elsewhere (on this host a's live process would keep the name: issue 31)
    monkeypatch.setattr("orchestrator.train.lease.socket.gethostname", lambda: "otherhost")
    b = RunLease(run_dir, ttl_s=60).acquire()
    assert not a.renew() and a.lost.is_set()
    a.release()  # does not touch b's generation
    with pytest.raises(RunNameInUse):
        RunLease(run_dir, ttl_s=60).acquire()
    b.release()
