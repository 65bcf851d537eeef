"""The library's layout, read from its own imports: the wings import only downwards, and no
module reaches into another's private names."""

import ast
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "jaxnets"

# What each part may import of the library (besides itself).
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core", "data"},
    "engine": {"core", "data", "models"},
    "runs": {"core", "data", "models", "engine"},
}


def _part(module: str) -> str | None:
    """`jaxnets.engine.loop` -> "engine"; the package's top level -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def _imports(path: Path):
    """(line, imported module, imported names) of every jaxnets import in `path`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxnets"):
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxnets"):
                    yield node.lineno, alias.name, None


def _files():
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(LIBRARY)
        if len(rel.parts) > 1 and rel.parts[0] in ALLOWED:
            yield rel.parts[0], rel, path


def test_each_wing_imports_only_the_wings_below_it():
    upward = []
    for part, rel, path in _files():
        for line, module, name in _imports(path):
            target = _part(f"{module}.{name}" if module in ("jaxnets",) and name else module)
            if target is None or target == part:
                continue
            if target not in ALLOWED[part]:
                upward.append(f"jaxnets/{rel}:{line} imports {module} ({part} -> {target})")
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_private_name():
    private = []
    for _, rel, path in _files():
        for line, module, name in _imports(path):
            if name and name.startswith("_"):
                private.append(f"jaxnets/{rel}:{line} imports {name} from {module}")
    assert not private, "\n".join(private)


def test_the_checks_see_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    """The two walks above find what they look for (a planted engine -> runs import and a
    private name), so their passing means something."""
    wing = tmp_path / "jaxnets" / "engine"
    wing.mkdir(parents=True)
    (wing / "planted.py").write_text(
        "from jaxnets.runs import writers\nfrom jaxnets.engine.hooks import _now\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "LIBRARY", tmp_path / "jaxnets")
    try:
        test_each_wing_imports_only_the_wings_below_it()
    except AssertionError as e:
        assert "planted.py:1 imports jaxnets.runs (engine -> runs)" in str(e)
    else:
        raise AssertionError("the upward import was not seen")
    try:
        test_no_module_imports_another_modules_private_name()
    except AssertionError as e:
        assert "planted.py:2 imports _now from jaxnets.engine.hooks" in str(e)
    else:
        raise AssertionError("the private name was not seen")
