"""uvicorn's HTTP/1.1 protocols (h11, httptools) with a request-head timeout (slowloris), a head size bound, and the
first byte's time for the request deadline.

uvicorn bounds the open connections (limit_concurrency) and idle keep-alive connections (timeout_keep_alive), and
with h11 the size of a request head (h11_max_incomplete_event_size), but not the time a client takes to send a head:
a socket sending one header byte every few seconds would hold its connection forever. Both guarded protocols start a
timer when a connection opens or a new request's first byte arrives and close the connection (408 when part of a
head came) unless the whole head has arrived within `header_timeout`. They also stamp the request's scope with that
first byte's `time.perf_counter()` (`scope["state"]["first_byte"]`), from which the request timeout counts.

`GuardedHttpToolsProtocol` (AEGIS_HTTP=httptools: llhttp, in C) also bounds the head's size itself, which uvicorn
does not for httptools: 431 once the request line and headers pass `max_head_bytes` (counted as the parser
delivers them, and the raw bytes received while a head is incomplete, so one endless header is cut too).

The settings travel in the environment (worker processes, service/workers.py, are spawned with it).
"""

from __future__ import annotations

import os
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMEOUT_BODY = b"the request head did not arrive in time\n"
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY))


HEADER_TIMEOUT_ENV = "AEGIS_HEADER_TIMEOUT_SECONDS"
MAX_HEAD_BYTES_ENV = "AEGIS_MAX_HEADER_BYTES"
TOO_LARGE_BODY = b"the request head is too large\n"
TOO_LARGE_RESPONSE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                      b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(TOO_LARGE_BODY), TOO_LARGE_BODY))


class _HeadTimer:
    """The timer both guarded protocols share: `_head_timed_out` runs unless `_disarm` comes within
    `header_timeout` (the server's setting, from the environment: worker processes are spawned with it)."""

    header_timeout: float = 10.0
    _head_timer = None

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class GuardedH11Protocol(_HeadTimer, H11Protocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, _HeadTimer.header_timeout))
        self._first_byte: float | None = None
        self._stamped = None
        self._arm()

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

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._first_byte is not None:  # part of a head came: say why before closing
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(_HeadTimer, HttpToolsProtocol):
    max_head_bytes: int = 16384

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, _HeadTimer.header_timeout))
        self.max_head_bytes = int(os.environ.get(MAX_HEAD_BYTES_ENV, GuardedHttpToolsProtocol.max_head_bytes))
        self._in_head = False  # between a request's first byte and its complete head
        self._parsed_bytes = 0  # request line and headers as the parser delivered them
        self._raw_bytes = 0  # chunks that ended inside an incomplete head (one endless header is never delivered)
        self._too_large = False
        self._received_at = 0.0
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._received_at = time.perf_counter()
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():  # every byte of this chunk belongs to the head
            self._raw_bytes += len(data)
            if self._raw_bytes > self.max_head_bytes:
                self._too_large = True
                self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["state"]["first_byte"] = self._received_at  # the time of the chunk holding the first byte
        self._in_head, self._parsed_bytes, self._raw_bytes = True, 0, 0
        self._disarm()
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._parsed_bytes += n
        if self._parsed_bytes > self.max_head_bytes:
            self._too_large = True
            raise _HeadTooLarge  # httptools turns it into a parser error: uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        if not self._too_large:
            return super().send_400_response(msg)
        if not self.transport.is_closing():
            self.transport.write(TOO_LARGE_RESPONSE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self._in_head):
            return  # a head arrived: the request and keep-alive timers take over
        if self._in_head:  # part of a head came: say why before closing
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def guarded_protocol(http: str, header_timeout: float, max_head_bytes: int) -> str:
    """uvicorn's `http` option for the guarded `http` protocol (h11 | httptools): an import string, which (unlike a
    class made per server) can be handed to worker processes; the limits travel in the environment they inherit."""
    os.environ[HEADER_TIMEOUT_ENV] = str(header_timeout)
    os.environ[MAX_HEAD_BYTES_ENV] = str(max_head_bytes)
    return {"h11": "service.http:GuardedH11Protocol", "httptools": "service.http:GuardedHttpToolsProtocol"}[http]
