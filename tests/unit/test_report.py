"""engine.report: series and skipped steps read exactly, PNGs that hold real plots, an HTML page whose
images are the PNGs, several runs compared, a run in progress; a real headless browser where one exists."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from engine.report import main
from engine.training.report import load_run, plot_panel, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, steps=12, skip_at=(5,), scale=1.0, partial_tail=False):
    folder.mkdir(parents=True)
    lines, skipped = [], 0
    for s in range(1, steps + 1):
        skipped += s in skip_at
        r = {
            "step": s,
            "loss": scale * (3.0 - 0.1 * s),
            "lr": 1e-3 * min(1, s / 4),
            "grad_norm": 1.0 / s,
            "tokens_per_s": 1000.0 + s,
            "skipped_steps": skipped,
            "target_tokens": 50,
            "expert_max_over_mean": [1.0 + 0.1 * s, 2.0 - 0.05 * s],
            "expert_max_tokens": [10 + s, 20 - s],
        }
        if s % 4 == 0:
            r["val_loss"] = scale * (3.1 - 0.1 * s)
        lines.append(json.dumps(r))
    text = "\n".join(lines) + "\n"
    if partial_tail:
        text += '{"step": 13, "loss": 1.'
    (folder / "metrics.jsonl").write_text(text)
    (folder / "samples.jsonl").write_text(json.dumps({"step": 4, "prompt": "2 + 2?", "text": "4 <b>"}) + "\n")
    return folder


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _pixels(png_bytes):
    import io

    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png_bytes), format="png")


def test_series_and_skipped_steps_are_read_exactly(tmp_path):
    run = load_run(_write_run(tmp_path / "a", skip_at=(5, 9), partial_tail=True))
    assert len(run.records) == 12  # the half-written 13th line of a live run is ignored
    steps, values = run.series("val_loss")
    assert steps == [4, 8, 12] and values == pytest.approx([2.7, 2.3, 1.9])
    assert run.skipped_steps() == [5, 9]


def test_report_writes_png_plots_and_a_self_contained_page(tmp_path, capsys):
    run_dir = _write_run(tmp_path / "run")
    assert main([str(run_dir)]) == 0
    out = run_dir / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "expert_max_over_mean.png",
        "expert_max_tokens.png",
        "grad_norm.png",
        "loss.png",
        "lr.png",
        "tokens_per_s.png",
    ]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        img = _pixels(data)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05, name  # not blank
    page = (out / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert parser.tags[0] == "html" and len(parser.srcs) == len(pngs)
    embedded = sorted(base64.b64decode(s.split(",", 1)[1]) for s in parser.srcs)
    assert embedded == sorted((out / n).read_bytes() for n in pngs)  # the page shows exactly the PNGs
    assert "Not logged by these runs: Model FLOPs utilisation, Peak memory." in page
    assert "updates skipped at steps 5." in page
    assert "<td>1.8000</td>" in page and "<td>1.9000</td>" in page  # last loss, best val loss
    assert "4 &lt;b&gt;" in page  # sample text escaped


def test_loss_plot_draws_every_run_and_marks_skipped_steps(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(_write_run(tmp_path / "a")), load_run(_write_run(tmp_path / "b", skip_at=(), scale=0.5))]
    fig = plot_panel(runs, ("loss", "val_loss"), "Loss", "nats", False)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["a loss", "a val_loss", "skipped step", "b loss", "b val_loss"]
    assert list(ax.lines[3].get_ydata()) == pytest.approx([0.5 * (3.0 - 0.1 * s) for s in range(1, 13)])
    assert list(ax.lines[2].get_xdata()) == [5, 5]


def test_several_runs_need_an_output_folder_and_compare(tmp_path, capsys):
    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", scale=0.5)
    assert main([str(a), str(b)]) == 2
    assert "--out" in capsys.readouterr().err
    out = write_report([a, b], tmp_path / "cmp")
    assert {p.name for p in out.glob("expert_*.png")} == {
        "expert_max_over_mean_0.png",
        "expert_max_over_mean_1.png",
        "expert_max_tokens_0.png",
        "expert_max_tokens_1.png",
    }
    assert main([str(tmp_path / "nothing")]) == 2


def _chromium():
    for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "headless_shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine; the page content is checked above")
def test_page_renders_in_headless_chromium(tmp_path):
    out = write_report([_write_run(tmp_path / "run")])
    shot = tmp_path / "shot.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run(
        base + ["--dump-dom", (out / "index.html").as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert len(re.findall(r"<img ", dom)) == 6
    subprocess.run(
        base + [f"--screenshot={shot}", "--window-size=1000,3000", (out / "index.html").as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    rgb = _pixels(shot.read_bytes())[..., :3]
    # the page's own text and table are grey; coloured pixels can only come from the rendered plots
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
    assert np.isfinite(rgb).all() and coloured.mean() > 0.01, coloured.mean()
