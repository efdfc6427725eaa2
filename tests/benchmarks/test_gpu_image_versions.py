"""The GPU machine's image runs other versions than CI (triton 3.6, transformers 5.17 with huggingface_hub
1.x, Hugging Face's `kernels` beside them): the tests that depend on those versions run here again
under them. The image's versions go into a small extra environment layered on this one (a venv
whose .pth file puts this environment's site-packages after its own), installed without
dependencies, after checking that every requirement of theirs is met by what the layers hold. Then,
in subprocesses of that interpreter, both at once: the sm_90 compile tests (every candidate config,
the LoRA path included) and the per-step compile counts with triton 3.6 put first on the path, and
the transformers-parity tests under transformers 5.17 with this environment's triton. The latter
run our kernels in Triton's interpreter on CPU, which the GPU never uses, and triton 3.6's
interpreter cannot run with numpy >= 2.4 (it converts one-element arrays with int()). Needs the
package index (about 200 MB, mostly triton's wheel; pip's cache serves later runs).
"""

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The GPU image's versions (torch 2.11, triton 3.6, transformers 5.17, huggingface_hub
# 1.33), and what transformers 5.17's huggingface_hub 1.x needs that this environment's 2.x does not.
IMAGE = [
    "transformers==5.17.0",
    "kernels==0.19.1",
    "huggingface_hub==1.33.0",
    "httpx==0.28.1",
    "httpcore==1.0.9",
    "certifi==2026.10.19.post1",
]
IMAGE_TRITON = "triton==3.6.0"
COMPILE_TESTS = [
    "tests/kernels/test_sm90_compile.py",
    "tests/kernels/test_sm90_compile_attention.py",
    "tests/benchmarks/test_suite_compile_budget.py",
]
PARITY_TESTS = ["tests/unit/test_model_parity.py", "tests/unit/test_loading.py", "tests/unit/peft"]

REQUIREMENTS_MET = """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
own = sys.argv[1]
bad, dists = [], [d for d in md.distributions() if str(d.locate_file("")).startswith(own)]
for d in dists:
    for text in d.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            bad.append(f"{d.metadata['Name']} needs {text}, the layers hold {have}")
print("\\n".join(bad) or "ok", len(dists))
"""


@pytest.fixture(scope="module")
def image_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp("image_env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(own) / "zz_layered_on_main.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    triton_dir = venv.parent / "triton"  # first on PYTHONPATH for the compile tests only
    start = time.perf_counter()
    for target, pins in ((own, IMAGE), (str(triton_dir), [IMAGE_TRITON])):
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                target,
                *pins,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert pip.returncode == 0, pip.stderr[-3000:]
    print(
        f"\nimage environment: {time.perf_counter() - start:.0f} s to download and install "
        f"{' '.join(IMAGE + [IMAGE_TRITON])}"
    )
    env = _env(triton_dir)
    for where in (own, str(triton_dir)):
        met = subprocess.run(
            [str(python), "-c", REQUIREMENTS_MET, where], capture_output=True, text=True, timeout=120, env=env
        )
        assert met.stdout.startswith("ok"), met.stdout + met.stderr
    versions = subprocess.run(
        [
            str(python),
            "-c",
            "import triton, transformers, huggingface_hub, kernels; "
            "print(triton.__version__, transformers.__version__, huggingface_hub.__version__, "
            "kernels.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert versions.stdout.split()[:3] == ["3.6.0", "5.17.0", "1.33.0"], versions.stdout + versions.stderr
    assert versions.stdout.split()[3].startswith(own)
    return python, triton_dir


def _env(triton_dir=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    if triton_dir is not None:
        env["PYTHONPATH"] = str(triton_dir)
    return env


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a cold Triton cache compiles every candidate again under 3.6: minutes
def test_compile_and_parity_tests_pass_under_the_image_versions(image_python):
    python, triton_dir = image_python
    runs = {}
    for name, tests, env in (("compile", COMPILE_TESTS, _env(triton_dir)), ("parity", PARITY_TESTS, _env())):
        cmd = [str(python), "-m", "pytest", *tests, "-q", "-rs", "-p", "no:cacheprovider"]
        runs[name] = (
            time.perf_counter(),
            subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        )
    for name, (start, proc) in runs.items():
        out = proc.communicate(timeout=1800)[0]
        print(f"{name} under the image versions: {time.perf_counter() - start:.0f} s; {out.strip().splitlines()[-1]}")
        assert proc.returncode == 0, out[-5000:]
        assert " skipped" not in out.splitlines()[-1], out[-3000:]  # skipped here would prove nothing
