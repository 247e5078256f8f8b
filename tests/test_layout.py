"""The layout a reader relies on: files finished in one sitting, short functions, project imports at the top of
each file and flowing downhill (no cycles), short lines, and a README reading guide that is true to the files."""
import ast
import re

from conftest import ROOT

FILES = sorted(ROOT.glob("*.py"))
MODULES = {f.stem for f in FILES}


def lines(path):
    return path.read_text().splitlines()


def project_imports(tree):
    """(module, is at the top level) for every import of a project module."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in MODULES:
                    yield name.split(".")[0], id(node) in top


def test_files_functions_and_lines_are_short():
    assert len(FILES) >= 11
    for f in FILES:
        text = lines(f)
        assert len(text) <= 800, f"{f.name}: {len(text)} lines"
        long = [i for i, line in enumerate(text, 1) if len(line) > 110]
        assert len(long) < 0.02 * len(text), f"{f.name}: lines over 110 characters: {long}"
        for node in ast.walk(ast.parse("\n".join(text))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 100, f"{f.name}:{node.lineno} {node.name} has {n} lines"


def test_project_imports_are_at_the_top_and_have_no_cycle():
    graph = {}
    for f in FILES:
        imports = list(project_imports(ast.parse(f.read_text())))
        assert all(top for _, top in imports), f"{f.name}: a project import inside a function: {imports}"
        graph[f.stem] = {m for m, _ in imports}

    def visit(module, path):
        for dep in graph[module]:
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])
    for module in graph:
        visit(module, [module])
    # downhill: the library files never import the scripts above them
    for library in ("model", "diffusion", "checkpoint", "shapes", "encoders", "data"):
        assert not graph[library] & {"train", "sample", "scaling", "experiments", "bench", "fid"}, library


def test_readme_reading_guide_is_true_to_the_files():
    readme = (ROOT / "README.md").read_text()
    guide = readme[readme.index("## Reading guide"):readme.index("## The scripts")]
    rows = re.findall(r"^\| \d+ \| `(\w+\.py)` \| (\d+) \|", guide, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(f.name for f in FILES)  # every file, once
    for name, count in rows:
        actual = len(lines(ROOT / name))
        assert abs(int(count) - actual) <= 0.05 * actual, f"README says {name} has {count} lines, it has {actual}"
