"""HTTPS on the data port, as Ray Serve's ``http_options`` ask for it.

Each test makes its own certificates (a CA, a server certificate for
127.0.0.1 signed by it, a client certificate), serves over HTTPS and talks to
the server with httpx trusting that CA. A bad file or password fails when the
options are given (``tandem.start``, ``tandem run``), not on a first request;
TLS connections keep every limit of the data port.
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, WebSocket
from starlette.requests import Request
from websockets.sync.client import connect as ws_connect

import tandem as serve
from helpers import GREETER, assert_clear_failure, env, free_port, tandem, wait_for
from tandem._private.api import http_url
from tandem.config import HTTPOptions


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    encrypted_key: Path
    password: str
    client_cert: Path
    client_key: Path
    other_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: Any, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: str | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("tandem test CA", ca_key, "tandem test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    return Certs(
        ca=_write_cert(tmp_path / "ca.crt", ca),
        cert=_write_cert(
            tmp_path / "server.crt",
            _certificate("localhost", server_key, "tandem test CA", ca_key, ca=False),
        ),
        key=_write_key(tmp_path / "server.key", server_key),
        encrypted_key=_write_key(tmp_path / "server-encrypted.key", server_key, "s3cret"),
        password="s3cret",
        client_cert=_write_cert(
            tmp_path / "client.crt",
            _certificate("client", client_key, "tandem test CA", ca_key, ca=False),
        ),
        client_key=_write_key(tmp_path / "client.key", client_key),
        other_key=_write_key(tmp_path / "other.key", ec.generate_private_key(ec.SECP256R1())),
    )


def https_options(certs: Certs, **options: Any) -> dict[str, Any]:
    return {"port": 0, "ssl_keyfile": str(certs.key), "ssl_certfile": str(certs.cert), **options}


def trusting(certs: Certs, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


@serve.deployment
class Where:
    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"scheme": request.url.scheme, "url": str(request.url)}


def base_url() -> str:
    url = http_url()
    assert url is not None
    return url


def test_https_serves_every_backend_and_plain_http_is_not_served(
    certs: Certs, backend: str
) -> None:
    serve.start(http_options=https_options(certs))
    serve.run(Where.bind(), route_prefix="/where", backend=backend)
    url = base_url()
    assert url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=trusting(certs), timeout=10) as client:
        answer = client.get(url + "/where/x")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"scheme": "https", "url": url + "/where/x"}
        assert client.get(url + "/-/healthz").text == "success"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/where/x", timeout=10)


def test_https_options_object_and_an_encrypted_key_with_its_password(certs: Certs) -> None:
    options = HTTPOptions(
        port=0,
        ssl_keyfile=str(certs.encrypted_key),
        ssl_certfile=str(certs.cert),
        ssl_keyfile_password=certs.password,
    )
    assert certs.password not in repr(options)
    serve.start(http_options=options)
    serve.run(Where.bind(), backend="local")
    answer = httpx.get(base_url() + "/", verify=trusting(certs), timeout=10)
    assert answer.json()["scheme"] == "https"


def test_key_and_certificate_must_come_together() -> None:
    for given in ({"ssl_keyfile": "server.key"}, {"ssl_certfile": "server.crt"}):
        with pytest.raises(ValueError, match="ssl_keyfile and ssl_certfile must be given together"):
            serve.start(http_options=given)
        with pytest.raises(ValueError, match="must be given together"):
            HTTPOptions(**given)
    for given in ({"ssl_keyfile_password": "x"}, {"ssl_ca_certs": "ca.crt"}):
        with pytest.raises(ValueError, match="only apply to HTTPS"):
            HTTPOptions(**given)
    # Empty strings mean "not given", as Ray Serve reads them.
    assert not HTTPOptions(ssl_keyfile="", ssl_certfile="").tls
    # A password of the wrong type is refused without showing it.
    given = {"ssl_keyfile": "k", "ssl_certfile": "c", "ssl_keyfile_password": 918273}
    with pytest.raises(ValueError) as failure:
        serve.start(http_options=given)
    assert "must be a string" in str(failure.value) and "918273" not in str(failure.value)
    with pytest.raises(ValueError) as failure:
        HTTPOptions(**given)
    assert "918273" not in str(failure.value)


def test_unusable_files_and_passwords_fail_at_start_with_a_clear_error(
    certs: Certs, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ({"ssl_keyfile": str(tmp_path / "missing.key")}, "ssl_keyfile", "cannot be read"),
        ({"ssl_certfile": str(tmp_path / "missing.crt")}, "ssl_certfile", "cannot be read"),
        ({"ssl_certfile": str(junk)}, "ssl_certfile", "holds no PEM certificate"),
        ({"ssl_keyfile": str(junk)}, "ssl_keyfile", "holds no PEM private key"),
        ({"ssl_keyfile": str(certs.other_key)}, "is not the key of the certificate", ""),
        ({"ssl_keyfile": str(certs.encrypted_key)}, "is encrypted", "ssl_keyfile_password"),
        (
            {"ssl_keyfile": str(certs.encrypted_key), "ssl_keyfile_password": "wrong"},
            "ssl_keyfile_password does not decrypt",
            "",
        ),
        ({"ssl_ca_certs": str(junk)}, "ssl_ca_certs", "holds no usable CA certificate"),
        ({"ssl_ca_certs": str(tmp_path / "missing-ca.crt")}, "ssl_ca_certs", "cannot be read"),
    ]
    for given, *words in cases:
        with pytest.raises(ValueError) as failure:
            serve.start(http_options=https_options(certs, **given))
        for word in words:
            assert word in str(failure.value), (given, str(failure.value))
        assert "wrong" not in str(failure.value)  # a password is never echoed
    # Nothing was taken: the good options still serve.
    serve.start(http_options=https_options(certs))
    serve.run(Where.bind(), backend="local")
    assert httpx.get(base_url() + "/", verify=trusting(certs), timeout=10).status_code == 200


def test_ssl_ca_certs_requires_a_client_certificate_signed_by_that_ca(certs: Certs) -> None:
    serve.start(http_options=https_options(certs, ssl_ca_certs=str(certs.ca)))
    serve.run(Where.bind(), backend="local")
    url = base_url() + "/"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=trusting(certs), timeout=10)
    answer = httpx.get(url, verify=trusting(certs, client_cert=True), timeout=10)
    assert answer.status_code == 200


# -- the limits hold over TLS ----------------------------------------------------------


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(30)  # a wait for the server's close, not a measured time
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_stalled_handshake_is_closed_at_header_timeout(certs: Certs) -> None:
    serve.start(http_options=https_options(certs, header_timeout_s=0.5))
    serve.run(Where.bind(), backend="local")
    host, port = base_url().removeprefix("https://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never finished
        assert _closed_by_server(sock)
    with socket.create_connection((host, int(port))) as sock:  # sends nothing at all
        assert _closed_by_server(sock)


def test_connections_shaking_hands_count_against_max_connections(certs: Certs) -> None:
    serve.start(http_options=https_options(certs, max_connections=2))
    serve.run(Where.bind(), backend="local")
    url = base_url()
    host, port = url.removeprefix("https://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/", verify=trusting(certs), timeout=10)
    finally:
        for sock in idle:
            sock.close()

    def serves() -> bool:
        try:
            return httpx.get(url + "/", verify=trusting(certs), timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(serves, timeout_s=10)


def test_a_closed_idle_connection_frees_its_place_without_the_clients_close_notify(
    certs: Certs,
) -> None:
    serve.start(http_options=https_options(certs, max_connections=1, keep_alive_timeout_s=0.2))
    serve.run(Where.bind(), backend="local")
    url = base_url() + "/"
    with httpx.Client(verify=trusting(certs), timeout=10) as idle:
        assert idle.get(url).status_code == 200  # then idle in its pool, reading nothing

        def serves() -> bool:
            try:
                return httpx.get(url, verify=trusting(certs), timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        # asyncio would wait 30 s for the idle client's close_notify, holding the only place.
        assert wait_for(serves, timeout_s=15)


def test_head_size_limit_holds_over_tls(certs: Certs) -> None:
    serve.start(http_options=https_options(certs, max_header_bytes=2048))
    serve.run(Where.bind(), backend="local")
    with httpx.Client(verify=trusting(certs), timeout=10) as client:
        answer = client.get(base_url() + "/", headers={"x-big": "a" * 4096})
        assert answer.status_code == 431
        assert client.get(base_url() + "/").status_code == 200


# -- tandem run and a config file ------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "greet.py").write_text(GREETER)
    return folder


def _config(certs: Certs, port: int, **options: Any) -> str:
    http = {"port": port, "ssl_keyfile": str(certs.key), "ssl_certfile": str(certs.cert)}
    return yaml.safe_dump(
        {
            "http_options": {**http, **options},
            "applications": [{"name": "default", "import_path": "greet:greeter"}],
        }
    )


@pytest.fixture
def https_server(app_dir: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> subprocess.Popen[bytes]:
        (app_dir / "serve.yaml").write_text(config)
        with (tmp_path / "server.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tandem", "run", "serve.yaml"],
                cwd=app_dir,
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_tandem_run_serves_https_from_the_config_file(
    certs: Certs, app_dir: Path, https_server: Any, tmp_path: Path
) -> None:
    port = free_port()
    process = https_server(_config(certs, port))
    url = f"https://127.0.0.1:{port}"

    def answers() -> str | None:
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return httpx.get(url + "/", verify=trusting(certs), timeout=5).text
        except httpx.HTTPError:
            return None

    assert wait_for(answers, timeout_s=30) == "unconfigured"


def test_tandem_run_refuses_a_wrong_password_before_deploying(certs: Certs, app_dir: Path) -> None:
    config = _config(
        certs, free_port(), ssl_keyfile=str(certs.encrypted_key), ssl_keyfile_password="nope"
    )
    (app_dir / "serve.yaml").write_text(config)
    result = tandem("run", "serve.yaml", cwd=app_dir)
    assert_clear_failure(result, "ssl_keyfile_password does not decrypt")
    assert "nope" not in result.stderr


wss_app = FastAPI()


@serve.deployment
@serve.ingress(wss_app)
class SecureEcho:
    @wss_app.websocket("/ws")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(f"{ws.url.scheme}:{await ws.receive_text()}")
        await ws.close()


def test_websocket_sessions_are_served_over_tls(certs: Certs) -> None:
    serve.start(http_options=https_options(certs))
    serve.run(SecureEcho.bind(), route_prefix="/secure")
    url = base_url().replace("https://", "wss://") + "/secure/ws"
    with ws_connect(url, ssl=trusting(certs)) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "wss:hello"
