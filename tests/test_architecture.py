"""The architecture as checked rules: the import contracts of pyproject.toml (import-linter), no
private names used across modules, pure estimators, a small top level, comments without dates."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "miselbo"
ENTRY_POINTS = [REPO_ROOT / name for name in ("train.py", "model.py", "miselbo_eval.py")]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def _product_files() -> list[Path]:
    """The package, the benchmarks and the entry points (tests and examples are not product code)."""
    return sorted(PACKAGE.rglob("*.py")) + sorted((REPO_ROOT / "benchmarks").glob("*.py")) + ENTRY_POINTS


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with this repository's contracts, on the miselbo package found in package_parent."""
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    return subprocess.run([LINT_IMPORTS, "--config", str(REPO_ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- import contracts

def test_import_contracts_hold():
    done = _lint_imports(REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and "0 broken" in done.stdout, done.stdout


@pytest.mark.parametrize("module, upward_import, reported", [
    ("nvae/layers.py", "from miselbo.pipeline import presets",            # the model reaching up
     "miselbo.nvae.layers -> miselbo.pipeline.presets"),
    ("estimators/bounds.py", "import tqdm", "miselbo.estimators.bounds -> tqdm"),  # math with a bar
    ("storage/safe_io.py", "from miselbo.training import settings",        # storage knowing training
     "miselbo.storage.safe_io -> miselbo.training.settings"),
    ("evaluation/report.py", "from miselbo.training import objective",    # two siblings meeting
     "miselbo.evaluation.report -> miselbo.training.objective"),
])
def test_an_import_against_the_contracts_fails_the_check(tmp_path, module, upward_import, reported):
    """The check can fail: a copy of the package with one forbidden import breaks a contract, and
    the report names that import."""
    shutil.copytree(PACKAGE, tmp_path / "miselbo", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "miselbo" / module
    target.write_text(target.read_text() + f"\n{upward_import}  # noqa: E402\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0 and reported in done.stdout, done.stdout + done.stderr


def test_a_cycle_fails_the_check(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "miselbo", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "miselbo" / "runtime" / "cli.py"  # stop_signals imports nothing of runtime
    target.write_text(target.read_text() + "\nfrom miselbo.runtime import stop_signals  # noqa: E402\n")
    other = tmp_path / "miselbo" / "runtime" / "stop_signals.py"
    other.write_text(other.read_text() + "\nfrom miselbo.runtime import cli  # noqa: E402\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0 and "No cycles are allowed in miselbo.runtime" in done.stdout, done.stdout


# ----------------------------------------------------------------------------- private names

def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _names_defined(tree: ast.AST) -> set[str]:
    """Every name a module binds: functions, classes, variables, attributes it assigns, arguments."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def private_names_used_across_modules(files: list[Path]) -> list[str]:
    """`from miselbo.x import _name`, or `something._name` where _name is one of ours defined in
    another module (a private name of torch or the standard library is not ours to judge)."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in files}
    defined = {path: _names_defined(tree) for path, tree in trees.items()}
    ours = set().union(*defined.values())
    found = []
    for path, tree in trees.items():
        where = path.relative_to(REPO_ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("miselbo"):
                found += [f"{where}:{node.lineno} imports {alias.name} from {node.module}"
                          for alias in node.names if _is_private(alias.name)]
            elif (isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr in ours
                  and node.attr not in defined[path]):
                found.append(f"{where}:{node.lineno} uses .{node.attr}, private to another module")
    return found


def test_no_private_name_is_used_across_modules():
    assert private_names_used_across_modules(_product_files()) == []


def test_the_private_name_check_sees_a_crossing(tmp_path):
    (tmp_path / "a.py").write_text("def _helper():\n    return 1\n")
    (tmp_path / "b.py").write_text("from miselbo.a import _helper\n")
    (tmp_path / "c.py").write_text("import a\nvalue = a._helper()\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
        found = private_names_used_across_modules(sorted(tmp_path.glob("*.py")))
    assert found == ["b.py:1 imports _helper from miselbo.a", "c.py:2 uses ._helper, private to another module"]


# ----------------------------------------------------------------------------- the layers' shape

def test_the_estimators_import_only_torch_numpy_and_the_standard_library():
    allowed = {"torch", "numpy", "miselbo"} | set(sys.stdlib_module_names)
    for path in (PACKAGE / "estimators").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for root in roots:
                assert root.split(".")[0] in allowed, f"{path.name} imports {root}"
                if root.startswith("miselbo"):
                    assert root.startswith("miselbo.estimators"), f"{path.name} imports {root}"


def test_the_package_top_level_holds_few_modules():
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules
    roles = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert roles == ["data", "ensemble", "estimators", "evaluation", "nvae", "pipeline", "runtime", "storage",
                     "training"]


# ----------------------------------------------------------------------------- comments that age well

STALE = re.compile(r"20\d\d-\d\d-\d\d|\btoday\b|\bissue\s+#?\d+|\bthe lead\b", re.IGNORECASE)


def test_no_dates_today_issue_numbers_or_the_lead_in_code_or_tests():
    files = _product_files() + sorted((REPO_ROOT / "tests").glob("*.py")) + sorted((REPO_ROOT / "examples").glob("*.py"))
    hits = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
            for path in files if path != Path(__file__).resolve()
            for number, line in enumerate(path.read_text().splitlines(), 1) if STALE.search(line)]
    assert hits == []
