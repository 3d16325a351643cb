"""gRPC channel and server settings shared by every codelane process.

Keepalive settings are matched on both sides: clients ping no more often than servers allow, so
idle worker streams survive NATs and load balancers without being killed for "too many pings".
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A channel whose server went away tries again after 1 s, then 1.6 times longer each time, up
    # to 2 minutes; calls meanwhile fail at once without trying. After 16 s down it would not try
    # again for 10 s more, past the 20 s an SDK stream gives a restarting server to come back
    # (codelane.client.RESUME_WITHIN): a server back in time was never reached.
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start and take
    # half of the connections. Off, it is refused at bind.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Accept client pings as often as clients are configured to send them.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_pings_without_data", 0),
]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives unary calls made without a timeout this one, so a silent server cannot hang a client.
    Streams are left alone: a turn or a watch may rightly run for hours."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self.seconds)
        return await continuation(client_call_details, request)


def create_channel(
    address: str,
    *,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    unary_timeout: float | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel: TLS when a CA is given (mTLS when a client cert and key are too).
    `unary_timeout` is the deadline of unary calls that do not set their own (None: no deadline).
    ValueError for a client certificate without its key (or a key without it), or without a CA:
    the channel would be plaintext, the certificate unused and a token sent in clear."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate and its key go together: give both tls_cert and tls_key")
    if tls_cert and tls_ca is None:
        raise ValueError("a client certificate (mTLS) needs TLS: give tls_ca too (the CA that signed the "
                         "server's certificate)")
    interceptors = [DefaultDeadline(unary_timeout)] if unary_timeout is not None else None
    if tls_ca is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> str:
    # Called only for an encrypted key; without it OpenSSL would prompt on the terminal.
    raise _EncryptedKey


def check_tls_files(*, cert: str | Path | None = None, key: str | Path | None = None,
                    ca: str | Path | None = None, ca_name: str = "TLS CA") -> None:
    """Raises ValueError naming the file and what is wrong with it when gRPC could not use it: a
    certificate or CA that holds no PEM certificate, a key that is no PEM private key, is
    encrypted or does not match its certificate. gRPC itself only logs lines of its own and then
    fails as if the port were taken (a server) or the peer unreachable (a client)."""
    for name, path in (("TLS certificate", cert), (ca_name, ca)):
        if path:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
            except ssl.SSLError:
                raise ValueError(
                    f"{name} {path}: holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)"
                ) from None
    if cert and key:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key), password=_refuse_passphrase)
        except _EncryptedKey:
            raise ValueError(f"TLS key {key}: encrypted with a passphrase, which gRPC cannot ask for: decrypt "
                             "it (openssl pkey -in KEY -out PLAIN)") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"TLS key {key}: does not match the certificate {cert}") from None
            raise ValueError(
                f"TLS key {key}: holds no PEM private key (a -----BEGIN ... PRIVATE KEY----- block)"
            ) from None


def parse_address(text: str, *, listen: bool = False) -> str:
    """A gRPC address, checked: `HOST:PORT`, `[IPV6]:PORT`, `unix:PATH` or `unix-abstract:NAME`. The port must be given
    (gRPC would silently use 443), from 1 to 65535, or 0 when `listen`ing (any free port). Returns
    the address stripped; ValueError saying what is wrong and what to write instead."""
    address = text.strip()
    example = "e.g. 127.0.0.1:50051"
    if not address:
        raise ValueError(f"the address is empty: give HOST:PORT, {example}")
    for scheme in ("unix:", "unix-abstract:"):
        if address.startswith(scheme):
            if not address.removeprefix(scheme).strip("/"):
                raise ValueError(f"{text!r} names no socket: give {scheme}/path/to/socket")
            return address
    if "://" in address:
        scheme, _, rest = address.partition("://")
        instead = rest.rstrip("/") or "host:50051"
        raise ValueError(f"{text!r} is a URL: give HOST:PORT without {scheme}://, e.g. {instead}")
    if any(c.isspace() for c in address) or "/" in address:
        raise ValueError(f"{text!r} is not HOST:PORT, {example}")
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r} has no port: give [IPV6]:PORT, e.g. [::1]:50051")
        port = rest[1:]
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} has no port: give HOST:PORT, e.g. {address}:50051")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:50051")
    if not host:
        raise ValueError(f"{text!r} has no host: give HOST:PORT, {example}")
    lowest = 0 if listen else 1
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from {lowest} to 65535")
    return address
