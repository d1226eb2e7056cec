"""SQLite state of the embedded DM service: one file (WAL), DM's records kept as JSON documents.

The service is one asyncio loop and every statement here is a short indexed write or read,
so the store is used synchronously from that loop. Running objects change often:
:class:`ThrottledSaver` writes each at most twice a second, and status changes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from apsdm.dm.errors import ObjectAlreadyExists

Doc = dict[str, Any]

#: listProcessingJobs' ``"DEFAULT"`` keys (dm-protocol.md section 4.2); kept in their own
#: column so that polling every job of an owner does not parse whole workflow copies.
JOB_SUMMARY_KEYS = (
    "id", "owner", "status", "stage", "startTime", "endTime", "runTime", "startTimestamp",
    "endTimestamp", "submissionTimestamp", "errorMessage",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
    UNIQUE (kind, name));
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    station TEXT NOT NULL COLLATE NOCASE, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roles (
    experiment_id INTEGER NOT NULL, username TEXT NOT NULL, role TEXT NOT NULL,
    PRIMARY KEY (experiment_id, username, role));
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL,
    UNIQUE (owner, name));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, summary TEXT NOT NULL,
    doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, experiment TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL,
    UNIQUE (experiment, name));
CREATE TABLE IF NOT EXISTS files (
    experiment TEXT NOT NULL, path TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (experiment, path));
CREATE TABLE IF NOT EXISTS transfer_files (
    transfer TEXT NOT NULL, path TEXT NOT NULL, state TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, PRIMARY KEY (transfer, path)) WITHOUT ROWID;
"""

_PARAMS = 500  # paths bound in one statement (SQLite allows 999 at least)


def _dump(doc: Doc) -> str:
    return json.dumps(doc, separators=(",", ":"))


class Store:
    """The service's database: experiments, transfers, workflows, jobs and the catalog."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: one write each
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own for a worker thread that only reads (WAL lets it run
        beside the loop's writes)."""
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def _transaction(self, statements: Iterable[tuple[str, Iterable[Any]]]) -> None:
        """Run several statements (sql, rows for executemany) as one transaction."""
        self._db.execute("BEGIN")
        try:
            for sql, rows in statements:
                self._db.executemany(sql, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _insert(self, what: str, sql: str, args: Iterable[Any]) -> int:
        """Run an INSERT; a UNIQUE clash is DM's ObjectAlreadyExists naming ``what``."""
        try:
            return self._db.execute(sql, tuple(args)).lastrowid or 0
        except sqlite3.IntegrityError:
            raise ObjectAlreadyExists(f"{what} already exists") from None

    def _docs(self, sql: str, *args: Any) -> list[Doc]:
        return [json.loads(row[0]) for row in self._db.execute(sql, args)]

    def _doc(self, sql: str, *args: Any) -> Doc | None:
        row = self._db.execute(sql, args).fetchone()
        return json.loads(row[0]) if row else None

    # --- experiments --------------------------------------------------------------------

    def name_id(self, kind: str, name: str) -> int:
        """A stable numeric id for a station or experiment-type name (created on first use)."""
        self._db.execute("INSERT OR IGNORE INTO names (kind, name) VALUES (?, ?)", (kind, name))
        row = self._db.execute(
            "SELECT id FROM names WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return int(row[0])

    def add_experiment(self, doc: Doc) -> int:
        """Store a new experiment (``doc`` holds name and stationName); return its id."""
        return self._insert(f"experiment {doc['name']}",
                            "INSERT INTO experiments (name, station, doc) VALUES (?, ?, ?)",
                            (doc["name"], doc["stationName"], _dump(doc)))

    def experiment(self, *, name: str | None = None, id: int | None = None
                   ) -> tuple[int, Doc] | None:
        """(id, doc) of the experiment with this name or id."""
        column, value = ("name", name) if name is not None else ("id", id)
        row = self._db.execute(
            f"SELECT id, doc FROM experiments WHERE {column} = ?", (value,)).fetchone()
        return (int(row[0]), json.loads(row[1])) if row else None

    def experiments(self, station: str) -> list[tuple[int, Doc]]:
        """(id, doc) of every experiment of a station (case-insensitive), oldest first."""
        rows = self._db.execute(
            "SELECT id, doc FROM experiments WHERE station = ? ORDER BY id", (station,))
        return [(int(i), json.loads(d)) for i, d in rows]

    def add_role(self, experiment_id: int, username: str, role: str) -> None:
        """Give a user a role on an experiment (adding it twice changes nothing)."""
        self._db.execute("INSERT OR IGNORE INTO roles VALUES (?, ?, ?)",
                         (experiment_id, username, role))

    def usernames(self, experiment_id: int) -> list[str]:
        """Users with any role on an experiment, in the order they were added."""
        rows = self._db.execute(
            "SELECT username FROM roles WHERE experiment_id = ? GROUP BY username "
            "ORDER BY MIN(rowid)", (experiment_id,))
        return [r[0] for r in rows]

    # --- DAQs and uploads ---------------------------------------------------------------

    def save_transfer(self, kind: str, doc: Doc) -> None:
        """Insert or update a DAQ (``kind`` "daq") or upload ("upload") record."""
        self._db.execute(
            "INSERT INTO transfers (id, kind, status, doc) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, doc = excluded.doc",
            (doc["id"], kind, doc["status"], _dump(doc)))

    def transfers(self, kind: str, statuses: Iterable[str] | None = None) -> list[Doc]:
        """Records of one kind in creation order, optionally only those in ``statuses``."""
        if statuses is None:
            return self._docs("SELECT doc FROM transfers WHERE kind = ? ORDER BY rowid", kind)
        wanted = list(statuses)
        marks = ",".join("?" * len(wanted))
        return self._docs(f"SELECT doc FROM transfers WHERE kind = ? AND status IN ({marks}) "
                          "ORDER BY rowid", kind, *wanted)

    def transfer(self, kind: str, id: str) -> Doc | None:
        return self._doc("SELECT doc FROM transfers WHERE kind = ? AND id = ?", kind, id)

    # --- workflows and jobs -------------------------------------------------------------

    def add_workflow(self, doc: Doc) -> None:
        self._insert(f"workflow {doc['name']} of owner {doc['owner']}",
                     "INSERT INTO workflows (id, owner, name, doc) VALUES (?, ?, ?, ?)",
                     (doc["id"], doc["owner"], doc["name"], _dump(doc)))

    def replace_workflow(self, doc: Doc) -> None:
        self._db.execute("UPDATE workflows SET doc = ? WHERE id = ?", (_dump(doc), doc["id"]))

    def workflow(self, owner: str, name: str) -> Doc | None:
        return self._doc("SELECT doc FROM workflows WHERE owner = ? AND name = ?", owner, name)

    def workflows(self, owner: str) -> list[Doc]:
        return self._docs("SELECT doc FROM workflows WHERE owner = ? ORDER BY rowid", owner)

    def save_job(self, doc: Doc) -> None:
        """Insert or update a processing job, with its DEFAULT-keys summary."""
        summary = {k: doc[k] for k in JOB_SUMMARY_KEYS if k in doc}
        self._db.execute(
            "INSERT INTO jobs (id, owner, status, summary, doc) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "summary = excluded.summary, doc = excluded.doc",
            (doc["id"], doc["owner"], doc["status"], _dump(summary), _dump(doc)))

    def job(self, id: str) -> Doc | None:
        return self._doc("SELECT doc FROM jobs WHERE id = ?", id)

    def jobs(self, owner: str, summary: bool = False, skip: int = 0,
             limit: int | None = None) -> list[Doc]:
        """An owner's jobs in submission order: whole records, or only the DEFAULT keys."""
        column = "summary" if summary else "doc"
        return self._docs(f"SELECT {column} FROM jobs WHERE owner = ? ORDER BY rowid "
                          "LIMIT ? OFFSET ?", owner, -1 if limit is None else limit, skip)

    def active_jobs(self) -> list[Doc]:
        return self._docs("SELECT doc FROM jobs WHERE status IN ('pending', 'running')")

    # --- catalog ------------------------------------------------------------------------

    def add_dataset(self, doc: Doc) -> None:
        self._insert(f"dataset {doc['datasetName']} of experiment {doc['experimentName']}",
                     "INSERT INTO datasets (id, experiment, name, doc) VALUES (?, ?, ?, ?)",
                     (doc["id"], doc["experimentName"], doc["datasetName"], _dump(doc)))

    def save_files(self, docs: list[Doc]) -> None:
        """Insert or update catalogued files (keyed by experimentName + experimentFilePath),
        all in one transaction."""
        self._transaction([(
            "INSERT INTO files (experiment, path, doc) VALUES (?, ?, ?) "
            "ON CONFLICT (experiment, path) DO UPDATE SET doc = excluded.doc",
            [(doc["experimentName"], doc["experimentFilePath"], _dump(doc)) for doc in docs])])

    def files(self, experiment: str, paths: list[str]) -> dict[str, Doc]:
        """The catalogued files among some paths of an experiment, by path."""
        marks = ",".join("?" * len(paths))
        return {row[0]: json.loads(row[1]) for row in self._db.execute(
            f"SELECT path, doc FROM files WHERE experiment = ? AND path IN ({marks})",
            (experiment, *paths))}

    def file(self, experiment: str, path: str) -> Doc | None:
        return self._doc("SELECT doc FROM files WHERE experiment = ? AND path = ?",
                         experiment, path)


Version = tuple[int, int]  # a file's (size, mtime_ns), as copying.FileStat


class FileStates:
    """One running transfer's files in the store: each one's state and the version it was
    handled at, so that a DAQ's memory does not grow with the files it has seen."""

    _LOOKUP = "SELECT state, size, mtime_ns FROM transfer_files WHERE transfer = ? AND path = ?"

    def __init__(self, store: Store, transfer: str) -> None:
        self._store = store
        self._transfer = transfer

    def get(self, paths: Iterable[str]) -> dict[str, tuple[str, Version | None]]:
        """The state and handled version (None if not recorded) of those paths known."""
        wanted = list(paths)
        found: dict[str, tuple[str, Version | None]] = {}
        for start in range(0, len(wanted), _PARAMS):
            chunk = wanted[start:start + _PARAMS]
            rows = self._store._db.execute(
                "SELECT path, state, size, mtime_ns FROM transfer_files WHERE transfer = ? "
                f"AND path IN ({','.join('?' * len(chunk))})", (self._transfer, *chunk))
            found.update((path, (state, None if size is None else (size, mtime)))
                         for path, state, size, mtime in rows)
        return found

    def put(self, rows: Sequence[tuple[str, str, Version | None]]) -> None:
        """Set paths' states and handled versions, in one transaction."""
        self._store._transaction([(
            "INSERT INTO transfer_files (transfer, path, state, size, mtime_ns) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (transfer, path) DO UPDATE SET "
            "state = excluded.state, size = excluded.size, mtime_ns = excluded.mtime_ns",
            [(self._transfer, path, state, *(version or (None, None)))
             for path, state, version in rows])])

    def drop(self, paths: Iterable[str] | None = None) -> None:
        """Forget some paths, or (None) every file of the transfer."""
        if paths is None:
            self._store._db.execute("DELETE FROM transfer_files WHERE transfer = ?",
                                    (self._transfer,))
            return
        self._store._transaction([("DELETE FROM transfer_files WHERE transfer = ? AND path = ?",
                                   [(self._transfer, path) for path in paths])])

    @contextlib.contextmanager
    def lookup(self) -> Iterator[Callable[[str], tuple[str, Version | None] | None]]:
        """For a worker thread: one path's state and handled version, on its own connection."""
        with self._store.reader() as db:
            def one(path: str) -> tuple[str, Version | None] | None:
                row = db.execute(self._LOOKUP, (self._transfer, path)).fetchone()
                if row is None:
                    return None
                return row[0], None if row[1] is None else (row[1], row[2])
            yield one


def _status(doc: Doc) -> Any:
    return doc.get("status", "")


class ThrottledSaver:
    """Writes a changing record at most once per ``period`` seconds; a new milestone at once.

    A record's milestone is its status unless ``milestone`` says otherwise (e.g. also the
    processes a job started, which a restart must know about). Records are mutated in
    place, so a deferred write stores the latest state. Once a record leaves
    pending/running its bookkeeping is dropped.
    """

    def __init__(self, write: Callable[[Doc], None], period: float = 0.5,
                 milestone: Callable[[Doc], Any] = _status) -> None:
        self._write = write
        self._period = period
        self._milestone = milestone
        self._last: dict[str, tuple[float, Any]] = {}  # id -> (monotonic time, milestone) written
        self._deferred: dict[str, tuple[asyncio.TimerHandle, Doc]] = {}

    def save(self, doc: Doc, force: bool = False) -> None:
        key = doc["id"]
        last_time, last_milestone = self._last.get(key, (float("-inf"), None))
        wait = last_time + self._period - time.monotonic()
        if force or self._milestone(doc) != last_milestone or wait <= 0:
            self._now(doc)
        elif key not in self._deferred:
            handle = asyncio.get_running_loop().call_later(wait, self._now, doc)
            self._deferred[key] = (handle, doc)

    def _now(self, doc: Doc) -> None:
        key, status = doc["id"], doc.get("status", "")
        pending = self._deferred.pop(key, None)
        if pending:
            pending[0].cancel()
        self._write(doc)
        if status in ("pending", "running"):
            self._last[key] = (time.monotonic(), self._milestone(doc))
        else:
            self._last.pop(key, None)

    def flush(self) -> None:
        """Write every deferred record now (at shutdown)."""
        for _, doc in list(self._deferred.values()):
            self._now(doc)
