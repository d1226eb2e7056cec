"""The gateway IOC: PV schema, CA and PVA servers built from it, poller and commands."""
