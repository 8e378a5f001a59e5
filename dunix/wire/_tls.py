"""Cluster certificates and mutual-TLS contexts.

One private CA per cluster signs everything; a peer is trusted when its certificate chains
to that CA and nothing else (no system roots). Who a peer is comes from the certificate's
subject: CN is the node or user name, OU its role ("node" or "client"). Host names are not
checked (``check_hostname`` off): nodes move between addresses, and the handshake compares
the Hello against CN and OU instead (see ``_handshake``).

``ssl`` and ``OSError`` failures are translated into ``dunix.errors`` here and nowhere else.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dunix.errors import AuthenticationFailed, ConfigError, DunixError, PeerUnreachable

ROLES = ("node", "client")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_CLOCK_SKEW = datetime.timedelta(hours=1)


def cert_paths(directory: str | os.PathLike[str], name: str, role: str) -> tuple[Path, Path]:
    """(certificate, key) file of an identity: ``NAME.pem`` or ``client-NAME.pem``."""
    base = Path(directory) / (name if role == "node" else f"client-{name}")
    return base.with_name(base.name + ".pem"), base.with_name(base.name + ".key")


def _check_name(name: str, role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, not {role!r}")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a valid {role} name (letters, digits, . _ -)")
    if role == "node" and name.startswith("client-"):
        raise ConfigError(f"node name {name!r} would collide with a client's files")


# -- key generation ---------------------------------------------------------------------


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a key."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)  # hosts' clocks disagree a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _load_or_make_ca(
    directory: Path, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, list[Path]]:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an EC key")
        return cert, key, []
    if cert_path.exists() or key_path.exists():
        # A new CA would silently orphan every certificate the old one signed.
        raise ConfigError(f"{directory} has only half a CA (ca.pem or ca.key missing)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"dunix cluster CA {os.urandom(4).hex()}")]
    )
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key), 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key, [cert_path, key_path]


def _issued_by(path: Path, key_path: Path, ca: x509.Certificate) -> bool:
    if not (path.exists() and key_path.exists()):
        return False
    try:
        x509.load_pem_x509_certificate(path.read_bytes()).verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _make_leaf(
    directory: Path,
    name: str,
    role: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> list[Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(subject, ca.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
    )
    if role == "node":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = cert_paths(directory, name, role)
    # Key first: a crash in between leaves a key without a certificate, which is redone.
    _write_private(key_path, _key_pem(key), 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return [cert_path, key_path]


def keygen(
    directory: str | os.PathLike[str],
    nodes: Iterable[str],
    clients: Iterable[str] = ("admin",),
    *,
    days: int = 3650,
) -> list[Path]:
    """Create the cluster CA and the missing node and client certificates; return new files.

    Idempotent: an existing CA is reused, and a certificate is only (re)made when it or its
    key is missing or it was not signed by this CA. EC P-256 keeps it fast.
    """
    wanted = [(n, "node") for n in nodes] + [(c, "client") for c in clients]
    for name, role in wanted:
        _check_name(name, role)
    out = Path(directory)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca, ca_key, written = _load_or_make_ca(out, days)
        for name, role in wanted:
            cert_path, key_path = cert_paths(out, name, role)
            if not _issued_by(cert_path, key_path, ca):
                written += _make_leaf(out, name, role, ca, ca_key, days)
    except OSError as exc:
        raise ConfigError(f"cannot write certificates to {out}: {exc}") from exc
    except ValueError as exc:  # unreadable PEM
        raise ConfigError(f"bad certificate or key in {out}: {exc}") from exc
    return written


# -- contexts and peers -----------------------------------------------------------------


def _context(purpose: int, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are checked by CN and OU after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: the server context asks for a cert too
    ctx.load_verify_locations(cafile=str(ca))  # the cluster CA only, no system roots
    ctx.load_cert_chain(str(cert), str(key))
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0  # no session resumption, so no tickets to race a quick close
    return ctx


@dataclass(frozen=True)
class TLSIdentity:
    """This process's certificate, key and cluster CA, ready as ``ssl`` contexts."""

    name: str
    role: str
    directory: Path
    _client: ssl.SSLContext = field(repr=False, compare=False)
    _server: ssl.SSLContext | None = field(repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], name: str, role: str) -> TLSIdentity:
        """Load ``NAME.pem``/``.key`` (nodes) or ``client-NAME.pem``/``.key`` and ``ca.pem``."""
        _check_name(name, role)
        folder = Path(directory)
        cert, key = cert_paths(folder, name, role)
        ca = folder / "ca.pem"
        try:
            found = peer_identity(_subject_dict(x509.load_pem_x509_certificate(cert.read_bytes())))
            if found != (name, role):
                raise ConfigError(f"{cert} is for {found}, not {(name, role)}")
            client = _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)
            server = _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key) if role == "node" else None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot load TLS identity {name!r} from {folder}: {exc}") from exc
        except AuthenticationFailed as exc:
            raise ConfigError(f"{cert}: {exc}") from exc
        return cls(name, role, folder, client, server)

    def client_context(self) -> ssl.SSLContext:
        return self._client

    def server_context(self) -> ssl.SSLContext:
        """Only node certificates carry serverAuth, so only nodes may accept connections."""
        if self._server is None:
            raise ConfigError(f"a {self.role} identity cannot accept TLS connections")
        return self._server


def _subject_dict(cert: x509.Certificate) -> dict[str, Any]:
    """A certificate's subject in the shape ``SSLSocket.getpeercert()`` uses."""
    names = {
        NameOID.COMMON_NAME: "commonName",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
    }
    return {
        "subject": tuple(
            ((names.get(a.oid, a.oid.dotted_string), str(a.value)),) for a in cert.subject
        )
    }


def peer_identity(cert: Mapping[str, Any] | None) -> tuple[str, str]:
    """(name, role) from a verified peer's ``getpeercert()`` dict: its CN and OU."""
    if not cert:
        raise AuthenticationFailed("peer presented no certificate")
    values: dict[str, list[str]] = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            values.setdefault(key, []).append(value)
    cns, ous = values.get("commonName", []), values.get("organizationalUnitName", [])
    if len(cns) != 1 or len(ous) != 1 or ous[0] not in ROLES:
        raise AuthenticationFailed(f"certificate subject {values} names no dunix peer")
    return cns[0], ous[0]


def translate_error(exc: BaseException, doing: str) -> DunixError:
    """A TLS or socket failure as a dunix error: a TLS refusal is an authentication failure.

    trio reports a failed TLS operation as ``BrokenResourceError`` with the
    ``ssl.SSLError`` as its cause, and a channel wraps that in ``PeerUnreachable``, so the
    cause chain is searched. Other dunix errors pass through unchanged.
    """
    if isinstance(exc, DunixError) and not isinstance(exc, PeerUnreachable):
        return exc
    seen: BaseException | None = exc
    for _ in range(8):  # chains are short; the bound only guards against a cycle
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return AuthenticationFailed(f"{doing}: TLS refused: {_tls_reason(seen)}")
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, DunixError):
        return exc
    return PeerUnreachable(f"{doing}: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """A readable reason; trio's ``BrokenResourceError`` is empty and its cause says why."""
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def _tls_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        # trio does not send the alert of a side whose handshake failed; the other side only
        # sees the connection end. The usual cause is a certificate from another cluster.
        return f"{reason} (peer hung up mid-handshake; does it trust this cluster's CA?)"
    detail = getattr(exc, "verify_message", None)
    return f"{reason} ({detail})" if detail else str(reason)
