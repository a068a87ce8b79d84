"""The code's shape: the ruff rules in pyproject.toml, tests that mirror the package, no test editing the import
path, no root script imported by the package, files under 450 lines, no import cycle between fora's modules."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "fora"
TESTS = REPO / "tests"
MAX_LINES = 450

# Modules with behaviour whose tests are not at their mirror path, and where they are.
EXEMPT = {
    "fora/models/compat/models.py": "remote-code model patches: run by tests/test_families.py on the family fixtures",
    "fora/models/compat/tokenizers.py": "remote-code tokenizer patches: run by tests/test_families.py on the family fixtures",
}
# __init__.py files are exempt too: package docstrings and re-exports, but for fora/models/compat/__init__.py,
# whose helpers (auto_map, prepare_remote_code, the class adapters) tests/test_families.py runs with the rest of compat.
# Test modules that mirror no one module: they cut across the package.
CROSS_CUTTING = {
    "tests/test_bad_inputs.py": "the one-line errors a user sees, through the entry points",
    "tests/test_families.py": "the remote-code family matrix (train, predict, merge, prompt) on tests/fixtures",
    "tests/test_golden.py": "every path's numbers against the runs recorded in tests/golden",
    "tests/test_scripts.py": "the shell scripts in scripts/ (set-up, the GPU check)",
    "tests/test_style.py": "this file",
}


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def has_behaviour(path: Path) -> bool:
    """A module has behaviour when it defines a function or method; fields, constants and re-exports do not count."""
    return any(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) for node in ast.walk(ast.parse(path.read_text())))


def mirror(path: Path) -> Path:
    """fora/a/b.py -> tests/a/test_b.py; fora/b.py -> tests/test_b.py."""
    inside = path.relative_to(PACKAGE)
    return TESTS / inside.parent / f"test_{inside.name}"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (scripts/setup.sh installs it)")
def test_ruff_finds_nothing():
    result = subprocess.run(["ruff", "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_every_module_with_behaviour_has_a_test_module_at_its_mirror_path():
    missing = [
        f"{relative(path)} -> {relative(mirror(path))}"
        for path in package_modules()
        if path.name != "__init__.py" and relative(path) not in EXEMPT and has_behaviour(path) and not mirror(path).is_file()
    ]
    assert missing == [], "modules without a test module at their mirror path (or an entry in EXEMPT)"
    stale = [name for name in EXEMPT if not (REPO / name).is_file() or not has_behaviour(REPO / name) or mirror(REPO / name).is_file()]
    assert stale == [], "EXEMPT names modules that are gone, have no behaviour, or have a mirror test module now"
    mirrors = {mirror(path) for path in package_modules()}
    strays = [relative(path) for path in sorted(TESTS.rglob("test_*.py"))
              if path not in mirrors and relative(path) not in CROSS_CUTTING and "fixtures" not in path.parts]
    assert strays == [], "test modules that mirror no module of fora/ (name them after one, or in CROSS_CUTTING)"


def test_no_test_edits_the_import_path():
    """Tests import the package and tests/support.py through pyproject.toml's pytest settings, never by hand."""
    editing = re.compile(r"\bsys\s*\.\s*path\b")
    found = [f"{relative(path)}:{number}" for path in sorted(TESTS.rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if editing.search(line)]
    assert found == []


def imported_names(tree: ast.AST) -> set[str]:
    """The top-level package of every absolute import anywhere in a module (function bodies included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_no_root_level_script():
    """The root scripts (train_lora.py, config.py, fusion_lora.py, ...) are doors into fora/, never the other way."""
    scripts = {path.stem for path in REPO.glob("*.py")}
    assert {"train_lora", "config", "fusion_lora", "predict_fora"} <= scripts
    found = {relative(path): sorted(imported_names(ast.parse(path.read_text())) & scripts) for path in package_modules()}
    assert {name: names for name, names in found.items() if names} == {}


def test_no_file_over_450_lines_in_the_package_or_at_the_root():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = [name for name in tracked if "/" not in name or name.startswith("fora/")]
    assert "fora/cli.py" in files and "train_lora.py" in files
    long = {name: lines for name in files if (lines := (REPO / name).read_bytes().count(b"\n")) > MAX_LINES}
    assert long == {}


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of fora that `path` imports when it is imported: statements outside function bodies
    (class bodies, if/try/with blocks included; `if TYPE_CHECKING:` blocks left out)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(handler.body for handler in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With | ast.ClassDef):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return {module for module in found if module in modules and module != name}


def test_no_import_cycle_between_the_packages_modules():
    paths = {module_name(path): path for path in package_modules()}
    graph = {name: sorted(top_level_imports(path, set(paths))) for name, path in paths.items()}
    assert sum(map(len, graph.values())) > 50, "the graph should hold the package's imports"
    done, on_path, cycles = set(), [], []

    def visit(name):
        on_path.append(name)
        for imported in graph[name]:
            if imported in on_path:
                cycles.append(" -> ".join(on_path[on_path.index(imported):] + [imported]))
            elif imported not in done:
                visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name)
    assert cycles == []
