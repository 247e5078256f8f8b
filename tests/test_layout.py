"""The layout a reader relies on: files finished in one sitting, short functions, project imports at the top
of each file and flowing downhill (no cycles), short lines, the stages apart from the tools, and a README that
is a front page whose reading guide and training-step diagram are true to the files."""
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


STAGES = ("train", "sample", "data", "fid", "model", "diffusion")  # what a run needs
TOOLS = {"bench", "experiments", "memory", "scaling"}  # what measures runs: never loaded by a run


def readme():
    return (ROOT / "README.md").read_text()


def section(text, heading):
    """The text of a '## heading' section, up to the next '## ' heading."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_readme_reading_guide_is_true_to_the_files():
    guide = section(readme(), "Reading guide")
    rows = re.findall(r"^\| \d+ \| `(\w+\.py)` \| (\d+) \|", guide, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(f.name for f in FILES)  # every file, once
    for name, count in rows:
        actual = len(lines(ROOT / name))
        assert abs(int(count) - actual) <= 0.05 * actual, f"README: {name} has {count} lines; it has {actual}"


def test_readme_is_a_front_page():
    text = readme()
    n_lines, n_words = len(text.splitlines()), len(text.split())
    assert n_lines <= 300 and n_words <= 2500, f"README: {n_lines} lines, {n_words} words (<= 300, 2,500)"
    first = "\n".join(text.splitlines()[:40])
    for command in ("pip install -r requirements.txt", "python train.py"):
        assert command in first, f"README: `{command}` is not in its first 40 lines"
    assert re.search(r"python -m pytest -q(?! -m)", text), "README: no fast tier, `python -m pytest -q`"
    assert 'python -m pytest -q -m ""' in text, 'README: no full tier, `python -m pytest -q -m ""`'
    for doc in re.findall(r"\]\((docs/[\w.]+\.md)", text):  # every docs page it points to exists
        assert (ROOT / doc).is_file(), f"README points to {doc}, which does not exist"


def test_the_project_cites_sources_not_its_notes():
    word = re.compile(r"\b" + "SP" + "EC" + r"\b")  # (spelt apart, so this file does not match itself)
    paths = [*ROOT.glob("*.py"), *ROOT.glob("configs/*.py"), *ROOT.glob("tests/*.py"), ROOT / "README.md",
             *ROOT.glob("docs/*.md")]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in paths
             for i, line in enumerate(lines(p), 1) if word.search(line)]
    assert not found, f"cite the paper, section, table or official file instead of the notes: {found}"


def test_the_stages_do_not_import_the_tools():
    graph = {f.stem: {m for m, _ in project_imports(ast.parse(f.read_text()))} for f in FILES}

    def reach(module, seen):
        for dep in graph[module] - seen:
            seen.add(dep)
            reach(dep, seen)
        return seen
    for stage in STAGES:  # directly or through another file: a stage never loads a tool's machinery
        tools = reach(stage, set()) & TOOLS
        assert not tools, f"{stage}.py imports {sorted(tools)}"


def test_training_step_diagram_points_at_its_code():
    """Each line `file.py:LINE  code  what it does` of the diagram names code found at that line."""
    guide = section(readme(), "Reading guide")
    diagram = guide[guide.index("**One training step**"):].split("```")[1]  # the first code block after it
    refs = re.findall(r"^(\w+\.py):(\d+) {2,}(\S.*?)(?: {2,}|$)", diagram, flags=re.M)
    assert len(refs) >= 10 and {f for f, _, _ in refs} >= {"train.py", "model.py", "diffusion.py"}, refs
    assert refs[-1][2] == "opt.step()", "the diagram ends at the optimizer step"
    for name, number, code in refs:
        source = lines(ROOT / name)
        line = source[int(number) - 1] if 0 < int(number) <= len(source) else ""
        now = [i for i, text in enumerate(source, 1) if code in text]  # where it is, to fix the number
        assert code in line, f"README's diagram: {name}:{number} should hold `{code}`; it is at {now}"
