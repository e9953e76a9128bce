"""Transport security, bearer-token auth and request-scoped logging for the gRPC server.

- `load_server_credentials`: TLS from PEM files; with a client CA, mutual TLS (client certificates required).
- `load_tokens` + `BearerTokenInterceptor`: `authorization: Bearer <token>` checked in constant time against
  every configured token; anything else is UNAUTHENTICATED before the servicer (or even the request parser)
  runs. Health and reflection stay open by default so probes and grpcurl work without a secret.
- `request_id_var` + `RequestIdFilter`: every log record carries the id of the RPC that emitted it.

Tokens are secrets: nothing here logs them, and errors about them say where (file, line) but never what.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
REFLECTION_METHODS = frozenset({"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"})
DEFAULT_OPEN_METHODS = HEALTH_METHODS | REFLECTION_METHODS
UNAUTHENTICATED_MESSAGE = "authorization: missing or invalid bearer token"


# -- TLS ------------------------------------------------------------------------------------------------------


def load_server_credentials(cert_file: str | Path, key_file: str | Path,
                            client_ca_file: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS server credentials from PEM files. With `client_ca_file`, clients must present a certificate
    signed by that CA (mutual TLS); without it, any client may connect and auth is the bearer token's job."""
    cert = _read_pem(cert_file, "tls_cert_file", "CERTIFICATE")
    key = _read_pem(key_file, "tls_key_file", "PRIVATE KEY")
    client_ca = _read_pem(client_ca_file, "tls_client_ca_file", "CERTIFICATE") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _read_pem(path: str | Path, setting: str, kind: str) -> bytes:
    # Fail at start-up with the setting's name: gRPC itself only reports a handshake failure much later.
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {path}: {error.strerror or error}") from error
    # "PRIVATE KEY" also matches "RSA PRIVATE KEY" / "EC PRIVATE KEY" headers.
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ValueError(f"{setting}: {path} is not a PEM file with a {kind}")
    return data


# -- bearer tokens --------------------------------------------------------------------------------------------


def load_tokens(token_file: str | Path | None, env_value: str | None) -> list[str]:
    """Accepted bearer tokens: one per line in `token_file` (blank lines and `#` comments skipped) plus the
    comma-separated `env_value`. Duplicates are dropped, order kept. An empty list means auth is off.

    A token file that yields no token is an error: the operator asked for auth, and silently running
    without it (or locking everyone out) would both be worse than refusing to start."""
    tokens: list[str] = []
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"auth_token_file: cannot read {token_file}: {error}") from error
        from_file = []
        for number, line in enumerate(lines, start=1):
            token = line.strip()
            if token and not token.startswith("#"):
                _check_token(token, f"auth_token_file {token_file} line {number}")
                from_file.append(token)
        if not from_file:
            raise ValueError(f"auth_token_file: {token_file} contains no tokens")
        tokens += from_file
    if env_value:
        for position, part in enumerate(env_value.split(","), start=1):
            token = part.strip()
            if token:
                _check_token(token, f"auth tokens from the environment, item {position}")
                tokens.append(token)
    return list(dict.fromkeys(tokens))


def _check_token(token: str, where: str) -> None:
    # gRPC metadata values are printable ASCII, and "Bearer <token>" splits on whitespace: a token outside
    # that set could never be presented, so it is a configuration mistake. The token itself is not quoted.
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError(f"{where}: a token must be printable ASCII without spaces")


def _digest(token: bytes) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of the tokens' lengths too.
    return hashlib.sha256(token).digest()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the first `authorization` entry if it is `Bearer <token>` (scheme case-insensitive)."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else bytes(value)
        scheme, _, token = raw.strip().partition(b" ")
        token = token.strip()
        return token if scheme.lower() == b"bearer" and token else None
    return None


def caller_namespace(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The caller's namespace for shared state (steering vectors): derived from its bearer token, so callers
    with different tokens never see each other's state; "public" without a token (auth off)."""
    token = bearer_token(metadata)
    return "t-" + _digest(token).hex()[:20] if token else "public"


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
    # A coroutine function on purpose: gRPC runs plain functions on a thread pool.
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # pragma: no cover — unreachable; makes this an async generator like a real streaming handler


# Denial handlers of each RPC kind. They have no request deserializer on purpose: an unauthenticated
# caller's payload is never parsed.
_DENY_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_deny_unary),
    (False, True): grpc.unary_stream_rpc_method_handler(_deny_streaming),
    (True, False): grpc.stream_unary_rpc_method_handler(_deny_unary),
    (True, True): grpc.stream_stream_rpc_method_handler(_deny_streaming),
}


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` for a configured token, or to a method
    in `open_methods` (health and reflection by default, so load balancers and grpcurl need no secret).

    The presented token is compared with every configured token, without stopping at the first match, using
    `hmac.compare_digest` on SHA-256 digests: the time taken says neither which token matched nor how long
    the tokens are. Refused calls get UNAUTHENTICATED from a handler of the same kind (unary/streaming) as
    the real one; unknown methods are refused the same way, so their existence is not revealed either."""

    def __init__(self, tokens: Iterable[str], open_methods: Iterable[str] = DEFAULT_OPEN_METHODS) -> None:
        self._digests = [_digest(token.encode("ascii")) for token in tokens]
        if not self._digests:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self.open_methods = frozenset(open_methods)

    def authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = bearer_token(metadata)
        if presented is None:
            return False
        digest = _digest(presented)
        match = False
        for expected in self._digests:
            match |= hmac.compare_digest(digest, expected)  # `|=`, not `or`: every token is always compared
        return match

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in self.open_methods or self.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        # Debug only, and without the metadata: a flood of bad calls must not flood the logs, and the
        # presented value may be a real token sent to the wrong server.
        log.debug("refused unauthenticated call to %s", method)
        handler = await continuation(handler_call_details)
        if handler is None:
            return _DENY_HANDLERS[False, False]
        return _DENY_HANDLERS[bool(handler.request_streaming), bool(handler.response_streaming)]


def open_methods(health_open: bool = True, reflection_open: bool = True) -> frozenset[str]:
    """The methods that skip auth, from the two operator switches."""
    return (HEALTH_METHODS if health_open else frozenset()) | (REFLECTION_METHODS if reflection_open else frozenset())


# -- request ids in logs --------------------------------------------------------------------------------------

# Set by the servicer at the start of each RPC; asyncio gives every RPC its own task, hence its own context,
# so concurrent RPCs never see each other's id.
request_id_var: ContextVar[str] = ContextVar("featurelens_request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current RPC's id, "-" outside one) to every record. Attach it to the
    *handler*, not a logger: handler filters see records from every logger, vLLM's included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an explicit `extra={"request_id": ...}` wins
            record.request_id = request_id_var.get()
        return True


@contextlib.contextmanager
def request_id_scope(request_id: str) -> Iterator[None]:
    """`with request_id_scope(rid):` — logs inside carry `rid`; the previous id is restored afterwards."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)
