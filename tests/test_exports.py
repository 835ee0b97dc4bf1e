"""The public surface is deliberate: adding or removing a name must change this test."""

from __future__ import annotations

import trio_hibernate

EXPECTED = {
    "AlarmInfo",
    "App",
    "AppContext",
    "ConnectionIdError",
    "DataCloneError",
    "DurableObject",
    "HibernateError",
    "Host",
    "HostOptions",
    "HostStatistics",
    "InvalidCloseCodeError",
    "JsonLogFormatter",
    "LimitExceededError",
    "Limits",
    "Namespace",
    "ObjectContext",
    "ObjectId",
    "ObjectState",
    "ObjectStatistics",
    "ObjectStub",
    "QueryParams",
    "ReadyState",
    "ReentrantCallError",
    "Request",
    "Response",
    "Server",
    "SqlCursor",
    "SqlStorage",
    "Storage",
    "StorageCommitError",
    "StorageError",
    "WebSocket",
    "WebSocketCompression",
    "WebSocketProtocolError",
    "WebSocketRequestResponsePair",
    "WebSocketStateError",
    "__version__",
    "configure_logging",
    "open_host",
    "open_server",
    "serve_objects",
    "wait_for_shutdown_signal",
}


def test_all_is_pinned() -> None:
    assert set(trio_hibernate.__all__) == EXPECTED


def test_public_names_live_in_the_package() -> None:
    for name in trio_hibernate.__all__:
        obj = getattr(trio_hibernate, name)
        module = getattr(obj, "__module__", None)
        if module is not None and name != "__version__":
            assert module == "trio_hibernate", f"{name} reports {module}"


def test_every_public_name_is_documented() -> None:
    for name in trio_hibernate.__all__:
        if name == "__version__":
            continue
        obj = getattr(trio_hibernate, name)
        assert obj.__doc__, f"{name} has no docstring"
        assert obj.__doc__.strip(), f"{name} has an empty docstring"


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("trio_hibernate").joinpath("py.typed").is_file()


def test_testing_surface_is_pinned() -> None:
    import trio_hibernate.testing as testing

    assert set(testing.__all__) == {
        "EPOCH",
        "TestHost",
        "TestWebSocket",
        "UpgradeRejected",
        "WebSocketClosed",
        "open_test_host",
    }
    for name in testing.__all__:
        obj = getattr(testing, name)
        if name != "EPOCH":
            assert obj.__module__ == "trio_hibernate.testing", name
            assert obj.__doc__, name


def test_host_options_are_open_hosts_keywords() -> None:
    """``HostOptions`` (what serve_objects and open_server pass on) never drifts from
    ``open_host``'s signature: same names, same annotations."""
    import inspect

    from trio_hibernate._host import open_host

    signature = inspect.signature(open_host.__wrapped__)  # type: ignore[attr-defined]
    keywords = {
        name: parameter.annotation
        for name, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    options = {
        name: getattr(hint, "__forward_arg__", hint)
        for name, hint in trio_hibernate.HostOptions.__annotations__.items()
    }
    assert options == keywords


def test_every_subpackage_is_in_the_wheel() -> None:
    """setuptools lists packages explicitly: a subpackage missing from the list installs
    fine in editable mode and is absent from a wheel."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "trio_hibernate").rglob("__init__.py")
    }
    assert listed == found
