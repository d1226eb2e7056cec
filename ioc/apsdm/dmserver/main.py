"""``apsdm-server``: run the embedded DM service alone until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from apsdm import logs
from apsdm.dm.errors import DmError

from . import start_service
from .tls import is_loopback

log = logging.getLogger("apsdm.dmserver.main")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apsdm-server",
        description="Embedded APS Data Management (DM) service: DM's REST protocol on one "
                    "port, with real file copies, subprocess workflows and state in SQLite. "
                    "Prints 'READY url=URL setup=FILE' once it listens; stops on SIGTERM/SIGINT.")
    parser.add_argument(
        "--data-root", type=Path, required=True, metavar="DIR",
        help="directory of all state: dm.sqlite, dm.login (created on first start, mode 0600), "
             "dm.setup.sh (rewritten at every start), storage/<STATION>/<experiment>/, "
             "jobs/<id>/ (job working directories) and apsdb.json (ESAFs and proposals, "
             "written by beamline staff; see apsdm.dmserver.apsdb)")
    parser.add_argument("--port", type=int, default=0, metavar="N",
                        help="TCP port to listen on; 0 (default) picks a free one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--station", default="APSDM", metavar="NAME",
                        help="DM station name written as DM_STATION_NAME and used for new "
                             "experiments (default APSDM)")
    parser.add_argument("--tls", choices=("auto", "on", "off"), default="auto",
                        help="serve HTTPS: 'auto' (default) on any address but loopback, or "
                             "when a certificate is given; plain HTTP is refused off loopback. "
                             "The certificate is named in dm.setup.sh as DM_CA_FILE")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                        help="TLS certificate (PEM) to serve; default: a self-signed one "
                             "made on first start, <data-root>/tls/dm.crt")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                        help="private key (PEM) of --tls-cert")
    parser.add_argument("--job-env", action="append", default=[], metavar="NAME=VALUE",
                        type=_assignment,
                        help="a variable every workflow process gets (repeat the option), "
                             "e.g. EPICS_PVA_NAME_SERVERS=host:port of the gateway it serves")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold of the messages written to stderr "
                             "(default INFO; DEBUG adds one line per HTTP request)")
    return parser


def _assignment(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``--job-env``, split; a name that is no variable name is refused."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


async def _serve(args: argparse.Namespace) -> None:
    tls = args.tls == "on" or (args.tls == "auto" and (
        args.tls_cert is not None or not is_loopback(args.host)))
    service = await start_service(args.data_root, args.port, args.host, args.station, tls,
                                  args.tls_cert, args.tls_key, job_env=dict(args.job_env))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY url={service.url} setup={service.setup_file}", flush=True)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await service.stop()


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit status 0 after a clean stop, 1 if the service cannot start."""
    args = _parser().parse_args(argv)
    logs.setup(args.log_level)
    try:
        asyncio.run(_serve(args))
    except (DmError, OSError) as exc:
        print(f"apsdm-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
