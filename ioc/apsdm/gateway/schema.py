"""The PV schema: the single source of truth for every PV the gateway serves.

Both servers, ``db/``, the screens and the ophyd devices are built from (or tested
against) :func:`build`. Names follow DESIGN.md: settings ``X`` with readbacks ``X_RBV``,
busy-style ``bo`` commands, slots ``DAQn:``, ``UPn:``, ``WFn:``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

LONG_STRING = 4096  # bytes a long-string (char waveform) PV holds
STRING = 40  # DBR_STRING


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


@dataclass(frozen=True)
class Field:
    """One PV of a group: its suffix, representation and role."""

    suffix: str
    kind: Kind
    desc: str
    writable: bool = False
    enums: tuple[str, ...] = ()
    egu: str = ""
    autosave: bool = False
    columns: tuple[tuple[str, str], ...] = ()  # TABLE: (name, p4p type code)
    low: float = 0.0  # LONG, DOUBLE: display limits (LOPR, HOPR); equal: none
    high: float = 0.0

    @property
    def pva_only(self) -> bool:
        return self.kind in (Kind.TABLE, Kind.STREAM)

    @property
    def max_length(self) -> int:
        return LONG_STRING if self.kind is Kind.LONGSTRING else STRING


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


S, LS, L, D, E, B = Kind.STRING, Kind.LONGSTRING, Kind.LONG, Kind.DOUBLE, Kind.ENUM, Kind.BUSY
NO_YES = ("No", "Yes")

EXPERIMENT = (
    _f("Name", S, "DM experiment to use", writable=True, autosave=True),
    _f("Name_RBV", S, "Selected DM experiment"),
    _f("Id_RBV", L, "Experiment id in DM"),
    _f("Description_RBV", LS, "Experiment description"),
    _f("Station_RBV", S, "Experiment station"),
    _f("Type_RBV", S, "Experiment type"),
    _f("DataDirectory_RBV", LS, "Experiment data directory"),
    _f("StorageDirectory_RBV", LS, "Experiment storage directory"),
    _f("StartDate_RBV", S, "Experiment start date"),
    _f("Users_RBV", LS, "Experiment users"),
    _f("Valid_RBV", E, "Name resolved to a DM experiment", enums=NO_YES),
    _f("Message_RBV", LS, "Why a selection was refused"),
)

_TRANSFER_COUNTS = (
    _f("Id_RBV", S, "DM id"),
    _f("Status_RBV", S, "DM status"),
    _f("NFiles_RBV", L, "Files seen"),
    _f("NProcessed_RBV", L, "Files copied"),
    _f("NErrors_RBV", L, "Files that failed"),
)

DAQ = (
    _f("DataDirectory", LS, "Local tree to monitor", writable=True, autosave=True),
    _f("DestDirectory", LS, "Experiment subdirectory", writable=True, autosave=True),
    _f("Start", B, "Start (or reuse) the DAQ", writable=True, enums=("Done", "Start")),
    _f("Stop", B, "Stop the DAQ", writable=True, enums=("Done", "Stop")),
    *_TRANSFER_COUNTS,
    _f("NWaiting_RBV", L, "Files waiting"),
    _f("Percent_RBV", D, "Percent complete", egu="%", high=100.0),
    _f("Active_RBV", E, "DAQ is running", enums=NO_YES),
    _f("Message_RBV", LS, "Last message"),
)

UPLOAD = (
    _f("Path", LS, "File or directory to upload", writable=True, autosave=True),
    _f("DestDirectory", LS, "Experiment subdirectory", writable=True, autosave=True),
    _f("Mode", E, "Upload a file or a directory", writable=True, autosave=True,
       enums=("File", "Directory")),
    _f("Start", B, "Upload; done when it ends", writable=True, enums=("Done", "Start")),
    *_TRANSFER_COUNTS,
    _f("Percent_RBV", D, "Percent complete", egu="%", high=100.0),
    _f("Message_RBV", LS, "Last message"),
)

STAGE_COLUMNS = (
    ("stage", "s"), ("child", "i"), ("status", "s"), ("runTime", "d"), ("exitStatus", "i"),
    ("command", "s"), ("stdOut", "s"), ("stdErr", "s"),
)

WORKFLOW = (
    _f("Name", S, "DM workflow name", writable=True, autosave=True),
    _f("Owner", S, "Workflow owner (blank: DM user)", writable=True, autosave=True),
    _f("Args", LS, "Job arguments, JSON object", writable=True, autosave=True),
    _f("WaitForOthers", E, "Wait for other jobs of workflow", writable=True, autosave=True,
       enums=NO_YES),
    _f("Start", B, "Start a job; done when it ends", writable=True, enums=("Done", "Start")),
    _f("JobId_RBV", S, "Processing job id"),
    _f("Status_RBV", S, "Job status"),
    _f("Stage_RBV", S, "Current stage"),
    _f("RunTime_RBV", D, "Job run time", egu="s"),
    _f("StagesDone_RBV", L, "Stages finished"),
    _f("StagesTotal_RBV", L, "Stages in workflow"),
    _f("Message_RBV", LS, "Last message"),
    _f("Stages", Kind.TABLE, "Stages and child processes", columns=STAGE_COLUMNS),
)

METADATA = (
    _f("Json", LS, "Run metadata, JSON object", writable=True),
    _f("Upload", B, "Add metadata to DM catalog", writable=True, enums=("Done", "Upload")),
    _f("DatasetName_RBV", S, "Dataset name in DM catalog"),
    _f("Message_RBV", LS, "Last message"),
)

STATUS = (
    _f("Connected_RBV", E, "DM reachable", enums=("Disconnected", "Connected")),
    _f("Message_RBV", LS, "Gateway health"),
    _f("Heartbeat_RBV", L, "Counts up every second"),
    _f("Version_RBV", S, "Gateway version"),
    _f("LastWriter_RBV", LS, "Who wrote last, what, when"),
    _f("DmUrl_RBV", LS, "DM service URL"),
    _f("DmRequests_RBV", L, "DM requests made"),
    _f("PollPeriod_RBV", D, "DM poll period", egu="s"),
)

TABLES = (
    _f("Experiments", Kind.TABLE, "Experiments of this station", columns=(
        ("name", "s"), ("id", "i"), ("station", "s"), ("type", "s"), ("startDate", "s"),
        ("description", "s"))),
    _f("DAQs", Kind.TABLE, "DAQs", columns=(
        ("id", "s"), ("experiment", "s"), ("dataDirectory", "s"), ("destDirectory", "s"),
        ("status", "s"), ("nFiles", "i"), ("nProcessed", "i"), ("nErrors", "i"),
        ("percent", "d"))),
    _f("Uploads", Kind.TABLE, "Uploads", columns=(
        ("id", "s"), ("experiment", "s"), ("dataDirectory", "s"), ("destDirectory", "s"),
        ("status", "s"), ("nFiles", "i"), ("nProcessed", "i"), ("nErrors", "i"),
        ("percent", "d"))),
    _f("Jobs", Kind.TABLE, "Processing jobs", columns=(
        ("id", "s"), ("workflow", "s"), ("owner", "s"), ("status", "s"), ("stage", "s"),
        ("runTime", "d"), ("submitted", "s"), ("errorMessage", "s"))),
    _f("Workflows", Kind.TABLE, "Workflows", columns=(
        ("name", "s"), ("owner", "s"), ("stages", "i"), ("description", "s"))),
)

STREAM_STATES = ("idle", "ready", "acquiring", "done", "error")
STREAM = (
    _f("Bluesky", Kind.STREAM, "Streaming handshake: bluesky side", writable=True),
    _f("Workflow", Kind.STREAM, "Streaming handshake: workflow side", writable=True),
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
    return pvs


def template(layout: Layout = Layout()) -> list[PV]:
    """The PVs of :func:`build` with the prefix written as the ``$(P)`` macro (db/, screens)."""
    return build(replace(layout, prefix="$(P)"))
