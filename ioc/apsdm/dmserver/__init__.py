"""Embedded DM service: DM's REST protocol on loopback, backed by SQLite and real files.

The IOC starts it inside its own asyncio loop with :func:`start_service`; ``apsdm-server``
runs it alone. Clients configure themselves from the ``dm.setup.sh`` and ``dm.login`` files
it writes under its data root, exactly as against production DM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from apsdm.dm.config import Credentials
from apsdm.dm.errors import ConfigurationError, InvalidArgument
from apsdm.dm.routes import Service

from .apsdb import DATA_FILE as APS_DB_FILE
from .apsdb import ApsDb
from .catalog import Catalog
from .common import check_name
from .daq import DaqService, UploadService
from .experiments import Experiments
from .processing import Processing
from .rest import app_runner
from .store import Store
from .tls import is_loopback, server_context
from .watch import WatchHub

__all__ = ["EmbeddedService", "start_service"]

log = logging.getLogger(__name__)

LOGIN_USER = "dm"


@dataclass
class EmbeddedService:
    """A running embedded DM service: where it listens and the files that describe it."""

    url: str
    login_file: Path
    setup_file: Path
    station: str
    data_root: Path
    _runner: web.AppRunner = field(repr=False)
    _closers: list[Callable[[], Awaitable[None]]] = field(repr=False)  # shutdown, in order

    async def stop(self) -> None:
        """Stop serving, stop transfers and jobs (resumed or failed at the next start)."""
        await self._runner.cleanup()
        for close in self._closers:
            await close()
        log.info("DM service at %s stopped", self.url)


def _ensure_login_file(path: Path) -> Credentials:
    """Create ``dm|<random password>`` (mode 0600) on first start; keep it afterwards."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{LOGIN_USER}|{secrets.token_urlsafe(24)}\n")
        log.info("wrote DM login file %s (user %s)", path, LOGIN_USER)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("DM login file %s is readable by other users; chmod 600 it", path)
    return Credentials.from_login_file(path)


def _write_setup_file(path: Path, url: str, login_file: Path, station: str,
                      ca_file: Path | None) -> None:
    """Write dm.setup.sh pointing every DM service variable at this service (atomically)."""
    lines = [f"# DM environment of the embedded DM service at {url}",
             "# (written by apsdm-server at every start: the port may change)"]
    lines += [f"export DM_{svc.name}_WEB_SERVICE_URL={url}" for svc in Service]
    lines += [f"export DM_LOGIN_FILE={shlex.quote(str(login_file))}",
              f"export DM_STATION_NAME={station}"]
    if ca_file is not None:  # the certificate it serves: clients that verify trust it
        lines += [f"export DM_CA_FILE={shlex.quote(str(ca_file))}"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _url_host(host: str) -> str:
    """The host clients should use in the URL (a wildcard address means loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


async def start_service(data_root: Path, port: int = 0, host: str = "127.0.0.1",
                        station: str = "APSDM", tls: bool = False, cert: Path | None = None,
                        key: Path | None = None,
                        job_env: Mapping[str, str] | None = None) -> EmbeddedService:
    """Start the service in the running loop; returns once it listens (port 0: any free one).

    ``tls``: serve HTTPS with ``cert`` and ``key``, or a self-signed certificate made on
    first start. Plain HTTP is refused on an address other hosts reach: the DM password
    would cross the network in clear. ``job_env``: variables every workflow process gets
    over the service's own environment (the gateway passes its CA/PVA addresses, so
    streaming jobs find it on any ports).
    """
    try:
        check_name(station, "station name")
    except InvalidArgument as exc:
        raise ConfigurationError(exc.message) from None
    if not tls and not is_loopback(host):
        raise ConfigurationError(
            f"plain HTTP on {host} refused: other hosts would send the DM password in clear "
            "(serve TLS, or listen on loopback)")
    data_root = Path(data_root).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    ssl_context, ca_file = server_context(data_root, host, cert, key) if tls else (None, None)
    login_file = data_root / "dm.login"
    credentials = _ensure_login_file(login_file)
    store = Store(data_root / "dm.sqlite")
    hub = WatchHub()
    experiments = Experiments(store, data_root / "storage", station, credentials.username)
    catalog = Catalog(store, experiments.find)
    processing = Processing(store, data_root / "jobs", job_env)
    uploads = UploadService(store, experiments.find, catalog.add_files, processing)
    daqs = DaqService(store, experiments.find, catalog.add_files, hub, processing,
                      uploads.upload)

    async def close_rest() -> None:
        await hub.close()
        store.close()

    closers = [daqs.shutdown, uploads.shutdown, processing.shutdown, close_rest]
    aps_db = ApsDb(data_root / APS_DB_FILE)
    runner = app_runner(credentials, [experiments, daqs, uploads, processing, catalog, aps_db])
    try:
        processing.recover()
        daqs.recover()
        uploads.recover()
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        for close in closers:
            await close()
        raise
    bound_port = runner.addresses[0][1]
    url = f"{'https' if tls else 'http'}://{_url_host(host)}:{bound_port}"
    setup_file = data_root / "dm.setup.sh"
    _write_setup_file(setup_file, url, login_file, station, ca_file)
    log.info("DM service for station %s at %s (data root %s)", station, url, data_root)
    return EmbeddedService(url, login_file, setup_file, station, data_root, runner, closers)
