"""The app the command line serves: finding it from a spec, and loading it again.

``load_app`` turns ``MODULE[:ATTR]`` or ``path/to/file.py[:ATTR]`` into an :class:`App`.
:class:`AppSource` remembers which modules loading the app imported from the app's own
folder (its *local* modules); loading it again forgets those modules first, so an edit
of a sibling module the app imports is picked up, not only an edit of the app file.
:func:`reload_on_change` watches the local modules' folders (``watchfiles``) and hands
the new app to the host.

Why in place rather than in a fresh process: every WebSocket, hibernated or not, lives
in this process; a new process would drop them all, and ``--reload`` promises to keep
them (``Host.replace_app``). What a reload does not redo: modules from outside the app's
folder (installed packages, trio_hibernate itself) stay as they are, and a local
module's global state starts afresh.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import site
import sys
import sysconfig
from contextlib import aclosing, suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Final

import trio

from ._app import App
from ._containment import Containment
from ._errors import AppLoadError
from ._object import DurableObject

if TYPE_CHECKING:
    import anyio

    from ._host import Host

__all__ = ["AppSource", "load_app", "reload_on_change"]

log = logging.getLogger("trio_hibernate.cli")

#: Longest wait (ms) of the file watcher's thread before it looks whether it should stop.
_WATCH_TIMEOUT_MS: Final = 1000
_MISSING: Final = object()


def _installed_roots() -> tuple[Path, ...]:
    """Where installed code lives: never an app's local module, even inside its folder."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
    roots.update(sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib"))
    return tuple(Path(root).resolve() for root in roots)


def _file_of(module: ModuleType) -> Path | None:
    source = getattr(module, "__file__", None)
    return None if not isinstance(source, str) else Path(source).resolve()


def _module_from_file(path: Path) -> ModuleType:
    # Compiled from source every time: a cached .pyc is validated by whole-second mtime
    # and size, so an edit of the same length within a second would load stale code.
    name = f"_trio_hibernate_app_{path.stem}"
    module = ModuleType(name)
    module.__file__ = str(path)
    code = compile(path.read_bytes(), str(path), "exec")
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]  # as the import system does for a module that fails
        raise
    return module


def _import(target: str) -> ModuleType:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name != target.split(".")[0] and exc.name != target:
            raise  # the app's module exists; something it imports does not
        raise AppLoadError(f"no module named {target!r} (from {Path.cwd()})") from None


def _module_of(target: str) -> ModuleType:
    if not (target.endswith(".py") or "/" in target):
        return _import(target)
    path = Path(target).resolve()
    if not path.is_file():
        raise AppLoadError(f"no such file: {path} (expected a Python file defining an App)")
    # As `python path/to/app.py` would: the app's folder first, so its siblings import.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return _module_from_file(path)


def _apps_in(module: ModuleType) -> list[str]:
    return sorted(name for name, value in vars(module).items() if isinstance(value, App))


def _describe(found: object) -> str:
    if isinstance(found, type):
        return f"the class {found.__qualname__}"
    return f"a {type(found).__name__}"


def _app_of(spec: str, module: ModuleType, attr: str) -> App:
    found = getattr(module, attr, _MISSING)
    if found is _MISSING:
        apps = _apps_in(module)
        where = f"it defines the App {', '.join(apps)}" if apps else "it defines no App"
        raise AppLoadError(f"{spec}: no attribute {attr!r} ({where})")
    if isinstance(found, App):
        return found
    if isinstance(found, type) and issubclass(found, DurableObject):
        namespace = found.__name__.lower()
        raise AppLoadError(
            f"{spec} is a DurableObject class, not an App: wrap it as "
            f'App({{"{namespace}": {found.__name__}}}) and serve that'
        )
    if callable(found) and not isinstance(found, type) and not inspect.iscoroutinefunction(found):
        made = found()  # an app factory; what it raises propagates like an import error
        if isinstance(made, App):
            return made
        raise AppLoadError(f"{spec}() returned {_describe(made)}, not an App")
    raise AppLoadError(f"{spec} is {_describe(found)}, not an App (trio_hibernate.App)")


def load_app(spec: str) -> tuple[App, Path | None]:
    """Load ``MODULE[:ATTR]`` or ``path/to/file.py[:ATTR]`` (ATTR defaults to ``app``).

    ATTR may be an :class:`App` or a function returning one. A file's folder goes first
    on ``sys.path`` (as ``python path/to/file.py`` does), so the app can import its
    sibling modules; a module is looked up from the current directory. Returns the app
    and its source file, if known.

    Raises:
        AppLoadError: the spec names no file, module or attribute, or what it names is
            not an App (a DurableObject class, say); the message says which. Errors
            raised by the app's own code (a SyntaxError, say) propagate unchanged.
    """
    target, _, attr = spec.partition(":")
    module = _module_of(target)
    return _app_of(spec, module, attr or "app"), _file_of(module)


class AppSource:
    """The app behind a spec, with the local modules its last load imported.

    A local module is one that loading the app imported (it was not imported before)
    whose file lies under the app's folder and outside installed code.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        """What the command line was given (``MODULE[:ATTR]`` or ``file.py[:ATTR]``)."""
        self._modules: dict[str, ModuleType] = {}
        self._root: Path | None = None

    @property
    def files(self) -> frozenset[Path]:
        """The source files of the local modules of the last successful load."""
        return frozenset(path for m in self._modules.values() if (path := _file_of(m)))

    @property
    def folders(self) -> frozenset[Path]:
        """The folders holding those files (what a watcher watches)."""
        return frozenset(path.parent for path in self.files)

    def load(self) -> App:
        """Load the app, importing its local modules afresh (those of the last load).

        On failure the modules of the last load are put back, so that the running code
        and ``sys.modules`` still agree. Raises as :func:`load_app` does.
        """
        old = {name: sys.modules.pop(name) for name in self._modules if name in sys.modules}
        for module in old.values():
            _forget_bytecode(module)
        importlib.invalidate_caches()  # a sibling module created since the last load
        before = set(sys.modules)
        try:
            app, source = load_app(self.spec)
        except BaseException:
            # Drop what the failed load imported from the app's folder, restore the rest.
            for name in self._local(set(sys.modules) - before):
                del sys.modules[name]
            sys.modules.update(old)
            raise
        if self._root is None and source is not None:
            self._root = source.parent
        self._modules = {name: sys.modules[name] for name in self._local(set(sys.modules) - before)}
        return app

    def _local(self, names: set[str]) -> list[str]:
        if self._root is None:
            return []
        installed = _installed_roots()
        return [
            name
            for name in names
            if (path := _file_of(sys.modules[name])) is not None
            and path.is_relative_to(self._root)
            and not any(path.is_relative_to(root) for root in installed)
        ]


def _forget_bytecode(module: ModuleType) -> None:
    # A .pyc is trusted on whole-second mtime and size: an edit within the second of the
    # last compile, of the same length, would load stale code.
    path = _file_of(module)
    if path is not None and path.suffix == ".py":
        with suppress(FileNotFoundError):
            Path(importlib.util.cache_from_source(str(path))).unlink()


async def reload(host: Host, source: AppSource, why: str) -> None:
    """Load ``source`` again and switch ``host`` to it; on failure keep the old code.

    Never raises for the app's own errors: a code update must not take the service
    down. A checkpoint.
    """
    app: App | None = None
    with Containment(log, "reloading %s failed; still serving the previous code", source.spec):
        app = source.load()  # the app's own code: whatever it raises is contained
    if app is None:
        await trio.lowlevel.checkpoint()
        return
    await host.replace_app(app)
    modules = ", ".join(sorted(path.name for path in source.files)) or "no local module"
    log.info(
        "reloaded %s (%s; %s): objects will be built from the new code", source.spec, why, modules
    )


async def reload_on_change(host: Host, source: AppSource) -> None:
    """Reload the app whenever a ``.py`` file in its local modules' folders changes.

    Never returns. Uses ``watchfiles`` (inotify and its kin, in a worker thread).

    Cancellation:
        The watcher's thread is told to stop as soon as this is cancelled, and stops
        within ``watchfiles``' step (50 ms).
    """
    from anyio import Event  # the reload extra: only --reload needs them
    from watchfiles import awatch

    while True:
        folders = source.folders
        if not folders:
            log.warning("--reload: %s has no local module to watch", source.spec)
            await trio.sleep_forever()
        stop = Event()

        def is_source(change: object, path: str, folders: frozenset[Path] = folders) -> bool:
            file = Path(path)
            return file.suffix == ".py" and file.parent in folders

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_when_cancelled, stop)
            changes = awatch(
                *folders,
                watch_filter=is_source,
                stop_event=stop,
                rust_timeout=_WATCH_TIMEOUT_MS,
                recursive=False,
            )
            async with aclosing(changes):
                async for found in changes:
                    names = sorted(Path(path).name for _, path in found)
                    await reload(host, source, f"changed: {', '.join(names)}")
                    if source.folders != folders:
                        break  # watch the new set of folders
            stop.set()
            nursery.cancel_scope.cancel()


async def _set_when_cancelled(stop: anyio.Event) -> None:
    # awatch waits for its thread even when cancelled; the thread stops at this event.
    try:
        await trio.sleep_forever()
    finally:
        stop.set()
