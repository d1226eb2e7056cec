"""Ophyd devices for the apsdm-gateway IOC: every CA PV of DESIGN.md as an EpicsSignal.

Settings are ``config``, progress ``normal``/``hinted``, ids ``config`` and commands and
messages ``omitted``. Busy commands use put completion, so ``set(1)`` returns a Status that
finishes when the IOC's command ends. pyepics does not hand CA's put-callback status to
ophyd, so the Status of a refused command finishes too: the reason is in the slot's
``Message_RBV`` (with an alarm), which the plans check. Long strings are char waveforms
read and written as text.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, Kind
from p4p.client.thread import Context

from .pva import PvaChannels

__all__ = ["NO_YES", "UPLOAD_MODES", "DMBeamtime", "DMDaq", "DMEsaf", "DMExperiment",
           "DMGateway", "DMMetadata", "DMProposal", "DMStatus", "DMUpload", "DMWorkflow"]

#: Enum strings that plans write or compare (a test checks them against the IOC's schema).
NO_YES = ("No", "Yes")
UPLOAD_MODES = ("File", "Directory")


def _readback(suffix: str, kind: Kind = Kind.normal, text: bool = False) -> Cpt:
    """A read-only PV; ``text`` reads strings, enums and char waveforms as ``str``."""
    return Cpt(EpicsSignalRO, suffix, kind=kind, string=text)


def _setting(suffix: str, readback: str | None = None, kind: Kind = Kind.config,
             text: bool = True) -> Cpt:
    """A writable setting (``text``: a text or enum, else a number); the put completes once
    the IOC has taken it."""
    return Cpt(EpicsSignal, readback or suffix, write_pv=suffix, kind=kind, string=text,
               put_complete=True)


def _command(suffix: str) -> Cpt:
    """A busy-style command: ``set(1)`` finishes when the IOC's action ends."""
    return Cpt(EpicsSignal, suffix, kind=Kind.omitted, put_complete=True)


class _Concise(Device):
    """Keeps reprs to prefix and name so ``summary()`` and logs stay readable."""

    def _repr_info(self) -> Iterator[tuple[str, Any]]:
        yield ("prefix", self.prefix)
        yield ("name", self.name)


class DMExperiment(_Concise):
    """``Experiment:`` — select the DM experiment by name and see its fields."""

    experiment_name = _setting("Name", readback="Name_RBV", kind=Kind.normal)  # read() says which
    experiment_id = _readback("Id_RBV", Kind.config)
    description = _readback("Description_RBV", Kind.config, text=True)
    station = _readback("Station_RBV", Kind.config, text=True)
    experiment_type = _readback("Type_RBV", Kind.config, text=True)
    data_directory = _readback("DataDirectory_RBV", Kind.config, text=True)
    storage_directory = _readback("StorageDirectory_RBV", Kind.config, text=True)
    start_date = _readback("StartDate_RBV", Kind.config, text=True)
    users = _readback("Users_RBV", Kind.config, text=True)
    valid = _readback("Valid_RBV", text=True)
    message = _readback("Message_RBV", Kind.omitted, text=True)


class _Transfer(_Concise):
    """What DAQs and uploads share: a destination in the experiment, the DM options Start
    passes (the common ones, and the rest as a JSON object), copy progress and the count of
    processing jobs the per-file workflow started."""

    dest_directory = _setting("DestDirectory")
    include_extensions = _setting("IncludeExtensions")
    skip_pattern = _setting("SkipPattern")
    workflow = _setting("Workflow")
    workflow_owner = _setting("WorkflowOwner")
    workflow_args = _setting("WorkflowArgs")
    remove_source = _setting("RemoveSource")
    options = _setting("Options")
    n_jobs = _readback("NJobs_RBV")
    n_files = _readback("NFiles_RBV")
    n_processed = _readback("NProcessed_RBV", Kind.hinted)
    n_errors = _readback("NErrors_RBV")
    percent = _readback("Percent_RBV")
    message = _readback("Message_RBV", Kind.omitted, text=True)


class DMDaq(_Transfer):
    """``DAQn:`` — a DAQ that copies new files of a local tree into experiment storage."""

    data_directory = _setting("DataDirectory")
    start_daq = _command("Start")
    stop_daq = _command("Stop")
    daq_id = _readback("Id_RBV", Kind.config, text=True)
    daq_status = _readback("Status_RBV", text=True)
    n_waiting = _readback("NWaiting_RBV")
    active = _readback("Active_RBV", text=True)


class DMUpload(_Transfer):
    """``UPn:`` — upload one file or a directory tree into experiment storage."""

    path = _setting("Path")
    mode = _setting("Mode")
    start_upload = _command("Start")
    upload_id = _readback("Id_RBV", Kind.config, text=True)
    upload_status = _readback("Status_RBV", text=True)


class DMWorkflow(_Concise):
    """``WFn:`` — start a DM processing job and follow it (stages table: PVA ``WFn:Stages``)."""

    workflow_name = _setting("Name")
    owner = _setting("Owner")
    args = _setting("Args")
    wait_for_others = _setting("WaitForOthers")
    start_job = _command("Start")
    job_id = _readback("JobId_RBV", Kind.config, text=True)
    job_status = _readback("Status_RBV", text=True)
    current_stage = _readback("Stage_RBV", text=True)
    run_time = _readback("RunTime_RBV", Kind.hinted)
    stages_done = _readback("StagesDone_RBV")
    stages_total = _readback("StagesTotal_RBV")
    message = _readback("Message_RBV", Kind.omitted, text=True)


class DMMetadata(_Concise):
    """``Metadata:`` — add a run's metadata (a JSON object) to DM's dataset catalog."""

    json = _setting("Json", kind=Kind.omitted)
    upload = _command("Upload")
    dataset_name = _readback("DatasetName_RBV", Kind.config, text=True)
    message = _readback("Message_RBV", Kind.omitted, text=True)


class DMStatus(_Concise):
    """``Status:`` — gateway health: DM reachable, heartbeat, version, last writer."""

    connected = _readback("Connected_RBV", text=True)
    message = _readback("Message_RBV", Kind.omitted, text=True)
    heartbeat = _readback("Heartbeat_RBV", Kind.omitted)
    version = _readback("Version_RBV", Kind.config, text=True)
    last_writer = _readback("LastWriter_RBV", Kind.omitted, text=True)
    dm_url = _readback("DmUrl_RBV", Kind.config, text=True)
    dm_requests = _readback("DmRequests_RBV", Kind.omitted)
    poll_period = _readback("PollPeriod_RBV", Kind.config)


class _Beamtime(_Concise):
    """What ESAFs and proposals share: the id tied to the experiment and its APS DB fields."""

    beamtime_id = _setting("Id", readback="Id_RBV", kind=Kind.normal)  # read() says which
    title = _readback("Title_RBV", Kind.config, text=True)
    pi = _readback("Pi_RBV", Kind.config, text=True)
    users = _readback("Users_RBV", Kind.config, text=True)
    start_date = _readback("StartDate_RBV", Kind.config, text=True)
    end_date = _readback("EndDate_RBV", Kind.config, text=True)
    valid = _readback("Valid_RBV", text=True)
    message = _readback("Message_RBV", Kind.omitted, text=True)


class DMEsaf(_Beamtime):
    """``Esaf:`` — the ESAF of the selected experiment (DM's APS DB service), as apsbss."""

    esaf_status = _readback("Status_RBV", Kind.config, text=True)
    sector = _readback("Sector_RBV", Kind.config, text=True)


class DMProposal(_Beamtime):
    """``Proposal:`` — the beamtime proposal of the selected experiment, as apsbss."""

    run = _readback("Run_RBV", Kind.config, text=True)


class DMBeamtime(_Concise):
    """``Beamtime:`` — select the experiment for an ESAF/proposal, creating it if DM has none."""

    experiment_name = _setting("Experiment")
    message = _readback("Message_RBV", Kind.omitted, text=True)


class DMStreamSide(_Concise):
    """``Stream:Bluesky:`` / ``Stream:Workflow:`` — one side of the streaming handshake as
    scalars (the IOC keeps them and the PVA structure ``Stream:Bluesky`` one value)."""

    state = _setting("State", kind=Kind.normal)
    message = _setting("Message", kind=Kind.omitted)
    counter = _setting("Counter", kind=Kind.normal, text=False)


class DMStreamWorkflow(DMStreamSide):
    """``Stream:Workflow:`` — the workflow's side, with the frames it lost and its results."""

    lost = _setting("Lost", kind=Kind.normal, text=False)
    results = _setting("Results", kind=Kind.omitted)


class DMStream(_Concise):
    """``Stream:`` — both sides of the streaming handshake; each side writes its own."""

    bluesky = Cpt(DMStreamSide, "Bluesky:")
    workflow = Cpt(DMStreamWorkflow, "Workflow:")


SLOT_GROUPS = (("daq", DMDaq, "DAQ"), ("up", DMUpload, "UP"), ("wf", DMWorkflow, "WF"))


class DMGateway(_Concise):
    """The whole gateway: experiment, metadata, health and ``daq1..``, ``up1..``, ``wf1..``.

    Slot counts vary per IOC, so the class with that many slot components is made (once
    per combination of counts) when an instance is created. ``pva_context`` reaches the
    PVA-only PVs (None: the process-wide context, from the ``EPICS_PVA_*`` environment).
    """

    experiment = Cpt(DMExperiment, "Experiment:")
    metadata = Cpt(DMMetadata, "Metadata:", kind=Kind.config)
    health = Cpt(DMStatus, "Status:", kind=Kind.config)
    esaf = Cpt(DMEsaf, "Esaf:", kind=Kind.config)
    proposal = Cpt(DMProposal, "Proposal:", kind=Kind.config)
    beamtime = Cpt(DMBeamtime, "Beamtime:", kind=Kind.omitted)
    stream = Cpt(DMStream, "Stream:", kind=Kind.omitted)
    slot_counts: tuple[int, int, int] | None = None  # set on the generated classes

    def __new__(cls, prefix: str = "DM:", *, n_daq: int = 4, n_upload: int = 4,
                n_workflow: int = 4, **kwargs: Any) -> DMGateway:
        counts = (n_daq, n_upload, n_workflow)
        return super().__new__(cls if cls.slot_counts == counts else _gateway_class(cls, counts))

    def __init__(self, prefix: str = "DM:", *, n_daq: int = 4, n_upload: int = 4,
                 n_workflow: int = 4, name: str = "dm", pva_context: Context | None = None,
                 **kwargs: Any) -> None:
        super().__init__(prefix, name=name, **kwargs)
        self.n_daq, self.n_upload, self.n_workflow = n_daq, n_upload, n_workflow
        self.pva_context = pva_context

    @property
    def pva(self) -> PvaChannels:
        """The gateway's PVA-only PVs (stream handshake, tables) as ophyd Signals."""
        return PvaChannels(self.prefix, self.pva_context)

    def _repr_info(self) -> Iterator[tuple[str, Any]]:
        yield from super()._repr_info()
        yield from (("n_daq", self.n_daq), ("n_upload", self.n_upload),
                    ("n_workflow", self.n_workflow))

    def daq(self, n: int) -> DMDaq:
        """DAQ slot ``n`` (1-based, as in the PV names)."""
        return self._slot("daq", n)

    def upload(self, n: int) -> DMUpload:
        """Upload slot ``n`` (1-based)."""
        return self._slot("up", n)

    def workflow(self, n: int) -> DMWorkflow:
        """Workflow slot ``n`` (1-based)."""
        return self._slot("wf", n)

    def _slot(self, group: str, n: int) -> Any:
        try:
            return getattr(self, f"{group}{int(n)}")
        except AttributeError:
            raise ValueError(f"{self.name} has no slot {group}{n}") from None


@cache
def _gateway_class(base: type[DMGateway], counts: tuple[int, int, int]) -> type[DMGateway]:
    """A subclass of ``base`` with one component per slot, named like the PVs."""
    attrs: dict[str, Any] = {"slot_counts": counts, "__module__": base.__module__}
    for (attr, device, group), count in zip(SLOT_GROUPS, counts, strict=True):
        for n in range(1, count + 1):
            attrs[f"{attr}{n}"] = Cpt(device, f"{group}{n}:")
    return type(base.__name__, (base,), attrs)
