"""``python jobs/offline_batch.py``: flags → job → exit status. Errors are one line on stderr."""
import logging
import sys
from typing import Any

from pipeline.config import parse_config
from pipeline.errors import PipelineError
from pipeline.signals import StopRequest


def main(argv: list[str] | None = None) -> int:
    """Run the job; return 0 when every row has a result or an error, non-zero otherwise (see docs/pipeline.md)."""
    argv = sys.argv[1:] if argv is None else argv
    with StopRequest() as stop:  # first: a signal at any later point only asks the job to stop
        # The job's own INFO lines; other libraries' stay at WARNING (torch logs cache statistics at exit at INFO).
        logging.basicConfig(level=logging.WARNING, format="[pipeline] %(message)s", stream=sys.stderr)
        logging.getLogger("pipeline").setLevel(logging.INFO)
        try:
            config = parse_config(argv)
            from pipeline.driver import run_job  # imports Ray: after the flags are known to be good
            report = run_job(config, stop=stop)
        except PipelineError as e:
            sys.stderr.write(f"error: {e}\n")  # one write: Ray's log forwarding thread shares the stream
            sys.stderr.flush()
            return e.exit_code
        if report.status == "completed":
            print(done_line(report.stats, str(report.output)), flush=True)
        if config.report and report.status in ("completed", "nothing to do"):
            _render_report(str(report.output))
        return report.exit_code


def done_line(stats: dict[str, Any], output: str) -> str:
    """The final line. After a resume it keeps this run's numbers (rows, tokens, throughput, time) apart from
    the totals over every run."""
    run = stats["this_run"]
    speed = f"{stats['output_tokens_per_s']:.1f} tok/s, {stats['wall_time_s']:.1f}s"
    totals = f"{stats['rows_done']} rows ({stats['rows_failed']} failed), {stats['generated_tokens']} tokens"
    if run["shards_skipped"]:
        line = f"done: this run {run['rows']} rows, {run['generated_tokens']} tokens, {speed}; all runs {totals}"
    else:
        line = f"done: {totals}, {speed}"
    if run["shard_retries"] or run["actors_replaced"]:
        line += f"; {run['shard_retries']} shard retries, {run['actors_replaced']} actors replaced"
    return f"{line} -> {output}"


def _render_report(output: str) -> None:
    """The results are already written: a report that cannot be drawn is a warning, not a failed job."""
    try:
        from pipeline.report import render_report
        _, page = render_report(output)
        print(f"report: {page}", flush=True)
    except (PipelineError, OSError) as e:
        print(f"warning: no report: {e}", file=sys.stderr, flush=True)
