"""Cluster certificates: what keygen writes, that it is idempotent, and who a cert names."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dunix.errors import AuthenticationFailed, ConfigError, PeerUnreachable
from dunix.wire import TLSIdentity, keygen, peer_identity
from dunix.wire._tls import translate_error


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def test_keygen_writes_ca_nodes_and_clients(tmp_path: Path) -> None:
    written = keygen(tmp_path / "tls", ["n1", "n2"], ["admin", "bob"])
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["ca.pem", "ca.key"]
        + [f"{n}.{ext}" for n in ("n1", "n2") for ext in ("pem", "key")]
        + [f"client-{c}.{ext}" for c in ("admin", "bob") for ext in ("pem", "key")]
    )
    for path in written:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700


def test_certificates_name_role_and_usage(tmp_path: Path) -> None:
    keygen(tmp_path, ["n1"], ["admin"])
    ca = _cert(tmp_path / "ca.pem")
    node, client = _cert(tmp_path / "n1.pem"), _cert(tmp_path / "client-admin.pem")
    for cert, cn, ou in ((node, "n1", "node"), (client, "admin", "client")):
        assert _subject(cert, NameOID.COMMON_NAME) == [cn]
        assert _subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [ou]
        cert.verify_directly_issued_by(ca)
    node_eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(node_eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    client_eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(client_eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_keygen_is_idempotent_and_adds_missing(tmp_path: Path) -> None:
    keygen(tmp_path, ["n1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert keygen(tmp_path, ["n1"]) == []
    added = keygen(tmp_path, ["n1", "n2"], ["admin", "carol"])
    assert sorted(p.name for p in added) == sorted(
        ["n2.pem", "n2.key", "client-carol.pem", "client-carol.key"]
    )
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, f"{name} was rewritten"
    _cert(tmp_path / "n2.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))


def test_keygen_redoes_a_pair_with_a_missing_key_or_foreign_signer(tmp_path: Path) -> None:
    keygen(tmp_path / "a", ["n1", "n2"])
    keygen(tmp_path / "other", ["n2"])
    (tmp_path / "a" / "n1.key").unlink()
    (tmp_path / "a" / "n2.pem").write_bytes((tmp_path / "other" / "n2.pem").read_bytes())
    redone = keygen(tmp_path / "a", ["n1", "n2"])
    assert sorted(p.name for p in redone) == ["n1.key", "n1.pem", "n2.key", "n2.pem"]
    ca = _cert(tmp_path / "a" / "ca.pem")
    _cert(tmp_path / "a" / "n2.pem").verify_directly_issued_by(ca)


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    keygen(tmp_path, ["n1"])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ConfigError, match="half a CA"):
        keygen(tmp_path, ["n2"])


@pytest.mark.parametrize(
    ("nodes", "clients"),
    [(["bad name"], []), ([""], []), (["client-x"], []), ([], ["a/b"]), (["-x"], [])],
)
def test_bad_names_are_refused(tmp_path: Path, nodes: list[str], clients: list[str]) -> None:
    with pytest.raises(ConfigError):
        keygen(tmp_path, nodes, clients)
    assert not (tmp_path / "ca.pem").exists()


def test_identity_contexts_are_tls13_mutual_and_cluster_only(tmp_path: Path) -> None:
    keygen(tmp_path, ["n1"], ["admin"])
    node = TLSIdentity.load(tmp_path, "n1", "node")
    assert (node.name, node.role) == ("n1", "node")
    for ctx in (node.server_context(), node.client_context()):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("commonName", _subject(_cert(tmp_path / "ca.pem"), NameOID.COMMON_NAME)[0]),),)
        ]
    admin = TLSIdentity.load(tmp_path, "admin", "client")
    assert admin.client_context().verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError):
        admin.server_context()  # no serverAuth in a client certificate


def test_identity_load_refuses_missing_or_mismatched(tmp_path: Path) -> None:
    keygen(tmp_path, ["n1"], ["admin"])
    with pytest.raises(ConfigError):
        TLSIdentity.load(tmp_path, "n9", "node")
    with pytest.raises(ConfigError):
        TLSIdentity.load(tmp_path, "admin", "node")
    with pytest.raises(ConfigError):
        TLSIdentity.load(tmp_path, "n1", "wizard")
    (tmp_path / "n1.pem").write_bytes((tmp_path / "client-admin.pem").read_bytes())
    with pytest.raises(ConfigError):
        TLSIdentity.load(tmp_path, "n1", "node")


def test_peer_identity_reads_cn_and_ou() -> None:
    cert = {
        "subject": ((("organizationalUnitName", "node"),), (("commonName", "n7"),)),
        "issuer": ((("commonName", "dunix cluster CA"),),),
    }
    assert peer_identity(cert) == ("n7", "node")
    client = {"subject": ((("organizationalUnitName", "client"),), (("commonName", "bob"),))}
    assert peer_identity(client) == ("bob", "client")


@pytest.mark.parametrize(
    "cert",
    [
        None,
        {},
        {"subject": ((("commonName", "n1"),),)},
        {"subject": ((("organizationalUnitName", "wizard"),), (("commonName", "n1"),))},
        {
            "subject": (
                (("organizationalUnitName", "node"),),
                (("commonName", "n1"),),
                (("commonName", "n2"),),
            )
        },
    ],
)
def test_peer_identity_refuses_non_dunix_certs(cert: dict[str, object] | None) -> None:
    with pytest.raises(AuthenticationFailed):
        peer_identity(cert)


def test_translate_error_finds_tls_refusal_in_the_cause_chain() -> None:
    try:
        try:
            raise ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError from exc
    except trio.BrokenResourceError as broken:
        err = translate_error(broken, "connecting")
    assert isinstance(err, AuthenticationFailed)
    assert isinstance(translate_error(ConnectionRefusedError(111, "refused"), "x"), PeerUnreachable)
    config = ConfigError("bad")
    assert translate_error(config, "x") is config
