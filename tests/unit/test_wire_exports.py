"""Pins the public names of ``dunix.wire`` (as trio's test_exports does).

Adding or removing a name is an API change: do it on purpose, here and in the caller.
"""

from __future__ import annotations

import types

import dunix.wire

PUBLIC = {
    # codec
    "DEFAULT_MAX_FRAME",
    "FrameDecoder",
    "decode",
    "encode",
    "frame",
    "message",
    "registered",
    # handshake
    "WIRE_VERSION",
    "ErrorReply",
    "Hello",
    "PeerInfo",
    "Welcome",
    "check_hello",
    "check_welcome",
    # TLS
    "TLSIdentity",
    "keygen",
    "peer_identity",
    # transport
    "Channel",
    "Handler",
    "PeerCred",
    "format_address",
    "listener_addresses",
    "open_channel",
    "open_unix_channel",
    "parse_address",
    "serve_tls",
    "serve_unix",
}


def test_all_is_pinned() -> None:
    assert set(dunix.wire.__all__) == PUBLIC
    assert len(dunix.wire.__all__) == len(PUBLIC), "duplicate in __all__"


def test_every_exported_name_exists() -> None:
    for name in dunix.wire.__all__:
        assert getattr(dunix.wire, name) is not None, name


def test_no_public_name_outside_all() -> None:
    # Submodules (``dunix.wire.control`` and the private ``_x`` ones) are not re-exports.
    public = {
        name
        for name, value in vars(dunix.wire).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == PUBLIC


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from dunix.wire import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC


def test_exports_come_from_private_modules() -> None:
    for name in dunix.wire.__all__:
        module = getattr(getattr(dunix.wire, name), "__module__", None)
        if module is not None and isinstance(getattr(dunix.wire, name), type):
            assert module.startswith("dunix.wire._"), (name, module)
