"""The public surface is deliberate: adding or removing a name must change this test."""

from __future__ import annotations

import os
import re

import trio_hibernate

EXPECTED = {
    "AlarmInfo",
    "App",
    "AppContext",
    "ClusterCommitError",
    "ClusterConfig",
    "ConnectionIdError",
    "DataCloneError",
    "DurableObject",
    "FencedError",
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
    "ObjectUnavailableError",
    "QueryParams",
    "ReadyState",
    "ReentrantCallError",
    "RemoteCallError",
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


#: What ``help()`` shows of each public class: its public attributes (``dir()`` less
#: underscore names and what it inherits from outside the package). A runtime internal
#: (a commit hook, a failure flag, a driver loop) belongs on an internal object or in a
#: module function, never here: add a name only with its documentation.
PUBLIC_ATTRIBUTES: dict[str, set[str]] = {
    "AlarmInfo": {"is_retry", "retry_count"},
    "App": {"authorize", "env", "fetch", "objects", "route_by_path"},
    "AppContext": {"env", "get_namespace", "now"},
    "ClusterConfig": {
        "advertise",
        "audit",
        "dsn",
        "host_id",
        "key",
        "lease_ttl",
        "pool_size",
        "with_advertise",
    },
    "DurableObject": {"alarm", "fetch", "websocket_close", "websocket_error", "websocket_message"},
    "Host": {
        "app",
        "close_timeout",
        "get_namespace",
        "hibernate",
        "hibernate_after_every_event",
        "limits",
        "object_statistics",
        "replace_app",
        "serve_socket",
        "shutdown_close_code",
        "statistics",
    },
    "HostOptions": set(),
    "HostStatistics": {
        "alarms_fired",
        "alarms_given_up",
        "alarms_pending",
        "alarms_retried",
        "auto_responses",
        "bad_requests",
        "buffered_bytes",
        "connections",
        "handler_errors",
        "hibernated_objects",
        "hibernations",
        "internal_errors",
        "live_objects",
        "messages_in",
        "messages_out",
        "refusals",
        "relayed",
        "seconds_in_memory",
        "storage_commits",
        "storage_failure",
        "turn_seconds",
        "turn_seconds_buckets",
        "turns",
        "wakes",
        "websockets",
    },
    "JsonLogFormatter": set(),
    "Limits": {
        "max_attachment_bytes",
        "max_auto_response_bytes",
        "max_buffered_bytes",
        "max_message_bytes",
        "max_queued_bytes_per_websocket",
        "max_queued_messages_per_websocket",
        "max_request_body_bytes",
        "max_send_buffer_bytes",
        "max_sql_bound_parameters",
        "max_sql_columns",
        "max_sql_row_bytes",
        "max_sql_statement_bytes",
        "max_storage_key_bytes",
        "max_storage_keys_per_call",
        "max_storage_value_bytes",
        "max_tag_bytes",
        "max_tags_per_websocket",
        "max_websockets_per_object",
    },
    "Namespace": {"get", "get_by_name", "id_from_name", "id_from_string", "name", "new_unique_id"},
    "ObjectContext": {
        "abort",
        "accept_websocket",
        "block_concurrency_while",
        "broadcast",
        "get_hibernatable_websocket_event_timeout",
        "get_namespace",
        "get_tags",
        "get_websocket",
        "get_websocket_auto_response",
        "get_websocket_auto_response_timestamp",
        "get_websockets",
        "id",
        "namespace",
        "now",
        "set_hibernatable_websocket_event_timeout",
        "set_websocket_auto_response",
        "start_soon",
        "storage",
    },
    "ObjectId": {"from_name", "hex", "name", "unique"},
    "ObjectState": {"HIBERNATED", "LIVE", "STARTING", "STOPPING"},
    "ObjectStatistics": {"activations", "queued_events", "state", "websockets"},
    "ObjectStub": {"call", "fetch", "id", "namespace"},
    "QueryParams": {"getlist", "multi_items"},
    "ReadyState": {"CLOSED", "CLOSING", "CONNECTING", "OPEN"},
    "Request": {
        "body",
        "context",
        "header",
        "headers",
        "method",
        "path",
        "query",
        "query_params",
        "url",
        "websocket",
        "websocket_protocols",
        "with_context",
        "with_headers",
    },
    "Response": {"body", "headers", "status", "websocket"},
    "Server": {"port", "url"},
    "SqlCursor": {
        "column_names",
        "columns",
        "one",
        "raw",
        "rows",
        "rows_read",
        "rows_written",
        "to_list",
    },
    "SqlStorage": {"database_size", "exec"},
    "Storage": {
        "delete",
        "delete_alarm",
        "delete_all",
        "get",
        "get_alarm",
        "list",
        "put",
        "set_alarm",
        "sql",
        "sync",
        "transaction",
    },
    "WebSocket": {
        "close",
        "deserialize_attachment",
        "id",
        "protocol",
        "ready_state",
        "send",
        "serialize_attachment",
        "url",
    },
    "WebSocketCompression": {"context_takeover", "min_message_bytes", "window_bits"},
    "WebSocketRequestResponsePair": {"get_request", "get_response", "request", "response"},
    # trio_hibernate.testing
    "TestHost": {
        "assert_not_woken",
        "connect",
        "connect_to",
        "fetch",
        "hibernate",
        "now",
        "open_clients",
        "run_alarm",
        "settle",
        "statistics",
        "strict",
    },
    "TestWebSocket": {"aclose", "close", "drop", "ping", "receive", "send"},
    # trio_hibernate.client
    "Backoff": {
        "base_seconds",
        "delay_seconds",
        "gives_up",
        "initial_seconds",
        "jitter",
        "max_retries",
        "max_seconds",
        "min_uptime_seconds",
        "multiplier",
    },
    "ClientEvent": {"attempt", "close_code", "delay_seconds", "error", "state", "status"},
    "ClientState": {"CLOSED", "CONNECTED", "CONNECTING", "RECONNECTING"},
    "ReconnectingWebSocket": {
        "buffered",
        "client_id",
        "flush",
        "receive",
        "send",
        "state",
        "url",
        "wait_connected",
    },
}


def _public_attributes(cls: type) -> set[str]:
    inherited = set()
    for base in cls.__mro__[1:]:
        if not base.__module__.startswith("trio_hibernate"):
            inherited |= set(dir(base))
    return {name for name in dir(cls) if not name.startswith("_") and name not in inherited}


def test_public_classes_show_no_internals() -> None:
    import inspect

    import trio_hibernate.client as client
    import trio_hibernate.testing as testing

    found = {
        name: _public_attributes(obj)
        for module in (trio_hibernate, testing, client)
        for name in module.__all__
        if inspect.isclass(obj := getattr(module, name)) and not issubclass(obj, BaseException)
    }
    assert found == PUBLIC_ATTRIBUTES


def test_browser_tests_are_skipped_with_the_reason_without_playwright() -> None:
    """A plain ``pytest`` selecting the browser test on a machine without Playwright (or
    Chromium) skips it and says why; it does not fail."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    without_playwright = (
        "import sys, pytest; sys.modules['playwright'] = None; "
        "sys.exit(pytest.main(['-p', 'no:cacheprovider', '-rs', '-m', 'browser', "
        "'tests/test_browser.py']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRIO_HIBERNATE_REQUIRE_BROWSER"}
    result = subprocess.run(
        [sys.executable, "-c", without_playwright],
        capture_output=True,
        timeout=60,
        cwd=root,
        env=env,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output
    assert re.search(r"\b\d+ skipped\b", output), output
    assert "passed" not in output, output
    assert "failed" not in output, output
    assert "Playwright is not installed (nox -s browser installs it)" in output


def test_the_distribution_metadata() -> None:
    """LICENSE, the license expression, project URLs and the classifiers a package
    index shows."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert (
        (root / "LICENSE")
        .read_text()
        .startswith("MIT License\n\nCopyright (c) the trio-hibernate authors\n")
    )
    assert (project["license"], project["license-files"]) == ("MIT", ["LICENSE"])
    repository = "https://github.com/trio-hibernate/trio-hibernate"
    assert project["urls"]["Homepage"] == repository
    assert project["urls"]["Documentation"].startswith(repository + "/")
    assert project["urls"]["Changelog"] == repository + "/blob/main/CHANGELOG.md"
    assert {
        "Development Status :: 3 - Alpha",
        "Framework :: Trio",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
        "Typing :: Typed",
    } <= set(project["classifiers"])
    assert set(project["optional-dependencies"]) == {"cluster", "reload", "test"}


def test_readme_and_docs_link_only_inside_the_repository() -> None:
    """A fresh clone has what the README and docs point to: no link or path into the
    workspace around the repository (``shared/...``, ``../`` out of the clone)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        assert "shared/" not in text, page.name
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.partition("#")[0]).resolve()
            assert path.is_relative_to(root), f"{page.name} links outside: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"
    readme = (root / "README.md").read_text()
    assert "python3 -m pip install /path/to/trio-hibernate " in readme  # one's own project
    assert "python3 -m pip install nox && python3 -m nox -s demo" in readme
    assert "python3 -m pip install nox && python3 -m nox\n" in readme
