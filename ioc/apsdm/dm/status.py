"""DM's status vocabulary for DAQs, uploads and processing jobs (dm-protocol.md section 3):
the one definition of active, ended and failed, for the IOC, the embedded service and tests.

The bluesky package cannot import this (it only knows PV names): its copies are checked
against this module by ``tests/test_status_vocabulary.py``.
"""

from __future__ import annotations

#: still under way (DM's DM_ACTIVE_PROCESSING_STATUS_LIST)
ACTIVE_STATUSES = frozenset({"pending", "running"})
#: what a processing job ends with (apstools' WORKFLOW_DONE_STATES)
JOB_END_STATUSES = frozenset({"done", "failed", "timeout", "aborted"})
#: what a DAQ or upload ends with (apstools' upload wait; ``aborting`` has not ended yet)
TRANSFER_END_STATUSES = frozenset({"done", "failed", "skipped", "aborted"})
#: the one definition of "this DAQ, upload or job has ended"
TERMINAL_STATUSES = JOB_END_STATUSES | TRANSFER_END_STATUSES
#: ended, but not as asked: a readback with one of these carries a STATE alarm
FAILED_STATUSES = TERMINAL_STATUSES - {"done"}
