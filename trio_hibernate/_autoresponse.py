"""The object-wide auto-response pair."""

from __future__ import annotations

import attrs

__all__ = ["WebSocketRequestResponsePair"]


def _must_be_str(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(
            f"WebSocketRequestResponsePair.{attribute.name} must be a str, "
            f"not {type(value).__name__}"
        )


@attrs.frozen
class WebSocketRequestResponsePair:
    """A text request and the text response the runtime sends for it.

    Set one with :meth:`ObjectContext.set_websocket_auto_response`: any accepted socket of
    the object that receives a text message exactly equal to :attr:`request` is answered with
    :attr:`response` by the runtime, without waking the object or calling a handler.
    Sizes are checked (against ``Limits.max_auto_response_bytes``) when the pair is set.
    """

    request: str = attrs.field(validator=_must_be_str)
    """The exact text message to answer (case-sensitive, no trimming)."""
    response: str = attrs.field(validator=_must_be_str)
    """The text message sent back."""

    def get_request(self) -> str:
        """The request string (the seed's ``getRequest()``)."""
        return self.request

    def get_response(self) -> str:
        """The response string (the seed's ``getResponse()``)."""
        return self.response
