"""Open the input as an Arrow stream, check its columns, and cut it into shards.

Supported: Parquet (file or directory), JSON Lines (.jsonl/.json/.ndjson), CSV, Arrow IPC (.arrow/.feather)
through ``pyarrow.dataset``; a directory saved with ``datasets.save_to_disk`` and a Hugging Face hub
dataset id through ``datasets`` (memory-mapped). Rows are read batch by batch: the driver holds only the
shards in flight.
"""
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import xxhash

from pipeline.errors import JobFailed, UsageError, one_line
from pipeline.rows import ALL_RESULT_COLUMNS, OVERRIDE_COLUMNS, SAMPLING_PARAMS_COLUMN

FILE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json",
                ".csv": "csv", ".arrow": "ipc", ".feather": "ipc"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_READ_BATCH_ROWS = 8192
HUB_TIMEOUT_S = 10.0


@dataclass
class InputSource:
    """A readable input: its schema and size are known up front; rows stream through :meth:`shards`."""
    location: str
    format: str
    schema: pa.Schema
    num_rows: int
    _fingerprint: Callable[[], str]
    _batches: Callable[[], Iterable[pa.RecordBatch]]

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the input's content (reads every byte of a file input: the driver computes it while Ray
        and the actors start)."""
        return self._fingerprint()

    def identity(self) -> dict[str, Any]:
        """What the manifest records to recognise this input again (see :mod:`pipeline.output`)."""
        return dict(path=self.location, format=self.format, num_rows=self.num_rows,
                    schema=self.schema.to_string(show_schema_metadata=False), fingerprint=self.fingerprint)

    def shards(self, shard_size: int) -> Iterator[tuple[int, pa.Table]]:
        """``(shard_id, table)`` for consecutive runs of ``shard_size`` rows (the last may be shorter)."""
        try:
            yield from cut_shards(self._batches(), shard_size, self.schema)
        except (pa.ArrowException, OSError) as e:
            raise JobFailed(f"cannot read input {self.location}: {one_line(e)}") from e


def cut_shards(batches: Iterable[pa.RecordBatch], shard_size: int, schema: pa.Schema) -> Iterator[tuple[int, pa.Table]]:
    """Regroup a stream of record batches of any sizes into tables of exactly ``shard_size`` rows."""
    pending: list[pa.RecordBatch] = []
    buffered = shard_id = 0
    for batch in batches:
        while batch.num_rows:
            take = min(shard_size - buffered, batch.num_rows)
            pending.append(batch.slice(0, take))
            batch = batch.slice(take)
            buffered += take
            if buffered == shard_size:
                yield shard_id, _table(pending, schema)
                pending, buffered, shard_id = [], 0, shard_id + 1
    if buffered:
        yield shard_id, _table(pending, schema)


def _table(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    # One contiguous copy: slices would otherwise drag whole parent buffers into the object store.
    table = pa.Table.from_batches([b.replace_schema_metadata(None) for b in batches])
    return (table if table.schema.equals(schema) else table.cast(schema)).combine_chunks()


def open_input(location: str, split: str = "train") -> InputSource:
    """Open ``location`` (see module doc); raise :class:`UsageError` if it cannot be read."""
    path = Path(location).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _open_hf(location, split, saved=path)
    if path.exists():
        return _open_files(location, path)
    if is_hub_id(location) and path.suffix.lower() not in FILE_FORMATS:
        return _open_hf(location, split, saved=None)
    raise UsageError(f"input not found: {location}")


def is_hub_id(name: str) -> bool:
    """Shaped like a Hugging Face hub id (``name`` or ``org/name``) rather than a file path."""
    return bool(_HUB_ID.match(name))


def _open_files(location: str, path: Path) -> InputSource:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith((".", "_"))
                                                               for part in p.relative_to(path).parts))
    if not files:
        raise UsageError(f"input directory {location} has no data files")
    formats = {}
    for f in files:
        fmt = FILE_FORMATS.get(f.suffix.lower())
        if fmt is None:
            raise UsageError(f"unsupported input file {f} (use {', '.join(sorted(FILE_FORMATS))}, "
                             f"or a saved Hugging Face dataset)")
        formats[fmt] = f
    if len(formats) > 1:
        raise UsageError(f"input directory {location} mixes formats: {', '.join(map(str, formats.values()))}")
    (fmt,) = formats
    try:
        dataset = pads.dataset([str(f) for f in files], format=fmt)
        num_rows = dataset.count_rows()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UsageError(f"cannot read {location} as {fmt}: {one_line(e)}") from e
    return InputSource(location=str(path.resolve()), format=fmt, schema=dataset.schema.remove_metadata(),
                       num_rows=num_rows, _fingerprint=lambda: fingerprint_files(files, path),
                       _batches=lambda: dataset.to_batches(batch_size=_READ_BATCH_ROWS))


def fingerprint_files(files: list[Path], root: Path) -> str:
    """A content hash of ``files``: bytes, sizes, and names relative to the folder ``root`` (a single file's own
    name does not count, so a renamed or moved copy is the same input)."""
    h = xxhash.xxh3_128()
    for f in files:
        name = f.relative_to(root) if root.is_dir() else ""
        h.update(f"{name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return "xxh3_128:" + h.hexdigest()


def _open_hf(location: str, split: str, saved: Path | None) -> InputSource:
    try:
        import datasets
    except ImportError as e:
        raise UsageError(f"reading {location} needs the 'datasets' package (pip install 'nanovllm-ray[datasets]')"
                         f"{'' if saved else '; or, if it is a local path, it does not exist'}") from e
    if not saved:
        check_hub_dataset(location)
    try:
        obj = datasets.load_from_disk(str(saved)) if saved else datasets.load_dataset(location, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError...)
        where = "saved dataset" if saved else "input (not a local path; as a Hugging Face hub dataset)"
        raise UsageError(f"cannot load {where} {location}: {one_line(e)}") from e
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise UsageError(f"dataset {location} has no split {split!r} (splits: {', '.join(obj)}); pass --split")
        obj = obj[split]
    if saved:
        def fingerprint() -> str:
            return fingerprint_files(sorted(p for p in saved.rglob("*") if p.is_file()), saved)
    else:
        def fingerprint() -> str:
            return f"hf:{obj._fingerprint}"
    ds = obj.with_format("arrow")
    return InputSource(location=str(saved.resolve()) if saved else location, format="hf-datasets",
                       schema=obj.features.arrow_schema.remove_metadata(), num_rows=len(obj),
                       _fingerprint=fingerprint,
                       _batches=lambda: (b for t in ds.iter(batch_size=_READ_BATCH_ROWS) for b in t.to_batches()))


def check_hub_dataset(name: str) -> None:
    """Fail at once, in one line, when the hub cannot serve dataset ``name``: ``datasets`` itself retries an
    unreachable hub for about 25 s, logging every retry. In offline mode (``HF_HUB_OFFLINE=1``) the cache is
    used, so there is nothing to check."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as e:
        raise UsageError(f"input {name}: the hub dataset is gated; accept its terms on the hub and log in "
                         f"(hf auth login)") from e
    except RepositoryNotFoundError as e:
        raise UsageError(f"input {name}: not a local path, and no such dataset on the Hugging Face hub "
                         f"(or it is private: hf auth login)") from e
    except Exception as e:  # the network: DNS, refused, timeout, proxy
        raise UsageError(f"input {name}: not a local path, and the Hugging Face hub cannot be reached "
                         f"({one_line(e)}); if the dataset is in the local cache, set HF_HUB_OFFLINE=1") from e


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


# What each kind of per-row override column (pipeline.rows.OVERRIDE_COLUMNS) may hold.
COLUMN_KINDS = {
    "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
    "text": _is_text,
    "bool": pa.types.is_boolean,
    "texts": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type),
}


# ----- column checks -------------------------------------------------------------------------------------------
def resolve_prompt_column(schema: pa.Schema, prompt_column: str, option: str = "--prompt-column") -> str:
    """The column holding prompts: ``prompt_column``, or ``messages`` when the default ``prompt`` is absent.

    Raises :class:`UsageError` for a missing column or one whose type can never hold prompts, for override
    columns of the wrong type or a ``sampling_params`` column that is not a struct, and for input columns
    that would clash with the result columns. ``option`` is how the caller's user names the prompt column
    (a flag, or a Python argument).
    """
    names = schema.names
    column = prompt_column
    if column not in names and column == "prompt" and "messages" in names:
        column = "messages"
    if column not in names:
        raise UsageError(f"input has no column {prompt_column!r} (columns: {', '.join(names) or 'none'}); "
                         f"choose one with {option}")
    kind = prompt_kind(schema.field(column).type)
    if kind is None:
        raise UsageError(f"column {column!r} has type {schema.field(column).type}; expected text (string), chat "
                         f"messages (list<struct<role: string, content: string>>) or token ids (list<int>)")
    for name, kind in OVERRIDE_COLUMNS.items():
        t = schema.field(name).type if name in names else None
        if t is not None and not pa.types.is_null(t) and not any(COLUMN_KINDS[k](t) for k in kind.split(" or ")):
            raise UsageError(f"column {name!r} (a per-row override) has type {t}; expected {kind}")
    if SAMPLING_PARAMS_COLUMN in names:
        t = schema.field(SAMPLING_PARAMS_COLUMN).type
        if not (pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_null(t)):
            raise UsageError(f"column {SAMPLING_PARAMS_COLUMN!r} has type {t}; expected a struct of SamplingParams "
                             f"fields (max_tokens, temperature, top_p, seed, ...)")
    clashes = [n for n in names if n in ALL_RESULT_COLUMNS]
    if clashes:
        raise UsageError(f"input columns {clashes} clash with result columns of the same names; rename them")
    return column


def prompt_kind(t: pa.DataType) -> str | None:
    """"text", "chat", "token_ids" or "null" (all rows null: each fails alone); None if no prompt fits ``t``."""
    if _is_text(t):
        return "text"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        item = t.value_type
        if pa.types.is_integer(item):
            return "token_ids"
        if pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}:
            return "chat"
    return None
