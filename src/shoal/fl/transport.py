"""Bytes between a federation's server and its clients: gRPC over mutual TLS.

Every method of the ``shoal.fl.Federation`` service takes bytes and returns
bytes (messages from :mod:`shoal.fl.wire`), so no generated protobuf code is
needed: the server registers plain functions through a generic handler and
the client calls ``/shoal.fl.Federation/METHOD`` with identity serializers.

The server demands a client certificate signed by the federation's CA
(:mod:`shoal.fl.certs`), and :func:`peer_identity` reads the client's name
from it. ``tls=None`` turns TLS off on both sides; use it only on a network
you trust (a test, a single machine), since anyone who can reach the port can
then join and read the model.

A :class:`Connection` rides out a server restart: a call that finds the
server unavailable, busy (its concurrent-call limit reached) or refusing a
second concurrent call (ABORTED) is retried with exponential backoff (0.2 s
doubling to 5 s, jittered) for up to ``retry_for_s``. A request the server received just
before it went down may then arrive twice, so handlers should treat a repeat
as harmless. Every other failure raises :class:`RpcFailed` at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from shoal.fl.certs import TlsFiles

SERVICE = "shoal.fl.Federation"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0

Handler = Callable[[bytes, grpc.ServicerContext], bytes]

log = logging.getLogger("shoal.fl")


class RpcFailed(RuntimeError):
    """A call failed for a reason retrying would not fix (or retries ran out)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def serve(
    address: str,
    handlers: dict[str, Handler],
    tls: TlsFiles | None,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 8,
    max_concurrent_calls: int | None = None,
) -> tuple[grpc.Server, int]:
    """Start serving ``handlers`` (method name -> function) on ``address``.

    ``workers`` threads run the handlers; with ``max_concurrent_calls`` a call
    beyond that many in progress is refused at once (RESOURCE_EXHAUSTED,
    which :class:`Connection` retries) instead of queueing. Returns the running server and the port it bound, which is the one to
    dial when ``address`` ends in ``:0``. A handler may end a call with
    ``context.abort(code, details)``; any other exception becomes INTERNAL
    and is logged with its traceback.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    methods = {
        name: grpc.unary_unary_rpc_method_handler(_guarded(name, fn)) for name, fn in handlers.items()
    }
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shoal-fl"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, methods)],
        options=_size_options(max_message_bytes),
        maximum_concurrent_rpcs=max_concurrent_calls,
    )
    if tls is None:
        log.warning("serving on %s WITHOUT TLS: any peer that reaches it can join and read the model", address)
        port = server.add_insecure_port(address)
    else:
        ca, cert, key = tls.read()
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    return server, port


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The common name in the client's verified certificate, None without TLS."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


class Connection:
    """A client's channel to the server; ``call`` retries while the server is away."""

    def __init__(
        self,
        address: str,
        tls: TlsFiles | None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_for_s: float = 60.0,
    ) -> None:
        if retry_for_s < 0:
            raise ValueError(f"retry_for_s must be >= 0, got {retry_for_s}")
        self.address = address
        self.retry_for_s = retry_for_s
        self._rng = random.Random()
        options = _size_options(max_message_bytes) + [
            # gRPC's own reconnect backoff starts at 1 s and grows to 120 s; a
            # call made while the channel waits fails at once, so it would
            # otherwise decide how soon a restarted server is noticed.
            ("grpc.initial_reconnect_backoff_ms", int(BACKOFF_FIRST_S * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(BACKOFF_FIRST_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX_S * 1000)),
        ]
        if tls is None:
            log.warning("connecting to %s WITHOUT TLS: the server is not authenticated, and the token and the "
                        "model travel in the clear", address)
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            ca, cert, key = tls.read()
            credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(address, credentials, options=options)

    def call(self, method: str, request: bytes, *, timeout: float = 30.0) -> bytes:
        """Send ``request`` to ``method`` and return the reply's bytes."""
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        give_up = time.monotonic() + self.retry_for_s
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return stub(request, timeout=timeout)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                left = give_up - time.monotonic()
                if not _retryable(code, details) or left <= 0:
                    raise RpcFailed(code.name if code else "UNKNOWN", details) from None
            # Jitter keeps clients that lost the same server from returning in lockstep.
            pause = min(delay * self._rng.uniform(0.5, 1.0), left)
            log.info("%s unavailable (%s); retrying %s in %.1f s", self.address, details, method, pause)
            time.sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX_S)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retryable(code: grpc.StatusCode | None, details: str) -> bool:
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
        return True
    # gRPC's own refusal when the server's concurrent-call limit is reached (a message
    # over the size limit is RESOURCE_EXHAUSTED too, and retrying would not help it).
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in details


def _guarded(name: str, fn: Handler) -> Handler:
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return fn(request, context)
        except Exception:
            # context.abort() raises to end the call with the code it set;
            # let that through untouched.
            if context.code() is not None:
                raise
            log.exception("handler %s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, f"{name} failed on the server")
            raise  # abort() always raises; this line is for readers and type checkers

    return handle


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
