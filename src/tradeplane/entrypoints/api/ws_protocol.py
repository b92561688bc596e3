"""uvicorn's WebSocket protocol with one addition: writing a frame that was encoded once for many clients.

A market data message goes to hundreds of clients unchanged. Through ASGI each `send` re-encodes the text,
builds a frame and passes four layers of awaits; measured with 500 subscribers that was about two thirds of the
hub's CPU per tick, the socket writes themselves the other third. Server frames are not masked, so one text
frame's bytes are the same for every connection that negotiated no extension: the hub encodes it once
(`encode_text_frame`) and hands it to each connection's `write_prepared_frame`, found in the ASGI scope under
`PREPARED_FRAMES_EXTENSION`.

`write_prepared_frame` writes only when an ASGI `send` would not have waited: the handshake is done, no close
was sent or received and the transport is not paused by flow control. Otherwise it returns False and the hub
queues the message for the connection's writer task as before, so back-pressure and the slow-consumer drop are
unchanged. The hub uses it only while that writer has nothing pending, so messages keep their order.

Under another server (or uvicorn configured with another protocol) the extension is absent and every message
goes through ASGI. Serve with `ws=FanoutWebSocketProtocol` and `ws_per_message_deflate=False`; a connection
that negotiated compression does not offer the extension.
"""

from __future__ import annotations

from collections.abc import Callable

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State

PREPARED_FRAMES_EXTENSION = "tradeplane.websocket.prepared_frames"
"""scope["extensions"][PREPARED_FRAMES_EXTENSION]["write"]: Callable[[bytes], bool]."""

PreparedFrameWriter = Callable[[bytes], bool]


def encode_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked, uncompressed text frame carrying `payload` (UTF-8 JSON)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class FanoutWebSocketProtocol(WebSocketsSansIOProtocol):
    """`websockets-sansio` as uvicorn ships it, plus `write_prepared_frame` offered to the app in the scope."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The ASGI task was created but has not run yet, so the app sees the extension from its first step.
        if self.handshake_initiated and not self.close_sent and not self.conn.extensions:
            self.scope["extensions"][PREPARED_FRAMES_EXTENSION] = {"write": self.write_prepared_frame}

    def write_prepared_frame(self, frame: bytes) -> bool:
        """Write `frame` now if a `send` would not wait or fail; False leaves it to the caller to queue."""
        if (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        ):
            self.transport.write(frame)
            return True
        return False
