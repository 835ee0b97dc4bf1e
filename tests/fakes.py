"""Test doubles shared by the Trio-free core tests."""

from __future__ import annotations

__all__ = ["FakeTransport"]


class FakeTransport:
    """Stands in for a connection: records what the core asks of it."""

    __slots__ = ("closes", "resumes", "sent", "shutdowns")

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.closes: list[tuple[int | None, str]] = []
        self.shutdowns: list[tuple[int, str]] = []
        self.resumes = 0

    def send_message(self, data: str | bytes) -> None:
        self.sent.append(data)

    def start_close(self, code: int | None, reason: str) -> None:
        self.closes.append((code, reason))

    def begin_shutdown(self, code: int, reason: str) -> None:
        self.shutdowns.append((code, reason))

    def resume_reading(self) -> None:
        self.resumes += 1
