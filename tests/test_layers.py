"""The package's boundaries, read from its source with ast: no module imports a private name (one
starting with "_") of another subpackage, only the op layer (nf4lora/ops) touches the native core
nf4lora._C, and each subpackage imports only the layers below it (docs/ARCHITECTURE.md).
The checker itself is checked on small sources that break each rule."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nf4lora

PACKAGE = Path(nf4lora.__file__).parent

# What each unit may import from the package (besides itself). A unit is a subpackage or a
# top-level module; "__init__" is the package's public face and may import everything.
ALLOWED = {
    "ops": {"version", "files"},
    "files": set(),
    "outdir": {"files"},
    "version": set(),
    "plan": set(),
    # integrations with other libraries, on top of the public API (they may import nf4lora itself)
    "hf": {"__init__", "ops", "quant", "lora", "loading"},
    "peft_layers": {"__init__", "ops", "quant", "lora"},
    "quant": {"ops"},
    "optim": {"ops"},
    "lora": {"ops", "quant", "files"},
    "loading": {"ops", "quant", "lora"},
    "train": {"ops", "quant", "lora", "optim", "loading", "files"},
    "generate": {"ops", "quant", "lora"},
    "cli": {"ops", "quant", "lora", "optim", "loading", "train", "files", "plan", "generate", "outdir"},
    "__main__": {"cli"},
    "__init__": {"ops", "quant", "lora", "optim", "loading", "train", "files", "cli", "version", "plan", "hf",
                 "generate"},
}


def _unit(module: str) -> str:
    """'nf4lora.ops.cpu' -> 'ops'; 'nf4lora.cli' -> 'cli'; 'nf4lora' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def violations(sources: dict[str, tuple[str, bool]], package: str = "nf4lora") -> list[str]:
    """sources: module name -> (source text, is a package __init__). Returns one line per breach."""
    found = []
    for module, (text, is_pkg) in sorted(sources.items()):
        unit = _unit(module)
        for node in ast.walk(ast.parse(text)):
            targets: list[tuple[str, str]] = []  # (imported module, name or "")
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_pkg, node)
                targets = [(target, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [(alias.name, "") for alias in node.names]
            for target, name in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                full = f"{target}.{name}" if name else target
                where = f"{module}:{node.lineno}"
                if full == f"{package}._C" or target == f"{package}._C":
                    if unit != "ops":
                        found.append(f"{where} imports the native core {package}._C outside the op layer")
                    continue
                other = _unit(full) if (name and full in sources) else _unit(target)
                if other != unit and other not in ALLOWED.get(unit, set()):
                    found.append(f"{where} ({unit}) imports {full} from {other}, which it may not use")
                private = [p for p in full.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
                if private and other != unit:
                    found.append(f"{where} imports the private name {full} across subpackages ({unit} -> {other})")
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, is_pkg = _module_name(path, PACKAGE)
        out[name] = (path.read_text(), is_pkg)
    return out


def test_the_package_keeps_its_boundaries():
    sources = package_sources()
    assert "nf4lora.ops.library" in sources and "nf4lora.lora.layer" in sources  # the walk found the tree
    assert violations(sources) == []


@pytest.mark.parametrize("module, text, is_pkg, expected", [
    ("nf4lora.lora.layer", "from ..ops.matmul import _forward\n", False, "private name nf4lora.ops.matmul._forward"),
    ("nf4lora.lora.io", "from .model import _inject\n", False, None),  # private within one subpackage: allowed
    ("nf4lora.quant.linear", "from .. import _C\n", False, "native core"),
    ("nf4lora.optim.base", "import nf4lora._C\n", False, "native core"),
    ("nf4lora.ops.native", "from .. import _C\n", False, None),
    ("nf4lora.ops.cpu", "from ..quant import QuantState\n", False, "which it may not use"),
    ("nf4lora.quant", "from ..lora import LoraLinear\n", True, "which it may not use"),
    ("nf4lora.train.loop", "from ..lora.model import _ADAPTERS\n", False, "private name"),
])
def test_the_checker_catches_each_breach(module, text, is_pkg, expected):
    sources = {"nf4lora.ops.matmul": ("", False), "nf4lora.lora.model": ("", False), module: (text, is_pkg)}
    found = violations(sources)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
