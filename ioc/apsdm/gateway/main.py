"""``apsdm-ioc``: the gateway IOC entry point (CA + PVA servers, DM-side state, poll loop,
publisher, commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

from apsdm import __version__, logs
from apsdm.dm import DmClient, DmConfig

from .ca import CaServer
from .commands import Commands
from .hub import AccessList, Hub
from .memory import bound_malloc_arenas, keep_started_objects
from .persist import Persistence
from .poller import Poller
from .publisher import Publisher
from .pva import PvaServer
from .schema import Layout, build
from .state import DmState

log = logging.getLogger("apsdm.gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="apsdm-ioc",
        description="EPICS gateway to APS Data Management: serves DM experiment, DAQ, upload "
                    "and processing-job state over Channel Access and PV Access, and turns "
                    "writes to command PVs into DM calls.")
    ap.add_argument("--prefix", default="DM:", help="PV name prefix $(P) (default: %(default)s)")
    ap.add_argument("--daq-slots", type=int, default=4, help="number of DAQn: slots (default 4)")
    ap.add_argument("--upload-slots", type=int, default=4, help="number of UPn: slots (default 4)")
    ap.add_argument("--workflow-slots", type=int, default=4,
                    help="number of WFn: slots (default 4)")
    ap.add_argument("--dm", choices=("embedded", "rest", "dm-package"), default="embedded",
                    help="DM backend: 'embedded' starts the embedded DM service in this process "
                         "(default); 'rest' talks to DM web services named by DM_* variables or "
                         "--dm-setup; 'dm-package' uses the conda 'dm' package (aps-dm-api)")
    ap.add_argument("--dm-setup", default="",
                    help="dm.setup.sh whose 'export DM_...' lines configure the DM client "
                         "(rest and dm-package backends; default: the environment)")
    ap.add_argument("--dm-timeout", type=float, default=10.0, metavar="S",
                    help="seconds the DM client waits for DM to connect or answer before the "
                         "IOC calls DM unreachable (default %(default)s)")
    ap.add_argument("--data-root", type=Path, default=Path("var/apsdm"),
                    help="directory for the gateway's state and, with the embedded backend, "
                         "DM's storage and database (default: %(default)s)")
    ap.add_argument("--dm-port", type=int, default=0,
                    help="embedded DM service HTTP port on 127.0.0.1 (0 = any free port)")
    ap.add_argument("--interface", default=os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "0.0.0.0"),
                    help="address the CA and PVA servers listen on "
                         "(default: $EPICS_CAS_INTF_ADDR_LIST or 0.0.0.0)")
    ap.add_argument("--ca-port", type=int, default=int(os.environ.get("EPICS_CA_SERVER_PORT", 5064)),
                    help="CA server port, TCP and UDP search (0 = pick a free port; "
                         "default $EPICS_CA_SERVER_PORT or 5064)")
    ap.add_argument("--pva-port", type=int,
                    default=int(os.environ.get("EPICS_PVAS_SERVER_PORT", 5075)),
                    help="PVA server TCP port (0 = pick free TCP and UDP search ports; default 5075)")
    ap.add_argument("--pva-broadcast-port", type=int, default=None,
                    help="PVA UDP search port (0 = pick a free port; default: picked with "
                         "--pva-port 0, else $EPICS_PVAS_BROADCAST_PORT or 5076)")
    ap.add_argument("--poll-period", type=float, default=1.0,
                    help="seconds between DM polls; each poll is one list call per kind "
                         "(default %(default)s)")
    ap.add_argument("--allow-write", nargs="*", default=[], metavar="HOST_OR_USER",
                    help="hosts, addresses or user names that may write PVs, on CA and PVA "
                         "(default: anyone)")
    ap.add_argument("--log-level", default="INFO",
                    choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    args = ap.parse_args(argv)
    for option in ("daq_slots", "upload_slots", "workflow_slots"):
        if not 0 <= getattr(args, option) <= 64:
            ap.error(f"--{option.replace('_', '-')} must be between 0 and 64")
    if args.poll_period <= 0:
        ap.error("--poll-period must be positive")
    if not 0 < args.dm_timeout < float("inf"):
        ap.error("--dm-timeout must be a positive number of seconds")
    return args


def free_port(interface: str, *, udp: bool = True) -> int:
    """A port free for TCP (and UDP) on ``interface``, for ``--*-port 0``."""
    host = "127.0.0.1" if interface in ("0.0.0.0", "") else interface
    while True:
        with socket.socket() as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            if not udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
                return port


def job_env(interface: str, ca_port: int, pva_port: int, pva_bcast: int,
            environ: dict[str, str] | None = None) -> dict[str, str]:
    """The EPICS environment that finds this gateway, for the workflow jobs it starts: its
    CA and PVA addresses first in the search lists (the rest of the lists kept, so a job
    still finds the beamline's other IOCs), and its PVA TCP port as a name server."""
    env = os.environ if environ is None else environ
    host = "127.0.0.1" if interface in ("0.0.0.0", "") else interface

    def first(name: str, address: str) -> str:
        rest = [a for a in env.get(name, "").split() if a != address]
        return " ".join([address, *rest])

    return {
        "EPICS_CA_ADDR_LIST": first("EPICS_CA_ADDR_LIST", f"{host}:{ca_port}"),
        "EPICS_PVA_ADDR_LIST": first("EPICS_PVA_ADDR_LIST", f"{host}:{pva_bcast}"),
        "EPICS_PVA_NAME_SERVERS": first("EPICS_PVA_NAME_SERVERS", f"{host}:{pva_port}"),
    }


async def make_dm(args: argparse.Namespace, env: dict[str, str]) -> tuple[Any, Any]:
    """The DM client for the chosen backend, and the embedded service when it runs here
    (its workflow jobs get ``env``: see :func:`job_env`)."""
    if args.dm == "embedded":
        from apsdm.dmserver import start_service  # the IOC only starts it, then talks HTTP

        service = await start_service(args.data_root / "dm", port=args.dm_port, job_env=env)
        config = DmConfig.from_env({}, setup_file=str(service.setup_file),
                                   timeout=args.dm_timeout)
        return DmClient(config), service
    config = DmConfig.from_env(setup_file=args.dm_setup, timeout=args.dm_timeout)
    if args.dm == "dm-package":
        from apsdm.dm.dmpkg import DmPackageClient

        return DmPackageClient(config), None
    return DmClient(config), None


async def heartbeat(hub: Hub, name: str) -> None:
    count = 0
    while True:
        count = (count + 1) % 2**31
        await hub.post(name, count)
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> None:
    layout = Layout(args.prefix, args.daq_slots, args.upload_slots, args.workflow_slots)
    args.data_root.mkdir(parents=True, exist_ok=True)
    ca_port = args.ca_port or free_port(args.interface)
    pva_port = args.pva_port or free_port(args.interface, udp=False)
    pva_bcast = args.pva_broadcast_port
    if pva_bcast is None:  # --pva-port 0 asks for a private PVA server: its search port too
        pva_bcast = int(os.environ.get("EPICS_PVAS_BROADCAST_PORT", 5076)) if args.pva_port else 0
    pva_bcast = pva_bcast or free_port(args.interface)
    os.environ["EPICS_CA_SERVER_PORT"] = str(ca_port)  # caproto reads its port from here

    dm, service = await make_dm(args, job_env(args.interface, ca_port, pva_port, pva_bcast))
    hub = Hub(build(layout), AccessList(frozenset(args.allow_write)))
    # both servers exist before the first post, so every value reaches both
    ca = CaServer(hub, [args.interface])
    pva = PvaServer(hub, {
        "EPICS_PVAS_INTF_ADDR_LIST": args.interface,
        "EPICS_PVAS_SERVER_PORT": str(pva_port),
        "EPICS_PVAS_BROADCAST_PORT": str(pva_bcast),
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1" if args.interface.startswith("127.") else "",
    })
    p = layout.prefix
    # data flows one way: DM -> poller -> state -> publisher -> PVs; PV -> commands -> DM
    state = DmState(Persistence(args.data_root / "ioc-state.json"), Publisher(hub))
    poller = Poller(dm, state, args.poll_period)
    commands = Commands(hub, dm, state, p)
    commands.register()
    await commands.restore()
    # shown on a PV and stdout: without any user:password@ part a URL may carry
    dm_url = re.sub(r"//[^/@]*@", "//", next(iter(dm.config.urls.values()), ""))
    await hub.post(f"{p}Status:Version_RBV", __version__)
    await hub.post(f"{p}Status:DmUrl_RBV", dm_url)
    await hub.post(f"{p}Status:PollPeriod_RBV", args.poll_period)
    await hub.post(f"{p}Status:Message_RBV", "starting")

    ca_port = await ca.start()
    pva_port, pva_bcast = pva.start()
    tasks = [asyncio.create_task(poller.run()),
             asyncio.create_task(heartbeat(hub, f"{p}Status:Heartbeat_RBV"))]
    keep_started_objects()
    print(f"READY ca_port={ca_port} pva_port={pva_port} pva_udp_port={pva_bcast} dm_url={dm_url}",
          flush=True)
    log.info("serving %d PVs with prefix %s (CA %d, PVA %d), DM at %s",
             len(hub.pvs), p, ca_port, pva_port, dm_url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pva.stop()
    await ca.stop()
    await state.flush()
    await dm.close()
    if service is not None:
        await service.stop()


def event_loop() -> asyncio.AbstractEventLoop:
    """The IOC's event loop: uvloop's (libuv), where each CA request costs fewer Python
    calls and system calls than on asyncio's own loop (bench/ioc_profile.py)."""
    import uvloop

    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bound_malloc_arenas()
    logs.setup(args.log_level)
    # caproto logs every refused put with a traceback; the gateway logs a one-line reason
    logging.getLogger("caproto.circ").setLevel(logging.CRITICAL)
    with asyncio.Runner(loop_factory=event_loop) as runner:
        runner.run(run(args))


if __name__ == "__main__":
    main()
