"""One streaming POST to a model API, with the SDKs' retry rules, shared by both HTTP providers.

A request is retried (per `RetryPolicy`) on retryable HTTP errors, connection errors and
timeouts, but only while nothing has been yielded: once text or a tool call reached the caller,
a retry would repeat it. Errors reported inside a 200 stream are not retried, as in the SDKs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from session_server.llm.base import ModelError, ModelRequest, StreamItem
from session_server.llm.http_errors import model_error, parse_error_body, redact
from session_server.llm.retry import RetryPolicy, should_retry
from session_server.llm.sse import SSEEvent, iter_sse
from session_server.llm.wire_json import encode_body

# Reading a stream may pause for long while a big model thinks; connecting should be quick.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=600.0)

# Why aiohttp and not httpx: a streamed answer is hundreds of small SSE events, each its own HTTP
# chunk. httpx hands every chunk up through h11, httpcore and its own decoders, ~25 us of Python a
# chunk; aiohttp parses in C and hands over whatever arrived since the last read, so one read
# often carries many events. Measured on benchmark M's answers: 3.0-3.5 ms of CPU against 6.5-9.5
# ms per answer (docs/performance.md).


@dataclass(frozen=True)
class Endpoint:
    """Where and how to POST, and how to describe failures."""

    provider: str  # for messages: "OpenAI", "Anthropic"
    url: str
    headers: Mapping[str, str]
    secret: str | None  # the API key, kept out of every message
    key_env: str  # the variable a user sets the key in, for hints


Decoder = Callable[[AsyncIterator[SSEEvent]], AsyncIterator[StreamItem]]

# What a failed connection, request or read raises; TimeoutError covers the timeouts aiohttp
# raises without wrapping them.
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
# What is read of a successful answer that is not an event stream, to say what it was.
_MAX_UNEXPECTED_BODY = 64 * 1024
# What is read of an error's body: its message is cut to 500 characters anyway, and a body that
# never ends (a broken proxy) was read whole, into memory, while the turn waited.
_MAX_ERROR_BODY = 64 * 1024


async def stream_with_retries(
    client: aiohttp.ClientSession,
    endpoint: Endpoint,
    body: Mapping[str, Any],
    policy: RetryPolicy,
    decode: Decoder,
) -> AsyncIterator[StreamItem]:
    """POST `body` and yield what `decode` makes of the response's events."""
    retries = 0
    content = encode_body(body)
    headers = {"content-type": "application/json", **endpoint.headers}
    while True:
        yielded = False
        try:
            async with client.post(endpoint.url, data=content, headers=headers) as response:
                if response.status < 400:
                    chunks = await _event_stream(endpoint, response)
                    try:
                        async for item in decode(iter_sse(chunks)):
                            yielded = True
                            yield item
                    except ModelError as exc:
                        # Error events quote the provider, which could echo the key back.
                        raise ModelError(exc.reason, redact(str(exc), endpoint.secret), exc.status) from None
                    return
                error = parse_error_body(await response.content.read(_MAX_ERROR_BODY))
                if retries >= policy.max_retries or not should_retry(
                    response.status, response.headers, error.code or error.type
                ):
                    raise model_error(
                        endpoint.provider,
                        error,
                        status=response.status,
                        secret=endpoint.secret,
                        key_env=endpoint.key_env,
                        request_id=response.headers.get("x-request-id") or response.headers.get("request-id"),
                        note=_attempts(retries),
                    )
                delay = policy.delay(retries, response.headers)
        except _TRANSPORT_ERRORS as exc:
            failure = _transport_error(endpoint, exc, yielded, retries)
            # A base URL without http(s):// fails the same way every time.
            if yielded or retries >= policy.max_retries or isinstance(exc, aiohttp.InvalidURL):
                raise failure from exc
            delay = policy.delay(retries)
        retries += 1
        await policy.sleep(delay)


async def _event_stream(endpoint: Endpoint, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response's body, when it is an event stream. A success that is not one (a JSON error
    some proxies answer with 200, a web page served at a wrong base URL) fails with what it says:
    read as events it gave nothing but "the stream ended early". A body labelled otherwise that
    starts like events (some compatible servers send them as text/plain) is still read as events."""
    chunks = response.content.iter_any()
    if response.content_type == "text/event-stream":
        return chunks
    first = await anext(chunks, b"")
    if first.lstrip().startswith((b"data:", b"event:", b":", b"id:", b"retry:")):
        return _prepended(first, chunks)
    body = first + await response.content.read(_MAX_UNEXPECTED_BODY - len(first))
    error = parse_error_body(body)
    raise model_error(
        endpoint.provider,
        error,
        status=None,
        secret=endpoint.secret,
        note=f"the server answered {response.status} with {response.content_type or 'no content type'}, "
        "not an event stream: check the base URL, and any proxy in between",
    )


async def _prepended(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _transport_error(endpoint: Endpoint, exc: Exception, yielded: bool, retries: int) -> ModelError:
    timeout = isinstance(exc, TimeoutError)
    what = "timed out" if timeout else f"connection failed ({type(exc).__name__}: {exc})"
    if yielded:
        # Output already reached the caller, so this is a broken stream, not a failed request.
        reason, message = "STREAM_ERROR", f"{endpoint.provider} stream broke off after output began: {what}"
    elif timeout:
        reason, message = "TIMEOUT", f"{endpoint.provider} request to {endpoint.url} {what}"
    else:
        reason, message = (
            "CONNECTION",
            f"{endpoint.provider} request to {endpoint.url} {what}; check the base URL",
        )
    if retries:
        message += f"; {_attempts(retries)}"
    return ModelError(reason, redact(message, endpoint.secret))


def _attempts(retries: int) -> str:
    return f"gave up after {retries} retries" if retries else ""


class HttpProvider:
    """A provider that POSTs each request to `base_url + PATH` and decodes the streamed answer.
    Subclasses name the API and give its headers, request body and decoder. A given `client` is
    used as is (and not closed); otherwise the provider owns one, made at the first request (an
    aiohttp session belongs to the event loop it was made in)."""

    PROVIDER: ClassVar[str]  # for messages: "OpenAI", "Anthropic"
    PATH: ClassVar[str]
    KEY_ENV: ClassVar[str]  # the variable a user sets the key in, for hints

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        client: aiohttp.ClientSession | None = None,
        max_retries: int = 2,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}{self.PATH}"
        self._endpoint = Endpoint(self.PROVIDER, self.url, self.headers(api_key), api_key, self.KEY_ENV)
        self._owns_client = client is None
        self._client = client
        self._timeout = timeout
        self._policy = retry_policy or RetryPolicy(max_retries=max_retries)

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        raise NotImplementedError

    @staticmethod
    def request_body(request: ModelRequest) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def decode(events: AsyncIterator[SSEEvent]) -> AsyncIterator[StreamItem]:
        raise NotImplementedError

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        if self._client is None:
            # trust_env: HTTPS_PROXY and NO_PROXY apply, as they did with httpx and do in the SDKs.
            self._client = aiohttp.ClientSession(timeout=self._timeout, trust_env=True)
        return stream_with_retries(self._client, self._endpoint, self.request_body(request), self._policy, self.decode)

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.close()
