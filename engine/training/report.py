"""A run report: one self-contained HTML page plus PNG plots, from a run's metrics.jsonl.

    python -m engine.report RUN_DIR [RUN_DIR ...] [--out DIR]

Plots: loss with validation loss, learning rate, grad norm, tokens/s, MFU, peak memory (each when
logged), and per run a heatmap of expert load per layer over steps (the busiest expert's tokens over
the mean, and its token count). Steps whose update was skipped (non-finite loss or gradient) are
marked with red dashed lines. Several runs are drawn on the same axes for comparison. Works on a run
still in progress (a half-written last line is ignored). Generations logged by
`trainer.sample_every` (samples.jsonl) are listed at the end.

Written to DIR (default RUN_DIR/report for one run): index.html, whose images are embedded, so the
page can be mailed as one file, and the same images as PNG files beside it.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

PANELS = [  # (file stem, title, y label, metric keys, log scale)
    ("loss", "Loss", "nats / token", ("loss", "val_loss"), False),
    ("lr", "Learning rate", "lr", ("lr",), False),
    ("grad_norm", "Gradient norm (before clipping)", "norm", ("grad_norm",), True),
    ("tokens_per_s", "Throughput", "tokens / s", ("tokens_per_s",), False),
    ("mfu", "Model FLOPs utilisation", "MFU", ("mfu",), False),
    ("peak_memory_gb", "Peak memory", "GiB", ("peak_memory_gb",), False),
]
HEATMAPS = [("expert_max_over_mean", "busiest expert / mean"), ("expert_max_tokens", "busiest expert's tokens")]


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    samples: list[dict] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pts], [float(v) for _, v in pts]

    def skipped_steps(self) -> list[int]:
        """Steps whose update was dropped: where the running count of skipped steps went up."""
        out, before = [], 0
        for r in self.records:
            n = r.get("skipped_steps", before)
            if n > before:
                out.append(r["step"])
            before = n
        return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the writer may be in the middle of this line
                break
            raise ValueError(f"{path}:{n}: not valid JSON") from None
    return out


def load_run(path: str | Path) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: not found; give the run's output folder (trainer.output_dir)")
    records = [r for r in _read_jsonl(metrics) if "step" in r]
    if not records:
        raise ValueError(f"{metrics}: no logged steps yet")
    return Run(path.resolve().name, path, records, _read_jsonl(path / "samples.jsonl"))


def plot_panel(runs: list[Run], keys: tuple[str, ...], title: str, ylabel: str, log: bool):
    """One figure with every run's series for `keys`, skipped steps marked; None when nothing is logged."""
    import matplotlib.pyplot as plt

    if not any(run.series(k)[0] for run in runs for k in keys):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for i, run in enumerate(runs):
        color = f"C{i}"
        for k, key in enumerate(keys):
            steps, values = run.series(key)
            if steps:
                label = key if len(runs) == 1 else f"{run.name} {key}"
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linestyle="-" if k == 0 else "--",
                    marker="o" if key.startswith("val") or len(steps) < 3 else None,
                    markersize=3,
                    label=label,
                )
        for j, step in enumerate(run.skipped_steps()):
            ax.axvline(step, color="red", linestyle=":", linewidth=1, label="skipped step" if i == j == 0 else None)
    if log and all(v > 0 for run in runs for key in keys for v in run.series(key)[1]):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_expert_heatmap(run: Run, key: str, label: str):
    """Layers (rows) x logged steps (columns) of a per-layer expert-load metric; None when not logged."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(r["step"], r[key]) for r in run.records if isinstance(r.get(key), list) and r[key]]
    if not rows:
        return None
    steps = [s for s, _ in rows]
    grid = np.array([v for _, v in rows], dtype=float).T  # [layers, steps]
    fig, ax = plt.subplots(figsize=(7, 0.4 * grid.shape[0] + 1.8), dpi=100)
    image = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, grid.shape[0] - 0.5, -0.5),
    )
    fig.colorbar(image, ax=ax, label=label)
    ax.set_yticks(range(grid.shape[0]))
    ax.set(title=f"Expert load per layer: {run.name}", xlabel="step", ylabel="layer")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png")
    plt.close(fig)


def _summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        last = run.records[-1]
        val = run.series("val_loss")[1]
        tps = run.series("tokens_per_s")[1]
        rows.append(
            [
                run.name,
                str(last["step"]),
                f"{last['loss']:.4f}" if "loss" in last else "-",
                f"{min(val):.4f}" if val else "-",
                f"{sum(tps) / len(tps):.0f}" if tps else "-",
                str(len(run.skipped_steps())),
            ]
        )
    return rows


def render_html(runs: list[Run], images: list[tuple[str, str, Path]], missing: list[str]) -> str:
    """The page: summary table, every image embedded (base64), skipped steps, samples."""
    esc = html.escape
    head = ["run", "steps", "last loss", "best val loss", "mean tokens/s", "skipped steps"]
    table = "".join(f"<th>{esc(h)}</th>" for h in head)
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _summary_rows(runs))
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Run report: '
        f"{esc(', '.join(r.name for r in runs))}</title><style>body{{font-family:sans-serif;max-width:900px;"
        "margin:2em auto}}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}</style></head><body>",
        f"<h1>Run report</h1><p>{esc(', '.join(str(r.path) for r in runs))}</p><table>{table}</table>",
    ]
    for title, alt, png in images:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<h2>{esc(title)}</h2><img alt="{esc(alt)}" src="data:image/png;base64,{data}">')
    if missing:
        parts.append(f"<p>Not logged by these runs: {esc(', '.join(missing))}.</p>")
    for run in runs:
        skipped = run.skipped_steps()
        if skipped:
            parts.append(f"<p>{esc(run.name)}: updates skipped at steps {esc(', '.join(map(str, skipped)))}.</p>")
        if run.samples:
            parts.append(f"<h2>Samples: {esc(run.name)}</h2>")
            for s in run.samples[-20:]:
                parts.append(
                    f"<p>step {esc(str(s.get('step')))}: <b>{esc(str(s.get('prompt')))}</b></p>"
                    f"<pre>{esc(str(s.get('text')))}</pre>"
                )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        if len(runs) > 1:
            raise ValueError("several runs: say where the comparison goes with --out DIR")
        out = runs[0].path / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, missing = [], []
    for stem, title, ylabel, keys, log in PANELS:
        fig = plot_panel(runs, keys, title, ylabel, log)
        if fig is None:
            missing.append(title)
            continue
        _save(fig, out / f"{stem}.png")
        images.append((title, stem, out / f"{stem}.png"))
    for i, run in enumerate(runs):
        for key, label in HEATMAPS:
            fig = plot_expert_heatmap(run, key, label)
            if fig is None:
                continue
            stem = f"{key}{'' if len(runs) == 1 else f'_{i}'}"
            _save(fig, out / f"{stem}.png")
            images.append((f"Expert load ({label}): {run.name}", stem, out / f"{stem}.png"))
    (out / "index.html").write_text(render_html(runs, images, missing))
    return out
