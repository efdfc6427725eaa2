"""An optional dependency that is installed but fails to import is reported with its own error, in one
line; only a package that is absent is called "not installed"."""

import sys
import warnings

from engine.errors import import_failure
from engine.peft import peft_export

BROKEN = "cannot import name 'CUDAProperties' from 'kernels'"


def test_absent_and_broken_are_told_apart():
    assert import_failure("peft", ModuleNotFoundError("No module named 'peft'", name="peft")) == \
        "peft is not installed"
    # Installed, but one of its own imports is missing or mismatched: not "not installed".
    missing_dependency = import_failure("peft", ModuleNotFoundError("No module named 'accelerate'", name="accelerate"))
    assert "installed but cannot be imported" in missing_dependency and "'accelerate'" in missing_dependency
    broken = import_failure("peft", ImportError(f"{BROKEN}\n(more lines)"))
    assert broken == f"peft is installed but cannot be imported (ImportError: {BROKEN})"


def _expert_layout_warnings() -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft_export._check_installed_peft.__wrapped__(("gate_up_proj", "down_proj"))
    return [str(w.message) for w in seen]


def test_an_installed_peft_that_fails_to_import_is_named_with_its_error(tmp_path, monkeypatch):
    fake = tmp_path / "peft"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise ImportError({BROKEN!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, name)
    messages = _expert_layout_warnings()
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert f"peft is installed but cannot be imported (ImportError: {BROKEN})" in messages[0]
    assert "not installed" not in messages[0]


def test_an_absent_peft_is_called_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what the import system does for a package that is absent
    messages = _expert_layout_warnings()
    assert len(messages) == 1 and messages[0].startswith("peft is not installed"), messages
