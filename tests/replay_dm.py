"""A replay of real DM on loopback: the responses captured from real DM services
(``tests/data/dm_captures.json``) served the way DM serves them, for the gateway's REST client
and ``apsdm-ioc --dm rest``.

A request is matched to its route (:mod:`apsdm.dm.routes`) and to the capture of that route
whose path arguments are the same (numbers compared as numbers, so ``0158394`` is
``158394``); query arguments (skip, keyList, ...) do not select. Login is a form POST that
sets a session cookie; a request without it gets 401, as from DM. A route without a capture
answers ObjectNotFound in DM's headers, except the DAQ and upload lists, which are empty (no
capture of them exists: a DM with no DAQs).

Only dmax's captures are complete responses; dm-protocol.md adds the form of DM's errors
(section 2.5), which the replay uses for what it has no capture of.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from apsdm.dm import routes

CAPTURES = Path(__file__).parent / "data" / "dm_captures.json"
#: list routes no capture exists of: replayed as empty lists
EMPTY_LISTS = frozenset({"listDaqs", "listUploads"})
#: the DM account and station of the captures (owner in their URLs, station in their records)
USERNAME, STATION = "dummy_user", "25IDC"
COOKIE = "session_id=replay"


def load_captures() -> list[dict[str, Any]]:
    """The captured responses, each with its route, URL and source."""
    return json.loads(CAPTURES.read_text())["captures"]


def _same(a: Any, b: Any) -> bool:
    """Path arguments are equal, digits compared as numbers."""
    a, b = str(a), str(b)
    return int(a) == int(b) if a.isdigit() and b.isdigit() else a == b


def path_args(route: routes.Route, values: dict[str, Any]) -> dict[str, Any]:
    """The arguments a route takes from its path (those that pick a capture)."""
    return {name: values[name] for name, _encoded in route.path_fields}


@dataclass
class ReplayDm:
    """The replay server: ``start()`` returns its URL; ``served`` lists the routes it
    answered from a capture, ``missed`` those it had none for."""

    captures: list[dict[str, Any]] = field(default_factory=load_captures)
    served: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:  # quiet: the test says what failed
                pass

            def do_GET(self) -> None:
                replay._answer(self)

            do_POST = do_PUT = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def write_setup(self, directory: Path, url: str) -> Path:
        """A dm.setup.sh (and login file) naming this replay for every DM service."""
        login = directory / "replay.login"
        login.write_text(f"{USERNAME}|replay-password\n")
        login.chmod(0o600)
        setup = directory / "dm.setup.sh"
        services = ("DS", "DAQ", "PROC", "CAT", "APS_DB")
        setup.write_text("".join(f"export DM_{s}_WEB_SERVICE_URL={url}\n" for s in services)
                         + f"export DM_STATION_NAME={STATION}\nexport DM_LOGIN_FILE={login}\n")
        return setup

    def find(self, method: str, raw_path: str, raw_query: str
             ) -> tuple[routes.Route, dict[str, Any] | None] | None:
        """The route of a request and its capture (None: no capture of it)."""
        found = routes.match(method, raw_path, raw_query)
        if found is None:
            return None
        route, values = found
        wanted = path_args(route, values)
        for capture in self.captures:
            if capture["route"] != route.name:
                continue
            url = urlsplit(capture["url"])
            _route, got = routes.match(capture["method"], url.path, url.query) or (route, {})
            if all(_same(got.get(k), v) for k, v in wanted.items()):
                return route, capture
        return route, None

    def _answer(self, req: BaseHTTPRequestHandler) -> None:
        url = urlsplit(req.path)
        if url.path == routes.LOGIN_PATH:
            length = int(req.headers.get("Content-Length") or 0)
            form = parse_qs(req.rfile.read(length).decode())
            if form.get("username") != [USERNAME]:
                return self._send(req, 401, b"")
            return self._send(req, 200, b"", {"Set-Cookie": f"{COOKIE}; Path=/"})
        if COOKIE not in (req.headers.get("Cookie") or ""):
            return self._send(req, 401, b"")
        found = self.find(req.command, url.path, url.query)
        if found is not None and found[1] is not None:
            self.served.append(found[0].name)
            return self._send(req, 200, json.dumps(found[1]["response"]).encode())
        name = found[0].name if found else f"{req.command} {url.path}"
        if name in EMPTY_LISTS:
            return self._send(req, 200, b"[]")
        self.missed.append(name)
        why = f"no capture of {name}"  # DM's error form (dm-protocol.md 2.5): headers and body
        body = {"errorMessage": why, "errorCode": 14, "exceptionType": "ObjectNotFound"}
        self._send(req, 200, json.dumps(body).encode(), {
            "Dm-Status-Code": "14", "Dm-Status-Message": why,
            "Dm-Exception-Type": "ObjectNotFound"})

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
