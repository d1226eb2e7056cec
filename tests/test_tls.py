"""HTTPS as real DM serves it: the embedded service over TLS (self-signed on first start, or a
given certificate, named in dm.setup.sh), driven by dmax (which never verifies, like the
vendor client) and by the gateway's client (which verifies against DM_CA_FILE when set);
plain HTTP is refused where other hosts could reach the password."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, DmServer, free_port
from test_dmax import Dmax, _esafs, _experiment
from test_dmax import dmax_client as dmax_client  # the fixture, on this module's dm_server

from apsdm.dm import CommunicationError, DmClient, DmConfig
from apsdm.dm.config import read_setup_file
from apsdm.dmserver.tls import server_context

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def dm_server(tmp_path: Path) -> Iterator[DmServer]:
    """apsdm-server with TLS on (a self-signed certificate made on first start)."""
    server = DmServer(tmp_path / "dm", free_port(udp=False), extra=["--tls", "on"])
    server.data_root.mkdir()
    server.start()
    yield server
    server.stop()


def test_dmax_sync_and_async_over_tls(dm_server: DmServer, dmax_client: Dmax) -> None:
    assert dm_server.url.startswith("https://127.0.0.1:")
    _experiment(dmax_client)
    _esafs(dmax_client)


def _list(config: DmConfig) -> list[str]:
    async def go() -> list[str]:
        async with DmClient(config) as dm:
            return [e.name for e in await dm.list_experiments()]

    return asyncio.run(go())


def test_client_verifies_against_the_ca_file_and_otherwise_as_the_vendor_client(
        dm_server: DmServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="apsdm.dm.client")
    setup = read_setup_file(dm_server.setup_file)
    assert Path(setup["DM_CA_FILE"]) == dm_server.data_root / "tls" / "dm.crt"
    assert (dm_server.data_root / "tls" / "dm.key").stat().st_mode & 0o077 == 0
    config = DmConfig.from_env({}, setup_file=str(dm_server.setup_file))
    assert _list(config) == []
    assert f"certificates verified against {setup['DM_CA_FILE']}" in caplog.text

    _context, stranger = server_context(tmp_path / "other", "127.0.0.1")  # another CA
    with pytest.raises(CommunicationError, match="CERTIFICATE_VERIFY_FAILED"):
        _list(DmConfig.from_env({**setup, "DM_CA_FILE": str(stranger)}))
    caplog.clear()
    assert _list(DmConfig.from_env({**setup, "DM_CA_FILE": ""})) == []  # no CA: not verified
    assert "certificates not verified (no DM_CA_FILE)" in caplog.text

    plain = {**setup, **{k: v.replace("https:", "http:") for k, v in setup.items()
                         if k.endswith("_WEB_SERVICE_URL")}}
    with pytest.raises(CommunicationError):  # no plain-HTTP answer on the TLS port
        _list(DmConfig.from_env(plain))


def test_off_loopback_the_server_never_speaks_plain_http(tmp_path: Path) -> None:
    root = tmp_path / "dm"
    root.mkdir()
    refused = subprocess.run([str(BIN / "apsdm-server"), "--data-root", str(root), "--host",
                              "0.0.0.0", "--tls", "off"], capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode == 1 and "plain HTTP on 0.0.0.0 refused" in refused.stderr

    _context, cert = server_context(tmp_path / "given", "127.0.0.1")  # a given certificate
    server = DmServer(root, free_port(udp=False), extra=[
        "--host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(cert.with_name("dm.key"))])
    server.start()
    try:  # TLS by default there, with the given certificate named for clients to verify
        assert server.url.startswith("https://127.0.0.1:")
        setup = read_setup_file(server.setup_file)
        assert setup["DM_CA_FILE"] == str(cert)
        assert _list(DmConfig.from_env({}, setup_file=str(server.setup_file))) == []
    finally:
        server.stop()
