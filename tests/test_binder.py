"""Binder builds from binder/ alone: its pins must cover the package and the notebooks."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"


def notebook_imports() -> set[str]:
    """Every module imported by a code cell of ``notebooks/*.ipynb`` (absolute imports)."""
    modules = set()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            # IPython magics and shell escapes are not Python
            lines = [
                line
                for line in cell.source.splitlines()
                if not line.lstrip().startswith(("%", "!"))
            ]
            for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module)
    return modules


def third_party(modules) -> set[str]:
    """The distributions (canonical names) that provide ``modules``, not counting the
    standard library and heterodyne itself."""
    providers = packages_distributions()
    out = set()
    for module in modules:
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "heterodyne":
            continue
        assert top in providers, f"notebooks import {top!r}, which no installed package provides"
        out.update(canonicalize_name(name) for name in providers[top])
    return out


def binder_pins() -> dict[str, Version]:
    pins = {}
    for line in (BINDER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # one exact pin per line
        assert spec.operator == "==", f"binder/requirements.txt: {line!r} is not a pin (==)"
        pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_binder_pins_cover_the_package_and_the_notebooks_within_pyproject_bounds():
    project, pins = pyproject(), binder_pins()
    main = [Requirement(text) for text in project["dependencies"]]
    needed = {canonicalize_name(r.name) for r in main} | third_party(notebook_imports())
    assert not needed - pins.keys(), (
        f"not pinned in binder/requirements.txt: {needed - pins.keys()}"
    )
    extras = [Requirement(t) for group in project["optional-dependencies"].values() for t in group]
    for requirement in main + extras:
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name]), (
                f"binder pins {name}=={pins[name]}, outside pyproject's {requirement}"
            )
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-"), runtime
    assert Requirement(f"python{project['requires-python']}").specifier.contains(
        runtime.removeprefix("python-") + ".0"
    ), f"binder/runtime.txt {runtime} is outside requires-python {project['requires-python']}"


def test_the_readme_binder_badge_opens_the_quickstart_of_this_repository():
    (url,) = re.findall(
        r"\(https://mybinder\.org/v2/gh/[^)\s]+\)", (ROOT / "README.md").read_text()
    )
    parts = urlsplit(url.strip("()"))
    owner_repo, ref = parts.path.removeprefix("/v2/gh/").rsplit("/", 1)
    repository = pyproject()["urls"]["Repository"]
    assert f"https://github.com/{owner_repo}" == repository and ref == "HEAD"
    (notebook,) = re.findall(r"labpath=([^&]+)", parts.query)
    assert unquote(notebook) == "notebooks/01_quickstart.ipynb"
    assert (ROOT / unquote(notebook)).is_file()


def source_tree(destination: Path) -> Path:
    """A copy of the files git tracks or would track (what Binder clones), without the
    local virtualenv and build outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


IMPORT_ALL = """
import importlib, importlib.metadata, json, sys
import heterodyne
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = repr(err)
print(json.dumps({"version": heterodyne.__version__, "file": heterodyne.__file__,
                  "metadata": importlib.metadata.version("heterodyne"), "failed": failed}))
"""


@pytest.mark.slow
def test_binder_environment_installs_and_runs_every_notebook_import(tmp_path):
    repo = source_tree(tmp_path / "repo")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv))

    def run(args, step, cwd=repo):
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(
                f"{step} failed (exit {done.returncode}). It downloads packages: without "
                f"network access to PyPI this test cannot pass.\n{done.stdout[-3000:]}"
                f"{done.stderr[-3000:]}",
                pytrace=False,
            )
        return done.stdout

    # pip's cache is used on purpose: after the project's own install it holds every wheel.
    # --no-compile: byte-compiling ~1 GB of packages takes longer than the imports need.
    run(
        ["python", "-m", "pip", "install", "-q", "--no-compile", "-r", "binder/requirements.txt"],
        "pip install -r binder/requirements.txt",
    )
    run(["bash", "binder/postBuild"], "binder/postBuild")
    run(["python", "-m", "pip", "check"], "pip check (heterodyne's requirements met by the pins)")
    out = json.loads(
        run(
            ["python", "-c", IMPORT_ALL, json.dumps(sorted(notebook_imports()))],
            "importing the notebooks' modules",
            cwd=tmp_path,  # not the source tree: heterodyne must come from the install
        )
    )
    assert out["failed"] == {}
    version = pyproject()["version"]
    assert out["version"] == out["metadata"] == version
    # a real install into the Binder environment, not this checkout
    assert Path(out["file"]).is_relative_to(venv), out["file"]
