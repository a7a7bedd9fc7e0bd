"""The shape of the code: layers that import only downward and no import cycles; unknown keyword arguments
rejected by every constructor with the accepted ones named."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import dist_ortho
from dist_ortho import MuonAdamW, get_optimizer
from dist_ortho.optim.registry import OPTIMIZERS

PACKAGE = Path(dist_ortho.__file__).parent

# Lowest first; a module may import its own layer and those below it, never one above.
LAYERS = [
    ("math", ["dist_ortho.math"]),
    ("communication", ["dist_ortho.comm"]),
    ("tensor parallel", ["dist_ortho.tp"]),
    ("parameters", ["dist_ortho.parameters"]),
    ("optimizer policy", ["dist_ortho.optim"]),
    ("integrations", ["dist_ortho.integrations", "dist_ortho.train", "dist_ortho.demo", "dist_ortho.plan", "dist_ortho"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """dist_ortho modules imported anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dist_ortho")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dist_ortho"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != module}


def test_layers_import_only_downward():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for target in _imports(module, path, modules):
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) - {"dist_ortho"} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


ROOT = PACKAGE.parent


def _code_block(path: Path, after: str) -> list[str]:
    """The lines of the first fenced block after the heading ``after`` in ``path``."""
    text = path.read_text()
    return text[text.index(after):].split("```\n", 2)[1].splitlines()


def _layer_rows(lines: list[str]) -> list[str]:
    """The block's layer names: its rows that start at column 0 (up to two spaces)."""
    return [re.split(r"\s{2,}", line)[0] for line in lines if line[:1].strip() and not line.startswith("launch/")]


def test_readme_layout_names_every_top_level_package_in_its_layer():
    lines = _code_block(ROOT / "README.md", "## Layout of the code")
    assert _layer_rows(lines) == [name for name, _ in LAYERS]
    rows = dict(zip(_layer_rows(lines), lines))
    entries = [p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
    entries += [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    assert len(entries) >= 8, entries
    for entry in entries:
        layer = LAYERS[_layer(f"dist_ortho.{entry}")][0]
        assert re.search(rf"(?<![\w.]){entry}\b", rows[layer]), f"README's layout: {entry} not in the {layer} row"


def test_architecture_page_names_every_module_and_no_other():
    """docs/architecture.md's block: a line ``dist_ortho/<package>/`` opens a package; every ``*.py`` after it
    is a module of that package. Every module is named (a package's __init__.py may be), and each named one exists."""
    lines = _code_block(ROOT / "docs" / "architecture.md", "# Layout of the code")
    assert _layer_rows(lines) == [name for name, _ in LAYERS]
    base, named = None, set()
    for line in lines:
        opened = re.match(r"^(?:\S.*?\s{2,})?\s*(dist_ortho/(?:\w+/)*)(?:\s|$)", line)
        if opened:
            base = opened.group(1)
            continue
        named |= {base + token for token in re.findall(r"(?<![\w/.])((?:\w+/)*\w+\.py)\b", line)}
    tree = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert len(tree) > 50, len(tree)
    assert not sorted(named - tree), f"docs/architecture.md names modules that do not exist: {sorted(named - tree)}"
    missing = sorted(p for p in tree - named if not p.endswith("__init__.py"))
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_each_mode_has_its_own_module():
    for mode in ("duplicated", "distributed", "gram", "home"):
        assert importlib.util.find_spec(f"dist_ortho.tp.{mode}") is not None, mode


def _params():
    return [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))]


@pytest.mark.parametrize("name", sorted(k for k in OPTIMIZERS if k != "adamw"))
def test_unknown_keyword_is_a_type_error_naming_it_and_the_accepted_ones(name):
    params = _params() if name == "muon_adamw" else _params()[:1]
    with pytest.raises(TypeError) as error:
        get_optimizer(name)(params, lr=0.01, tp_mod="gram")
    message = str(error.value)
    assert "tp_mod" in message and "tp_mode" in message, message


def test_misspelled_keywords_do_not_build():
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(TypeError, match=r"\['num_ns_step', 'tp_mod'\]"):
        dist_ortho.Muon([p], lr=0.01, tp_mod="gram", num_ns_step=3)
    with pytest.raises(TypeError, match="num_ns_step"):  # no matrix parameter at all: still checked
        MuonAdamW([torch.nn.Parameter(torch.randn(6))], num_ns_step=3)
    with pytest.raises(TypeError, match="beta3"):
        get_optimizer("normuon")([p], beta3=0.9)
    with pytest.raises(TypeError, match="nesterov"):  # Scion has no Nesterov
        dist_ortho.Scion([p], nesterov=True)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['weight_decay'\]"):  # fixed at 1
        dist_ortho.Scion([p], weight_decay=0.1)
