"""The code's shape: the project's modules import each other without a cycle, so each can be read
(and tested) after the ones it uses."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_imports() -> dict[str, set[str]]:
    """module -> the project's modules it imports anywhere in its text (lazy imports inside functions too)."""
    files = {os.path.splitext(os.path.relpath(f, ROOT))[0].replace(os.sep, "."): f
             for f in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tasks", "*.py"))}
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
    assert {"model", "grpo", "search", "tasks", "tasks.semantle"} <= set(graph), sorted(graph)
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
