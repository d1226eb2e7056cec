"""Plan stub for an ESAF or beamtime proposal: select (or create) the experiment for it and
tie the ids to it on the gateway, which checks them in DM's APS DB service."""

from bluesky import plan_stubs as bps
from bluesky.utils import MsgGenerator

from ..devices import DMGateway
from .io import YES, expect, write

__all__ = ["select_beamtime"]


def select_beamtime(gateway: DMGateway, experiment: str, esaf_id: str = "",
                    proposal_id: str = "") -> MsgGenerator[None]:
    """Select ``experiment`` (created in DM if it has none), then tie the ESAF and proposal
    ids to it; raise GatewayError with the gateway's reason if DM refuses any step."""
    yield from write(gateway.beamtime, experiment_name=experiment)

    def selected() -> MsgGenerator[bool]:
        valid = yield from bps.rd(gateway.experiment.valid, default_value=YES)
        current = yield from bps.rd(gateway.experiment.experiment_name, default_value=experiment)
        return valid == YES and current == experiment

    yield from expect(gateway.beamtime, selected, f"DM experiment {experiment!r} not selected")
    for device, beamtime_id in ((gateway.esaf, esaf_id), (gateway.proposal, proposal_id)):
        if beamtime_id:  # DM's ids are numbers: the gateway shows them without leading zeros
            number = str(int(beamtime_id)) if beamtime_id.isdigit() else beamtime_id
            yield from write(device, beamtime_id=number)
