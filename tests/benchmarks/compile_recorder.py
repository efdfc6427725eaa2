"""Count the Triton kernels a piece of code would compile, with no GPU: every `*_kernel` of the
gptoss_kernels package is swapped for the sm_90 compile test's Recorder (tests/kernels/sm90_aot.py),
so a launch is recorded instead of run, and the distinct compile keys are counted the way Triton's
JIT keys its cache (kernel, argument types and specialization, constexprs, num_warps/num_stages).

With autotuning on, the autotuner launches every candidate of a bucket once (what it compiles on a
GPU before timing them); the recorder does the same. Needs real @triton.jit objects: run without
TRITON_INTERPRET (or with TRITON_INTERPRET=0).

Also a pytest plugin (`-p tests.benchmarks.compile_recorder`, with GPTOSS_RECORD_COMPILES=FILE):
the GPU tests it collects run on CPU tensors with their GPU skip lifted and their value assertions
made no-ops (the recorded kernels compute nothing), and FILE receives the compile count, with the
tests that still stopped early (their later launches are missing: the count is a lower bound).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install() -> list:
    """Swap every gptoss_kernels `*_kernel` for a Recorder; the list the launches go to."""
    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    from sm90_aot import Recorder
    from triton.runtime.jit import JITFunction

    import gptoss_kernels
    from gptoss_kernels import _runtime, gemm_configs

    launches: list = []
    for info in pkgutil.iter_modules(gptoss_kernels.__path__):
        module = importlib.import_module(f"gptoss_kernels.{info.name}")
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                setattr(module, name, Recorder(obj, launches))
    _runtime.check_tensors = lambda *tensors: None  # meta and CPU tensors are fine for recording
    choose = gemm_configs.choose

    def every_candidate_when_tuning(key, cands, device, launch):
        if gemm_configs._state["autotune"] and len(cands) > 1:
            for config in cands:
                launch(config)
        return choose(key, cands, device, launch)

    gemm_configs.choose = every_candidate_when_tuning
    return launches


def compile_keys(launches) -> set:
    from sm90_aot import to_source

    keys = set()
    for kernel, args, kwargs in launches:
        src, options = to_source(kernel, args, kwargs)
        keys.add((kernel.fn.__name__, str(src.signature), str(sorted(src.constants.items())), str(options)))
    return keys


def per_kernel(keys) -> dict:
    counts: dict = {}
    for key in keys:
        counts[key[0]] = counts.get(key[0], 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------ pytest plugin
_STATE: dict = {"launches": None, "stopped": []}


def pytest_configure(config):
    if os.environ.get("GPTOSS_RECORD_COMPILES"):
        import torch

        _STATE["launches"] = install()
        torch.testing.assert_close = lambda *args, **kwargs: None  # recorded kernels leave outputs unwritten


def pytest_collection_modifyitems(config, items):
    if _STATE["launches"] is None:
        return
    for item in items:  # the GPU tests run here on CPU tensors: their launches are what is counted
        item.own_markers = [m for m in item.own_markers if m.name != "skipif"]


def pytest_runtest_logreport(report):
    if _STATE["launches"] is not None and report.failed:
        _STATE["stopped"].append(report.nodeid)


def pytest_sessionfinish(session):
    if _STATE["launches"] is None:
        return
    keys = compile_keys(_STATE["launches"])
    Path(os.environ["GPTOSS_RECORD_COMPILES"]).write_text(json.dumps(
        {"compiles": len(keys), "launches": len(_STATE["launches"]), "kernels": per_kernel(keys),
         "tests": session.testscollected, "stopped_early": _STATE["stopped"]}))
