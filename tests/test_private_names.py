"""No module of Drover uses another module's private names (a leading ``_``): neither ``from m import _x``
nor ``obj._x`` where ``_x`` is defined in another of our modules and not in this one. A module that needs
something of another gets a public, documented interface for it (the issue that introduced this check:
``actors/control_state.py`` called the scheduler's ``_fail_request`` and ``_read_delivered``).

Access through ``self`` / ``cls`` is left alone (a subclass may use what its base class keeps), as ruff's
SLF001 does; so are other libraries' private names (where nothing else serves, they are commented at the
call). Tests may reach into what they test: only the production packages are checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "control", "engines", "transport", "observability", "scripts")
# Another library's private names that one of ours happens to share, each used where that library offers no
# public way (commented at the call): (module, name).
OTHER_LIBRARIES = {("transport.kv_store", "_stream")}  # nats-py KeyValue's stream name (compaction purge)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules(root: Path) -> dict[str, ast.Module]:
    trees = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            trees[module] = ast.parse(path.read_text(), filename=str(path))
    return trees


def _defined(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, assigned names and attributes, class fields."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if _private(n)}


def violations(root: Path) -> list[str]:
    trees = _modules(root)
    defined = {module: _defined(tree) for module, tree in trees.items()}
    owners: dict[str, set[str]] = {}
    for module, names in defined.items():
        for name in names:
            owners.setdefault(name, set()).add(module)
    found = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] not in PACKAGES or node.module == module:
                    continue
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                receiver = node.value
                if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                    continue
                others = owners.get(node.attr, set()) - {module}
                if others and node.attr not in defined[module] and (module, node.attr) not in OTHER_LIBRARIES:
                    found.append(f"{module}:{node.lineno} uses {node.attr} of {', '.join(sorted(others))}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    assert violations(ROOT) == []


def test_the_check_finds_a_private_call_and_a_private_import(tmp_path: Path) -> None:
    (tmp_path / "actors").mkdir()
    (tmp_path / "actors" / "a.py").write_text("class A:\n    def _hidden(self) -> None:\n        pass\n")
    (tmp_path / "actors" / "b.py").write_text(
        "from actors.a import _helper\n\ndef f(a) -> None:\n    a._hidden()\n    self_like = a\n"
    )
    found = violations(tmp_path)
    assert found == ["actors.b:1 imports actors.a._helper", "actors.b:4 uses _hidden of actors.a"]
