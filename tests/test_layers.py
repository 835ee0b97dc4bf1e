"""The layer rules of the package, checked by reading its source with :mod:`ast`.

Nothing here imports the package under test: the rules are about the text of the
modules (what they import, what they call, how long their classes are), so they hold
whether or not the package is importable, and a failure names the file and line.

The rules (issue 10; the headers of ``_core/__init__.py`` and ``_net/__init__.py`` state
theirs):

- no import cycle among the package's modules, counting ``if TYPE_CHECKING:`` and
  function-local imports: an import hidden from the interpreter is still a dependency;
- ``_core`` is sans-IO: it never imports trio or any I/O library (not even through
  another package module), never awaits and never reads a clock;
- ``_net`` knows the runtime only through the Protocol it defines: it never imports
  ``_host``, ``_runtime`` or ``_supervisor`` (not even through another package module);
- no module reaches into another's private names (``obj._name``);
- no class is longer than :data:`MAX_CLASS_LINES` lines.

An exception to a rule is listed here with its reason (private names, long classes);
the lists may only shrink: a listed exception that no longer occurs fails the test too.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Final

import attrs

PACKAGE: Final = "trio_hibernate"
ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGE_DIR: Final = ROOT / PACKAGE


@attrs.frozen
class Module:
    """One source file of the package."""

    name: str  # dotted, e.g. "trio_hibernate._core.sockets"
    path: Path
    tree: ast.Module
    is_package: bool  # an __init__.py

    @property
    def short(self) -> str:
        """The name without the package prefix, as the messages print it."""
        return self.name.removeprefix(PACKAGE + ".") or PACKAGE

    def where(self, node: ast.AST) -> str:
        """``path:line`` of ``node``, relative to the repository root."""
        return f"{self.path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


@attrs.frozen
class Import:
    """One imported module, as written in one import statement."""

    target: str  # absolute dotted name
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``
    local: bool  # inside a function

    def describe(self) -> str:
        kinds = [
            kind
            for kind, on in (("TYPE_CHECKING", self.type_checking), ("local", self.local))
            if on
        ]
        return f" ({', '.join(kinds)})" if kinds else ""


@cache
def modules() -> dict[str, Module]:
    """Every module of the package, by dotted name."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found[name] = Module(name, path, tree, is_package)
    assert f"{PACKAGE}._core" in found, f"no _core package under {PACKAGE_DIR}"
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name of the module ``node`` imports from."""
    if node.level == 0:
        assert node.module is not None
        return node.module
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    assert node.level - 1 < len(package), f"{module.where(node)}: relative import escapes"
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(module: Module) -> list[Import]:
    """Every module ``module`` imports, wherever the import statement stands."""
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool, local: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(
                Import(alias.name, node.lineno, type_checking, local) for alias in node.names
            )
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                # ``from . import x`` imports the module ``x`` when there is one.
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules() else base
                found.append(Import(target, node.lineno, type_checking, local))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                visit(statement, True, local)
            for statement in node.orelse:
                visit(statement, type_checking, local)
            return
        local = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking, local)

    visit(module.tree, False, False)
    return found


def package_module(target: str) -> str | None:
    """The package module ``target`` names (or lies in), or None for another library."""
    name = target
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def graph() -> dict[str, dict[str, Import]]:
    """source -> {imported package module -> the first import of it}."""
    edges: dict[str, dict[str, Import]] = {}
    for name, module in modules().items():
        edges[name] = {}
        for imported in imports(module):
            target = package_module(imported.target)
            if target is not None and target != name:
                edges[name].setdefault(target, imported)
    return edges


def strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def shortest_path(
    edges: dict[str, dict[str, Import]], start: str, goal: str, within: set[str] | None = None
) -> list[str] | None:
    """The shortest import chain from ``start`` to ``goal``, both included (at least one
    import, so ``start == goal`` asks for a cycle), through ``within`` only; or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue and goal not in parent:
        node = queue.popleft()
        for successor in sorted(edges[node]):
            if successor not in parent and (within is None or successor in within):
                parent[successor] = node
                queue.append(successor)
    if goal not in parent:
        return None
    path = [goal, parent[goal]]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


def describe_chain(edges: dict[str, dict[str, Import]], chain: list[str]) -> list[str]:
    """One line per import of ``chain``: where it is written and what kind it is."""
    lines = []
    for source, target in pairwise(chain):
        imported = edges[source][target]
        module = modules()[source]
        lines.append(
            f"  {module.path.relative_to(ROOT)}:{imported.line}: "
            f"{module.short} imports {modules()[target].short}{imported.describe()}"
        )
    return lines


# -- no import cycle --------------------------------------------------------------


def cycle_report() -> list[str]:
    """A readable description of every import cycle, empty when there is none."""
    edges = graph()
    report = []
    for component in strongly_connected(edges):
        members = set(component)
        short = ", ".join(modules()[name].short for name in component)
        report.append(f"import cycle among {len(component)} modules: {short}")
        cycle = shortest_path(edges, component[0], component[0], members)
        assert cycle is not None
        report.append(" one cycle:")
        report.extend(describe_chain(edges, cycle))
        report.append(" every import inside the cycle:")
        for source in component:
            inside = [target for target in edges[source] if target in members]
            for target in sorted(inside, key=lambda target: edges[source][target].line):
                report.extend(describe_chain(edges, [source, target]))
    return report


def test_no_import_cycle() -> None:
    report = cycle_report()
    assert not report, "\n".join(report)


def test_cycle_finder_sees_type_checking_and_local_imports() -> None:
    """The finder is not blind to the imports that hide a cycle from the interpreter."""
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from . import _limits, __version__
def f():
    from ._core.events import Event
"""
    module = Module(f"{PACKAGE}._fake", PACKAGE_DIR / "_fake.py", ast.parse(source), False)
    found = {(i.target, i.type_checking, i.local) for i in imports(module)}
    assert found == {
        ("typing", False, False),
        (f"{PACKAGE}._limits", True, False),  # a module: the module
        (PACKAGE, True, False),  # not a module: the package it comes from
        (f"{PACKAGE}._core.events", False, True),
    }
    edges = {
        "a": {"b": Import("b", 1, True, False)},
        "b": {"c": Import("c", 2, False, True)},
        "c": {"a": Import("a", 3, False, False), "d": Import("d", 4, False, False)},
        "d": {},
    }
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert shortest_path(edges, "a", "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]


# -- _core is sans-IO ---------------------------------------------------------------

CORE: Final = f"{PACKAGE}._core"
#: What ``_core`` may not import, directly or through another package module: the event
#: loops and I/O libraries, the protocol engines that the Trio layer drives, the clock.
IO_LIBRARIES: Final = frozenset(
    {
        "trio",
        "trio_websocket",
        "h11",
        "wsproto",
        "socket",
        "select",
        "selectors",
        "asyncio",
        "threading",
        "time",
        "sqlite3",
    }
)
#: The names of calls that read a clock (``time.monotonic()``, ``datetime.now()``,
#: ``trio.current_time()``, ``loop.time()``...), whatever object they are called on.
CLOCK_CALLS: Final = frozenset(
    {
        "time",
        "time_ns",
        "monotonic",
        "monotonic_ns",
        "perf_counter",
        "perf_counter_ns",
        "process_time",
        "thread_time",
        "now",
        "utcnow",
        "today",
        "current_time",
    }
)


def core_modules() -> list[Module]:
    return [
        module for name, module in modules().items() if name == CORE or name.startswith(CORE + ".")
    ]


def reachable(starts: list[str]) -> dict[str, list[str]]:
    """Every package module that ``starts`` import, transitively (``TYPE_CHECKING`` and
    local imports included), with a shortest import chain that reaches it."""
    edges = graph()
    reached: dict[str, list[str]] = {}
    queue = deque((start, [start]) for start in starts)
    while queue:
        name, chain = queue.popleft()
        if name not in reached:
            reached[name] = chain
            queue.extend((target, [*chain, target]) for target in sorted(edges[name]))
    return reached


def test_core_imports_no_io_library() -> None:
    """Nor does any package module that ``_core`` imports (``TYPE_CHECKING`` included)."""
    edges = graph()
    reached = reachable([module.name for module in core_modules()])
    faults = []
    for name, chain in reached.items():
        module = modules()[name]
        for imported in imports(module):
            if imported.target.partition(".")[0] in IO_LIBRARIES:
                faults.append(
                    f"{module.path.relative_to(ROOT)}:{imported.line}: {module.short} imports "
                    f"{imported.target}{imported.describe()}"
                )
                if len(chain) > 1:
                    faults.append(f" and _core reaches {module.short} through:")
                    faults.extend(describe_chain(edges, chain))
    assert not faults, "_core must not depend on I/O:\n" + "\n".join(faults)


def test_core_never_awaits() -> None:
    faults = []
    for module in core_modules():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.AsyncFunctionDef | ast.AsyncWith | ast.AsyncFor | ast.Await):
                faults.append(f"{module.where(node)}: {type(node).__name__}")
            elif isinstance(node, ast.comprehension) and node.is_async:
                faults.append(f"{module.where(node.target)}: async comprehension")
    assert not faults, "_core must never await:\n" + "\n".join(faults)


def test_core_reads_no_clock() -> None:
    faults = []
    for module in core_modules():
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in CLOCK_CALLS:
                faults.append(f"{module.where(node)}: {ast.unparse(node)}")
    assert not faults, "_core must take time as an argument, not read a clock:\n" + "\n".join(
        faults
    )


# -- _net does not know the runtime ---------------------------------------------------

NET: Final = f"{PACKAGE}._net"
#: What ``_net`` may not import, directly or through another package module.
RUNTIME: Final = frozenset({f"{PACKAGE}._host", f"{PACKAGE}._runtime", f"{PACKAGE}._supervisor"})


def test_net_does_not_import_the_runtime() -> None:
    edges = graph()
    starts = [name for name in modules() if name == NET or name.startswith(NET + ".")]
    assert starts, f"no {NET} package"
    faults = []
    for name, chain in reachable(starts).items():
        if name in RUNTIME:
            faults.append(f"_net reaches {modules()[name].short}:")
            faults.extend(describe_chain(edges, chain))
    assert not faults, "\n".join(faults)


# -- no reaching into another module's private names -----------------------------------


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _assigned_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _assigned_names(element)
    elif isinstance(target, ast.Starred):
        yield from _assigned_names(target.value)


def _body_names(body: list[ast.stmt]) -> Iterator[str]:
    """The names a module or class body binds: defs, classes, assignments (also inside
    the ``if``/``try``/``with`` blocks of that body)."""
    for statement in body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield statement.name
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                yield from _assigned_names(target)
        elif isinstance(statement, ast.AnnAssign | ast.AugAssign):
            yield from _assigned_names(statement.target)
        elif isinstance(statement, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody"):
                yield from _body_names(getattr(statement, block, []))
            for handler in getattr(statement, "handlers", []):
                yield from _body_names(handler.body)


def _slots(body: list[ast.stmt]) -> Iterator[str]:
    for statement in body:
        if isinstance(statement, ast.Assign | ast.AnnAssign) and "__slots__" in {
            name
            for target in (
                statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            )
            for name in _assigned_names(target)
        }:
            assert statement.value is not None
            for node in ast.walk(statement.value):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    yield node.value


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in {"self", "cls"}


@cache
def private_names_defined(module: Module) -> frozenset[str]:
    """The private names ``module`` defines: module-level names, class attributes and
    methods, ``__slots__`` entries, and ``self._x = ...`` assignments."""
    names = set(_body_names(module.tree.body))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ClassDef):
            names.update(_body_names(node.body))
            names.update(_slots(node.body))
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for element in ast.walk(target):
                    if isinstance(element, ast.Attribute) and _is_self(element.value):
                        names.add(element.attr)
    return frozenset(name for name in names if is_private(name))


@attrs.frozen
class PrivateAccess:
    module: Module
    node: ast.Attribute

    @property
    def key(self) -> tuple[str, str]:
        return (self.module.short, self.node.attr)

    def describe(self) -> str:
        return f"{self.module.where(self.node)}: {ast.unparse(self.node)}"


def private_accesses(module: Module) -> list[PrivateAccess]:
    """Every ``expr._name`` in ``module`` where ``expr`` is not ``self``/``cls`` and
    ``_name`` is not one ``module`` defines itself (a friend access within a module is
    fine: the module owns both sides)."""
    own = private_names_defined(module)
    found = [
        PrivateAccess(module, node)
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Attribute)
        and is_private(node.attr)
        and not _is_self(node.value)
        and node.attr not in own
    ]
    return sorted(found, key=lambda access: (access.node.lineno, access.node.col_offset))


#: The private-name accesses across modules that are tolerated, as (module, attribute):
#: why. The test fails on any other, and on an entry that no longer occurs.
#: (module, attribute) -> why that module may use another module's private name. Empty:
#: where the package needs what a class hides, the class's module hands it out through a
#: module function (``_host.runtime_of``, ``_websocket.record_of``...).
ALLOWED_PRIVATE_ACCESS: Final[dict[tuple[str, str], str]] = {}


def test_no_private_access_across_modules() -> None:
    found: dict[tuple[str, str], list[PrivateAccess]] = {}
    for module in modules().values():
        for access in private_accesses(module):
            found.setdefault(access.key, []).append(access)
    new = [
        access.describe()
        for key, accesses in sorted(found.items())
        if key not in ALLOWED_PRIVATE_ACCESS
        for access in accesses
    ]
    stale = [f"{key}: {why}" for key, why in ALLOWED_PRIVATE_ACCESS.items() if key not in found]
    report = []
    if new:
        report.append(
            "access to another module's private names (offer a public method, or move the "
            "code to the module that owns the name):"
        )
        report.extend(new)
    if stale:
        report.append("these ALLOWED_PRIVATE_ACCESS entries no longer occur; delete them:")
        report.extend(stale)
    assert not report, "\n".join(report)


def test_private_access_finder() -> None:
    source = """
class Box:
    __slots__ = ("_slot",)
    _class_level = 1
    def __init__(self, other):
        self._mine = other._theirs          # other module's name: found
        self._slot = other._mine            # a name this module defines: a friend
    def _method(self):
        return cls._class_level, self.__dict__, other._method, other.__mangled
def _helper(storage):
    return storage._database, storage._helper
"""
    module = Module(f"{PACKAGE}._fake", PACKAGE_DIR / "_fake.py", ast.parse(source), False)
    assert private_names_defined(module) == {"_slot", "_class_level", "_mine", "_method", "_helper"}
    assert [access.describe() for access in private_accesses(module)] == [
        "trio_hibernate/_fake.py:6: other._theirs",
        "trio_hibernate/_fake.py:9: other.__mangled",
        "trio_hibernate/_fake.py:11: storage._database",
    ]


# -- no class longer than MAX_CLASS_LINES ------------------------------------------------

MAX_CLASS_LINES: Final = 300


def class_lengths() -> dict[str, tuple[int, str]]:
    """``module.Class`` (nested classes as ``module.Outer.Inner``) -> (lines, where)."""
    found = {}

    def visit(module: Module, node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                assert child.end_lineno is not None
                name = f"{prefix}.{child.name}"
                found[name] = (child.end_lineno - child.lineno + 1, module.where(child))
                visit(module, child, name)
            elif not isinstance(child, ast.expr):
                visit(module, child, prefix)

    for module in modules().values():
        visit(module, module.tree, module.short)
    return found


#: Classes over the limit today, with their length: they may shrink, not grow; an
#: entry fails once its class is gone or within the limit.
LONG_CLASSES: Final[dict[str, int]] = {
    # The read loop gained inline turns, then the log line of the socket's end and the
    # sent-message counter (issue 15); the lean frame codec (issue 13) replaces its
    # wsproto half next and splits the class.
    "_net.websocket.WebSocketTransport": 322,
}


def test_no_long_class() -> None:
    lengths = class_lengths()
    faults = []
    for name, (lines, where) in sorted(lengths.items()):
        limit = LONG_CLASSES.get(name, MAX_CLASS_LINES)
        if lines > limit:
            faults.append(f"{where}: class {name} has {lines} lines (limit {limit})")
    for name, recorded in LONG_CLASSES.items():
        lines = lengths.get(name, (0, ""))[0]
        if lines <= MAX_CLASS_LINES:
            faults.append(
                f"LONG_CLASSES[{name!r}] = {recorded} is stale: the class has {lines} lines "
                f"now (0: gone), within {MAX_CLASS_LINES}; delete the entry"
            )
    assert not faults, "\n".join(faults)


# -- every exception class in _errors.py ---------------------------------------------------


def exception_classes_outside_errors() -> list[str]:
    """Classes deriving (by name) from an exception class, defined outside ``_errors``."""
    known = {"Exception", "BaseException"}
    errors = modules()[f"{PACKAGE}._errors"]
    known |= {node.name for node in ast.walk(errors.tree) if isinstance(node, ast.ClassDef)}
    found = []
    for module in modules().values():
        if module.short == "_errors":
            continue
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(base).rpartition(".")[2] for base in node.bases}
            if bases & known or any(b.endswith(("Error", "Exception")) for b in bases):
                found.append(f"{module.where(node)}: class {node.name}")
    return found


def test_every_exception_class_is_in_errors() -> None:
    """One place to read what can be raised, split by fault (see ``_errors.py``)."""
    found = exception_classes_outside_errors()
    assert not found, "define exception classes in trio_hibernate/_errors.py:\n" + "\n".join(found)
