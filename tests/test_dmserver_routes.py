"""Raw-HTTP tests of the embedded DM service's protocol layer: login, sessions, DM's error
headers, argument decoding, unknown objects, the files it writes and ``apsdm-server``.

Requests are built with httpx and :mod:`apsdm.dm.routes` only (no DM client), so these
tests pin the wire behaviour every client relies on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from apsdm.dm import wire
from apsdm.dm.config import read_setup_file
from apsdm.dm.routes import LOGIN_PATH, ROUTES
from apsdm.dmserver import EmbeddedService, start_service

STATION = "APSDM"


class LoopThread:
    """An asyncio loop in a thread, as the IOC would host the service in its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def service(tmp_path: Path, loop_thread: LoopThread) -> Iterator[EmbeddedService]:
    svc = loop_thread.run(start_service(tmp_path / "dm", station=STATION))
    yield svc
    loop_thread.run(svc.stop())


def credentials(svc: EmbeddedService) -> dict[str, str]:
    user, _, password = svc.login_file.read_text().strip().partition("|")
    return {"username": user, "password": password}


@pytest.fixture
def http(service: EmbeddedService) -> Iterator[httpx.Client]:
    """A logged-in client (the cookie jar keeps the session)."""
    with httpx.Client(base_url=service.url, timeout=20) as client:
        assert client.post(LOGIN_PATH, data=credentials(service)).status_code == 200
        yield client


def call(client: httpx.Client, route_name: str, /, **values: object) -> httpx.Response:
    route = ROUTES[route_name]
    return client.request(route.method, route.url(**values), headers={"Content-Type": "html"})


def raw(client: httpx.Client, method: str, path: str) -> httpx.Response:
    """Send a path exactly as written (httpx would not re-encode it anyway)."""
    return client.request(method, path)


def ok(resp: httpx.Response) -> object:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Dm-Status-Code"] == "0", resp.headers.get("Dm-Status-Message")
    return resp.json()


def dm_error(resp: httpx.Response, code: int, name: str, status: int = 200) -> str:
    """Check DM's error answer (headers and JSON body agree); return the message."""
    assert resp.status_code == status, resp.text
    assert resp.headers["Dm-Status-Code"] == str(code), resp.headers.get("Dm-Status-Message")
    assert resp.headers["Dm-Exception-Type"] == name
    message = resp.headers["Dm-Status-Message"]
    assert message and message.isascii() and message.isprintable()  # one header line
    body = resp.json()
    assert body["errorCode"] == code
    assert body["exceptionType"] == name
    assert body["errorMessage"]
    assert "Traceback" not in resp.text
    return str(body["errorMessage"])


def add_experiment(client: httpx.Client, name: str) -> dict:
    return ok(call(client, "addExperiment", name=name, stationName=STATION, typeName="TEST",
                   description="test"))  # type: ignore[return-value]


# --- login and sessions --------------------------------------------------------------------


def test_login_gives_a_session_cookie(service: EmbeddedService) -> None:
    with httpx.Client(base_url=service.url) as client:
        resp = client.post(LOGIN_PATH, data=credentials(service))
        assert resp.status_code == 200
        assert "session_id=" in resp.headers["Set-Cookie"]
        assert resp.cookies.get("session_id")
        assert ok(call(client, "listDaqs")) == []


@pytest.mark.parametrize("form", [
    {"username": "dm", "password": "wrong"},
    {"username": "someone", "password": "<real>"},
    {"username": "", "password": ""},
    {},
])
def test_wrong_credentials_are_refused_with_401(service: EmbeddedService,
                                                form: dict[str, str]) -> None:
    if form.get("password") == "<real>":
        form = {**form, "password": credentials(service)["password"]}
    with httpx.Client(base_url=service.url) as client:
        resp = client.post(LOGIN_PATH, data=form)
        dm_error(resp, 6, "AuthenticationError", status=401)
        assert "session_id" not in resp.headers.get("Set-Cookie", "")
        assert call(client, "listDaqs").status_code == 401


def test_login_with_a_non_form_body_is_refused(service: EmbeddedService) -> None:
    with httpx.Client(base_url=service.url) as client:
        resp = client.post(LOGIN_PATH, json=credentials(service))
        assert resp.status_code == 401


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_every_route_needs_a_session(service: EmbeddedService, name: str) -> None:
    route = ROUTES[name]
    path = route.url(**{field: "x" for field, _ in route.path_fields})
    with httpx.Client(base_url=service.url) as client:
        dm_error(client.request(route.method, path), 12, "InvalidSession", status=401)
        client.cookies.set("session_id", "not-a-session")
        dm_error(client.request(route.method, path), 12, "InvalidSession", status=401)


def test_vendor_style_cookie_header_is_accepted(service: EmbeddedService) -> None:
    """The vendor client sends the whole Set-Cookie string back as its Cookie header."""
    with httpx.Client(base_url=service.url) as client:
        set_cookie = client.post(LOGIN_PATH, data=credentials(service)).headers["Set-Cookie"]
    with httpx.Client(base_url=service.url) as client:
        resp = client.get(ROUTES["listDaqs"].url(), headers={"Cookie": set_cookie})
        assert ok(resp) == []


def test_password_is_never_logged(service: EmbeddedService,
                                  caplog: pytest.LogCaptureFixture) -> None:
    password = credentials(service)["password"]
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=service.url) as client:
        client.post(LOGIN_PATH, data={"username": "dm", "password": password + "x"})
        client.post(LOGIN_PATH, data=credentials(service))
        call(client, "listDaqs")
    assert "login" in caplog.text
    assert password not in caplog.text


# --- routes and errors ---------------------------------------------------------------------


def test_unknown_route_and_method_give_404(http: httpx.Client) -> None:
    dm_error(raw(http, "GET", "/dm/noSuchThing"), 8, "UrlError", status=404)
    dm_error(raw(http, "DELETE", "/dm/experimentDaqs"), 8, "UrlError", status=404)
    dm_error(raw(http, "GET", "/"), 8, "UrlError", status=404)
    dm_error(raw(http, "GET", "/dm/%0A"), 8, "UrlError", status=404)  # a decoded newline


def test_handled_error_is_http_200_with_dm_headers(http: httpx.Client) -> None:
    message = dm_error(call(http, "getExperimentByName", name="nope", stationName=STATION),
                       14, "ObjectNotFound")
    assert "nope" in message


@pytest.mark.parametrize("path", [
    "/dm/experimentsByName/b'not*base64!'/APSDM",
    "/dm/experimentsByName/b'%ZZ'/APSDM",
    # valid base64 twice, but the text is not UTF-8
    "/dm/experimentsByName/" + base64.b64encode(base64.b64encode(b"\xff\xfe")).decode()
    + "/APSDM",
])
def test_malformed_encoded_segment_is_invalid_argument(http: httpx.Client, path: str) -> None:
    dm_error(raw(http, "GET", path), 10, "InvalidArgument")


@pytest.mark.parametrize("token", [
    "b'@@@'",  # not base64
    wire.encode("{not json"),  # base64 of broken JSON
    wire.encode_json([1, 2]),  # JSON, but not an object
    wire.encode_json(None),
    wire.encode("[" * 1200),  # nested deeper than Python's recursion limit
])
def test_broken_json_argument_is_invalid_argument(http: httpx.Client, token: str) -> None:
    add_experiment(http, "e1")
    path = ROUTES["startDaq"].url(experimentName="e1", dataDirectory="/tmp")
    dm_error(raw(http, "POST", f"{path}?taskInfo={token}"), 10, "InvalidArgument")


@pytest.mark.parametrize("key_list", ['""', "7", "[1, 2]", "[]", "{}"])
def test_bad_key_list_is_invalid_argument(http: httpx.Client, key_list: str) -> None:
    path = ROUTES["listProcessingJobs"].url(owner="dm", queryDict={})
    dm_error(raw(http, "GET", f"{path}&keyList={wire.encode(key_list)}"), 10, "InvalidArgument")


@pytest.mark.parametrize(("skip", "limit"), [("-1", "5"), ("x", "5"), ("0", "1.5")])
def test_bad_skip_or_limit_is_invalid_argument(http: httpx.Client, skip: str,
                                               limit: str) -> None:
    dm_error(call(http, "listProcessingJobs", owner="dm", queryDict={}, skip=skip, limit=limit,
                  keyList="DEFAULT"), 10, "InvalidArgument")


def test_missing_required_argument_is_invalid_argument(http: httpx.Client) -> None:
    dm_error(raw(http, "POST", "/dm/workflows/addWorkflow?allowCurrentUsername=0"),
             10, "InvalidArgument")
    dm_error(raw(http, "POST", "/dm/datasets/addExperimentDataset"), 10, "InvalidArgument")


def test_query_operators_are_refused(http: httpx.Client) -> None:
    dm_error(call(http, "listWorkflows", owner="dm", queryDict={"name": {"$regex": "x"}}),
             10, "InvalidArgument")


@pytest.mark.parametrize(("name", "values"), [
    ("getDaqInfo", {"id": "no-such-daq"}),
    ("getUploadInfo", {"id": "no-such-upload"}),
    ("stopUpload", {"id": "no-such-upload"}),
    ("getProcessingJobById", {"owner": "dm", "id": "no-such-job"}),
    ("getWorkflowByName", {"owner": "dm", "name": "no-such-workflow"}),
    ("getExperimentById", {"id": "123456"}),
    ("getExperimentFile", {"experimentName": "e", "experimentFilePath": "a/b.h5"}),
    ("stopDaq", {"experimentName": "e1", "dataDirectory": "/tmp"}),
    ("startDaq", {"experimentName": "no-such-exp", "dataDirectory": "/tmp", "taskInfo": {}}),
    ("startProcessingJob", {"owner": "dm", "workflowName": "nope", "argsDict": {}}),
])
def test_unknown_objects_are_object_not_found(http: httpx.Client, name: str,
                                              values: dict[str, object]) -> None:
    add_experiment(http, "e1")
    dm_error(call(http, name, **values), 14, "ObjectNotFound")


def test_control_characters_in_a_message_keep_the_header_printable(http: httpx.Client) -> None:
    """An error message quoting the client's text is escaped in the header, not dropped."""
    message = dm_error(call(http, "getExperimentByName", name="a\x06\x1bé", stationName=STATION),
                       14, "ObjectNotFound")
    assert "a\x06\x1bé" in message


def test_non_numeric_experiment_id_is_invalid_argument(http: httpx.Client) -> None:
    dm_error(call(http, "getExperimentById", id="abc"), 10, "InvalidArgument")


def test_jobs_of_another_owner_are_not_found(http: httpx.Client) -> None:
    workflow = {"name": "w", "owner": "dm", "stages": {"01": {"command": "true"}}}
    ok(call(http, "addWorkflow", allowCurrentUsername=0, workflow=workflow))
    job = ok(call(http, "startProcessingJob", owner="dm", workflowName="w", argsDict={}))
    assert isinstance(job, dict) and job["status"] == "pending"
    dm_error(call(http, "getProcessingJobById", owner="other", id=job["id"]),
             14, "ObjectNotFound")
    assert ok(call(http, "getProcessingJobById", owner="dm", id=job["id"]))


# --- argument decoding ---------------------------------------------------------------------


def test_values_with_quotes_slashes_and_plus_round_trip(http: httpx.Client,
                                                         tmp_path: Path) -> None:
    """Decoded values keep every character (the vendor's double base64 itself never holds
    '/' or '+': base64 of base64 text only uses 62 of the 64 symbols)."""
    add_experiment(http, "e1")
    data = tmp_path / "it's a+b & c?d=e%20"
    data.mkdir()
    daq = ok(call(http, "startDaq", experimentName="e1", dataDirectory=str(data),
                  taskInfo={"destDirectory": "a+b/c'd"}))
    assert isinstance(daq, dict)
    assert daq["dataDirectory"] == str(data)
    assert daq["destDirectory"] == "a+b/c'd"
    stopped = ok(call(http, "stopDaq", experimentName="e1", dataDirectory=str(data)))
    assert isinstance(stopped, dict) and stopped["status"] == "done"


def test_bare_base64_without_quotes_or_newline_is_accepted(http: httpx.Client) -> None:
    """dmax sends b64encode(b64encode(x)): no b'...' and no inner newline."""
    add_experiment(http, "e-bare")
    token = base64.b64encode(base64.b64encode(b"e-bare")).decode()
    experiment = ok(raw(http, "GET", f"/dm/experimentsByName/{token}/{STATION}"))
    assert isinstance(experiment, dict) and experiment["name"] == "e-bare"


def test_long_values_with_inner_newlines_decode(http: httpx.Client) -> None:
    """encodebytes wraps at 76 characters, so long values carry newlines inside."""
    name = "x" * 64
    assert b"\n" in base64.b64decode(wire.encode(name)[2:-1]).rstrip(b"\n")
    add_experiment(http, name)
    experiment = ok(call(http, "getExperimentByName", name=name, stationName=STATION))
    assert isinstance(experiment, dict) and experiment["name"] == name


# --- input checks that answer with DM errors -----------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a b", "a/b", "x" * 65, "bad\nname"])
def test_bad_experiment_names_are_invalid_argument(http: httpx.Client, name: str) -> None:
    dm_error(call(http, "addExperiment", name=name, stationName=STATION), 10, "InvalidArgument")


def test_duplicate_experiment_is_object_already_exists(http: httpx.Client) -> None:
    add_experiment(http, "dup")
    dm_error(call(http, "addExperiment", name="dup", stationName=STATION),
             15, "ObjectAlreadyExists")


def test_experiment_of_another_station_is_not_found(http: httpx.Client) -> None:
    add_experiment(http, "e1")
    dm_error(call(http, "getExperimentByName", name="e1", stationName="OTHER"),
             14, "ObjectNotFound")
    assert ok(call(http, "getExperimentByName", name="e1", stationName=STATION.lower()))


@pytest.mark.parametrize("dest", ["../escape", "/absolute", "a/../../b"])
def test_dest_directory_must_stay_inside(http: httpx.Client, tmp_path: Path, dest: str) -> None:
    add_experiment(http, "e1")
    message = dm_error(call(http, "startDaq", experimentName="e1", dataDirectory=str(tmp_path),
                            taskInfo={"destDirectory": dest}), 10, "InvalidArgument")
    assert "destDirectory" in message
    dm_error(call(http, "upload", experimentName="e1", dataDirectory=str(tmp_path),
                  daqInfo={"destDirectory": dest}), 10, "InvalidArgument")


def test_missing_data_directory_is_invalid_argument(http: httpx.Client, tmp_path: Path) -> None:
    add_experiment(http, "e1")
    missing = tmp_path / "missing"
    for name, options in (("startDaq", "taskInfo"), ("upload", "daqInfo")):
        message = dm_error(call(http, name, experimentName="e1", dataDirectory=str(missing),
                                **{options: {}}), 10, "InvalidArgument")
        assert str(missing) in message
    message = dm_error(call(http, "startDaq", experimentName="e1", dataDirectory="rel/dir",
                            taskInfo={}), 10, "InvalidArgument")
    assert "absolute" in message


def test_watching_the_experiment_storage_is_refused(http: httpx.Client,
                                                    service: EmbeddedService) -> None:
    """A DAQ whose destination lies inside its own source would copy its copies forever."""
    add_experiment(http, "e1")
    dm_error(call(http, "startDaq", experimentName="e1", dataDirectory=str(service.data_root),
                  taskInfo={}), 10, "InvalidArgument")


def test_bad_upload_options_are_invalid_argument(http: httpx.Client, tmp_path: Path) -> None:
    add_experiment(http, "e1")
    for options in ({"processingMode": "tree"}, {"experimentFilePath": "absent.h5"},
                    {"reprocessFiles": "maybe"}):
        dm_error(call(http, "upload", experimentName="e1", dataDirectory=str(tmp_path),
                      daqInfo=options), 10, "InvalidArgument")


# --- files the service writes, and apsdm-server --------------------------------------------


def test_login_and_setup_files(tmp_path: Path, loop_thread: LoopThread) -> None:
    root = tmp_path / "dm"
    first = loop_thread.run(start_service(root, station="8IDI"))
    login = first.login_file.read_text()
    loop_thread.run(first.stop())
    assert stat.S_IMODE(first.login_file.stat().st_mode) == 0o600
    user, _, password = login.strip().partition("|")
    assert user == "dm" and len(password) >= 16
    second = loop_thread.run(start_service(root, station="8IDI"))
    try:
        assert second.login_file.read_text() == login  # kept on later starts
        env = read_setup_file(second.setup_file)
        for service in ("DS", "DAQ", "PROC", "CAT"):
            assert env[f"DM_{service}_WEB_SERVICE_URL"] == second.url
        assert env["DM_LOGIN_FILE"] == str(second.login_file)
        assert env["DM_STATION_NAME"] == "8IDI"
        assert password not in second.setup_file.read_text()
    finally:
        loop_thread.run(second.stop())


def test_apsdm_server_runs_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "ioc")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "apsdm.dmserver.main", "--data-root", str(tmp_path / "dm"),
         "--port", "0", "--station", "TEST1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY url=http://127.0.0.1:"), line
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        assert read_setup_file(fields["setup"])["DM_DS_WEB_SERVICE_URL"] == fields["url"]
        password = (tmp_path / "dm" / "dm.login").read_text().strip().partition("|")[2]
        with httpx.Client(base_url=fields["url"]) as client:
            assert client.post(LOGIN_PATH, data={"username": "dm", "password": "no"}
                               ).status_code == 401
            assert client.post(LOGIN_PATH, data={"username": "dm", "password": password}
                               ).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert password not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_apsdm_server_reports_a_busy_port(tmp_path: Path, service: EmbeddedService) -> None:
    port = service.url.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "ioc")}
    result = subprocess.run(
        [sys.executable, "-m", "apsdm.dmserver.main", "--data-root", str(tmp_path / "other"),
         "--port", port], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1
    assert "apsdm-server:" in result.stderr and "Traceback" not in result.stderr
