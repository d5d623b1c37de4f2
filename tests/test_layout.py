"""The architecture of ``torch_impl``: four rooms that import only downward.

    pipeline  ->  models, slides, streaming
    models    ->  streaming
    slides    ->  streaming
    streaming ->  (nothing of torch_impl; reference only)

Each module's imports are read with ``ast`` (no import is executed), relative imports are
resolved against the module's package, and every import of ``torch_impl`` must land in the
module's own room or a room it may use. ``reference/`` imports nothing of ``torch_impl``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "torch_impl"

#: room -> the other rooms it may import
ALLOWED = {
    "streaming": set(),
    "models": {"streaming"},
    "slides": {"streaming"},
    "pipeline": {"streaming", "models", "slides"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module that ``path`` imports (at any depth in the file)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name submodules: count them too
                found += [target] + ([f"{target}.{a.name}" for a in node.names] if not node.module else [])
            else:
                found.append(node.module)
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "torch_impl" or len(parts) < 2:
        return None
    return parts[1]


def test_every_module_lives_in_a_room():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}]
    assert not loose, f"modules outside the four rooms: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_downward(room):
    violations = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for module in imported_modules(path):
            target = room_of(module)
            if module == "torch_impl" or (target is not None and target != room and target not in ALLOWED[room]):
                violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not violations, "\n".join(violations)


def test_the_engine_imports_only_reference_torch_numpy_and_the_standard_library():
    import sys

    allowed_roots = {"reference", "torch", "numpy", "torch_impl"} | set(sys.stdlib_module_names)
    outside = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((PACKAGE / "streaming").rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] not in allowed_roots
    ]
    assert not outside, "\n".join(outside)


def test_reference_imports_nothing_of_torch_impl():
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / "reference").rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in {"torch_impl", "torch"}
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_imports():
    """The oracle is tight: a known upward import in a throw-away file is reported."""
    path = PACKAGE / "streaming" / "trunk.py"
    assert "torch_impl.streaming.geometry" in imported_modules(path)
    assert "torch_impl.streaming.sources" in imported_modules(path)
    resnet = imported_modules(PACKAGE / "models" / "resnet.py")
    assert "torch_impl.streaming" in resnet and room_of("torch_impl.streaming") == "streaming"
