"""The house as the design card draws it: the top level is the card's, imports only go down (stages and tools
above the library sgm/, the library above common.py) and never in a circle, and each stage opens with its
exact command and one block of defaults. The import graph is derived from the code itself (every import, also
those inside functions), so a new import that breaks the layering fails here."""
import ast
import os
import re
from pathlib import Path

from conftest import REPO

# The card's top level; beside it at most three folders, each named for what it holds.
CARD = {"requirements.txt", "Makefile", "README.md", "common.py", "01_collect.py", "02_score.py", "03_suppress.py",
        "04_evaluate.py", "data", "tests"}
FOLDERS = {"sgm", "tools", "docs"}
STAGES = ["01_collect.py", "02_score.py", "03_suppress.py", "04_evaluate.py"]
TOOLS = ["bench", "tune", "plant", "widthcheck", "eyes", "browse", "modalities"]


def ignored_names():
    """Top-level names .gitignore leaves out (a virtual environment, runs/, caches): not part of the layout."""
    lines = (REPO / ".gitignore").read_text().splitlines()
    return {line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#") and "*" not in line}


def repo_files(root, suffix):
    """The repository's own files ending in `suffix`: no dot folders, no caches, nothing a .gitignore (the top
    one or a folder's own, such as data/'s built files) leaves out."""
    found = []
    for folder, dirs, files in os_walk(root):
        ignored = set()
        for gitignore in (folder / ".gitignore", *([root / ".gitignore"] if folder != root else [])):
            if gitignore.exists():
                ignored |= {line.strip().strip("/") for line in gitignore.read_text().splitlines()
                            if line.strip() and not line.startswith("#") and "*" not in line}
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__" and d not in ignored)
        found += [folder / name for name in sorted(files) if name.endswith(suffix) and name not in ignored]
    return found


def os_walk(root):
    for folder, dirs, files in os.walk(root):
        yield Path(folder), dirs, files


def module_files(root):
    """{module name: path} of every Python file outside tests/: `common`, `01_collect`, `sgm.models`,
    `tools.plant`, `data.build`; a package's __init__.py is the package."""
    found = {}
    for path in repo_files(root, ".py"):
        parts = path.relative_to(root).parts
        if parts[0] == "tests":
            continue
        name = ".".join(parts)[:-3]
        found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def import_graph(root):
    """{module: set of the repository's modules it imports}. `from sgm import models` and `from sgm.models import
    x` both import sgm.models (not the package sgm: its __init__ holds a docstring only)."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [[alias.name] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [[f"{node.module}.{alias.name}", node.module] for alias in node.names]
            else:
                continue
            for options in candidates:  # the most specific name that is a repository module
                target = next((option for option in options if option in modules), None)
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer(module):
    """2: the stages, the tools and the data builder; 1: the library; 0: common.py."""
    if module == "common":
        return 0
    if module == "sgm" or module.startswith("sgm."):
        return 1
    return 2


def problems(graph, layer_of=layer):
    """Every import that goes up a layer, and every circle, as readable lines (empty: the layering holds)."""
    found = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}): imports only go down"
             for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) > layer_of(a)]
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append("circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_checker_catches_the_old_circle():
    """The import graph before the redesign: the model loader built the positive control, so models -> plant ->
    judges -> endpoint -> models was a circle, and the library imported a tool."""
    old = {"01_collect": {"common", "models", "judges"}, "common": set(), "neurons": {"common"},
           "models": {"common", "neurons", "plant"}, "plant": {"common", "models", "judges", "neurons"},
           "judges": {"common", "endpoint"}, "endpoint": {"common", "models"}}
    old_layer = {"01_collect": 2, "plant": 2, "common": 0}
    found = problems(old, lambda module: old_layer.get(module, 1))
    assert "models (layer 1) imports plant (layer 2): imports only go down" in found
    assert any(line.startswith("circle: ") and {"models", "plant", "judges", "endpoint"} <= set(
        line[len("circle: "):].split(" -> ")) for line in found), found
    # and the same graph without the loader's import of the experiment is clean
    old["models"].discard("plant")
    assert problems(old, lambda module: old_layer.get(module, 1)) == []


def test_imports_only_go_down_and_never_in_a_circle():
    graph = import_graph(REPO)
    assert {"common", "sgm.models", "sgm.report", "tools.plant", "data.build", "04_evaluate"} <= set(graph)
    assert problems(graph) == []
    assert not any(target.startswith("tools") for target in graph["sgm.models"])  # the loader knows no experiment


def test_the_top_level_is_the_cards():
    names = {path.name for path in REPO.iterdir()} - ignored_names()
    shown = {name for name in names if not name.startswith(".")}
    assert shown == CARD | FOLDERS, f"not in the card: {sorted(shown - CARD - FOLDERS)}; " \
                                    f"missing: {sorted(CARD | FOLDERS - shown)}"
    assert (REPO / "sgm" / "__init__.py").exists() and (REPO / "tools" / "__init__.py").exists()
    assert {path.stem for path in (REPO / "tools").glob("*.py")} - {"__init__"} == set(TOOLS)


def test_every_stage_and_tool_opens_with_its_command_and_one_defaults_block():
    for script in STAGES:
        source = (REPO / script).read_text(encoding="utf-8")
        docstring = ast.get_docstring(ast.parse(source))
        assert f"python {script} " in docstring, f"{script}: its docstring shows no `python {script} ...` command"
        assert len(re.findall(r"^defaults = dict\(", source, flags=re.M)) == 1, f"{script}: one defaults block"
    for tool in TOOLS:
        docstring = ast.get_docstring(ast.parse((REPO / "tools" / f"{tool}.py").read_text(encoding="utf-8")))
        assert f"python -m tools.{tool}" in docstring, f"tools/{tool}.py: its docstring shows no command"


def test_04_reads_in_one_sitting():
    """generate -> judge -> metrics -> report; the report's layout lives in sgm/report.py (the card's ~500 lines,
    with a little room)."""
    assert len((REPO / "04_evaluate.py").read_text(encoding="utf-8").splitlines()) <= 520
