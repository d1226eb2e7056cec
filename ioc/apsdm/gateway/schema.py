"""The PV schema: the single source of truth for every PV the gateway serves, and what it does.

Both servers, ``db/``, the screens and the ophyd devices are built from (or tested
against) :func:`build`. Names follow DESIGN.md: settings ``X`` with readbacks ``X_RBV``,
busy-style ``bo`` commands, slots ``DAQn:``, ``UPn:``, ``WFn:``. Behaviour is declared
here too, in the spirit of caproto's ``PVGroup``: each readback names its DM source (a
record and a field, or a derivation), each writable PV its check and its command (a
method of :class:`~apsdm.gateway.commands.Commands`), each table its rows and columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from operator import attrgetter
from typing import Any

from apsdm.dm.records import Job, Stage
from apsdm.dm.status import FAILED_STATUSES

from . import checks
from .checks import STREAM_STATES as STREAM_STATES  # the handshake's states, served here

LONG_STRING = 4096  # bytes a long-string (char waveform) PV holds on CA
#: bytes a long string may hold over PVA where its field allows more (``pva_length``): DM
#: takes its arguments in the URL, base64 twice (x1.85), and httpx sends 64 KiB of URL at most
PVA_LONG_STRING = 32 * 1024
STRING = 40  # DBR_STRING
JOBS_SHOWN = 100  # rows of the Jobs table (newest first)


class Kind(StrEnum):
    """How a PV is represented on the wire and in db/."""

    STRING = "string"  # DBR_STRING, 40 characters
    LONGSTRING = "longstring"  # char waveform, `.$` access on CA
    LONG = "long"
    DOUBLE = "double"
    ENUM = "enum"
    BUSY = "busy"  # bo command: 1 while the action runs, put-callback completes at the end
    TABLE = "table"  # PVA NTTable only
    STREAM = "stream"  # PVA structure only


class Record(StrEnum):
    """What a readback or table reads from the DM-side state."""

    EXPERIMENT = "experiment"  # the selected Experiment (None: none selected)
    DAQ = "daq"  # the Daq its slot follows
    UPLOAD = "upload"  # the Upload its slot follows
    JOB = "job"  # the Job its slot follows
    SNAPSHOT = "snapshot"  # the last poll as a whole
    ESAF = "esaf"  # the Esaf tied to the selected experiment (None: none)
    PROPOSAL = "proposal"  # the Proposal tied to the selected experiment (None: none)


@dataclass(frozen=True)
class Source:
    """A readback's DM source: a record, the getter of its value, and the text of the STATE
    alarm the value raises (blank: none). No record (no experiment, an empty slot): the
    PV's :attr:`Field.initial` value, without an alarm."""

    record: Record
    get: Callable[[Any], Any]
    alarm: Callable[[Any], str] | None = None


def of(record: Record, attr: str, alarm: Callable[[Any], str] | None = None) -> Source:
    """A readback of one field of a DM record (e.g. the experiment's ``description``)."""
    return Source(record, attrgetter(attr), alarm)


@dataclass(frozen=True)
class Column:
    """A table column: name, p4p type code, and its getter of a row."""

    name: str
    code: str
    get: Callable[[Any], Any]


@dataclass(frozen=True)
class Table:
    """A table's rows (from a record) and columns."""

    record: Record
    rows: Callable[[Any], Iterable[Any]]
    columns: tuple[Column, ...]


ColumnSpec = tuple[str, str, "str | Callable[[Any], Any]"]


def table(record: Record, rows: Callable[[Any], Iterable[Any]],
          columns: tuple[ColumnSpec, ...]) -> Table:
    """A table from (name, p4p type code, row attribute or getter) column specs."""
    return Table(record, rows, tuple(
        Column(name, code, attrgetter(get) if isinstance(get, str) else get)
        for name, code, get in columns))


@dataclass(frozen=True)
class Field:
    """One PV of a group: its suffix, representation and role, and its behaviour:
    a readback's ``source``, a table's ``table``, a write's ``check`` and ``command``
    (the :class:`~apsdm.gateway.commands.Commands` method that handles it; default: a setting)."""

    suffix: str
    kind: Kind
    desc: str
    writable: bool = False
    enums: tuple[str, ...] = ()
    egu: str = ""
    autosave: bool = False
    source: Source | None = None
    table: Table | None = None
    check: checks.Check | None = None
    command: str = ""
    option: str = ""  # DAQ/upload settings: the DM daqInfo key Start passes the value as
    low: float = 0.0  # LONG, DOUBLE: display limits (LOPR, HOPR); equal: none
    high: float = 0.0
    pva_length: int = 0  # LONGSTRING: bytes it holds over PVA, beyond CA's (0: the same)

    @property
    def pva_only(self) -> bool:
        return self.kind in (Kind.TABLE, Kind.STREAM)

    @property
    def max_length(self) -> int:
        """Bytes the PV holds on CA (its char waveform's NELM), terminator included."""
        return LONG_STRING if self.kind is Kind.LONGSTRING else STRING

    def length(self, protocol: str) -> int:
        """Bytes the PV holds when written through ``protocol`` ("ca" or "pva")."""
        return max(self.max_length, self.pva_length) if protocol == "pva" else self.max_length

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        """TABLE: (name, p4p type code) of each column."""
        return tuple((c.name, c.code) for c in self.table.columns) if self.table else ()

    @property
    def initial(self) -> Any:
        """The value at start, and of a readback whose record is absent (an empty slot)."""
        if self.kind in (Kind.STRING, Kind.LONGSTRING):
            return ""
        if self.kind is Kind.DOUBLE:
            return 0.0
        if self.kind is Kind.TABLE:
            return []
        if self.kind is Kind.STREAM:
            return {"state": "idle", "message": "", "counter": 0, "timestamp": 0.0}
        return 0


@dataclass(frozen=True)
class PV:
    """A served PV: full name, the group it belongs to, its slot number and definition."""

    name: str
    group: str  # "Experiment", "DAQ", "UP", "WF", "Metadata", "Status", "" (top), "Stream"
    slot: int  # 1..n for slot groups, 0 otherwise
    field: Field

    @property
    def suffix(self) -> str:
        return self.field.suffix

    @property
    def is_rbv(self) -> bool:
        return self.field.suffix.endswith("_RBV")


def _f(suffix: str, kind: Kind, desc: str, **kw: object) -> Field:
    return Field(suffix, kind, desc, **kw)  # type: ignore[arg-type]


def failed_status(obj: Any) -> str:
    """The text of the STATE alarm of a DM object that ended not as asked (blank: none)."""
    return obj.status if obj.status in FAILED_STATUSES else ""


def _run_time(job: Job) -> float:
    """DM's run time, counted on from the start while the job runs."""
    if not job.finished and job.raw.get("startTime"):
        return round(time.time() - float(job.raw["startTime"]), 1)
    return round(job.run_time, 1)


def _stage_rows(job: Job) -> list[tuple[Stage, dict[str, Any]]]:
    """One row per stage and child process (a stage without children: one row)."""
    return [(st, child) for st in job.stages for child in st.children or ({},)]


def _newest_jobs(snap: Any) -> list[Job]:
    return sorted(snap.jobs.values(), key=lambda j: j.submission_time, reverse=True)[:JOBS_SHOWN]


S, LS, L, D, E, B = Kind.STRING, Kind.LONGSTRING, Kind.LONG, Kind.DOUBLE, Kind.ENUM, Kind.BUSY
NO_YES = ("No", "Yes")
EXP, DAQ_, UP_, JOB_, SNAP = (Record.EXPERIMENT, Record.DAQ, Record.UPLOAD, Record.JOB,
                              Record.SNAPSHOT)

EXPERIMENT = (
    _f("Name", S, "DM experiment to use", writable=True, autosave=True,
       command="select_experiment"),
    _f("Name_RBV", S, "Selected DM experiment", source=of(EXP, "name")),
    _f("Id_RBV", L, "Experiment id in DM", source=of(EXP, "id")),
    _f("Description_RBV", LS, "Experiment description", source=of(EXP, "description")),
    _f("Station_RBV", S, "Experiment station", source=of(EXP, "station")),
    _f("Type_RBV", S, "Experiment type", source=of(EXP, "type")),
    _f("DataDirectory_RBV", LS, "Experiment data directory", source=of(EXP, "data_directory")),
    _f("StorageDirectory_RBV", LS, "Experiment storage directory",
       source=of(EXP, "storage_directory")),
    _f("StartDate_RBV", S, "Experiment start date", source=of(EXP, "start_date")),
    _f("Users_RBV", LS, "Experiment users",
       source=Source(EXP, lambda e: ",".join(e.users))),
    _f("Valid_RBV", E, "Name resolved to a DM experiment", enums=NO_YES,
       source=Source(EXP, lambda _e: 1)),
    _f("Message_RBV", LS, "Why a selection was refused"),
)


def _transfer_counts(rec: Record) -> tuple[Field, ...]:
    """Readbacks DAQs and uploads share."""
    return (
        _f("Id_RBV", S, "DM id", source=of(rec, "id")),
        _f("Status_RBV", S, "DM status", source=of(rec, "status", failed_status)),
        _f("NFiles_RBV", L, "Files seen", source=of(rec, "n_files")),
        _f("NProcessed_RBV", L, "Files copied", source=of(rec, "n_processed")),
        _f("NErrors_RBV", L, "Files that failed",
           source=of(rec, "n_errors", lambda t: "copy errors" if t.n_errors else "")),
    )


def _transfer_options(rec: Record) -> tuple[Field, ...]:
    """The DM options a DAQ or upload slot passes at Start: the common ones as their own
    PVs, the rest as one JSON object; and the processing jobs the per-file workflow started."""
    return (
        _f("IncludeExtensions", LS, "Extensions to take, e.g. h5,hdf5", writable=True,
           autosave=True, option="includeFileExtensions"),
        _f("SkipPattern", LS, "Paths to skip, e.g. *.tmp,scratch/*", writable=True,
           autosave=True, option="skipFilePathPattern"),
        _f("Workflow", S, "Workflow to run once per file", writable=True, autosave=True,
           option="workflowName"),
        _f("WorkflowOwner", S, "Its owner (blank: DM user)", writable=True, autosave=True,
           check=checks.username, option="workflowOwner"),
        _f("WorkflowArgs", LS, "Per-file job args: key:value ...", writable=True,
           autosave=True, check=checks.workflow_args, option="workflowArgs"),
        _f("RemoveSource", E, "Delete source files once copied", writable=True,
           autosave=True, enums=NO_YES, option="removeSourceFiles"),
        _f("Options", LS, "More DM options, JSON object", writable=True, autosave=True,
           check=checks.dm_options_text),
        _f("NJobs_RBV", L, "Processing jobs started",
           source=Source(rec, lambda t: int(t.raw.get("nProcessingJobs") or 0))),
    )


def _percent(rec: Record) -> Field:
    return _f("Percent_RBV", D, "Percent complete", egu="%", high=100.0,
              source=Source(rec, lambda t: round(t.percent, 2)))


DAQ = (
    _f("DataDirectory", LS, "Local tree to monitor", writable=True, autosave=True,
       check=checks.absolute_path),
    _f("DestDirectory", LS, "Experiment subdirectory", writable=True, autosave=True,
       check=checks.relative_path),
    _f("Start", B, "Start (or reuse) the DAQ", writable=True, enums=("Done", "Start"),
       command="daq_start"),
    _f("Stop", B, "Stop the DAQ", writable=True, enums=("Done", "Stop"), command="daq_stop"),
    *_transfer_counts(DAQ_),
    _f("NWaiting_RBV", L, "Files waiting", source=of(DAQ_, "n_waiting")),
    _percent(DAQ_),
    _f("Active_RBV", E, "DAQ is running", enums=NO_YES,
       source=Source(DAQ_, lambda d: 1 if d.active else 0)),
    *_transfer_options(DAQ_),
    _f("Message_RBV", LS, "Last message"),
)

UPLOAD = (
    _f("Path", LS, "File or directory to upload", writable=True, autosave=True,
       check=checks.absolute_path),
    _f("DestDirectory", LS, "Experiment subdirectory", writable=True, autosave=True,
       check=checks.relative_path),
    _f("Mode", E, "Upload a file or a directory", writable=True, autosave=True,
       enums=("File", "Directory")),
    _f("Start", B, "Upload; done when it ends", writable=True, enums=("Done", "Start"),
       command="upload_start"),
    *_transfer_counts(UP_),
    _percent(UP_),
    *_transfer_options(UP_),
    _f("Message_RBV", LS, "Last message"),
)

STAGE_COLUMNS: tuple[ColumnSpec, ...] = (
    ("stage", "s", lambda r: r[0].id),
    ("child", "i", lambda r: int(r[1].get("childProcessNumber", -1))),
    ("status", "s", lambda r: str(r[1].get("status", r[0].status))),
    ("runTime", "d", lambda r: float(r[1].get("runTime") or 0.0)),
    ("exitStatus", "i", lambda r: int(r[1].get("exitStatus") or 0)),
    ("command", "s", lambda r: str(r[1].get("command", r[0].command))),
    ("stdOut", "s", lambda r: str(r[1].get("stdOut") or "")[-2000:]),
    ("stdErr", "s", lambda r: str(r[1].get("stdErr") or "")[-2000:]),
)

WORKFLOW = (
    _f("Name", S, "DM workflow name", writable=True, autosave=True),
    _f("Owner", S, "Workflow owner (blank: DM user)", writable=True, autosave=True,
       check=checks.username, command="owner_setting"),
    _f("Args", LS, "Job arguments, JSON object", writable=True, autosave=True,
       check=checks.job_args_text),
    _f("WaitForOthers", E, "Wait for other jobs of workflow", writable=True, autosave=True,
       enums=NO_YES),
    _f("Start", B, "Start a job; done when it ends", writable=True, enums=("Done", "Start"),
       command="workflow_start"),
    _f("JobId_RBV", S, "Processing job id", source=of(JOB_, "id")),
    _f("Status_RBV", S, "Job status", source=of(JOB_, "status", failed_status)),
    _f("Stage_RBV", S, "Current stage", source=of(JOB_, "stage")),
    _f("RunTime_RBV", D, "Job run time", egu="s", source=Source(JOB_, _run_time)),
    _f("StagesDone_RBV", L, "Stages finished",
       source=Source(JOB_, lambda j: sum(st.status in ("done", "failed") for st in j.stages))),
    _f("StagesTotal_RBV", L, "Stages in workflow", source=Source(JOB_, lambda j: len(j.stages))),
    _f("Message_RBV", LS, "Last message"),
    _f("Stages", Kind.TABLE, "Stages and child processes",
       table=table(JOB_, _stage_rows, STAGE_COLUMNS)),
)

METADATA = (
    _f("Json", LS, "Run metadata, JSON object", writable=True, check=checks.json_object_text,
       pva_length=PVA_LONG_STRING),  # CA shows the first 4 kB; PVA all of it
    _f("Upload", B, "Add metadata to DM catalog", writable=True, enums=("Done", "Upload"),
       command="metadata_upload"),
    _f("DatasetName_RBV", S, "Dataset name in DM catalog"),  # posted by metadata_upload
    _f("Message_RBV", LS, "Last message"),
)

# Connected_RBV and Message_RBV are the connection state's (Publisher); the rest set at start
STATUS = (
    _f("Connected_RBV", E, "DM reachable", enums=("Disconnected", "Connected")),
    _f("Message_RBV", LS, "Gateway health"),
    _f("Heartbeat_RBV", L, "Counts up every second"),
    _f("Version_RBV", S, "Gateway version"),
    _f("LastWriter_RBV", LS, "Who wrote last, what, when"),
    _f("DmUrl_RBV", LS, "DM service URL"),
    _f("DmRequests_RBV", L, "DM requests made", source=of(SNAP, "requests")),
    _f("PollPeriod_RBV", D, "DM poll period", egu="s"),
)


def _transfer_table(rows: Callable[[Any], Iterable[Any]]) -> Table:
    """The DAQs and Uploads tables: one row per transfer DM lists."""
    return table(SNAP, rows, (
        ("id", "s", "id"),
        ("experiment", "s", "experiment_name"),
        ("dataDirectory", "s", "data_directory"),
        ("destDirectory", "s", "dest_directory"),
        ("status", "s", "status"),
        ("nFiles", "i", "n_files"),
        ("nProcessed", "i", "n_processed"),
        ("nErrors", "i", "n_errors"),
        ("percent", "d", "percent")))


TABLES = (
    _f("Experiments", Kind.TABLE, "Experiments of this station", table=table(
        SNAP, attrgetter("experiments"), (
            ("name", "s", "name"),
            ("id", "i", "id"),
            ("station", "s", "station"),
            ("type", "s", "type"),
            ("startDate", "s", "start_date"),
            ("description", "s", "description")))),
    _f("DAQs", Kind.TABLE, "DAQs", table=_transfer_table(lambda s: s.daqs.values())),
    _f("Uploads", Kind.TABLE, "Uploads", table=_transfer_table(lambda s: s.uploads.values())),
    _f("Jobs", Kind.TABLE, "Processing jobs", table=table(SNAP, _newest_jobs, (
        ("id", "s", "id"),
        ("workflow", "s", "workflow_name"),
        ("owner", "s", "owner"),
        ("status", "s", "status"),
        ("stage", "s", "stage"),
        ("runTime", "d", "run_time"),
        ("submitted", "s", lambda j: str(j.raw.get("submissionTimestamp", ""))),
        ("errorMessage", "s", "error_message")))),
    _f("Workflows", Kind.TABLE, "Workflows", table=table(SNAP, attrgetter("workflows"), (
        ("name", "s", "name"),
        ("owner", "s", "owner"),
        ("stages", "i", lambda w: len(w.stages)),
        ("description", "s", "description")))),
)

# --- streaming: the handshake structures, their scalar mirrors on both protocols (ophyd
# signals and screens use them; a write to either form updates the other) and the
# workflow's results (frames lost, a JSON summary bluesky records in the run)


def _stream_side(side: str) -> tuple[Field, ...]:
    """One side of the handshake: the structure and its State, Message, Counter mirrors."""
    return (
        _f(side, Kind.STREAM, f"Streaming handshake: {side.lower()} side", writable=True,
           check=checks.stream_value, command="stream_whole"),
        _f(f"{side}:State", E, f"Stream {side.lower()} state", writable=True,
           enums=STREAM_STATES, command="stream_part"),
        _f(f"{side}:Message", LS, f"Stream {side.lower()} message", writable=True,
           command="stream_part"),
        _f(f"{side}:Counter", L, f"Stream {side.lower()} counter", writable=True,
           command="stream_part"),
    )


STREAM = (
    *_stream_side("Bluesky"),
    *_stream_side("Workflow"),
    _f("Workflow:Lost", L, "Frames the workflow lost", writable=True),
    _f("Workflow:Results", LS, "Workflow results, JSON object", writable=True,
       check=checks.json_object_text),
)

# --- ESAF and proposal of the selected experiment (APS DB service), like the apsbss IOC ---
# Esaf:Id / Proposal:Id tie an ESAF / a beamtime proposal to the selected experiment (kept per
# experiment across restarts); Beamtime:Experiment selects, or creates, the experiment for them.


def _beamtime(record: Record, what: str) -> tuple[Field, ...]:
    """Readbacks ESAFs and proposals share: id, title, PI, users, dates, found."""
    return (
        _f("Id", S, f"{what} id of the experiment", writable=True, check=checks.digits,
           command="select_beamtime"),
        _f("Id_RBV", S, f"{what} id", source=of(record, "id")),
        _f("Title_RBV", LS, f"{what} title", source=of(record, "title")),
        _f("Pi_RBV", LS, f"{what} principal investigator", source=of(record, "pi")),
        _f("Users_RBV", LS, f"{what} users", source=Source(record, lambda b: ", ".join(b.users))),
        _f("StartDate_RBV", S, f"{what} start", source=of(record, "start")),
        _f("EndDate_RBV", S, f"{what} end", source=of(record, "end")),
        _f("Valid_RBV", E, f"Id resolved to a {what}", enums=NO_YES,
           source=Source(record, lambda _b: 1)),
        _f("Message_RBV", LS, "Why an id was refused"),
    )


ESAF = (
    *_beamtime(Record.ESAF, "ESAF"),
    _f("Status_RBV", S, "ESAF status", source=of(Record.ESAF, "status")),
    _f("Sector_RBV", S, "ESAF sector", source=of(Record.ESAF, "sector")),
)

PROPOSAL = (
    *_beamtime(Record.PROPOSAL, "Proposal"),
    _f("Run_RBV", S, "Proposal run (cycle)", source=of(Record.PROPOSAL, "run")),
)

BEAMTIME = (
    _f("Experiment", S, "Select or create for ESAF/proposal", writable=True,
       command="beamtime_experiment"),
    _f("Message_RBV", LS, "Why it was refused"),
)


@dataclass(frozen=True)
class Layout:
    """Prefix and slot counts: everything that varies between gateway instances."""

    prefix: str = "DM:"
    n_daq: int = 4
    n_upload: int = 4
    n_workflow: int = 4


def build(layout: Layout = Layout()) -> list[PV]:
    """Every PV of a gateway with this prefix and these slot counts, in display order."""
    p = layout.prefix
    pvs = [PV(f"{p}Experiment:{f.suffix}", "Experiment", 0, f) for f in EXPERIMENT]
    for group, fields, count in (("DAQ", DAQ, layout.n_daq), ("UP", UPLOAD, layout.n_upload),
                                 ("WF", WORKFLOW, layout.n_workflow)):
        for n in range(1, count + 1):
            pvs += [PV(f"{p}{group}{n}:{f.suffix}", group, n, f) for f in fields]
    pvs += [PV(f"{p}Metadata:{f.suffix}", "Metadata", 0, f) for f in METADATA]
    pvs += [PV(f"{p}Status:{f.suffix}", "Status", 0, f) for f in STATUS]
    pvs += [PV(f"{p}{f.suffix}", "", 0, f) for f in TABLES]
    pvs += [PV(f"{p}Stream:{f.suffix}", "Stream", 0, f) for f in STREAM]
    pvs += [PV(f"{p}{g}:{f.suffix}", g, 0, f)
            for g, fields in (("Esaf", ESAF), ("Proposal", PROPOSAL), ("Beamtime", BEAMTIME))
            for f in fields]
    return pvs


def template(layout: Layout = Layout()) -> list[PV]:
    """The PVs of :func:`build` with the prefix written as the ``$(P)`` macro (db/, screens)."""
    return build(replace(layout, prefix="$(P)"))
