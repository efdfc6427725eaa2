"""metrics.jsonl is strict JSON, and a resumed run does not log replayed steps twice."""

import json

import pytest

from engine.training.metrics import MetricsWriter


def _strict_load(line):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_written_as_null(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    w.write(
        {
            "step": 1,
            "loss": float("nan"),
            "grad_norm": float("inf"),
            "lr": 1e-3,
            "expert_max_over_mean": [1.5, float("-inf")],
        }
    )
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    record = _strict_load(line)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "expert_max_over_mean": [1.5, None]}


@pytest.mark.parametrize("start_step,kept", [(0, []), (2, [1, 2]), (3, [1, 2, 3]), (9, [1, 2, 3, 4])])
def test_resume_keeps_only_the_steps_up_to_the_checkpoint(tmp_path, start_step, kept):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # a torn last line of a killed run
    MetricsWriter(tmp_path, enabled=True, start_step=start_step)
    assert [_strict_load(x)["step"] for x in path.read_text().splitlines()] == kept


def test_old_nan_records_are_made_strict_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 2.0}\n')
    MetricsWriter(tmp_path, enabled=True, start_step=2)
    assert [_strict_load(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": None},
        {"step": 2, "loss": 2.0},
    ]


def test_other_ranks_leave_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    MetricsWriter(tmp_path, enabled=False, start_step=1)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
