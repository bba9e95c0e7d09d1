"""The run store's files: written atomically, read back checked, claimed with locks that cannot stick.

* :func:`atomic_write` is the one way ``dpai_lib`` writes a file that others read (run records, collected
  CSVs, checkpoints, unpacked data): a temporary file in the same folder, flushed and fsynced, then
  renamed over the target (``os.replace``), so a reader or a crash never meets half a file.
* :class:`RunRecord` is the schema of a run record (``<run_id>.json``, written by :mod:`dpai_lib.runs`);
  :func:`read_record` is the one reader, and an unreadable record is a :class:`CorruptRecordError` that
  names the file and what is wrong; :func:`quarantine` moves such a file aside, so the run is redone.
* :class:`RunLock` claims one run: a lock file created exclusively, holding host, pid, start and heartbeat
  times that a thread of the holder refreshes; a lock whose process is gone, whose heartbeat is older than
  the timeout, or which is empty and older than a grace period is stale and is taken over atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

SCHEMA = "dpai_lib.run/1"
FINISHED = ("done", "diverged")  # a run with such a record is never repeated; any other status is redone
STATUSES = ("running", "done", "diverged", "failed", "interrupted")


# -- atomic writes ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """``with atomic_write(path, "wb") as f: ...``: the file appears at ``path`` complete or not at all
    (a temporary ``.<name>.<pid>.<random>.tmp`` beside it, flushed, fsynced, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies, as for open()
    try:
        f: IO[Any]
        with (os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (NaN allowed), written atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
    return Path(path)


# -- run records -----------------------------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # records of newer versions may carry more keys


class _Named(_Open):
    name: str


class _Prune(_Open):
    method: str
    sparsity: float


class RecordConfig(_Open):
    """The part of a run configuration that readers of records rely on (the whole one is stored)."""

    seed: int
    data: _Named
    model: _Named
    prune: _Prune
    train: dict[str, Any] | None = None


class RunRecord(_Open):
    """A run record, ``<run_id>.json``: what :func:`dpai_lib.runs.execute` writes (and, for a run that
    failed before its notebook could record it, :func:`dpai_lib.pipeline.execute_run`)."""

    schema_: Literal["dpai_lib.run/1"] = Field(alias="schema", description="record format, " + SCHEMA)
    run_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="hash of the configuration and code versions")
    labels: dict[str, Any] = Field(description="artefact, setting, method, tier of the run that wrote it (older "
                                   "records say 'budget' for 'tier'; read_record renames it)")
    status: Literal["running", "done", "diverged", "failed", "interrupted"]
    error: str | None = Field(description="why a run failed, diverged or was interrupted; else None")
    traceback: str | None = Field(None, description="of a failed or interrupted run")
    config: RecordConfig = Field(description="the canonical run configuration")
    code_versions: dict[str, int] | None = Field(None, description="model and pruner versions (newer records)")
    seed: int
    results: dict[str, Any] = Field(description="masks summary, node-path counts, accuracies, pruner report")
    curves: list[dict[str, Any]] = Field(description="one row per training epoch")
    curves_prune: list[dict[str, Any]] | None = Field(None, description="a pruner's per-step trace")
    timings: dict[str, Any] = Field(description="started, finished, prune_s, train_s, total_s")
    provenance: dict[str, Any] = Field(description="versions, device, threads, host, git commit and dirty flag")
    determinism: dict[str, Any] | None = Field(None, description="the flags seed_everything set")


class CorruptRecordError(ValueError):
    """A record file that cannot be read back: its path and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"corrupt run record {self.path}: {problem}")


def _problems(err: ValidationError) -> str:
    out = []
    for e in err.errors()[:6]:
        where = ".".join(str(p) for p in e["loc"]) or "record"
        out.append(f"{where}: {'missing' if e['type'] == 'missing' else e['msg']}")
    more = len(err.errors()) - len(out)
    return "; ".join(out) + (f"; and {more} more" if more > 0 else "")


def read_record(path: str | os.PathLike, run_id: str | None = None) -> dict[str, Any]:
    """The record at ``path`` as the JSON object on disk, checked against :class:`RunRecord` (and, with
    ``run_id``, that it is that run's). A missing file is ``FileNotFoundError``; anything unreadable
    (empty, truncated, not an object, not a record, missing fields) is a :class:`CorruptRecordError`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError as exc:
        raise CorruptRecordError(path, f"not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise CorruptRecordError(path, "empty file")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = " (truncated?)" if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated") else ""
        where = f"line {exc.lineno}, column {exc.colno}"
        raise CorruptRecordError(path, f"invalid JSON{cut}: {exc.msg} ({where})") from None
    if not isinstance(raw, dict):
        raise CorruptRecordError(path, f"not a JSON object but a {type(raw).__name__}")
    if raw.get("schema") != SCHEMA:
        raise CorruptRecordError(path, f"not a dpai_lib run record (schema {raw.get('schema')!r}, expected {SCHEMA!r})")
    try:
        RunRecord.model_validate(raw)
    except ValidationError as exc:
        raise CorruptRecordError(path, f"missing or invalid fields: {_problems(exc)}") from None
    if run_id is not None and raw["run_id"] != run_id:
        raise CorruptRecordError(path, f"holds run {raw['run_id']}, not {run_id}")
    return upgrade_labels(raw)


def upgrade_labels(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the run tier under ``labels["tier"]``: records written before the rename carry it as
    ``labels["budget"]`` (the name now kept for a pruner's layer-wise budget); the label is renamed in place,
    its position in the labels kept."""
    labels = record.get("labels")
    if isinstance(labels, dict) and "budget" in labels and "tier" not in labels:
        record["labels"] = {("tier" if k == "budget" else k): v for k, v in labels.items()}
    return record


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Check ``record`` against :class:`RunRecord` and write it atomically."""
    RunRecord.model_validate(record)
    return write_json(path, record)


def quarantine(path: str | os.PathLike, why: BaseException | str = "") -> Path | None:
    """Move an unreadable record aside to ``<name>.corrupt-<UTC time>`` (kept for inspection, never read:
    stores list ``*.json``) and log a warning naming both; None if it was gone already."""
    path = Path(path)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    problem = why.problem if isinstance(why, CorruptRecordError) else str(why)
    log.warning("corrupt run record %s (%s) moved aside to %s; the run will be redone", path, problem, target.name)
    return target


# -- locks -----------------------------------------------------------------------------------------
def lock_timeout() -> float:
    """Seconds without a heartbeat after which a lock is stale on any host: ``$DPAI_LOCK_TIMEOUT_S`` or 600."""
    value = os.environ.get("DPAI_LOCK_TIMEOUT_S", "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"DPAI_LOCK_TIMEOUT_S must be a positive number of seconds; got {value!r}")
    return seconds


_HELD: set[str] = set()  # tokens of the locks this process holds (a lock of our pid not in it is a dead ancestor's)


class RunLock:
    """An exclusive claim on one run (``with RunLock(path) as got: ...`` or acquire/release).

    The lock file is created with ``O_CREAT | O_EXCL`` and holds ``host``, ``pid``, ``started``,
    ``heartbeat`` and a random ``token``; a daemon thread rewrites it every ``heartbeat_s`` while it is
    held. It is stale when its process is gone (same host), its heartbeat is older than ``timeout_s``
    (any host; default :func:`lock_timeout`), or it is empty or unreadable and older than ``grace_s``.
    A stale lock is taken over atomically: the taker first hard-links it to a name made of its inode and
    modification time (``os.link`` fails if that name exists, so exactly one taker wins), checks that the
    link is the very file it judged stale, removes it and creates its own with ``O_EXCL``."""

    def __init__(self, path: str | os.PathLike, *, timeout_s: float | None = None, heartbeat_s: float | None = None,
                 grace_s: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout_s = lock_timeout() if timeout_s is None else float(timeout_s)
        self.heartbeat_s = min(30.0, self.timeout_s / 4) if heartbeat_s is None else float(heartbeat_s)
        self.grace_s = grace_s
        self.held = False
        self._fd: int | None = None
        self._owner: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> bool:
        """True if this object now holds the lock; False if a live holder has it."""
        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(4):
            if self._create():
                return True
            seen = self._observe()
            if seen is None:
                continue  # released just now: try again
            why = self.stale_reason(*seen)
            if why is None:
                return False
            self._take_over(*seen, why)  # won or lost, the next creation attempt decides
        return False

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        fd = self._held_fd()
        with contextlib.suppress(FileNotFoundError):
            if _same_file(os.stat(self.path), os.fstat(fd)):  # still ours, not a taker's
                self.path.unlink()
        os.close(fd)
        _HELD.discard(self._owner["token"])
        self._fd, self.held = None, False

    def owner(self) -> dict[str, Any] | None:
        """What the lock file says (host, pid, started, heartbeat), None if there is none or it is unreadable."""
        seen = self._observe()
        return _parse(seen[1]) if seen else None

    def stale_reason(self, stat: os.stat_result, content: bytes) -> str | None:
        """Why a lock file with this stat and content is stale, or None if its holder may be alive."""
        now = time.time()
        owner = _parse(content)
        if owner is None:
            age = now - stat.st_mtime
            return f"empty or unreadable for {age:.0f} s" if age > self.grace_s else None
        beat = now - max(float(owner.get("heartbeat") or 0), stat.st_mtime)
        if beat > self.timeout_s:
            holder = f"{owner.get('host')}:{owner.get('pid')}"
            return f"heartbeat of {holder} is {beat:.0f} s old (timeout {self.timeout_s:g} s)"
        if owner.get("host") == socket.gethostname():
            pid = owner["pid"]
            if pid == os.getpid():
                return None if owner.get("token") in _HELD else f"left by an earlier process with pid {pid}"
            if pid <= 0 or not _alive(pid):
                return f"process {pid} on {owner['host']} is gone"
        return None

    # -- internals ---------------------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            return False
        now = time.time()
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                       "token": uuid.uuid4().hex}
        self._fd, self.held = fd, True
        _HELD.add(self._owner["token"])
        self._write()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _held_fd(self) -> int:
        """The open lock file (set from acquire until release, which joins the heartbeat first)."""
        if self._fd is None:
            raise RuntimeError(f"lock {self.path} is not held")
        return self._fd

    def _write(self) -> None:
        fd, data = self._held_fd(), json.dumps(self._owner).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)

    def _beat(self) -> None:
        lost = False
        while not self._stop.wait(self.heartbeat_s):
            self._owner["heartbeat"] = time.time()
            try:
                self._write()
            except OSError as exc:
                log.warning("heartbeat of lock %s failed: %s", self.path, exc)
                continue
            if not lost:
                try:
                    lost = not _same_file(os.stat(self.path), os.fstat(self._held_fd()))
                except FileNotFoundError:
                    lost = True
                if lost:
                    log.warning("lock %s was taken over by another runner while this one held it", self.path)

    def _observe(self) -> tuple[os.stat_result, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                return os.fstat(f.fileno()), f.read(4096)
        except FileNotFoundError:
            return None

    def _take_over(self, stat: os.stat_result, content: bytes, why: str) -> bool:
        """Remove the stale lock (stat, content) if this runner is the one taker that links it aside first."""
        aside = self.path.with_name(f"{self.path.name}.stale-{stat.st_ino}-{stat.st_mtime_ns}")
        try:
            os.link(self.path, aside)
        except (FileExistsError, FileNotFoundError):
            return False  # another runner is taking it over, or it is gone
        except OSError as exc:  # a file system without hard links: no safe takeover
            log.warning("stale lock %s (%s) cannot be taken over here (%s); delete it by hand", self.path, why, exc)
            return False
        try:
            with open(aside, "rb") as f:
                now = os.fstat(f.fileno())
                same = (now.st_ino, now.st_dev, now.st_mtime_ns) == (stat.st_ino, stat.st_dev, stat.st_mtime_ns) \
                    and f.read(4096) == content
            if not same:
                return False  # the lock changed since it was judged: leave it
            os.unlink(self.path)  # only this runner can remove it now: it holds the aside name
            log.warning("took over stale lock %s: %s", self.path, why)
            return True
        finally:
            aside.unlink(missing_ok=True)


def _parse(content: bytes) -> dict[str, Any] | None:
    try:
        owner = json.loads(content)
    except ValueError:
        return None
    if not (isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)):
        return None
    return owner


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
