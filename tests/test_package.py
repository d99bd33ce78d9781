"""What `pip install .` installs: the wheel, installed into a fresh virtual environment, imports
module by module, away from the checkout; no module imports the top-level programs or datasets/;
the package has no import cycles."""
import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = {"datasets", "train", "main", "scripts", "tests"}  # the checkout's top level


def wheel_modules(wheel):
    """Module names of the .py files in the wheel, and their sources."""
    with zipfile.ZipFile(wheel) as archive:
        return {name[:-3].replace("/", ".").removesuffix(".__init__"): archive.read(name).decode()
                for name in archive.namelist() if name.endswith(".py")}


def imports(module, source):
    """The modules (and names in them) that `source` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: relative import"  # the package imports absolutely
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from a copy of what the package is made of (a build in the checkout would
    leave build/ there, and a stale build/lib goes into the next wheel)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT / "so", source / "so", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, capture_output=True, timeout=300, cwd=out)
    (path,) = out.glob("so_clip-*.whl")
    return path


@pytest.mark.slow  # builds a wheel and a virtual environment
def test_the_wheel_imports_module_by_module_in_a_fresh_venv(wheel, tmp_path):
    modules = wheel_modules(wheel)
    assert {"so", "so.optim", "so.rule", "so.batched", "so.files", "so.clip.model", "so.clip.methods", "so.clip.optimizers"} <= modules.keys()
    with zipfile.ZipFile(wheel) as archive:
        assert "so/clip/model_configs/so-tiny.json" in archive.namelist()
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("/METADATA"))).decode()
    requires = [line.split(":", 1)[1].split(";")[0].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert {r.split(">")[0] for r in requires if "extra" not in r} >= {"torch", "numpy"}  # torch warns without numpy
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # torch, open_clip and peft from this environment: a .pth file adds its site-packages after the
    # venv's own, so the installed `so` is the one that imports
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import importlib, sys\n"
        f"modules = {sorted(modules)!r}\n"
        "for name in modules:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({site!r}), (name, module.__file__)\n"
        f"leaked = sorted(set({sorted(OUTSIDE)!r}) & set(sys.modules))\n"
        "assert not leaked, leaked\n"
        "import open_clip\n"
        "assert 'so-tiny' in open_clip.list_models()\n"
        "print(len(modules))\n")
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=clean_env)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == len(modules)


@pytest.mark.slow  # builds a wheel
def test_the_package_imports_nothing_of_the_checkout_and_has_no_cycles(wheel):
    modules = wheel_modules(wheel)
    graph = {}
    for name, source in modules.items():
        found = imports(name, source)
        assert not {f.split(".")[0] for f in found} & OUTSIDE, (name, found)
        graph[name] = {f for f in found if f in modules and f != name}
    for name in ("so", "so.optim", "so.rule", "so.batched", "so.draws", "so.flat_index", "so.sparse_grad"):  # torch
        assert all(f.split(".")[0] in {"torch", "so", "math", "warnings", "itertools", "typing"}
                   for f in imports(name, modules[name]) if f), name
    state = {}

    def visit(node, path):
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        if state.get(node) != "done":
            state[node] = "open"
            for nxt in graph[node]:
                visit(nxt, path + [node])
            state[node] = "done"

    for name in graph:
        visit(name, [])
