"""uvicorn's WebSocket protocol with one addition: writing a frame that was encoded once for many clients.

A market data message goes to hundreds of clients unchanged. Through ASGI each `send` re-encodes the text,
builds a frame and passes four layers of awaits; measured with 500 subscribers that was about two thirds of the
hub's CPU per tick, the socket writes themselves the other third. Server frames are not masked, so one text
frame's bytes are the same for every connection that negotiated no extension: the hub encodes it once
(`encode_text_frame`) and writes it to each connection's transport, through the `attach` function found in the
ASGI scope under `PREPARED_FRAMES_EXTENSION`.

A prepared frame may be written only when an ASGI `send` would not have waited: the handshake is done, no close
was sent or received and the transport is neither closing nor paused by flow control. Checking that for every
client on every message was a fifth of the fan-out's CPU, so the protocol keeps the answer instead: it
re-evaluates it after each event that can change it (bytes received, an ASGI send, flow control, a keepalive
timeout, shutdown, connection lost) and tells the hub's listener when it flips. While it is False the hub
queues the message for the connection's writer task as before, so back-pressure and the slow-consumer drop are
unchanged.

On a plain TCP connection (no TLS) the extension also offers the socket's file descriptor under "fileno", so
the hub can write a prepared frame with `os.write` and skip the event loop's transport: with 500 clients the
transport's bookkeeping around each write was a sixth of the fan-out's time. That is safe because of two things
this protocol guarantees. Nothing the transport holds can be overtaken: the transport's high-water mark is 0,
so it pauses writing whenever it holds a single unsent byte and resumes only once it holds none, and a paused
connection is not ready. The descriptor is never stale: the event loop closes it only after
`connection_lost`, which reports the connection not ready first (uvloop and asyncio both close the socket after
calling it). Whatever `os.write` does not take (a partial write, EAGAIN) is handed to the transport, in order.

Under another server (or uvicorn configured with another protocol) the extension is absent and every message
goes through ASGI. Serve with `ws=FanoutWebSocketProtocol` and `ws_per_message_deflate=False`; a connection
that negotiated compression does not offer the extension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State

PREPARED_FRAMES_EXTENSION = "tradeplane.websocket.prepared_frames"
"""scope["extensions"][PREPARED_FRAMES_EXTENSION]: {"attach": a PreparedFramesAttach, "fileno": int | None}."""

ReadinessListener = Callable[[bool], None]
"""Called with True when a prepared frame may be written to the connection now, False when no longer."""
FrameWriter = Callable[[bytes], None]
"""Writes one complete frame (or the rest of one) to the connection; call it only while the readiness last
reported is True, or to finish a frame that `os.write` on the connection's "fileno" wrote in part."""
PreparedFramesAttach = Callable[[ReadinessListener], FrameWriter]
"""Registers the connection's one listener (called at once with the current readiness) and returns its writer."""


def encode_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked, uncompressed text frame carrying `payload` (UTF-8 JSON)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class FanoutWebSocketProtocol(WebSocketsSansIOProtocol):
    """`websockets-sansio` as uvicorn ships it, plus prepared frames offered to the app in the scope."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared_ready = False
        self._readiness_listener: ReadinessListener | None = None

    def attach_prepared_frames(self, listener: ReadinessListener) -> FrameWriter:
        self._readiness_listener = listener
        self.prepared_ready = self._can_write_prepared()
        listener(self.prepared_ready)
        return self.transport.write

    def _can_write_prepared(self) -> bool:
        """Whether an ASGI `send` of a data frame would go out now without waiting or failing."""
        return (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        )

    def _readiness_may_have_changed(self) -> None:
        ready = self._can_write_prepared()
        if ready is not self.prepared_ready:
            self.prepared_ready = ready
            if self._readiness_listener is not None:
                self._readiness_listener(ready)

    # Every way the answer can change passes through one of these.

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The ASGI task was created but has not run yet, so the app sees the extension from its first step.
        if self.handshake_initiated and not self.close_sent and not self.conn.extensions:
            attach: PreparedFramesAttach = self.attach_prepared_frames
            self.scope["extensions"][PREPARED_FRAMES_EXTENSION] = {"attach": attach, "fileno": self._plain_fileno()}

    def _plain_fileno(self) -> int | None:
        """The socket's descriptor, when frames may be written to it directly (see the module docstring)."""
        transport = self.transport
        if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        # Paused while the transport holds any unsent byte, so "ready" also means "nothing for os.write to overtake".
        transport.set_write_buffer_limits(high=0, low=0)
        return int(sock.fileno())

    def data_received(self, data: bytes) -> None:
        try:
            super().data_received(data)  # a close frame, a parser error
        finally:
            self._readiness_may_have_changed()

    async def send(self, message: ASGISendEvent) -> None:
        try:
            await super().send(message)  # accept, close
        finally:
            self._readiness_may_have_changed()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._readiness_may_have_changed()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._readiness_may_have_changed()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._readiness_may_have_changed()

    def shutdown(self) -> None:
        super().shutdown()
        self._readiness_may_have_changed()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._readiness_may_have_changed()

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        finally:
            self._readiness_may_have_changed()
