"""A visual report of a job: ``python jobs/report.py <output>`` (or :func:`render_report`) writes ``<output>/report.png`` and
``<output>/report.html``.

The plots come from the job's ``steps.parquet`` (one record per engine step, tagged with its actor) and
its result parts: throughput over time per actor, running batch size, KV-cache usage, prefix-cache hit
rate, and the TTFT and latency distributions. The HTML page adds the job's numbers from ``stats.json``
and embeds the image as a data URI; it loads nothing else, so it can be mailed, attached to a ticket or
opened offline. ``offline_batch.py --report`` calls :func:`render_report` at the end of a job.

After a resume, the plots over time and the actor table show the latest run (the one ``stats.json``
describes), so that no idle gap between runs stretches the time axis; row totals and the distributions
cover every run, and are labelled so.
"""
import argparse
import base64
import html
import io
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, UsageError
from pipeline.output import OutputDir
from pipeline.rows import OUTPUT_SCHEMA

PNG_NAME, HTML_NAME = "report.png", "report.html"
# Actor i is drawn in ACTOR_COLORS[i % 10] (matplotlib's tab10); the two distributions have their own colours.
ACTOR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")
TTFT_COLOR, LATENCY_COLOR = "#17becf", "#9467bd"
THROUGHPUT_BINS = 50
PERCENTILES = (50, 90, 99)
RESULT_COLUMNS = ("num_prompt_tokens", "num_cached_tokens", "ttft_s", "latency_s")
MATPLOTLIB_MISSING = 'the report needs matplotlib: pip install -e ".[report]" (or: pip install matplotlib)'

Steps = dict[str, np.ndarray]   # one actor's step records: column name -> values, in time order


@dataclass
class JobData:
    """What the report reads from a job's output directory."""
    root: Path
    stats: dict[str, Any]       # stats.json; {} when the job wrote none (killed before its end)
    steps: dict[str, Steps]     # actor id -> its steps in the latest run (all steps without stats), by name
    results: pa.Table           # RESULT_COLUMNS of every written row, all runs
    t0: float                   # wall-clock start of the run's first step: time zero of the plots

    @property
    def resumed(self) -> bool:
        """Whether the latest run continued earlier ones (its numbers then differ from the job's totals)."""
        return bool(self.stats and self.stats["this_run"]["shards_skipped"])


def load_job(output_dir: str | os.PathLike) -> JobData:
    """Read a job's output; :class:`UsageError` when ``output_dir`` holds neither results nor steps."""
    out = OutputDir(output_dir)
    if not out.results.is_dir() and not out.steps_path.exists():
        raise UsageError(f"{out.root} is not a job output directory (it has no results/ and no steps.parquet)")
    stats = json.loads(out.stats_path.read_text()) if out.stats_path.exists() else {}
    parts = out.part_paths() if out.results.is_dir() else []
    schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in RESULT_COLUMNS])
    results = pa.concat_tables([pq.read_table(p, columns=list(RESULT_COLUMNS)) for p in parts] or
                               [schema.empty_table()])
    steps_table = pq.read_table(out.steps_path) if out.steps_path.exists() else pa.table({})
    if steps_table.num_rows and stats:  # the latest run's steps: they end after it started
        steps_table = steps_table.filter(pc.greater_equal(steps_table["timestamp"], stats["this_run"]["started_at"]))
    steps: dict[str, Steps] = {}
    t0 = 0.0
    if steps_table.num_rows:
        t0 = pc.min(pc.subtract(steps_table["timestamp"], steps_table["step_time_s"])).as_py()
        for actor in sorted(set(steps_table["actor_id"].to_pylist())):
            rows = steps_table.filter(pc.equal(steps_table["actor_id"], actor)).sort_by("timestamp")
            steps[actor] = {name: rows[name].to_numpy() for name in rows.column_names if name != "actor_id"}
    return JobData(out.root, stats, steps, results, t0)


# ----- plots -------------------------------------------------------------------------------------------------
def plot(job: JobData):
    """The report's figure (a ``matplotlib.figure.Figure``): six panels over the job's steps and results."""
    try:
        from matplotlib.figure import Figure  # not pyplot: no global state or GUI backend in the caller's process
    except ImportError as e:
        raise UsageError(MATPLOTLIB_MISSING) from e
    fig = Figure(figsize=(14, 12), dpi=100, layout="constrained")
    axes = fig.subplots(3, 2)
    fig.suptitle(_title(job), fontsize=14)
    _throughput(axes[0, 0], job)
    _per_actor(axes[0, 1], job, "Running batch size", "sequences in the step", _batch_size)
    _per_actor(axes[1, 0], job, "KV-cache usage", "% of blocks in use", lambda s, t: (t, _kv_usage(s)))
    _per_actor(axes[1, 1], job, "Prefix-cache hit rate (cumulative)", "% of prompt tokens from the cache",
               _prefix_hit_rate)
    runs = "all runs, " if job.resumed else ""
    _distribution(axes[2, 0], job.results["ttft_s"], "Time to first token", TTFT_COLOR, runs)
    _distribution(axes[2, 1], job.results["latency_s"], "Request latency", LATENCY_COLOR, runs)
    return fig


def _title(job: JobData) -> str:
    s = job.stats
    title = f"Job {s.get('job_id', job.root.name)}"
    if s and job.resumed:
        title += (f": {s['status']}, {s['rows_done']}/{s['rows_total']} rows over all runs; this run "
                  f"{s['this_run']['rows']} rows, {s['output_tokens_per_s']:.1f} tok/s")
    elif s:
        title += f": {s['status']}, {s['rows_done']}/{s['rows_total']} rows, {s['output_tokens_per_s']:.1f} tok/s"
    return title


def _throughput(ax, job: JobData) -> None:
    """Generated tokens per second in equal time bins."""
    title = "Generation throughput per actor"
    if not job.steps:
        return _no_data(ax, title)
    end = max(s["timestamp"][-1] for s in job.steps.values()) - job.t0
    edges = np.linspace(0.0, max(end, 1e-3), THROUGHPUT_BINS + 1)
    width = edges[1] - edges[0]
    total = np.zeros(THROUGHPUT_BINS)
    for (actor, s), color in zip(job.steps.items(), itertools.cycle(ACTOR_COLORS)):
        tokens, _ = np.histogram(s["timestamp"] - job.t0, bins=edges, weights=_new_tokens(s))
        total += tokens
        ax.stairs(tokens / width, edges, color=color, label=actor, linewidth=2)
    if len(job.steps) > 1:
        ax.stairs(total / width, edges, color="black", linestyle="--", label="all actors", linewidth=1.2)
    _axes(ax, title, "tokens/s")


def _per_actor(ax, job: JobData, title: str, ylabel: str,
               series: Callable[[Steps, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    """One line per actor: ``series(steps, seconds since time zero) -> (x, y)``."""
    if not job.steps:
        return _no_data(ax, title)
    for (actor, s), color in zip(job.steps.items(), itertools.cycle(ACTOR_COLORS)):
        x, y = series(s, s["timestamp"] - job.t0)
        ax.plot(x, y, color=color, label=actor, linewidth=2, drawstyle="steps-post")
    _axes(ax, title, ylabel)


def _new_tokens(s: Steps) -> np.ndarray:
    """Tokens appended to sequences in each step (outputs written before the column existed: one per scheduled
    sequence, which also counts the token async scheduling drops after a sequence stopped)."""
    return s["num_new_tokens"] if "num_new_tokens" in s else s["batch_size"]


def _batch_size(s: Steps, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences in each step from its start, dropping to 0 when the engine drained (idle between shards)."""
    drained = (s["num_running"] == 0) & (s["num_waiting"] == 0)
    x = np.concatenate([t - s["step_time_s"], t[drained]])
    y = np.concatenate([s["batch_size"], np.zeros(int(drained.sum()), dtype=s["batch_size"].dtype)])
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def _kv_usage(s: Steps) -> np.ndarray:
    """Percent of the KV-cache blocks in use after each step."""
    return 100.0 * s["kv_blocks_used"] / np.maximum(s["kv_blocks_used"] + s["kv_blocks_free"], 1)


def _prefix_hit_rate(s: Steps, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """After each prefill step: prompt tokens served from the prefix cache / prompt tokens prefilled so far."""
    prefill = s["phase"] == "prefill"
    # Steps written before chunked prefill have no num_prefill_tokens: their prefill steps forwarded only prompts.
    computed = s["num_prefill_tokens"] if "num_prefill_tokens" in s else s["num_tokens"]
    hits = np.cumsum(s["prefix_cache_hit_tokens"][prefill])
    prompt = np.cumsum(computed[prefill] + s["prefix_cache_hit_tokens"][prefill])
    return t[prefill], 100.0 * hits / np.maximum(prompt, 1)


def _distribution(ax, column: pa.ChunkedArray, title: str, color: str, runs: str) -> None:
    """A histogram of the rows' values (failed rows have none), with p50/p90/p99 marked."""
    values = pc.drop_null(column).to_numpy()
    if not len(values):
        return _no_data(ax, title)
    ax.hist(values, bins=min(40, max(5, len(values) // 2)), color=color)
    for q, v, style in zip(PERCENTILES, np.percentile(values, PERCENTILES), ("-", "--", ":")):
        ax.axvline(v, color="black", linestyle=style, linewidth=1.2, label=f"p{q} {_seconds(v)}")
    _axes(ax, f"{title} ({runs}{len(values)} rows)", "rows", xlabel="seconds")


def _axes(ax, title: str, ylabel: str, xlabel: str = "seconds since the run's first step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    ax.grid(alpha=0.3)


def _no_data(ax, title: str) -> None:
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=14)


def _seconds(v: float) -> str:
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


# ----- numbers ------------------------------------------------------------------------------------------------
def summary(job: JobData) -> list[tuple[str, str]]:
    """(label, value) rows for the page's summary table, from stats.json, the results and the steps."""
    s, rows = job.stats, []
    if s:
        config, resources, run = s.get("config", {}), s.get("resources", {}), s["this_run"]
        all_runs = " (all runs)" if job.resumed else ""
        this_run = " (this run)" if job.resumed else ""
        rows += [("status", s["status"]), ("model", str(config.get("model"))),
                 (f"rows{all_runs}", f"{s['rows_done']} of {s['rows_total']} done, {s['rows_failed']} failed"),
                 (f"prompt tokens{all_runs}", f"{s['prompt_tokens']:,}"),
                 (f"generated tokens{all_runs}", f"{s['generated_tokens']:,}")]
        if job.resumed:
            rows += [("rows (this run)", f"{run['rows']} ({run['shards_skipped']} shards were already written)"),
                     ("generated tokens (this run)", f"{run['generated_tokens']:,}")]
        rows += [(f"wall time{this_run}", _seconds(s["wall_time_s"])),
                 (f"output throughput{this_run}", f"{s['output_tokens_per_s']:.1f} tok/s"),
                 ("actors", f"{resources.get('num_actors')} on {resources.get('device')}")]
    for name, label in (("ttft_s", "TTFT"), ("latency_s", "latency")):
        values = pc.drop_null(job.results[name]).to_numpy()
        if len(values):
            rows.append((f"{label} {' / '.join(f'p{q}' for q in PERCENTILES)}",
                         " / ".join(_seconds(v) for v in np.percentile(values, PERCENTILES))))
    prompt_tokens = pc.sum(job.results["num_prompt_tokens"]).as_py()
    if prompt_tokens:
        cached = pc.sum(job.results["num_cached_tokens"]).as_py() or 0
        rows.append(("prefix-cache hit rate", f"{100.0 * cached / prompt_tokens:.1f}% of prompt tokens"))
    if job.steps:
        steps = job.steps.values()
        rows += [(f"engine steps{' (this run)' if job.resumed else ''}", f"{sum(len(s['step']) for s in steps):,}"),
                 ("peak running batch", str(max(int(s["batch_size"].max()) for s in steps))),
                 ("peak KV-cache usage", f"{max(_kv_usage(s).max() for s in steps):.1f}%"),
                 ("preemptions", str(sum(int(s["num_preempted"].sum()) for s in steps)))]
    return rows


def actor_rows(job: JobData) -> list[list[str]]:
    """The per-actor table (header first) from stats.json's actors."""
    header = ["actor", "status", "shards", "rows", "failed", "generated tokens", "busy", "tok/s busy", "load"]
    body = [[a["actor_id"], a["status"], str(a["shards"]), str(a["rows"]), str(a["rows_failed"]),
             f"{a['generated_tokens']:,}", _seconds(a["busy_s"]),
             f"{a['generated_tokens'] / a['busy_s']:.1f}" if a["busy_s"] else "-",
             _seconds(a["load_time_s"]) if a["load_time_s"] is not None else "-"]
            for a in job.stats.get("actors", {}).values()]
    return [header, *body] if body else []


# ----- output ------------------------------------------------------------------------------------------------
def render_html(job: JobData, png: bytes) -> str:
    """A self-contained page: the summary, the figure as a base64 data URI, the actors."""
    e = html.escape
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary(job))
    actors = actor_rows(job)
    actor_table = (f"<h2>Actors{' of this run' if job.resumed else ''}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in actors[0]) + "</tr>" +
                   "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in actors[1:]) +
                   "</table>") if actors else ""
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(_title(job))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin: 8px 0 24px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; height: auto; border: 1px solid #ddd; }}
.note {{ color: #555; max-width: 60em; }}
</style></head>
<body>
<h1>{e(_title(job))}</h1>
<p class="note">Output: {e(str(job.root.resolve()))}</p>
<h2>Summary</h2><table>{table}</table>
<h2>Plots</h2>
<img alt="throughput, batch size, KV-cache usage, prefix-cache hit rate, TTFT and latency"
 src="data:image/png;base64,{image}">
<p class="note">Time runs from the run's first engine step{" (the plots over time show this run only)" if job.resumed
else ""}. Throughput counts the tokens appended to sequences in each step, in {THROUGHPUT_BINS} equal bins; the
dashed line sums the actors. The hit rate is cumulative over each actor's prefill steps. The distributions cover
rows that produced tokens{" in every run" if job.resumed else ""} (failed rows have no timings).</p>
{actor_table}
</body></html>
"""


def render_report(output_dir: str) -> tuple[str, str]:
    """Write ``report.png`` and ``report.html`` into a job's output directory; return their paths."""
    job = load_job(output_dir)
    buffer = io.BytesIO()
    plot(job).savefig(buffer, format="png")
    png_path, html_path = job.root / PNG_NAME, job.root / HTML_NAME
    png_path.write_bytes(buffer.getvalue())
    html_path.write_text(render_html(job, buffer.getvalue()), encoding="utf-8")
    return str(png_path), str(html_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="the job's output directory (offline_batch.py --output)")
    args = p.parse_args(argv)
    try:
        png, page = render_report(args.output)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {png} and {page}")
    return 0
