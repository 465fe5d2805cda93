"""The package boundaries, read from the source: who may import whom, no import circles, one namespace."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "serving", "training", "ui", "benchmarks")
# What each package may import of the others (everything may import itself).
ALLOWED = {
    "services": set(),
    "training": {"services"},
    "serving": {"services"},
    "ui": set(),  # the UI talks to the API over HTTP only
    "benchmarks": {"services", "serving", "training"},
}
# Outside the standard library, the UI uses its web framework, the HTTP client and its settings' libraries only.
UI_THIRD_PARTY = {"gradio", "requests", "PIL", "pydantic", "yaml"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["medhash", *parts])


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


MODULES = source_modules()


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions and TYPE_CHECKING included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES)
    return names


def project_imports(path: Path) -> set[str]:
    return {name for name in imports_of(path) if name in MODULES}


def package_of(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    wrong = sorted(
        f"{module} imports {target}"
        for module, path in MODULES.items() if package_of(module) == package
        for target in project_imports(path)
        if package_of(target) not in ALLOWED[package] | {package}
    )
    assert not wrong, wrong


def test_no_top_level_names_but_medhash():
    strays = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        for name in imports_of(path) if name.split(".")[0] in PACKAGES
    )
    assert not strays, strays


def test_ui_imports_only_its_own_modules_and_its_web_libraries():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    foreign = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items() if package_of(module) == "ui"
        for name in imports_of(path)
        if not name.startswith("medhash.ui") and name.split(".")[0] not in stdlib | UI_THIRD_PARTY
    )
    assert not foreign, foreign


def test_no_import_circles():
    graph = {module: project_imports(path) - {module} for module, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_package_folder_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for top in PACKAGES for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk
    assert project["tool"]["setuptools"]["package-dir"] == {f"medhash.{top}": top for top in PACKAGES}


def test_installed_namespace_is_medhash_only(tmp_path):
    """Outside the checkout, `import services` finds nothing of ours; `import medhash.services` works."""
    def run(statement: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", statement], cwd=tmp_path, capture_output=True, text=True)

    for name in PACKAGES:
        assert run(f"import {name}").returncode != 0, name
    found = run("import medhash.services, medhash.ui; print(medhash.services.__file__)")
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == (ROOT / "services" / "__init__.py").resolve()
