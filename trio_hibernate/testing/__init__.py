"""Testing your objects: fast, deterministic, and strict about hibernation.

:func:`open_test_host` runs an app on Trio's clock (idle timeouts and alarms included),
:class:`TestHost` connects in-process WebSocket clients (:class:`TestWebSocket`), evicts
objects, fires alarms and checks that nothing woke. ``strict=True`` (or
``pytest --hibernate-strict``) drops the instance after every event, so state kept only
in memory fails your tests instead of production. The pytest plugin (registered
automatically) provides the ``hibernate_host`` fixture; see ``docs/testing.md``.
"""

from .._errors import UpgradeRejected as UpgradeRejected, WebSocketClosed as WebSocketClosed
from ._client import TestWebSocket as TestWebSocket
from ._host import EPOCH as EPOCH, TestHost as TestHost, open_test_host as open_test_host

__all__ = [
    "EPOCH",
    "TestHost",
    "TestWebSocket",
    "UpgradeRejected",
    "WebSocketClosed",
    "open_test_host",
]


def _fix_module_names() -> None:
    for name in __all__:
        obj = globals()[name]
        module = getattr(obj, "__module__", "")
        if module.startswith(("trio_hibernate.testing._", "trio_hibernate._")):
            obj.__module__ = "trio_hibernate.testing"


_fix_module_names()
del _fix_module_names
