"""The installed project beside the packages it lives with: no top-level import name shared with another
distribution (Hugging Face's `kernels`, a transformers dependency, beside our `gptoss_kernels`), from
the repository root or anywhere; every module imports with autograd disabled and without touching the
environment, the warnings filters or sys.path; the Triton experts' first call may come inside no_grad."""

import importlib.metadata
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parents[2]
DIST = "gptoss-engine"


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def _setup_packages() -> list[str]:
    """The `packages` setup.py hands to setuptools, read by running it with setup() captured."""
    seen = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = real
    return seen["packages"]


def _our_top_level_names() -> set[str]:
    """What the project installs (its distribution's metadata and setup.py) and what the repository
    root makes importable from there (folders with an __init__.py)."""
    installed = (importlib.metadata.distribution(DIST).read_text("top_level.txt") or "").split()
    from_setup = {p.split(".")[0] for p in _setup_packages()}
    at_root = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert {"engine", "gptoss_kernels"} <= set(installed) == from_setup <= at_root
    return from_setup | at_root


def test_no_top_level_import_name_belongs_to_another_distribution():
    owners = importlib.metadata.packages_distributions()
    shared = {name: sorted(set(owners[name]) - {DIST}) for name in _our_top_level_names()
              if set(owners.get(name, ())) - {DIST}}
    assert not shared, f"these import names are also installed by other distributions: {shared}"


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_hugging_face_kernels_and_ours_import_side_by_side(where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    proc = _python("""
        import json
        from kernels import use_kernel_forward_from_hub
        import kernels
        import gptoss_kernels, gptoss_kernels.reference
        print(json.dumps({"theirs": kernels.__file__, "ours": gptoss_kernels.__file__,
                          "hub": callable(use_kernel_forward_from_hub)}))
    """, cwd)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["hub"]
    theirs = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert Path(found["theirs"]).resolve() == Path(theirs).resolve(), found  # Hugging Face's own file
    assert Path(found["ours"]).resolve() == REPO / "gptoss_kernels" / "__init__.py"
    assert importlib.metadata.packages_distributions()["kernels"] == ["kernels"]


IMPORT_EVERY_MODULE = """
    import importlib, os, pkgutil, sys, warnings
    import sympy, torch  # sympy installs its own warnings filter when first imported: not ours
    torch.set_grad_enabled(False)
    env, filters, path = dict(os.environ), list(warnings.filters), list(sys.path)
    names = []
    for package in ("engine", "gptoss_kernels"):
        names += [package] + [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__,
                                                                      package + ".")]
    for name in names:
        importlib.import_module(name)
    assert not torch.is_grad_enabled()
    assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
    assert list(warnings.filters) == filters, [f for f in warnings.filters if f not in filters]
    assert sys.path == path, (path, sys.path)
    print(len(names), "modules")
"""


def test_every_module_imports_with_autograd_off_and_changes_no_process_state(tmp_path):
    proc = _python(IMPORT_EVERY_MODULE, tmp_path, TRITON_INTERPRET="1")
    count = int(proc.stdout.split()[-2])
    assert count > 80, proc.stdout  # the walk found the packages' modules, not just their __init__


def test_triton_experts_first_called_inside_no_grad(tmp_path):
    # A fresh process: the kernels' first use (and the clamp-gradient probe it runs) happens under no_grad.
    _python("""
        import torch
        from engine.moe.backends import experts_backend
        from gptoss_kernels.reference import expert_mlp_reference
        g = torch.Generator().manual_seed(0)
        e, h, i, counts = 2, 16, 16, torch.tensor([3, 2])
        x = torch.randn(5, h, generator=g)
        w_gu, b_gu = torch.randn(e, h, 2 * i, generator=g) / 4, torch.randn(e, 2 * i, generator=g)
        w_d, b_d = torch.randn(e, i, h, generator=g) / 4, torch.randn(e, h, generator=g)
        with torch.no_grad():
            y = experts_backend("triton").mlp(x, counts, w_gu, b_gu, w_d, b_d, alpha=1.702, limit=7.0)
        ref = expert_mlp_reference(x, counts, w_gu, b_gu, w_d, b_d, alpha=1.702, limit=7.0)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    """, tmp_path, TRITON_INTERPRET="1")


@pytest.mark.slow
def test_lora_export_tests_pass_when_run_alone():
    # They once passed only after another test had imported the kernels outside no_grad.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/peft/test_lora_export.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
