"""Packaging: one import namespace, and the torch-free parts import without torch."""
import os
import subprocess
import sys

from conftest import REPO

NO_TORCH = "import sys; sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_runtime_and_cli_import_without_torch(tmp_path):
    code = NO_TORCH + (
        "import edge_lolcats, edge_lolcats.runtime, edge_lolcats.cli, edge_lolcats.formats.tokenizer, edge_lolcats.formats.gguf_io\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "import edge_lolcats.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
    )
    r = run_python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "linearize" in r.stdout and "generate" in r.stdout
    # and torch really is blocked in that interpreter
    r = run_python(NO_TORCH + "import torch", tmp_path)
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_folders_install_under_one_namespace(tmp_path):
    code = ("import importlib.util, edge_lolcats.runtime as r, edge_lolcats.kernels as k, edge_lolcats.converters as c\n"
            "print(r.__file__); print(k.__file__); print(c.__file__)\n"
            "for bare in ('runtime', 'converters'):\n"
            "    assert importlib.util.find_spec(bare) is None, bare\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "assert spec is None or 'site-packages' in (spec.origin or ''), spec\n")
    r = run_python(code, tmp_path)  # outside the repo, so only installed names are importable
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert files == [os.path.join(REPO, p, "__init__.py") for p in ("runtime", "kernels", "converters")]


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "edge-lolcats")
    r = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bench" in r.stdout


def _modules() -> dict:
    """{module name: (file, is a package)} of the four folders installed as edge_lolcats.*."""
    roots = {"edge_lolcats": "edge_lolcats", "edge_lolcats.converters": "converters",
             "edge_lolcats.runtime": "runtime", "edge_lolcats.kernels": "kernels"}
    files = {}
    for pkg, folder in roots.items():
        for dirpath, _, names in os.walk(os.path.join(REPO, folder)):
            for f in names:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(REPO, folder))[:-3].split(os.sep)
                    parts = [p for p in rel if p != "__init__"]
                    files[".".join([pkg] + parts)] = (os.path.join(dirpath, f), rel[-1] == "__init__")
    return files


def _import_graph():
    """{module: modules of this project it imports (anywhere in the file, lazily too)}, read from
    the source."""
    import ast

    files = _modules()
    graph = {}
    for mod, (path, is_pkg) in files.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                target = (".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                          if node.level else node.module or "")
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def test_dependencies_point_one_way():
    """The runtime never imports PyTorch-side or training code; converters never import the
    training loop; no two modules import each other (lazy imports included)."""
    graph = _import_graph()
    torch_free = ("edge_lolcats.runtime", "edge_lolcats.arch", "edge_lolcats.formats.gguf_io",
                  "edge_lolcats.formats.tokenizer", "edge_lolcats.formats.fileio", "edge_lolcats.converters.gguf_names")
    allowed_in_runtime = torch_free + ("edge_lolcats.formats", "edge_lolcats.converters", "edge_lolcats")
    for mod, deps in graph.items():
        if mod.startswith(torch_free):
            bad = [d for d in deps if not d.startswith(allowed_in_runtime) or d in ("edge_lolcats.formats.loading",
                                                                                  "edge_lolcats.formats.checkpoint")]
            assert not bad, f"{mod} (torch-free) imports {bad}"
        if mod.startswith("edge_lolcats.converters"):
            assert not [d for d in deps if d.startswith("edge_lolcats.training")], f"{mod} imports training code"
    mutual = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b)
    assert not mutual, f"modules importing each other: {mutual}"


def test_every_package_is_installed():
    """pyproject lists every package folder (a wheel would otherwise miss it)."""
    import tomllib

    listed = set(tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["tool"]["setuptools"]["packages"])
    packages = {m for m, (_, is_pkg) in _modules().items() if is_pkg}
    assert packages <= listed, f"packages missing from pyproject.toml: {sorted(packages - listed)}"
