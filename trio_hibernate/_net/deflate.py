"""One socket's permessage-deflate: the transport compresses outbound messages with it,
the frame reader inflates inbound ones through its :attr:`DeflateExtension.inflater`
(see ``_core/deflate.py`` for the terms and the bounds on inflating).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from .._core.deflate import Inflater, new_compressor
from .._core.frames import deflate_message, encode_message

if TYPE_CHECKING:
    from .._core.deflate import Compression, DeflateParams
    from .._core.frames import Compressor

__all__ = ["DeflateExtension"]


@final
class DeflateExtension:
    """A socket's permessage-deflate, on the ``params`` it negotiated with the host's
    ``compression``. Holds a compressor only with server context takeover (and its
    inflater a decompressor only while it must)."""

    __slots__ = ("_compressor", "_host", "inflater", "params")

    def __init__(self, compression: Compression, params: DeflateParams) -> None:
        self._host = compression
        self.params = params
        """The terms negotiated (shared with other sockets)."""
        self.inflater = Inflater(compression, params)
        """Inflates the socket's inbound compressed messages (``_core/wsreader.py``)."""
        self._compressor: Compressor | None = None

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
