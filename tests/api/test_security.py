"""TLS, mutual TLS and bearer tokens, with certificates made here; health stays open for probes."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saliency.oip import grpc_predict_v2_pb2 as oip
from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency_client import SaliencyClient, SaliencyError
from saliency_service.api.server import SaliencyServer
from saliency_service.config import Settings
from saliency_service.core.errors import InvalidArgument

from .conftest import RunningServer, start_server, stop_server

TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_key: Path
    server_cert: Path
    ca_file: Path
    client_key: bytes
    client_cert: bytes
    stranger_key: bytes
    stranger_cert: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    other_ca_key, stranger_key = _key(), _key()
    (folder / "ca.pem").write_bytes(_pem(ca))
    (folder / "server.key").write_bytes(_pem_key(server_key))
    (folder / "server.pem").write_bytes(_pem(_cert("server", server_key, "test-ca", ca_key, server=True)))
    return Pki(
        ca=_pem(ca),
        server_key=folder / "server.key",
        server_cert=folder / "server.pem",
        ca_file=folder / "ca.pem",
        client_key=_pem_key(client_key),
        client_cert=_pem(_cert("pipeline", client_key, "test-ca", ca_key)),
        stranger_key=_pem_key(stranger_key),
        stranger_cert=_pem(_cert("stranger", stranger_key, "other-ca", other_ca_key)),
    )


def _settings(model_repository: Path, **values: object) -> Settings:
    return Settings(model_repository=model_repository, host="127.0.0.1", port=0, metrics_port=0, workers=1, grace_seconds=1.0, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls_server(model_repository: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"other-token\n{TOKEN}\n")
    running = start_server(
        _settings(model_repository, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), auth_token_file=str(tokens))
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def mtls_server(model_repository: Path, pki: Pki) -> Iterator[RunningServer]:
    running = start_server(
        _settings(
            model_repository, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca_file)
        )
    )
    yield running
    stop_server(running)


def _code(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, SaliencyError), error
    return error.code


def test_tls_with_the_right_token_works(tls_server: RunningServer, pki: Pki) -> None:
    with SaliencyClient(tls_server.address, credentials=grpc.ssl_channel_credentials(pki.ca), token=TOKEN, timeout=60) as client:
        assert [m.name for m in client.list_models()] == ["broken", "shapes", "vit_shapes"]


def test_missing_token_is_unauthenticated_and_a_wrong_one_permission_denied(tls_server: RunningServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca)
    with SaliencyClient(tls_server.address, credentials=credentials, timeout=60) as client:
        with pytest.raises(SaliencyError) as missing:
            client.list_models()
    assert _code(missing.value) == grpc.StatusCode.UNAUTHENTICATED and missing.value.reason == "MISSING_CREDENTIALS"
    with SaliencyClient(tls_server.address, credentials=credentials, token="guess", timeout=60) as client:
        with pytest.raises(SaliencyError) as wrong:
            client.list_models()
    assert _code(wrong.value) == grpc.StatusCode.PERMISSION_DENIED and wrong.value.reason == "INVALID_TOKEN"


def test_the_inference_protocol_needs_the_token_too(tls_server: RunningServer, pki: Pki) -> None:
    with grpc.secure_channel(tls_server.address, grpc.ssl_channel_credentials(pki.ca)) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerReady(oip.ServerReadyRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert stub.ServerReady(oip.ServerReadyRequest(), timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")]).ready


def test_health_stays_open_for_probes(tls_server: RunningServer, pki: Pki) -> None:
    with grpc.secure_channel(tls_server.address, grpc.ssl_channel_credentials(pki.ca)) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_to_a_tls_port_fails(tls_server: RunningServer) -> None:
    with SaliencyClient(tls_server.address, token=TOKEN, timeout=10) as client:
        with pytest.raises(SaliencyError) as refused:
            client.list_models()
    assert _code(refused.value) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(mtls_server: RunningServer, pki: Pki) -> None:
    good = grpc.ssl_channel_credentials(pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert)
    with SaliencyClient(mtls_server.address, credentials=good, timeout=60) as client:
        assert "shapes" in [m.name for m in client.list_models()]
    for credentials in (
        grpc.ssl_channel_credentials(pki.ca),
        grpc.ssl_channel_credentials(pki.ca, private_key=pki.stranger_key, certificate_chain=pki.stranger_cert),
    ):
        with SaliencyClient(mtls_server.address, credentials=credentials, timeout=10) as client:
            with pytest.raises(SaliencyError) as refused:
                client.list_models()
        assert _code(refused.value) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "values",
    [
        {"tls_cert_file": "/nonexistent.pem"},
        {"tls_cert_file": "/nonexistent.pem", "tls_key_file": "/nonexistent.key"},
        {"tls_client_ca_file": "/nonexistent.pem"},
        {"auth_token_file": "/nonexistent"},
    ],
)
def test_bad_security_settings_fail_at_start_with_the_setting_named(model_repository: Path, values: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument) as error:
        SaliencyServer(_settings(model_repository, **values))
    assert error.value.reason == "INVALID_SETTINGS"
    assert any(name in error.value.message for name in values)


def test_an_empty_token_file_is_refused(model_repository: Path, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("\n  \n")
    with pytest.raises(InvalidArgument, match="holds no token"):
        SaliencyServer(_settings(model_repository, auth_token_file=str(tmp_path / "tokens")))
