"""No untrusted pickle: the package reads only safetensors and JSON from user files, and any
torch.load it calls passes weights_only=True. Checked over the installed package's source with
the ast module: a torch.load call without weights_only=True, or torch.load imported under another
name, fails here, so new code cannot slip one in."""
import ast
from pathlib import Path

import nf4lora

PACKAGE = Path(nf4lora.__file__).parent
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no Python sources under {PACKAGE}"
    for path in files:
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    return ""


def test_no_pickle_modules_imported():
    bad = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            bad += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in FORBIDDEN_MODULES]
    assert not bad, bad


def test_torch_load_only_with_weights_only_true():
    bad = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func).endswith("torch.load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    bad.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
                bad.append(f"{path.name}:{node.lineno}: imports torch.load by name (call torch.load(..., weights_only=True))")
            if isinstance(node, ast.Call) and _dotted(node.func) in ("eval", "exec"):
                bad.append(f"{path.name}:{node.lineno}: {_dotted(node.func)}()")
    assert not bad, bad
