"""``python jobs/offline_batch.py``: flags → job → exit status. Errors are one line on stderr."""
import logging
import sys

from pipeline.config import parse_config
from pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    """Run the job; return 0 when every row has a result or an error, non-zero otherwise (see docs/pipeline.md)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[pipeline] %(message)s", stream=sys.stderr)
    try:
        config = parse_config(argv)
        from pipeline.driver import run_job  # imports Ray: after the flags are known to be good
        report = run_job(config)
    except PipelineError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: Ray's log forwarding thread shares the stream
        sys.stderr.flush()
        return e.exit_code
    except KeyboardInterrupt:  # while planning, before any shard ran (the job itself handles it later)
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    if report.status == "completed":
        s = report.stats
        print(f"done: {s['rows_total']} rows ({s['rows_failed']} failed), {s['generated_tokens']} tokens, "
              f"{s['output_tokens_per_s']:.1f} tok/s, {s['wall_time_s']:.1f}s -> {report.output}", flush=True)
    if config.report and report.status in ("completed", "nothing to do"):
        _render_report(str(report.output))
    return report.exit_code


def _render_report(output: str) -> None:
    """The results are already written: a report that cannot be drawn is a warning, not a failed job."""
    try:
        from pipeline.report import render_report
        _, page = render_report(output)
        print(f"report: {page}", flush=True)
    except (ImportError, PipelineError, OSError) as e:
        print(f"warning: no report: {e}", file=sys.stderr, flush=True)
