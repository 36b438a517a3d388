"""What `pip install torch==2.13.0 -e .` (no extras) installs is enough for every command.

Every `import` of a third-party package in mupad/ is checked against pyproject.toml: the
package is a core dependency, or the import can never fail (under TYPE_CHECKING, or in a
try whose except catches ImportError), or it sits behind `mupad.optional.require_extra`,
whose one-line error names an extra that declares the package. A module that calls
require_extra at its top may import that extra's packages at its top, but it may itself only
be imported lazily (inside a function). Adding a top-level import of an undeclared package
anywhere in mupad/ fails this test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mupad"

# Import names whose distribution is named otherwise (and may not be installed here).
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "cv2": "opencv-python",
    "openslide": "openslide-python",
    "python_multipart": "python-multipart",
    "multipart": "python-multipart",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0))


@cache
def declared() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """(core distributions, extra -> its distributions) from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = frozenset(requirement_name(spec) for spec in project["dependencies"])
    extras = {
        extra: frozenset(requirement_name(spec) for spec in specs)
        for extra, specs in project.get("optional-dependencies", {}).items()
    }
    return core, extras


@cache
def installed() -> dict[str, list[str]]:
    """Top-level import name -> distributions, of what is installed here."""
    return importlib.metadata.packages_distributions()


def distribution(module: str) -> str:
    """The distribution that provides top-level `module` (its own name when unknown)."""
    top = module.split(".")[0]
    if top in DISTRIBUTION_OF:
        return normalise(DISTRIBUTION_OF[top])
    found = installed().get(top)
    return normalise(found[0]) if found else normalise(top)


def third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top not in ("mupad", "__future__")


@dataclass(frozen=True)
class Import:
    module: str  # as written: "skimage.color", "mupad.serve.app"
    line: int
    in_function: bool
    cannot_fail: bool  # under TYPE_CHECKING, or guarded by `except ImportError`


@dataclass(frozen=True)
class Require:
    module: str
    extra: str | None
    line: int
    in_function: bool


class _Walker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.imports: list[Import] = []
        self.requires: list[Require] = []
        self._function = 0
        self._guarded = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._function += 1
        self.generic_visit(node)
        self._function -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self._guarded += 1
            for child in node.body:
                self.visit(child)
            self._guarded -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        catches = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
        guarded = "ImportError" in catches or "ModuleNotFoundError" in catches
        self._guarded += guarded
        for child in node.body:
            self.visit(child)
        self._guarded -= guarded
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    def _add(self, module: str, node: ast.AST) -> None:
        self.imports.append(Import(module, node.lineno, self._function > 0, self._guarded > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node)
            if node.module == "mupad" or node.module.startswith("mupad."):
                for alias in node.names:  # `from mupad.serve import app` imports a module
                    self._add(f"{node.module}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name == "require_extra" and node.args and isinstance(node.args[0], ast.Constant):
            extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
            value = extra.value if isinstance(extra, ast.Constant) else None
            self.requires.append(
                Require(node.args[0].value, value, node.lineno, self._function > 0)
            )
        self.generic_visit(node)


def scan(source: str) -> _Walker:
    walker = _Walker()
    walker.visit(ast.parse(source))
    return walker


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(sources: dict[str, str]) -> list[str]:
    """Every breach of the rules above in {module name: source}."""
    core, extras = declared()
    scans = {name: scan(source) for name, source in sources.items()}
    problems = []
    # Modules that are an extra's: they call require_extra at their top.
    extra_modules = {
        name: sorted({str(r.extra) for r in found.requires if not r.in_function})
        for name, found in scans.items()
        if any(not r.in_function for r in found.requires)
    }
    for name, found in scans.items():
        for call in found.requires:
            dist = distribution(call.module)
            if call.extra not in extras:
                problems.append(
                    f"{name}:{call.line}: require_extra({call.module!r}) names extra "
                    f"{call.extra!r}, which pyproject.toml does not declare"
                )
            elif dist not in extras[call.extra]:
                problems.append(f"{name}:{call.line}: {dist} is not in the {call.extra!r} extra")
        # distribution -> line of the top-level require_extra that makes importing it safe
        required_at = {}
        for call in found.requires:
            if not call.in_function:
                required_at.setdefault(distribution(call.module), call.line)
        eager_targets = set()
        for item in found.imports:
            for target in extra_modules:
                within = item.module == target or item.module.startswith(target + ".")
                if within and target != name and not item.in_function:
                    eager_targets.add((item.line, target))
            if not third_party(item.module) or item.cannot_fail:
                continue
            dist = distribution(item.module)
            if dist in core:
                continue
            if not item.in_function and required_at.get(dist, item.line) < item.line:
                continue
            problems.append(
                f"{name}:{item.line}: imports {item.module} (distribution {dist}), which is not "
                "a core dependency in pyproject.toml; declare it there, or import it through "
                "mupad.optional.require_extra(..., extra=...) with an extra that declares it"
            )
        for line, target in sorted(eager_targets):
            problems.append(
                f"{name}:{line}: imports {target} (which needs the "
                f"{'/'.join(extra_modules[target])} extra) at module level; import it inside "
                "the function that needs it"
            )
    return problems


def project_sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_third_party_import_is_declared_or_behind_an_extra():
    sources = project_sources()
    assert len(sources) > 100 and "mupad.cli" in sources
    assert violations(sources) == []


def test_pyproject_declares_the_packages_the_install_needs():
    core, extras = declared()
    assert {"torch", "numpy", "typer", "rich", "scikit-image", "pandas", "scipy"} <= core
    assert {"fastapi", "starlette", "uvicorn", "python-multipart"} <= extras["serve"]


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ("import sklearn\n", "imports sklearn (distribution scikit-learn)"),
        ("from sklearn.cluster import KMeans\n", "imports sklearn.cluster"),
        ("def f():\n    import fastapi\n", "imports fastapi"),  # lazy, but no extra named
        ("import torch.utils.tensorboard\nimport tensorboard\n", "imports tensorboard"),
        (
            "from mupad.optional import require_extra\n"
            "require_extra('fastapi', extra='web', needed_for='x')\n",
            "extra 'web', which pyproject.toml does not declare",
        ),
        (
            "from mupad.optional import require_extra\n"
            "require_extra('fastapi', extra='tensorboard', needed_for='x')\n",
            "fastapi is not in the 'tensorboard' extra",
        ),
    ],
)
def test_the_check_catches_undeclared_imports(source, complaint):
    (problem,) = violations({"mupad.example": source})
    assert complaint in problem


def test_the_check_accepts_the_allowed_forms():
    web = (
        "from mupad.optional import require_extra\n"
        "require_extra('fastapi', extra='serve', needed_for='x')\n"
        "from fastapi import FastAPI\n"
    )
    ok = {
        "mupad.core_user": "import numpy\nfrom PIL import Image\n",
        "mupad.fallback": "def f():\n    try:\n        import torchvision\n"
        "    except ImportError:\n        return None\n",
        "mupad.typing_only": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import uvicorn\n",
        "mupad.web": web,
        "mupad.web_user": "def serve():\n    from mupad.web import app\n",
    }
    assert violations(ok) == []
    eager = {**ok, "mupad.eager_user": "from mupad.web import app\n"}
    (problem,) = violations(eager)
    assert "mupad.eager_user:1: imports mupad.web" in problem
    # The package imported before the call that would explain its absence:
    (problem,) = violations({"mupad.web": "import fastapi\n" + web})
    assert "mupad.web:1: imports fastapi" in problem
