"""bluesky-queueserver startup: the RunEngine ``RE``, the gateway ``dm`` (prefix ``$APSDM_PREFIX``,
default ``DM:``), the simulated detector ``det`` and apsdm_ophyd's plans, annotated for the queue.

The RE Manager runs this file in its worker; ``dm`` reaches the IOC through the ``EPICS_*``
environment of the RE Manager (its PVA PVs through the process-wide p4p context). Opening the
environment waits up to ``$APSDM_CONNECT_TIMEOUT`` s (default 10) for ``dm`` to connect, so the
first plan does not meet channels still connecting; an IOC that is down is logged, not fatal
(the plans then say which PV did not answer).
"""

import logging
import os

from bluesky import RunEngine
from bluesky_queueserver import parameter_annotation_decorator
from ophyd.sim import det  # noqa: F401 (the queue finds devices by name here)

import apsdm_ophyd

RE = RunEngine({})
dm = apsdm_ophyd.DMGateway(os.environ.get("APSDM_PREFIX", "DM:"), name="dm")
try:
    dm.wait_for_connection(timeout=float(os.environ.get("APSDM_CONNECT_TIMEOUT", "10")))
except TimeoutError as exc:
    logging.getLogger("apsdm_ophyd").warning("%s not connected at startup: %s", dm.prefix, exc)

#: ``gateway`` takes the name of a DMGateway of this profile, ``detectors`` readable devices
GATEWAY = {"annotation": "Gateways", "devices": {"Gateways": ["dm"]}}
DETECTORS = {"annotation": "typing.List[__READABLE__]"}

setup_user = parameter_annotation_decorator({"parameters": {"gateway": GATEWAY}})(
    apsdm_ophyd.setup_user)
file_collection_plan, streaming_collection_plan = (
    parameter_annotation_decorator({"parameters": {"gateway": GATEWAY, "detectors": DETECTORS}})(plan)
    for plan in (apsdm_ophyd.file_collection_plan, apsdm_ophyd.streaming_collection_plan))
