"""One socket's permessage-deflate: wsproto inflates inbound messages through it, the
transport compresses outbound ones with it (see ``_core/deflate.py`` for the terms).

Inflating is bounded: each call gives zlib at most the room the message has left
(``Limits.max_message_bytes``, the memory budget) plus one byte, so a decompression
bomb costs no more memory than a plain message at the limit; past it the extension
refuses the frame with 1009 (or 1013 for the budget): wsproto reports it as a protocol
failure, and the transport closes the socket with that code.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Final, final

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits

from .._core.deflate import PERMESSAGE_DEFLATE, new_compressor
from .._core.frames import deflate_message, encode_message

if TYPE_CHECKING:
    from wsproto.frame_protocol import FrameDecoder, FrameProtocol

    from .._core.deflate import Compression, Decompressor, DeflateParams
    from .._core.frames import Compressor

__all__ = ["DeflateExtension"]

#: What the sender removed from the end of each compressed message (RFC 7692 7.2.2).
_SYNC_TAIL: Final = b"\x00\x00\xff\xff"
_USES_RSV1: Final = RsvBits(True, False, False)
_TEXT: Final = Opcode.TEXT  # module constants: Enum class attributes are slow to read
_BINARY: Final = Opcode.BINARY


@final
class DeflateExtension(Extension):
    """A socket's permessage-deflate, on the ``params`` it negotiated with the host's
    ``compression``. Holds a compressor or decompressor only while it must: during an
    inbound compressed message, or for good with context takeover."""

    __slots__ = (
        "_compressor",
        "_decompressor",
        "_frame_compressed",
        "_host",
        "_inflated",
        "_message_compressed",
        "params",
    )

    name = PERMESSAGE_DEFLATE

    def __init__(self, compression: Compression, params: DeflateParams) -> None:
        self._host = compression
        self.params = params
        """The terms negotiated (shared with other sockets)."""
        self._compressor: Compressor | None = None
        self._decompressor: Decompressor | None = None
        self._message_compressed = False  # the inbound message has RSV1
        self._frame_compressed = False  # the inbound frame's payload is to be inflated
        self._inflated = 0  # bytes inflated of the inbound message

    # -- outbound (called by the transport) ------------------------------------------------

    def __call__(self, message: str | bytes) -> bytes:
        """The frame of ``message``: compressed, unless shorter than
        ``min_message_bytes`` (then plain). The extension is the transport's frame
        encoder itself (no bound method per socket)."""
        host = self._host
        if len(message) < host.min_message_bytes:
            return encode_message(message)
        params = self.params
        if not params.server_context_takeover:
            return host.shared_frame(message, params.server_window_bits)
        if self._compressor is None:
            self._compressor = new_compressor(params.server_window_bits)
        return deflate_message(message, self._compressor)

    # -- wsproto's Extension ---------------------------------------------------------------

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # a server never offers

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            return CloseReason.PROTOCOL_ERROR  # RFC 7692 section 6.1
        if opcode is _TEXT or opcode is _BINARY:  # the first frame of a message
            self._message_compressed = rsv.rsv1
            self._inflated = 0
        self._frame_compressed = self._message_compressed and not opcode.iscontrol()
        return _USES_RSV1

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._frame_compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not (fin and self._frame_compressed):
            return None
        data = self._inflate(_SYNC_TAIL)
        self._message_compressed = self._frame_compressed = False
        decompressor = self._decompressor
        if decompressor is not None and (
            not self.params.client_context_takeover or decompressor.eof
        ):
            self._decompressor = None  # nothing to keep (or a final block ended its stream)
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        if decompressor is None:
            decompressor = zlib.decompressobj(-self.params.client_window_bits)
            self._decompressor = decompressor
        room = self._host.room(self._inflated)
        try:
            out = decompressor.decompress(data, room + 1)
        except zlib.error:
            self._decompressor = None
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if len(out) > room:  # the message limit, or the memory budget: no more
            self._decompressor = None
            if self._host.over_message_limit(self._inflated):
                return CloseReason.MESSAGE_TOO_BIG
            return CloseReason.TRY_AGAIN_LATER
        return out
