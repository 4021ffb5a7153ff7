"""The output directory: layout, atomic writes, the manifest, and the resume / overwrite rules.

Layout of ``<output>/``::

    manifest.json            input identity + result settings; written when the job is first planned
    results/part-NNNNN.parquet   one per finished shard, renamed into place whole (never partial)
    _steps/steps-NNNNN.parquet   the engine steps that produced a shard (written just before its part)
    steps.parquet            all step records, merged from _steps/ at the end of every run
    stats.json               totals and timings of the latest run
    sample_prompts.parquet   the generated sample input (only when --input is omitted)
    _tmp/                    files being written; renamed into place when complete

A shard is done exactly when its part file exists, so a re-run skips it and nothing is written twice.
"""
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import JobFailed, UsageError

MANIFEST_VERSION = 1
_PART = re.compile(r"^part-(\d+)\.parquet$")


class OutputDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.results = self.root / "results"
        self.step_parts = self.root / "_steps"
        self.tmp = self.root / "_tmp"
        self.manifest_path = self.root / "manifest.json"
        self.stats_path = self.root / "stats.json"
        self.steps_path = self.root / "steps.parquet"
        self.sample_path = self.root / "sample_prompts.parquet"
        # Everything the pipeline writes except the sample input; --overwrite removes exactly these.
        self._owned = (self.results, self.step_parts, self.tmp, self.manifest_path, self.stats_path, self.steps_path,
                       self.root / "report.png", self.root / "report.html")

    # ----- planning (no writes until prepare) ------------------------------------------------------------------
    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse an output that is not ours to write; called before anything is written."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--output {self.root} exists and is not a directory")
        nearest = next(p for p in (self.root, *self.root.absolute().parents) if p.exists())
        if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
            why = "is not a directory" if not nearest.is_dir() else "is not writable"
            raise UsageError(f"cannot create directory {self.root}: {nearest} {why}")
        if self.manifest_path.exists() or overwrite:
            return
        if resume:
            raise UsageError(f"nothing to resume in {self.root}: it has no manifest.json")
        ours = [p.name for p in self._owned if p.exists()]
        if ours:
            raise UsageError(f"--output {self.root} holds pipeline files ({', '.join(ours)}) but no manifest.json; "
                             f"pass --overwrite to replace them or choose another --output")

    def prepare(self, manifest: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any], set[int]]:
        """Create or reopen the job; return its manifest and the shards already written.

        A previous manifest must describe the same input and result settings, else :class:`UsageError`
        (unless ``overwrite``, which discards the previous results first).
        """
        if overwrite:
            self.clear()
        if self.manifest_path.exists():
            previous = self._read_manifest()
            differences = manifest_differences(previous, manifest)
            if differences:
                raise UsageError(f"--output {self.root} holds a job with a different {'; '.join(differences)}; "
                                 f"refusing to resume onto it (choose another --output, or --overwrite)")
            manifest = previous
        else:
            self._makedirs(self.root)
            self.write_json(self.manifest_path, manifest)
        self._makedirs(self.results)
        self._makedirs(self.step_parts)
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of a killed run
        self._makedirs(self.tmp)
        return manifest, self.finished_shards()

    def previous_manifest(self, overwrite: bool) -> dict[str, Any] | None:
        """The manifest of the job already here, if it is to be continued (None: none, or ``overwrite``)."""
        return None if overwrite or not self.manifest_path.exists() else self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {self.manifest_path}: {e}; pass --overwrite to start over") from e
        if manifest.get("version") != MANIFEST_VERSION:
            raise UsageError(f"{self.manifest_path} has version {manifest.get('version')!r}, expected "
                             f"{MANIFEST_VERSION}; pass --overwrite to start over")
        return manifest

    def clear(self) -> None:
        """Remove what the pipeline wrote here (and nothing else)."""
        for path in self._owned:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def finished_shards(self) -> set[int]:
        if not self.results.is_dir():
            return set()
        return {int(m.group(1)) for name in os.listdir(self.results) if (m := _PART.match(name))}

    def part_paths(self) -> list[Path]:
        return sorted(self.results / f for f in os.listdir(self.results) if _PART.match(f))

    # ----- writing ----------------------------------------------------------------------------------------------
    def write_shard(self, shard_id: int, results: pa.Table, steps: pa.Table | None) -> Path:
        """Write a finished shard: its step records first, then its part file (which marks it done)."""
        if steps is not None and steps.num_rows:
            self.write_parquet(self.step_parts / f"steps-{shard_id:05d}.parquet", steps)
        return self.write_parquet(self.results / f"part-{shard_id:05d}.parquet", results)

    def write_parquet(self, path: Path, table: pa.Table) -> Path:
        return self._atomic(path, lambda tmp: pq.write_table(table, tmp))

    def write_json(self, path: Path, obj: Any) -> Path:
        return self._atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))

    def merge_steps(self) -> Path:
        """(Re)build ``steps.parquet`` from every shard's step records, in shard order."""
        files = sorted(self.step_parts.glob("steps-*.parquet"))
        tables = [pq.read_table(f) for f in files]
        merged = pa.concat_tables(tables, promote_options="default") if tables else pa.table(
            {"actor_id": pa.array([], pa.string()), "shard_id": pa.array([], pa.int64())})
        return self.write_parquet(self.steps_path, merged)

    def close(self) -> None:
        """Remove the (empty) temp folder at the end of a run."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _atomic(self, path: Path, write) -> Path:
        """Write through a temp file in ``_tmp/`` (same filesystem), fsync, then rename into place."""
        tmp = self.tmp / f"{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self._makedirs(self.tmp)
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise JobFailed(f"cannot write {path}: {e.strerror or e}") from e
        return path

    @staticmethod
    def _makedirs(path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create directory {path}: {e.strerror or e}") from e


def make_manifest(job_id: str, identity: dict[str, Any], shard_size: int, num_shards: int,
                  settings: dict[str, Any]) -> dict[str, Any]:
    return dict(version=MANIFEST_VERSION, job_id=job_id, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                input=identity, shard_size=shard_size, num_shards=num_shards, settings=settings)


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable reasons why ``new`` cannot continue the job of ``old`` (empty: it can).

    The input must be the same data (row count, schema, content fingerprint; its path may change),
    cut into the same shards, with the same settings that shape each row's result.
    """
    diffs = []
    for key in ("num_rows", "schema", "fingerprint"):
        if old["input"].get(key) != new["input"].get(key):
            diffs.append(f"input {key} (was {_short(old['input'].get(key))}, now {_short(new['input'].get(key))}; "
                         f"input was {old['input'].get('path')})")
    if old.get("shard_size") != new.get("shard_size"):
        diffs.append(f"--shard-size (was {old.get('shard_size')}, now {new.get('shard_size')})")
    # Over the keys of both: a setting given before and left out now (--n 2, then no --n) differs too.
    for key in [*new["settings"], *(k for k in old["settings"] if k not in new["settings"])]:
        was, now = old["settings"].get(key), new["settings"].get(key)
        if was != now:
            diffs.append(f"{key} (was {_short(repr(was))}, now {_short(repr(now))})")
    return diffs


def _short(value: Any) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
