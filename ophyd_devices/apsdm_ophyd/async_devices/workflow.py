"""``WFn:``: start a DM processing job and follow it to its end."""

from ophyd_async.core import StandardReadable
from ophyd_async.core import StandardReadableFormat as Format

from .command import BusyCommand
from .enums import NoYes, StartCommand
from .signals import readback, setting
from .tables import StagesTable


class DMWorkflow(StandardReadable):
    """One workflow slot: set ``workflow_name`` and ``args`` (a JSON object), then
    ``start_job.set(StartCommand.START)`` completes when the job ends and fails if it failed."""

    def __init__(self, prefix: str, name: str = "") -> None:
        self.prefix = prefix
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.workflow_name = setting(str, prefix, "Name")
            self.owner = setting(str, prefix, "Owner")
            self.args = setting(str, prefix, "Args")
            self.wait_for_others = setting(NoYes, prefix, "WaitForOthers")
            self.job_id = readback(str, prefix, "JobId_RBV")
        with self.add_children_as_readables():
            self.job_status = readback(str, prefix, "Status_RBV")
            self.current_stage = readback(str, prefix, "Stage_RBV")
            self.stages_done = readback(int, prefix, "StagesDone_RBV")
            self.stages_total = readback(int, prefix, "StagesTotal_RBV")
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.run_time = readback(float, prefix, "RunTime_RBV")
        self.message = readback(str, prefix, "Message_RBV")
        self.stages = readback(StagesTable, prefix, "Stages")
        self.start_job = BusyCommand(StartCommand, prefix, "Start", self.message, self.job_status)
        super().__init__(name)
