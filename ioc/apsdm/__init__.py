"""apsdm-gateway: an EPICS (CA + PVA) gateway to the APS Data Management system."""

__version__ = "0.1.0"
