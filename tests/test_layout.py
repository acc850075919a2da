"""The layout's promises: the five core files import the machinery (plumbing/, tasks/), never the reverse,
and no module of the project imports itself back through others, imports inside functions included.

    python -m pytest tests/test_layout.py -q
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ("model", "data", "lora", "train", "eval")


def project_modules():
    """{module name: path} of every project module outside tests/ (plumbing.x, tasks.x, and the core)."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("plumbing", "tasks"):
        for p in (ROOT / pkg).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def imports_of(path, mods):
    """Project modules that path imports anywhere in the file (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in mods}
    return found


def test_machinery_never_imports_the_core():
    mods = project_modules()
    for name, path in mods.items():
        if name.startswith(("plumbing", "tasks")):
            assert not imports_of(path, mods) & set(CORE), f"{name} imports a core file"


def test_no_import_cycles():
    mods = project_modules()
    graph = {name: imports_of(path, mods) - {name} for name, path in mods.items()}
    done, stack = set(), []

    def visit(n):
        assert n not in stack, "import cycle: " + " -> ".join(stack[stack.index(n):] + [n])
        if n in done:
            return
        stack.append(n)
        for m in sorted(graph[n]):
            visit(m)
        stack.pop()
        done.add(n)

    for n in sorted(graph):
        visit(n)
    assert {"data", "plumbing.cli"} <= graph["model"]  # the graph is real: model.py imports these


def test_gguf_is_optional_imported_only_inside_functions():
    """handtune runs without the gguf package: no module imports it at load time (plumbing/gguf_io.py says so)."""
    for name, path in project_modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # top-level statements only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert "gguf" not in names, f"{name} imports gguf at load time"


def test_core_files_stay_within_the_learning_path_budget():
    """The five core files read like nanochat's SFT path: at most 2,300 lines and 115,000 non-blank (not
    whitespace) characters together, and no file over 600 lines. Machinery goes to plumbing/ or tasks/."""
    texts = {name: (ROOT / f"{name}.py").read_text(encoding="utf-8") for name in CORE}
    lines = {name: len(t.splitlines()) for name, t in texts.items()}
    assert max(lines.values()) <= 600, lines
    assert sum(lines.values()) <= 2300, lines
    assert sum(len("".join(t.split())) for t in texts.values()) <= 115_000


def test_every_script_has_help():
    import subprocess
    import sys

    scripts = [f"{name}.py" for name in ("model", "data", "train", "eval")]
    scripts += sorted(str(p.relative_to(ROOT)) for d in ("lab", "scripts") for p in (ROOT / d).glob("*.py")
                      if "__main__" in p.read_text(encoding="utf-8"))  # lab/common.py is a module, not a script
    assert "lab/ladder_report.py" in scripts and "scripts/gpu_check.py" in scripts and "lab/masking.py" in scripts
    for name in scripts:
        r = subprocess.run([sys.executable, name, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("usage:") and not r.stderr, name


def test_requirements_torch_floor_has_torch_amp_grad_scaler():
    """torch.amp.GradScaler(device), which train.py uses for fp16, exists from torch 2.3: the floor says so."""
    import re

    line = next(ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.startswith("torch"))
    floor = tuple(int(v) for v in re.match(r"torch>=(\d+)\.(\d+)", line).groups())
    assert floor >= (2, 3), line


def test_lab_scripts_are_short_and_built_on_the_core_not_copies_of_it():
    """Each experiment is one short script on lab/common.py, which trains and scores with train.py's and
    eval.py's own functions; no core file imports the lab."""
    experiments = [p for p in (ROOT / "lab").glob("*.py") if p.stem not in ("common", "ladder_report")]
    assert len(experiments) >= 8
    for p in experiments:
        text = p.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 150, p.name
        assert "from common import" in text and "def train_step" not in text and "def forward" not in text, p.name
    common = (ROOT / "lab" / "common.py").read_text(encoding="utf-8")
    assert "import train" in common and "from eval import" in common
    for name in CORE:
        assert "lab" not in imports_of(ROOT / f"{name}.py", {"lab": None, "common": None}), name
