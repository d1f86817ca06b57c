"""The code's shape: the project's modules import each other without a cycle, so each can be read
(and tested) after the ones it uses."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_imports() -> dict[str, set[str]]:
    """module -> the project's modules it imports anywhere in its text (lazy imports inside functions too)."""
    files = {os.path.splitext(os.path.relpath(f, ROOT))[0].replace(os.sep, "."): f
             for f in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
             if not os.path.relpath(f, ROOT).startswith(("tests", "results"))}
    files["tasks"] = files.pop("tasks.__init__")
    graph = {}
    for mod, path in files.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        graph[mod] = {n for n in names if n in files and n != mod}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = project_imports()
    assert {"model", "grpo", "search", "tasks", "tasks.semantle", "scripts.experiments",
            "weights.default_model"} <= set(graph), sorted(graph)
    assert graph["grpo"] and graph["search"], "the graph sees imports"
    state = {}  # module -> "open" while on the depth-first path, "done" after

    def visit(mod, path):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_imports_point_down():
    """The algorithm imports nothing from the speed machinery (fast/), the embedded-model plumbing (weights/) or the
    research harness (scripts/), and nothing outside the harness imports it: `ls` shows the architecture, and the
    core reads on its own."""
    graph = project_imports()
    core = ("model", "lora", "sampling", "grpo", "database", "search", "tokenizer", "diagnostics", "together")
    up = {mod: sorted(d for d in deps if d.startswith(("fast.", "weights.", "scripts.")))
          for mod, deps in graph.items() if mod in core}
    assert not any(up.values()), up
    harness = {mod: sorted(d for d in deps if d.startswith("scripts.")) for mod, deps in graph.items()
               if not mod.startswith("scripts.")}
    assert not any(harness.values()), harness
    for folder in ("fast", "scripts", "weights"):
        assert os.path.exists(os.path.join(ROOT, folder, "README.md")), f"{folder}/ says what it holds"
