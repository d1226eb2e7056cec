"""DM client configuration, read the way DM's own tools read it.

Sources: ``DM_*`` environment variables, and a ``dm.setup.sh`` file whose ``export``
lines set them (parsed like apstools' ``dm_source_environ``). The password is read from
``DM_LOGIN_FILE`` (``user|password``) only when logging in and never shown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigurationError
from .routes import Service

_EXPORT = re.compile(r"^\s*export\s+(DM_\w+)=(.*)$")


def read_setup_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``DM_*`` variables set by the ``export`` lines of a dm.setup.sh file."""
    values: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        m = _EXPORT.match(line)
        if not m:
            continue
        value = m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        # expand references to variables set earlier in the same file
        values[m.group(1)] = re.sub(
            r"\$\{?(\w+)\}?", lambda v: values.get(v.group(1), os.environ.get(v.group(1), "")), value
        )
    return values


@dataclass(frozen=True)
class Credentials:
    """A DM username and password; the password is kept out of repr and str."""

    username: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return self.username

    @classmethod
    def from_login_file(cls, path: str | os.PathLike[str]) -> Credentials:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read DM login file {path}: {exc.strerror}") from None
        user, sep, password = text.partition("|")
        if not sep or not user:
            raise ConfigurationError(f"DM login file {path} is not 'user|password'")
        return cls(user.strip(), password.strip())


@dataclass(frozen=True)
class DmConfig:
    """Where the DM services are, who we are there, and which station we serve."""

    urls: Mapping[Service, str]
    login_file: str = ""
    station: str = ""
    timeout: float = 10.0
    ca_file: str = ""  # DM_CA_FILE: verify the services' TLS certificates against it

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, setup_file: str = "",
                 timeout: float = 10.0) -> DmConfig:
        """Build from the environment, with ``setup_file`` (or ``DM_SETUP_FILE``) under it."""
        env = dict(os.environ if environ is None else environ)
        dm_env = {k: v for k, v in env.items() if k.startswith("DM_")}
        if setup_file:  # a file named here wins over the environment
            merged = {**dm_env, **read_setup_file(setup_file)}
        elif env.get("DM_SETUP_FILE"):  # the environment wins over a file it names
            merged = {**read_setup_file(env["DM_SETUP_FILE"]), **dm_env}
        else:
            merged = dm_env
        urls = {
            svc: merged[f"DM_{svc.name}_WEB_SERVICE_URL"].rstrip("/")
            for svc in Service
            if merged.get(f"DM_{svc.name}_WEB_SERVICE_URL")
        }
        return cls(urls, merged.get("DM_LOGIN_FILE", ""), merged.get("DM_STATION_NAME", ""), timeout,
                   merged.get("DM_CA_FILE", ""))

    @classmethod
    def single_url(cls, url: str, login_file: str = "", station: str = "",
                   timeout: float = 10.0) -> DmConfig:
        """All services at one URL (the embedded service serves them all)."""
        return cls({svc: url.rstrip("/") for svc in Service}, login_file, station, timeout)

    def url(self, service: Service) -> str:
        try:
            return self.urls[service]
        except KeyError:
            raise ConfigurationError(
                f"DM_{service.name}_WEB_SERVICE_URL is not set") from None

    def credentials(self) -> Credentials:
        if not self.login_file:
            raise ConfigurationError("DM_LOGIN_FILE is not set")
        return Credentials.from_login_file(self.login_file)
