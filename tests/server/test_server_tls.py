"""TLS on the one port (``--certfile/--keyfile``): WebSocket (wss) and HTTP
(https) round trips against a certificate made here, and a plain-text
client refused without harm."""

from __future__ import annotations

import datetime
import ipaddress
import json
import pathlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_support import Daemon, daemon

from agor_actors.client import CallError, connect, open_websocket
from agor_actors.server import ServerSettings
from protocols import PROTOCOL_VERSION, Codec, Hello, Welcome, decode_server_frame, encode


def _certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


@pytest.fixture
async def secure(tmp_path: pathlib.Path) -> AsyncIterator[tuple[Daemon, ssl.SSLContext]]:
    certfile, keyfile = _certificate(tmp_path)
    settings = ServerSettings(certfile=certfile, keyfile=keyfile)
    async with daemon(tmp_path / "data", settings) as d:
        yield d, ssl.create_default_context(cafile=str(certfile))


async def _https(port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_https_round_trip(secure: tuple[Daemon, ssl.SSLContext]) -> None:
    d, context = secure
    reply = await _https(
        d.port,
        context,
        b"GET /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + f"Authorization: Bearer {d.token}\r\n\r\n".encode(),
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["data"] == []
    health = await _https(
        d.port, context, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert health.startswith(b"HTTP/1.1 200")


async def test_wss_round_trip(secure: tuple[Daemon, ssl.SSLContext]) -> None:
    d, context = secure
    url = f"wss://127.0.0.1:{d.port}/ws"
    async with open_websocket(
        url, subprotocols=[Codec.JSON.subprotocol], ssl_context=context
    ) as ws:
        await ws.send_message(encode(Codec.JSON, Hello(PROTOCOL_VERSION, d.token, None)))
        with trio.fail_after(10):
            (welcome,) = decode_server_frame(Codec.JSON, await ws.get_message())
        assert isinstance(welcome, Welcome)
        # calls and their results, and a large frame both ways
        session = await _call(ws, 1, "sessions", {"title": "over TLS"})
        content = "x" * 100_000
        message = await _call(
            ws, 2, "messages", {"session_id": session["id"], "role": "user", "content": content}
        )
        assert message["content"] == content


async def _call(ws: Any, ref: int, service: str, data: dict[str, Any]) -> Any:
    frame = {"type": "call", "ref": ref, "service": service, "method": "create", "data": data}
    await ws.send_message(json.dumps(frame))
    with trio.fail_after(10):
        (result,) = decode_server_frame(Codec.JSON, await ws.get_message())
    assert result.ok, result
    return result.data


async def test_plain_text_on_a_tls_port_is_closed(secure: tuple[Daemon, ssl.SSLContext]) -> None:
    d, context = secure
    stream = await trio.open_tcp_stream("127.0.0.1", d.port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
        assert not data.startswith(b"HTTP/1.1 200")
    # the daemon still serves TLS clients
    health = await _https(
        d.port, context, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert health.startswith(b"HTTP/1.1 200")


async def test_half_a_tls_configuration_is_refused(tmp_path: pathlib.Path) -> None:
    from agor_actors.server._serve import StartupError

    certfile, _ = _certificate(tmp_path)
    with pytest.raises(BaseException) as caught:
        async with daemon(tmp_path / "data", ServerSettings(certfile=certfile)):
            pass
    error: BaseException = caught.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, StartupError)
    assert "both --certfile and --keyfile" in str(error)


async def _refused(url: str, token: str) -> CallError:
    """The error of a client that cannot connect to ``url``: at once, not
    after the connect timeout."""
    with trio.fail_after(5), pytest.raises(CallError) as caught:
        async with connect(url, token=token):
            pass
    assert caught.value.code == "unavailable"
    return caught.value


async def test_a_wss_url_with_an_untrusted_certificate_fails_at_once_saying_why(
    secure: tuple[Daemon, ssl.SSLContext],
) -> None:
    d, _ = secure
    refused = await _refused(f"wss://127.0.0.1:{d.port}/ws", d.token)
    assert "TLS handshake failed: self-signed certificate" in refused.message


async def test_a_wss_url_on_a_plain_port_fails_at_once_saying_why(tmp_path: pathlib.Path) -> None:
    """The TLS handshake is made before the WebSocket's, so its failure is
    the error (it was a WebSocket closed mid-handshake, waited out for the
    whole connect timeout and reported as "no answer in time")."""
    async with daemon(tmp_path / "data") as d:
        refused = await _refused(f"wss://127.0.0.1:{d.port}/ws", d.token)
    assert "TLS handshake failed: wrong version number" in refused.message
    assert "a ws:// URL?" in refused.message


async def test_a_ws_url_on_a_tls_port_fails_at_once(secure: tuple[Daemon, ssl.SSLContext]) -> None:
    d, _ = secure
    refused = await _refused(f"ws://127.0.0.1:{d.port}/ws", d.token)
    assert "the server closed the connection during the handshake" in refused.message
