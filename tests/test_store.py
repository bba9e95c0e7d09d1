"""The store: one atomic write, records read back checked (corrupt ones named), locks that cannot stick."""

import json
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpai_lib import store
from dpai_lib.store import CorruptRecordError, RunLock, atomic_write, quarantine, read_record, write_json, write_record

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "results" / "runs").glob("*.json"))


def record(**overrides):
    rec = {"schema": store.SCHEMA, "run_id": "0123456789abcdef", "labels": {"tier": "smoke"}, "status": "done",
           "error": None, "config": {"seed": 0, "data": {"name": "synthetic"}, "model": {"name": "resnet20"},
                                     "prune": {"method": "random", "sparsity": 0.9}, "train": None},
           "seed": 0, "results": {}, "curves": [], "timings": {"total_s": 1.0}, "provenance": {}}
    return rec | overrides


# -- atomic writes ---------------------------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_whole_when_the_writer_fails(tmp_path):
    path = tmp_path / "a" / "f.json"
    write_json(path, {"x": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as f:
        f.write('{"x": 2, "half')
        raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary file left behind
    with atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # like open(): not mkstemp's 0600


def test_there_is_one_atomic_writer_in_the_files_this_change_owns():
    """runs, pipeline, results, trainer and data write through store.atomic_write: no other os.replace."""
    for name in ("runs", "pipeline", "results", "trainer", "data"):
        text = (ROOT / "dpai_lib" / f"{name}.py").read_text()
        assert "os.replace" not in text and ".tmp" not in text, name
    assert (ROOT / "dpai_lib" / "store.py").read_text().count("os.replace(") == 1


# -- records ---------------------------------------------------------------------------------------
def test_a_record_written_before_the_tier_rename_reads_with_its_tier_label(tmp_path):
    path = write_json(tmp_path / "0123456789abcdef.json",
                      record(labels={"artefact": "a", "budget": "paper", "method": "dpai"}))
    assert list(read_record(path)["labels"].items()) == [("artefact", "a"), ("tier", "paper"), ("method", "dpai")]
    assert json.loads(path.read_text())["labels"]["budget"] == "paper"  # reading never rewrites the file
    both = write_json(tmp_path / "b.json", record(labels={"budget": "erk", "tier": "smoke"}))
    assert read_record(both)["labels"] == {"budget": "erk", "tier": "smoke"}  # a new record is left as it is


def test_every_committed_record_validates_and_round_trips_byte_for_byte(tmp_path):
    assert COMMITTED
    for path in COMMITTED:
        rec = read_record(path, path.stem)
        write_record(tmp_path / path.name, rec)
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name  # the format on disk is unchanged


@pytest.mark.parametrize("content, problem", [
    ("", "empty file"),
    ('{"schema": "dpai_lib.run/1", "run_id": "01234', "invalid JSON (truncated?): Unterminated string"),
    ("[1, 2]", "not a JSON object but a list"),
    ('{"schema": "other/2"}', "not a dpai_lib run record (schema 'other/2'"),
    (b"\xff\xfe{", "not UTF-8 text"),
])
def test_an_unreadable_record_is_a_corrupt_record_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "0123456789abcdef.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorruptRecordError) as err:
        read_record(path)
    assert isinstance(err.value, ValueError) and not isinstance(err.value, json.JSONDecodeError)
    assert str(err.value).startswith(f"corrupt run record {path}: ") and problem in str(err.value)
    assert err.value.path == path


def test_missing_fields_are_named_and_a_missing_file_is_not_corrupt(tmp_path):
    path = tmp_path / "r.json"
    rec = record()
    del rec["results"], rec["status"]
    rec["config"] = {"seed": 0}
    write_json(path, rec)
    with pytest.raises(CorruptRecordError) as err:
        read_record(path)
    msg = str(err.value)
    assert "missing or invalid fields" in msg and "results: missing" in msg and "status: missing" in msg
    assert "config.data: missing" in msg
    write_json(path, record(status="finished"))
    with pytest.raises(CorruptRecordError, match="status: Input should be 'running', 'done'"):
        read_record(path)
    write_json(path, record())
    assert read_record(path)["status"] == "done"
    with pytest.raises(CorruptRecordError, match="holds run 0123456789abcdef, not fedcba9876543210"):
        read_record(path, "fedcba9876543210")
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "none.json")
    with pytest.raises(ValueError):  # a writer cannot write what the reader would call corrupt
        write_record(path, record(seed="zero"))


def test_quarantine_moves_the_file_aside_and_names_it(tmp_path, caplog):
    path = tmp_path / "0123456789abcdef.json"
    path.write_text("{")
    with caplog.at_level(logging.WARNING, logger="dpai_lib.store"):
        target = quarantine(path, "invalid JSON")
    assert not path.exists() and target.read_text() == "{"
    assert target.name.startswith("0123456789abcdef.json.corrupt-") and target.suffix != ".json"
    assert str(path) in caplog.text and target.name in caplog.text
    assert quarantine(path) is None  # gone already (another runner moved it)


# -- locks -----------------------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: no zombie
    return p.pid


def write_lock(path: Path, age_s: float = 0.0, **owner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(owner) if owner else "")
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_live_lock_is_busy_and_released_locks_are_free(tmp_path):
    path = tmp_path / "locks" / "r.lock"
    a, b = RunLock(path), RunLock(path)
    assert a.acquire() and not b.acquire()
    owner = b.owner()
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert owner["started"] <= owner["heartbeat"] <= time.time()
    a.release()
    assert not path.exists()
    with b as got:
        assert got and path.exists()
    assert not path.exists()


@pytest.mark.parametrize("case, busy", [
    ("empty, fresh", True),  # being written right now
    ("empty, old", False),
    ("garbage, old", False),
    ("other host, fresh heartbeat", True),
    ("other host, old heartbeat", False),
    ("this host, dead pid", False),
    ("this host, live pid", True),
    ("this host, our pid, not ours", False),  # an earlier process with our pid (a restarted container)
])
def test_stale_locks_are_taken_and_live_ones_are_not(tmp_path, case, busy, caplog):
    path = tmp_path / "r.lock"
    now, host = time.time(), socket.gethostname()
    if case == "empty, fresh":
        write_lock(path, 1)
    elif case == "empty, old":
        write_lock(path, 120)
    elif case == "garbage, old":
        path.write_text('{"host": "a", "pi')
        os.utime(path, (now - 120, now - 120))
    elif case == "other host, fresh heartbeat":
        write_lock(path, 500, host="elsewhere", pid=1, started=now - 3600, heartbeat=now - 500)
    elif case == "other host, old heartbeat":
        write_lock(path, 700, host="elsewhere", pid=1, started=now - 3600, heartbeat=now - 700)
    elif case == "this host, dead pid":
        write_lock(path, 1, host=host, pid=dead_pid(), started=now, heartbeat=now)
    elif case == "this host, live pid":
        write_lock(path, 1, host=host, pid=os.getppid(), started=now, heartbeat=now)
    else:
        write_lock(path, 1, host=host, pid=os.getpid(), started=now, heartbeat=now, token="old")
    lock = RunLock(path, timeout_s=600, grace_s=30)
    with caplog.at_level(logging.WARNING, logger="dpai_lib.store"):
        got = lock.acquire()
    try:
        assert got is not busy
        if not busy:
            assert f"took over stale lock {path}" in caplog.text
            assert lock.owner()["pid"] == os.getpid()
            assert [p.name for p in tmp_path.iterdir()] == ["r.lock"]  # nothing left aside
    finally:
        lock.release()


def test_the_heartbeat_is_refreshed_and_a_taken_over_holder_does_not_delete_the_new_lock(tmp_path, caplog):
    path = tmp_path / "r.lock"
    a = RunLock(path, timeout_s=1.0, heartbeat_s=0.1)
    assert a.acquire()
    first = a.owner()["heartbeat"]
    time.sleep(0.5)
    assert a.owner()["heartbeat"] > first and not RunLock(path, timeout_s=1.0).acquire()  # alive: busy
    a._stop.set()  # the holder freezes: no more heartbeats
    a._thread.join()
    time.sleep(1.2)
    b = RunLock(path, timeout_s=1.0, heartbeat_s=0.1)
    with caplog.at_level(logging.WARNING, logger="dpai_lib.store"):
        assert b.acquire()
    assert "heartbeat of" in caplog.text and "s old (timeout 1 s)" in caplog.text
    a.release()  # the frozen holder wakes up and releases: b's lock stays
    assert path.exists() and b.owner()["token"] == b._owner["token"]
    b.release()
    assert not path.exists()


def test_lock_timeout_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DPAI_LOCK_TIMEOUT_S", "42")
    assert RunLock(tmp_path / "x.lock").timeout_s == 42.0 and RunLock(tmp_path / "x.lock", timeout_s=5).timeout_s == 5
    monkeypatch.setenv("DPAI_LOCK_TIMEOUT_S", "ten minutes")
    with pytest.raises(ValueError, match="DPAI_LOCK_TIMEOUT_S must be a positive number of seconds; got 'ten minutes'"):
        RunLock(tmp_path / "x.lock")


def _racer(lock_dir: str, trials: int, barrier, results) -> None:
    won = []
    for i in range(trials):
        barrier.wait()
        lock = RunLock(Path(lock_dir) / f"{i}.lock", timeout_s=600, grace_s=30)
        got = lock.acquire()
        won.append(got)
        barrier.wait()  # everybody has tried before the winner lets go
        if got:
            lock.release()
    results.put((os.getpid(), won))


def test_exactly_one_of_8_processes_takes_over_a_stale_lock_in_each_of_300_trials(tmp_path):
    trials, procs = 300, 8
    now, host, gone = time.time(), socket.gethostname(), dead_pid()
    for i in range(trials):  # three kinds of stale lock
        kind = i % 3
        if kind == 0:
            write_lock(tmp_path / f"{i}.lock", 1, host=host, pid=gone, started=now, heartbeat=now)
        elif kind == 1:
            write_lock(tmp_path / f"{i}.lock", 3600, host="elsewhere", pid=7, started=now - 7200, heartbeat=now - 3600)
        else:
            write_lock(tmp_path / f"{i}.lock", 3600)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_racer, args=(str(tmp_path), trials, barrier, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    outcome = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    winners = [sum(won[i] for _, won in outcome) for i in range(trials)]
    assert winners == [1] * trials, [i for i, n in enumerate(winners) if n != 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # every winner released; nothing left aside
