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
        "import edge_lolcats, edge_lolcats.runtime, edge_lolcats.cli, edge_lolcats.tokenizer, edge_lolcats.gguf_io\n"
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
