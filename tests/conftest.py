"""Fixtures that start the real things: the embedded DM service and the IOC, each as a
subprocess on loopback with its own ports, data root and EPICS environment."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _pytest.nodeid import coerce_node_id

BIN = Path(sys.executable).parent
READY_TIMEOUT = 60.0


def free_port(udp: bool = True) -> int:
    """A loopback port free for TCP (and UDP, as CA and PVA search need)."""
    while True:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if not udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def epics_env(ca_port: int, pva_port: int, pva_bcast: int) -> dict[str, str]:
    """Client environment that finds exactly one IOC on loopback, over CA and PVA."""
    return {
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{ca_port}",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(ca_port),
        "EPICS_CA_REPEATER_PORT": str(free_port()),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_ADDR_LIST": f"127.0.0.1:{pva_bcast}",
        "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{pva_port}",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_BROADCAST_PORT": str(pva_bcast),
    }


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server and wait for its READY line; fail fast if it exits."""
    fh = log.open("a")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    buffer = ""
    while time.monotonic() < deadline:
        chunk = proc.stdout.readline()
        buffer += chunk or ""
        if "READY" in buffer:
            os.set_blocking(proc.stdout.fileno(), True)
            return proc, buffer
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} not ready in {READY_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass
class DmServer:
    """The embedded DM service running alone (``apsdm-server``)."""

    data_root: Path
    port: int
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    extra: list[str] = field(default_factory=list)  # more apsdm-server options (--tls on)

    @property
    def setup_file(self) -> Path:
        return self.data_root / "dm.setup.sh"

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc, line = _start(
            [str(BIN / "apsdm-server"), "--data-root", str(self.data_root), "--port", str(self.port),
             "--log-level", "DEBUG", *self.extra], self.data_root.parent / "dm-server.log", env)
        self.url = re.search(r"url=(\S+)", line).group(1)  # type: ignore[union-attr]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)

    def client(self) -> Any:
        from apsdm.dm import DmClient, DmConfig

        return DmClient(DmConfig.from_env({}, setup_file=str(self.setup_file)))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Grouped tests first (the load group, whose 10-minute soak is the longest test), so with
    two workers the soak starts at once and the rest of the suite runs beside it; and the
    group made to hold.

    pytest-xdist 3.8's ``--dist loadgroup`` (after the other hooks, so ``trylast``) tags a
    grouped test as ``<nodeid>@<group>`` by setting ``item._nodeid``, but pytest 9.2 reads
    ``Node.nodeid`` from ``Node._id``: the tag was lost and every grouped test ran beside
    the others. The tag is moved to where pytest reads it; tests/test_suite_grouping.py
    fails if either side changes shape.
    """
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
    for item in items:
        tagged = item.__dict__.get("_nodeid")
        if tagged and tagged != item.nodeid:
            item._id = coerce_node_id(tagged)


_CHILD_ENV = "APSDM_TEST_CHILD"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``own_process`` test in a new interpreter and fail if it fails there.

    pyepics keeps one libca context per process and the suite re-creates it for every IOC
    (``use_ca``); a test that restarts an IOC under dozens of live CA channels has crashed
    the worker process (SIGSEGV inside libca) when it ran after many other tests, and never
    alone. In its own process it starts from a clean libca, with every assertion intact.
    """
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(_CHILD_ENV):
        return None
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-o", "addopts=", pyfuncitem.nodeid], cwd=root, capture_output=True, text=True,
        env={**os.environ, _CHILD_ENV: "1"}, timeout=600)
    if child.returncode != 0:
        pytest.fail(f"in its own process, exit {child.returncode}:\n"
                    f"{child.stdout[-6000:]}\n{child.stderr[-3000:]}", pytrace=False)
    return True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures tests recorded (``record_property("figures", text)``) after the run,
    on the controller, so they reach the output with two workers too (load, soak)."""
    for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        for name, text in report.user_properties:
            if name == "figures" and report.when == "call":
                terminalreporter.write_sep("-", f"figures: {report.nodeid}")
                terminalreporter.write_line(str(text))


@pytest.fixture
def dm_server(tmp_path: Path) -> Iterator[DmServer]:
    server = DmServer(tmp_path / "dm", free_port(udp=False))
    server.data_root.mkdir()
    server.start()
    yield server
    server.stop()


@dataclass
class Ioc:
    """A running ``apsdm-ioc`` and the client environment that reaches it."""

    data_root: Path
    prefix: str
    extra: list[str] = field(default_factory=list)
    ca_port: int = 0
    pva_port: int = 0
    pva_bcast: int = 0
    dm_url: str = ""
    proc: subprocess.Popen[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    any_ports: bool = False  # as a new user starts it: ports 0, no EPICS_* environment

    @property
    def setup_file(self) -> Path:
        return self.data_root / "dm" / "dm.setup.sh"

    def start(self) -> None:
        if self.any_ports:
            ports = ["--ca-port", "0", "--pva-port", "0"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        else:
            if not self.ca_port:  # keep the ports across restarts: clients reconnect by themselves
                self.ca_port, self.pva_port, self.pva_bcast = (free_port(), free_port(udp=False),
                                                               free_port())
                self.env = epics_env(self.ca_port, self.pva_port, self.pva_bcast)
            ports = ["--ca-port", str(self.ca_port), "--pva-port", str(self.pva_port),
                     "--pva-broadcast-port", str(self.pva_bcast)]
            env = {**os.environ, **self.env}
        cmd = [str(BIN / "apsdm-ioc"), "--prefix", self.prefix, "--data-root", str(self.data_root),
               "--interface", "127.0.0.1", *ports, "--poll-period", "0.25", "--log-level", "DEBUG",
               *self.extra]
        self.proc, line = _start(cmd, self.data_root / "ioc.log", {**env, "PYTHONUNBUFFERED": "1"})
        self.dm_url = re.search(r"dm_url=(\S*)", line).group(1)  # type: ignore[union-attr]
        if self.any_ports:  # the ports it picked, from its READY line
            found = dict(re.findall(r"(\w+_port)=(\d+)", line))
            self.ca_port, self.pva_port, self.pva_bcast = (
                int(found["ca_port"]), int(found["pva_port"]), int(found["pva_udp_port"]))
            self.env = epics_env(self.ca_port, self.pva_port, self.pva_bcast)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pva_context(self, nt: bool = True) -> Any:
        """A p4p client context for this IOC; ``nt=False`` gives plain Values (no unwrapping)."""
        from p4p.client.thread import Context

        conf = {k: v for k, v in self.env.items() if k.startswith("EPICS_PVA")}
        return Context("pva", conf=conf, useenv=False, nt=None if nt else False)

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix

    def dm_client(self) -> Any:
        from apsdm.dm import DmClient, DmConfig

        return DmClient(DmConfig.from_env({}, setup_file=str(self.setup_file)))

    def log(self) -> str:
        return (self.data_root / "ioc.log").read_text()


#: the libca contexts use_ca made, each destroyed when the next replaces it; the process's
#: first context is not among them and stays: ophyd's callback threads attached to it when
#: ophyd was imported, and would call into it freed
_MADE_CONTEXTS: set[int] = set()


def use_ca(env: dict[str, str]) -> None:
    """Point pyepics (libca, one context per process) at this test's IOC, on a new libca
    context: libca reads the address list when a context makes its first channel."""
    import epics

    # PVs of earlier tests must let go of the old context first, or their
    # garbage collection later crashes inside libca (pyepics' clear_cache docs); type(), not
    # isinstance(): an unconnected ophyd-async PVA converter raises even on __class__
    for obj in gc.get_objects():
        if issubclass(type(obj), epics.PV) and obj.context is not None:
            # ophyd's shim PV narrows clear_callbacks() and refuses released PVs; the
            # subscription is gone by the time either complains
            with contextlib.suppress(TypeError, RuntimeError):
                obj.disconnect()
    old = epics.ca.current_context() if epics.ca.libca else None
    epics.ca.clear_cache()  # clears every channel, then detaches the old context for a new one
    if old in _MADE_CONTEXTS:
        # pyepics only detaches the old context: left alive, each kept its threads and its
        # searches for an IOC long gone, and a worker that had run a hundred IOC tests
        # crashed inside libca now and then; no thread uses it again, so it is destroyed
        _MADE_CONTEXTS.discard(old)
        fresh = epics.ca.current_context()
        epics.ca.detach_context()
        epics.ca.attach_context(old)
        epics.ca.libca.ca_context_destroy()
        epics.ca.attach_context(fresh)
    os.environ.update(env)
    epics.ca.initialize_libca()
    _MADE_CONTEXTS.add(epics.ca.current_context())


def make_ioc(tmp_path: Path, *extra: str, any_ports: bool = False) -> Ioc:
    root = tmp_path / "ioc"
    root.mkdir(exist_ok=True)
    ioc = Ioc(root, f"T{uuid.uuid4().hex[:6]}:", list(extra), any_ports=any_ports)
    ioc.start()
    try:
        use_ca(ioc.env)
    except BaseException:
        ioc.stop()  # never leave an IOC behind when the client side fails
        raise
    return ioc


@pytest.fixture
def ioc(tmp_path: Path) -> Iterator[Ioc]:
    """The IOC on the embedded DM service, with pyepics pointed at it."""
    running = make_ioc(tmp_path)
    yield running
    running.stop()


@pytest.fixture
def dm(ioc: Ioc) -> Any:
    """An async DM client for the IOC's embedded DM service (for test set-up)."""
    return ioc.dm_client()


# --- the bluesky side (tests/test_plan*.py) -----------------------------------------


@pytest.fixture
def gateway(ioc: Ioc, ctx: Any) -> Any:
    """The whole gateway as one ophyd device, connected, with this test's PVA context."""
    from apsdm_ophyd import DMGateway

    gw = DMGateway(ioc.prefix, name="dm", pva_context=ctx)
    gw.wait_for_connection(timeout=30)
    return gw


@pytest.fixture
def RE() -> Any:
    """A RunEngine that hands back the plan's return value."""
    from bluesky import RunEngine

    return RunEngine({}, call_returns_result=True)


@pytest.fixture
def ctx(ioc: Ioc) -> Iterator[Any]:
    """A p4p client context for this test's IOC."""
    context = ioc.pva_context()
    yield context
    context.close()
