"""TLS of the embedded DM service, as real DM serves HTTPS: a given certificate and key, or a
self-signed one made on first start under ``<data-root>/tls/`` (key mode 0600) and kept.

The certificate is named in ``dm.setup.sh`` as ``DM_CA_FILE`` so a client can verify it;
the vendor client (and dmax) do not verify, and keep working.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from apsdm.dm.errors import ConfigurationError

log = logging.getLogger(__name__)

CERT_DAYS = 3650
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to may be reached from outside
        return False


def server_context(data_root: Path, host: str, cert: Path | None = None,
                   key: Path | None = None) -> tuple[ssl.SSLContext, Path]:
    """The TLS context to serve with and the certificate file clients may verify against."""
    if (cert is None) != (key is None):
        raise ConfigurationError("give both a TLS certificate and its key, or neither")
    if cert is None or key is None:
        cert, key = data_root / "tls" / "dm.crt", data_root / "tls" / "dm.key"
        if not (cert.exists() and key.exists()):
            _self_signed(cert, key, host)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"TLS certificate {cert} or key {key} unusable: {exc}") from None
    return context, cert


def _self_signed(cert: Path, key: Path, host: str) -> None:
    """Write a self-signed certificate for loopback, this host's name and ``host``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    names = dict.fromkeys((*LOOPBACK_NAMES, socket.getfqdn(), socket.gethostname(), host))
    alt: list[x509.GeneralName] = []
    for name in names:
        if not name or name in ("0.0.0.0", "::"):
            continue
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apsdm embedded DM service")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256()))
    cert.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    log.info("wrote self-signed TLS certificate %s for %s", cert, ", ".join(n for n in names if n))
