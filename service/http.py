"""uvicorn's h11 protocol with a request-head timeout (slowloris) and the first byte's time for the request deadline.

uvicorn bounds the size of a request head (h11_max_incomplete_event_size), the open connections (limit_concurrency)
and idle keep-alive connections (timeout_keep_alive), but not the time a client takes to send a head: a socket
sending one header byte every few seconds would hold its connection forever. `GuardedH11Protocol` starts a timer
when a connection opens or a new request's first byte arrives and closes the connection (408 when part of a head
came) unless the whole head has arrived within `header_timeout`. It also stamps the request's scope with that first
byte's `time.perf_counter()` (`scope["state"]["first_byte"]`), from which the request timeout counts.

httptools (AEGIS_HTTP=httptools) is faster but none of this applies: bound head size and time at a reverse proxy
(nginx: large_client_header_buffers, client_header_timeout, client_body_timeout; docs/security.md).
"""

from __future__ import annotations

import os
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

TIMEOUT_BODY = b"the request head did not arrive in time\n"
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY))


HEADER_TIMEOUT_ENV = "AEGIS_HEADER_TIMEOUT_SECONDS"


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # the server's setting, from the environment: worker processes (service/workers.py) are spawned with it
        self.header_timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, GuardedH11Protocol.header_timeout))
        self._head_timer = None
        self._first_byte: float | None = None
        self._stamped = None
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._first_byte is None:  # a new request's first byte
            self._first_byte = time.perf_counter()
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection failed)
            self._disarm()
            if self.scope is not None and self._stamped is not self.scope:
                self.scope["state"]["first_byte"] = self._first_byte
                self._stamped = self.scope
            self._first_byte = None

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._first_byte is not None:  # part of a head came: say why before closing
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def guarded_h11(header_timeout: float) -> str:
    """uvicorn's `http` option for this protocol: an import string, which (unlike a class made per server) can be
    handed to worker processes; the timeout travels in the environment they inherit."""
    os.environ[HEADER_TIMEOUT_ENV] = str(header_timeout)
    return "service.http:GuardedH11Protocol"
