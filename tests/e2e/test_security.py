"""TLS, mutual TLS and bearer-token auth on a real grpc.aio server on a free localhost port.

The FeatureLensService here is a tiny fake with canned answers: the engine cannot be started per test, and
what is under test is the transport and the interceptor in front of the servicer, not generation. Health and
reflection are the real servicers, as in `featurelens serve`. Certificates come from a throwaway CA made
with `cryptography` for this test session; nothing is read from or written to the repository.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from featurelens.server import security
from featurelens.server.security import (
    UNAUTHENTICATED_MESSAGE,
    BearerTokenInterceptor,
    RequestIdFilter,
    load_server_credentials,
    load_tokens,
    request_id_scope,
    request_id_var,
)
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

TOKENS = ["s3cret-token-a", "other-token-b"]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureLensService"].full_name
TIMEOUT_S = 10  # every call has a deadline: a broken handshake must fail the test, never hang it


# -- a throwaway PKI ------------------------------------------------------------------------------------------


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # fast to generate, unlike RSA


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), cert, key


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          server: bool) -> Pem:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        # Hostname checks read the SAN, not the CN: both names a client may dial are listed.
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_ca: Pem  # a CA the server does not trust, with a client cert of its own
    rogue_client: Pem
    files: dict[str, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    ca, ca_cert, ca_key = make_ca("featurelens test CA")
    rogue_ca, rogue_cert, rogue_key = make_ca("someone else's CA")
    result = Pki(ca=ca, server=issue(ca_cert, ca_key, "localhost", server=True),
                 client=issue(ca_cert, ca_key, "test-client", server=False), rogue_ca=rogue_ca,
                 rogue_client=issue(rogue_cert, rogue_key, "rogue-client", server=False), files={})
    root = tmp_path_factory.mktemp("pki")
    for name, data in (("ca.pem", ca.cert), ("server.pem", result.server.cert), ("server.key", result.server.key)):
        (root / name).write_bytes(data)
        result.files[name] = root / name
    return result


# -- a real server with a fake service -------------------------------------------------------------------------


class FakeFeatureLens(pb_grpc.FeatureLensServiceServicer):
    """Canned answers; stands in for the vLLM-backed servicer, which needs an engine we cannot start per test."""

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802 — gRPC method name
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model="fake-model", num_layers=2)

    async def GenerateStream(self, request: pb.GenerateStreamRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        for word in ("hello", " world"):
            yield pb.GenerateStreamResponse(text_delta=word)
        yield pb.GenerateStreamResponse(finish_reason=pb.FINISH_REASON_LENGTH)


@dataclass
class Served:
    server: grpc.aio.Server
    port: int


async def start(credentials: grpc.ServerCredentials | None, tokens: list[str] | None = None) -> Served:
    interceptors = [BearerTokenInterceptor(tokens)] if tokens else []
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_FeatureLensServiceServicer_to_server(FakeFeatureLens(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return Served(server, port)


@pytest.fixture(scope="module")
async def plain_auth() -> AsyncIterator[Served]:
    served = await start(None, TOKENS)
    yield served
    await served.server.stop(0)


@pytest.fixture(scope="module")
async def tls_auth(pki: Pki) -> AsyncIterator[Served]:
    served = await start(load_server_credentials(pki.files["server.pem"], pki.files["server.key"]), TOKENS)
    yield served
    await served.server.stop(0)


@pytest.fixture(scope="module")
async def mtls(pki: Pki) -> AsyncIterator[Served]:
    credentials = load_server_credentials(pki.files["server.pem"], pki.files["server.key"],
                                          client_ca_file=pki.files["ca.pem"])
    served = await start(credentials)
    yield served
    await served.server.stop(0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def model_info(channel: grpc.aio.Channel, metadata=None) -> pb.GetModelInfoResponse:
    return await pb_grpc.FeatureLensServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata,
                                                                       timeout=TIMEOUT_S)


async def stream_texts(channel: grpc.aio.Channel, metadata=None) -> list[str]:
    call = pb_grpc.FeatureLensServiceStub(channel).GenerateStream(pb.GenerateStreamRequest(text="hi"),
                                                                  metadata=metadata, timeout=TIMEOUT_S)
    return [chunk.text_delta async for chunk in call]


async def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- bearer tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [
    None,
    bearer("wrong-token"),
    bearer(TOKENS[0] + "x"),
    bearer(TOKENS[0][:-1]),
    (("authorization", TOKENS[0]),),  # no scheme
    (("authorization", f"Basic {TOKENS[0]}"),),
    (("authorization", "Bearer "),),
    (("x-api-key", TOKENS[0]),),
], ids=["none", "wrong", "longer", "prefix", "no-scheme", "basic", "empty", "other-header"])
async def test_unary_refused_without_the_right_token(plain_auth: Served, metadata) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_auth.port}") as channel:
        error = await status_of(model_info(channel, metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == UNAUTHENTICATED_MESSAGE


@pytest.mark.parametrize("metadata", [None, bearer("wrong-token")], ids=["none", "wrong"])
async def test_stream_refused_without_the_right_token(plain_auth: Served, metadata) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_auth.port}") as channel:
        error = await status_of(stream_texts(channel, metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == UNAUTHENTICATED_MESSAGE


@pytest.mark.parametrize("token", TOKENS)
async def test_right_token_passes_unary_and_stream(plain_auth: Served, token: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_auth.port}") as channel:
        assert (await model_info(channel, bearer(token))).model == "fake-model"
        assert await stream_texts(channel, bearer(token)) == ["hello", " world", ""]
        # The scheme is case-insensitive (RFC 7235).
        assert (await model_info(channel, (("authorization", f"bearer {token}"),))).model == "fake-model"


async def test_unknown_method_is_unauthenticated_not_unimplemented(plain_auth: Served) -> None:
    # Without a token a caller must not learn which methods exist.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_auth.port}") as channel:
        call = channel.unary_unary("/featurelens.v1.FeatureLensService/NoSuchMethod")(b"", timeout=TIMEOUT_S)
        assert (await status_of(call)).code() == grpc.StatusCode.UNAUTHENTICATED
        call = channel.unary_unary("/featurelens.v1.FeatureLensService/NoSuchMethod")(
            b"", metadata=bearer(TOKENS[0]), timeout=TIMEOUT_S)
        assert (await status_of(call)).code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_and_reflection_stay_open(plain_auth: Served) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_auth.port}") as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=TIMEOUT_S)
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert SERVICE_NAME in names


async def test_health_can_be_closed_too() -> None:
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(TOKENS, security.open_methods(False, False))])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert (await status_of(check)).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)


def test_every_token_is_compared_without_early_exit(monkeypatch) -> None:
    calls = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    interceptor = BearerTokenInterceptor(["t1", "t2", "t3"])
    for presented, expected in (("t1", True), ("t3", True), ("nope", False)):
        calls.clear()
        assert interceptor.authorized(bearer(presented)) is expected
        assert len(calls) == 3, "a match must not stop the loop early: the time would tell which token matched"


async def test_tokens_never_logged(plain_auth: Served, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_auth.port}") as channel:
        await status_of(model_info(channel, bearer("leaked-wrong-token")))
        await model_info(channel, bearer(TOKENS[0]))
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "leaked-wrong-token" not in text and TOKENS[0] not in text


def test_interceptor_needs_a_token() -> None:
    with pytest.raises(ValueError):
        BearerTokenInterceptor([])


# -- TLS and mutual TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_tls_handshake_with_the_test_ca(tls_auth: Served, pki: Pki, host: str) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    async with grpc.aio.secure_channel(f"{host}:{tls_auth.port}", credentials) as channel:
        assert (await model_info(channel, bearer(TOKENS[0]))).model == "fake-model"
        assert await stream_texts(channel, bearer(TOKENS[1])) == ["hello", " world", ""]
        # TLS does not replace the token.
        assert (await status_of(model_info(channel))).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_plaintext_refused_when_tls_is_on(tls_auth: Served) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_auth.port}") as channel:
        error = await status_of(model_info(channel, bearer(TOKENS[0])))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_server_cert_from_an_untrusted_ca_is_refused(tls_auth: Served, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.rogue_ca.cert)
    async with grpc.aio.secure_channel(f"localhost:{tls_auth.port}", credentials) as channel:
        error = await status_of(model_info(channel, bearer(TOKENS[0])))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_accepts_a_client_cert_from_the_ca(mtls: Served, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert, private_key=pki.client.key,
                                               certificate_chain=pki.client.cert)
    async with grpc.aio.secure_channel(f"localhost:{mtls.port}", credentials) as channel:
        assert (await model_info(channel)).model == "fake-model"
        assert await stream_texts(channel) == ["hello", " world", ""]


@pytest.mark.parametrize("client", ["none", "rogue"])
async def test_mtls_refuses_missing_or_foreign_client_certs(mtls: Served, pki: Pki, client: str) -> None:
    if client == "none":
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert, private_key=pki.rogue_client.key,
                                                   certificate_chain=pki.rogue_client.cert)
    async with grpc.aio.secure_channel(f"localhost:{mtls.port}", credentials) as channel:
        error = await status_of(model_info(channel))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_credentials_name_the_bad_setting(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^tls_cert_file: cannot read"):
        load_server_credentials(tmp_path / "missing.pem", pki.files["server.key"])
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="^tls_key_file: .* is not a PEM file"):
        load_server_credentials(pki.files["server.pem"], not_pem)
    with pytest.raises(ValueError, match="^tls_client_ca_file: "):
        load_server_credentials(pki.files["server.pem"], pki.files["server.key"], client_ca_file=not_pem)


# -- loading tokens ------------------------------------------------------------------------------------------------


def test_load_tokens_from_file_and_env(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# operators\nalpha-1\n\n  beta-2  \n#gamma-3\nalpha-1\n")
    assert load_tokens(token_file, None) == ["alpha-1", "beta-2"]
    assert load_tokens(None, " delta-4, ,epsilon-5,") == ["delta-4", "epsilon-5"]
    assert load_tokens(token_file, "beta-2,zeta-6") == ["alpha-1", "beta-2", "zeta-6"]
    assert load_tokens(None, None) == [] and load_tokens(None, "") == []  # auth off


def test_load_tokens_rejects_bad_config_without_echoing_tokens(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="contains no tokens"):
        load_tokens(empty, None)
    with pytest.raises(ValueError, match="cannot read"):
        load_tokens(tmp_path / "missing", None)
    spaced = tmp_path / "spaced"
    spaced.write_text("good\nhas secret space\n")
    with pytest.raises(ValueError, match="line 2") as info:
        load_tokens(spaced, None)
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="item 2") as info:
        load_tokens(None, "ok,naïve-secret")
    assert "secret" not in str(info.value)


# -- request ids in logs --------------------------------------------------------------------------------------------


def test_request_id_filter_tags_every_record() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("featurelens.test.request_id")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        with request_id_scope("req-42"):
            logger.warning("inside")
            logger.warning("explicit", extra={"request_id": "given"})
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert [r.request_id for r in records] == ["-", "req-42", "given", "-"]
    assert request_id_var.get() == "-"
