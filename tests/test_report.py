"""The job report: ``jobs/report.py`` renders a real job's steps and results into a PNG and a
self-contained HTML page, which headless Chromium displays with its plots (skipped without Chromium)."""
import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import parse_config
from pipeline.driver import run_job
from pipeline import report
from pipeline.errors import UsageError
from pipeline.rows import build_result_table
from test_pipeline_support import REPO, PacedActor, job_argv, read_results, start_ray_cluster, subprocess_env

ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
JOB_ID = "report-job"


@pytest.fixture(scope="module")
def job_output(ray_cluster, tmp_path_factory):
    """A real job: the 64 built-in sample prompts in 16 shards on 2 actors, with a small KV cache."""
    output = tmp_path_factory.mktemp("report") / "out"
    argv = job_argv(None, output, "--job-id", JOB_ID, "--engine-arg", "num_kvcache_blocks=32", actors=2,
                    shard_size=4, max_tokens=8)
    assert run_job(parse_config(argv), actor_cls=PacedActor).status == "completed"
    return output


@pytest.fixture(scope="module")
def rendered(job_output):
    png, page = report.render_report(str(job_output))
    return dict(png=png, html=page, text=Path(page).read_text(encoding="utf-8"))


def test_report_files_are_written_into_the_job_output(job_output, rendered):
    assert (rendered["png"], rendered["html"]) == (str(job_output / "report.png"), str(job_output / "report.html"))
    with Image.open(rendered["png"]) as image:
        assert image.format == "PNG" and image.size == (1400, 1200)


def test_html_is_self_contained(rendered):
    text = rendered["text"]
    assert not re.search(r"https?://|<script|<link|<iframe|url\(", text, re.IGNORECASE)
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == Path(rendered["png"]).read_bytes()


def test_report_shows_the_jobs_numbers(rendered):
    text = rendered["text"]
    assert f"Job {JOB_ID}: completed, 64/64 rows" in text
    for label in ("TTFT p50 / p90 / p99", "latency p50 / p90 / p99", "prefix-cache hit rate", "peak KV-cache usage",
                  "actor-0", "actor-1"):
        assert label in text


def test_every_panel_is_drawn_from_the_jobs_steps_and_results(job_output):
    job = report.load_job(job_output)
    actors = set(read_results(job_output).column("actor_id").to_pylist())
    assert set(job.steps) == actors == {"actor-0", "actor-1"}
    assert sum(len(s["step"]) for s in job.steps.values()) == pq.read_table(job_output / "steps.parquet").num_rows
    axes = report.plot(job).axes
    for ax in axes[:4]:   # throughput, batch size, KV cache, prefix-cache hit rate: a line per actor
        labels = ax.get_legend_handles_labels()[1]
        assert {"actor-0", "actor-1"} <= set(labels), ax.get_title()
    assert max(ax.get_ylim()[1] for ax in axes[:3]) > 0
    for ax in axes[4:]:   # TTFT and latency histograms over the 64 rows
        assert sum(p.get_height() for p in ax.patches) == 64, ax.get_title()
    usage = dict(report.summary(job))["peak KV-cache usage"]
    assert float(usage.rstrip("%")) > 0


def test_cli_renders_and_refuses_a_directory_without_a_job(job_output, tmp_path):
    run = [sys.executable, str(REPO / "jobs" / "report.py")]
    ok = subprocess.run([*run, str(job_output)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "report.html" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, str(tmp_path)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a job output directory" in bad.stderr


def test_without_matplotlib_the_report_names_the_extra_to_install(job_output, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UsageError, match=r'the report needs matplotlib: pip install -e "\.\[report\]"'):
        report.render_report(str(job_output))
    from pipeline.cli import _render_report  # --report at the end of a job: a warning, the job still succeeds
    _render_report(str(job_output))
    assert 'warning: no report: the report needs matplotlib: pip install -e ".[report]"' in capsys.readouterr().err


def test_report_of_a_job_killed_before_its_end(tmp_path):
    """Only result parts, no stats.json and no steps.parquet; every row failed: panels say "no data"."""
    (tmp_path / "results").mkdir()
    part = build_result_table(2, {}, {0: "invalid prompt: empty", 1: "invalid prompt: empty"}, "actor-0", 0)
    pq.write_table(part, tmp_path / "results" / "part-00000.parquet")
    _, page = report.render_report(str(tmp_path))
    job = report.load_job(tmp_path)
    assert not job.steps and job.results.num_rows == 2
    assert all("no data" in [t.get_text() for t in ax.texts] for ax in report.plot(job).axes)
    assert f"Job {tmp_path.name}" in Path(page).read_text()


def test_batch_size_drops_to_zero_when_the_engine_drains_and_hit_rate_is_cumulative():
    steps = dict(phase=np.array(["prefill", "decode", "prefill", "decode"]), batch_size=np.array([2, 2, 1, 1]),
                 num_running=np.array([2, 0, 1, 0]), num_waiting=np.zeros(4, int),
                 num_tokens=np.array([30, 2, 5, 1]), num_prefill_tokens=np.array([30, 0, 5, 0]),
                 prefix_cache_hit_tokens=np.array([0, 0, 15, 0]),
                 step_time_s=np.full(4, 0.1))
    t = np.array([0.1, 0.2, 1.1, 1.2])   # step ends; the engine is idle from 0.2 to 1.0
    x, y = report._batch_size(steps, t)
    assert x.tolist() == pytest.approx([0.0, 0.1, 0.2, 1.0, 1.1, 1.2]) and y.tolist() == [2, 2, 0, 1, 1, 0]
    x, rate = report._prefix_hit_rate(steps, t)
    assert x.tolist() == [0.1, 1.1] and rate.tolist() == pytest.approx([0.0, 100 * 15 / 50])


def test_offline_batch_report_flag_renders_at_the_end_of_the_job(ray_cluster, tmp_path):
    output = tmp_path / "out"
    argv = job_argv(None, output, "--report", "--job-id", "flagged", "--address", ray_cluster.address, shard_size=64,
                    max_tokens=2)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "offline_batch.py"), *argv], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (output / "report.png").is_file() and "Job flagged: completed" in (output / "report.html").read_text()


# ----- in a browser ----------------------------------------------------------------------------------------------
def colour_pixels(image: np.ndarray, hex_colour: str, tolerance: int = 40) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image[:, :, :3].astype(int) - rgb).max(axis=2) <= tolerance).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_headless_chromium_renders_the_plots(rendered, tmp_path):
    """A screenshot of the page shows the plots: the actors' line colours and the histograms' colours."""
    shot = tmp_path / "report-screenshot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1400,2200", f"file://{rendered['html']}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2200, 1400)
    assert (pixels.min(axis=2) < 200).mean() > 0.03, "the page is (nearly) blank"
    for name, colour in (("actor-0", report.ACTOR_COLORS[0]), ("actor-1", report.ACTOR_COLORS[1]),
                         ("TTFT histogram", report.TTFT_COLOR), ("latency histogram", report.LATENCY_COLOR)):
        assert colour_pixels(pixels, colour) > 300, f"no {name} colour ({colour}) in the screenshot {shot}"
