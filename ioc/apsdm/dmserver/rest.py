"""HTTP layer of the embedded DM service: login sessions, routing, DM's status headers.

Requests are matched with :func:`apsdm.dm.routes.match` on the raw path and query, since
DM's encoded tokens are quoted ``b'...'`` text that no framework should decode. Each route
is served by the method of the same name on the one service object that has it.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import Any

from aiohttp import web

from apsdm.dm import routes
from apsdm.dm.config import Credentials
from apsdm.dm.errors import (
    AuthenticationError,
    DmError,
    InternalError,
    InvalidArgument,
    InvalidSession,
    UrlError,
    exception_type_name,
)

log = logging.getLogger(__name__)
#: one line per request, at INFO; apsdm.logs keeps it at WARNING unless --log-level DEBUG
access_log = logging.getLogger("apsdm.dmserver.access")

#: ``dm=`` is DM's status code (0 ok, 10 InvalidArgument, ...; "-" login)
ACCESS_LOG_FORMAT = '%a "%r" %s %b dm=%{Dm-Status-Code}o %Tfs'

SESSION_COOKIE = "session_id"
SESSION_SECONDS = 24 * 3600
MAX_SESSIONS = 1000  # beyond this a login ends the oldest session
_COOKIE_RE = re.compile(r"(?<![\w-])" + SESSION_COOKIE + r"=([A-Za-z0-9_-]+)")
#: JSON arguments that must decode to an object (dict)
_JSON_OBJECTS = ("taskInfo", "daqInfo", "argsDict", "workflow", "datasetInfo", "queryDict")


class Sessions:
    """Logins to the service's one account, and the session cookies they hand out."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._expiry: dict[str, float] = {}  # token -> time.time() it expires

    def login(self, username: str, password: str) -> str | None:
        """A new session token, or None if the credentials are wrong."""
        user_ok = hmac.compare_digest(username.encode(), self._credentials.username.encode())
        password_ok = hmac.compare_digest(password.encode(),
                                          self._credentials.password.encode())
        if not (user_ok and password_ok):
            return None
        now = time.time()
        self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        while len(self._expiry) >= MAX_SESSIONS:
            del self._expiry[next(iter(self._expiry))]
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + SESSION_SECONDS
        return token

    def valid(self, cookie_header: str) -> bool:
        """Whether a Cookie header carries a live session (the vendor client sends back the
        whole Set-Cookie string, so the header is searched rather than parsed)."""
        now = time.time()
        return any(self._expiry.get(t, 0) > now for t in _COOKIE_RE.findall(cookie_header))


def error_response(err: DmError, status: int = 200) -> web.Response:
    """DM's answer for a handled error: status headers and a JSON body."""
    name = exception_type_name(err)
    one_line = " ".join(err.message.split())
    # printable ASCII only: a control character (e.g. from a name the client sent) would
    # make the HTTP layer drop the answer, which the client would take for DM being down
    header = one_line.encode("unicode_escape").decode("ascii")[:1000]
    body = {"errorMessage": err.message, "errorCode": err.code, "exceptionType": name}
    return web.json_response(body, status=status, headers={
        "Dm-Status-Code": str(err.code), "Dm-Status-Message": header,
        "Dm-Exception-Type": name})


class _Dispatcher:
    """Serves every request: login, session check, route match, handler call, DM answer."""

    def __init__(self, sessions: Sessions, handlers: dict[str, Any]) -> None:
        self._sessions = sessions
        self._handlers = handlers
        self._signatures = {name: inspect.signature(h) for name, h in handlers.items()}

    async def handle(self, request: web.Request) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        if path == routes.LOGIN_PATH and request.method == "POST":
            return await self._login(request)
        if not self._sessions.valid(request.headers.get("Cookie", "")):
            return error_response(InvalidSession("no valid DM session: log in first"), 401)
        try:
            found = routes.match(request.method, path, query)
            if found is None:
                return error_response(UrlError(f"no DM route {request.method} {path}"), 404)
            route, values = found
            body = json.dumps(await self._call(route.name, values))
        except DmError as err:
            return error_response(err)
        except Exception as exc:
            log.exception("%s %s failed", request.method, path)
            return error_response(InternalError(f"internal error: {exc}"))
        return web.Response(text=body, content_type="application/json",
                            headers={"Dm-Status-Code": "0"})

    async def _call(self, name: str, values: dict[str, Any]) -> Any:
        """Call a route's handler with the arguments it declares (others are ignored)."""
        for key in _JSON_OBJECTS:
            if key in values and not isinstance(values[key], dict):
                raise InvalidArgument(f"{key} must be a JSON object")
        signature = self._signatures[name]
        try:
            bound = signature.bind(**{k: v for k, v in values.items()
                                      if k in signature.parameters})
        except TypeError as exc:
            raise InvalidArgument(f"{name}: {exc}") from None
        result = self._handlers[name](*bound.args, **bound.kwargs)
        return await result if inspect.isawaitable(result) else result

    async def _login(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError:
            form = None
        username = str(form.get("username", "")) if form else ""
        password = str(form.get("password", "")) if form else ""
        token = self._sessions.login(username, password)
        if token is None:
            log.warning("refused DM login as %r from %s", username[:64], request.remote)
            return error_response(AuthenticationError("invalid username or password"), 401)
        log.info("DM login as %s from %s", username, request.remote)
        response = web.json_response({}, headers={"Dm-Status-Code": "0"})
        response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True,
                            expires=formatdate(time.time() + SESSION_SECONDS, usegmt=True))
        return response


#: Bytes of request line and header DM's CherryPy servers take (its default
#: ``server.max_request_header_size``): DM's arguments travel in the URL, so this bounds
#: them (aiohttp's own default, 8190, would refuse 5 kB of run metadata).
MAX_REQUEST_HEADER = 500 * 1024


def app_runner(credentials: Credentials, services: Iterable[object]) -> web.AppRunner:
    """The web application, each route of routes.ROUTES served by the one service naming it,
    in a runner that writes the access log."""
    services = list(services)
    handlers = {}
    for name in routes.ROUTES:
        owners = [s for s in services if callable(getattr(s, name, None))]
        if len(owners) != 1:
            raise RuntimeError(f"DM route {name} has {len(owners)} handlers, not 1")
        handlers[name] = getattr(owners[0], name)
    app = web.Application()
    # every path, a decoded newline included ('.' would leave those to aiohttp's plain 404)
    app.router.add_route("*", r"/{tail:[\s\S]*}",
                         _Dispatcher(Sessions(credentials), handlers).handle)
    return web.AppRunner(app, access_log=access_log, access_log_format=ACCESS_LOG_FORMAT,
                         shutdown_timeout=5.0, max_line_size=MAX_REQUEST_HEADER,
                         max_field_size=MAX_REQUEST_HEADER)
