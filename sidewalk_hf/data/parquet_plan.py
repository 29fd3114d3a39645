"""The plan of a pass over a parquet split, made from file metadata alone: which reader reads which rows.

A job has ``P = W * R`` readers: ``R`` per process (``W`` processes), reader ``g = r * R + j`` being
reader ``j`` of process ``r``. The split's files are the ones ``datasets`` resolves for it (local paths
or ``hf://`` URLs, read through ``huggingface_hub``'s filesystem), and their footers give the rows of
each row group, so a plan costs one footer read per file and process and no data.

A training pass is planned from ``(seed, epoch, W, R, B)`` alone (``B`` records per batch), so every
process and DataLoader worker makes the same plan with no communication:

- every batch of a process is made of one *part* from each of its readers, so a batch mixes the row
  groups of all the process's readers: reader ``j`` gives ``part_size(t, j, B, R)`` records to batch
  ``t``, the sizes ``B // R`` or ``B // R + 1`` rotating over the readers from step to step so that every
  reader gives ``B`` records per ``R`` steps (when ``B < R``, readers ``j < B`` give one record each and
  the others read nothing);
- the row groups are put in a seeded random order, new each epoch;
- each process runs ``T`` steps, so reader ``j`` of every process gets a *line* of
  ``reader_records(T, j, B, R)`` records: a list of segments (row ranges of row groups) holding exactly
  that many;
- *whole row groups*: in that order, each row group goes to the reader with the fewest records so far;
  ``T`` is the most steps every reader can fill, each line ends where its quota ends, and the rest of
  the pass is dropped (counted). No row group is read by two readers;
- *cut row groups*: the row groups laid end to end, cut into the readers' quotas with
  ``T = N // (W * B)``, the most a pass can use. A row group cut between two readers is read by both.
  It is chosen only when whole row groups would drop more records beyond the cut's drop than the cut
  reads twice, and more than ``max(W * B, N / 100)``: when row groups are few or large next to a
  reader's share (fewer row groups than readers always). The plan says how many records its readers
  fetch (``fetched_records``), so the cost is known and logged.

An evaluation pass keeps the files' order and drops nothing: whole row groups to the least loaded reader
when there are at least ``P`` of them, else the split cut into ``P`` nearly equal shares.

Within a line, ``ReaderOrder`` gives the order in which a reader emits its records: a buffer shuffle
(training) seeded by ``(seed, epoch, g)`` of ``reader_buffer_size`` records (so that a process buffers
about ``buffer_batches * B`` records in all, as a whole-stream shuffle with the same ``buffer_batches``
does), which does not depend on the records' contents, so a reader can pass over emitted records without
having read them (an exact resume re-reads only row groups that still hold records to come).
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FOOTER_READ_THREADS = 16  # footers are small reads: from the Hub, latency bound
_ROW_GROUP_ORDER_STREAM = 0x52475244  # separates the row-group shuffle's seed from the readers' seeds


class ShardReadError(OSError):
    """A parquet file of the split (or one of its row groups) that cannot be read: truncated, corrupt,
    missing a column. The message names the file."""


@dataclass(frozen=True)
class RowGroup:
    """One row group: ``first_record`` is the position of its first row in the split (files in order)."""

    file_index: int
    index: int
    num_rows: int
    first_record: int


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of a row group, read by one reader."""

    row_group: RowGroup
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass
class SplitLayout:
    """A split's parquet files, their row groups, and the files left out because they cannot be read."""

    files: list[str]
    metadata: list[pq.FileMetaData | None]
    row_groups: list[RowGroup]
    columns: list[str]
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    @property
    def num_records(self) -> int:
        return sum(group.num_rows for group in self.row_groups)

    def read_segment(self, segment: Segment, columns: Sequence[str]) -> pa.Table:
        """The segment's rows (``columns`` only), reading its row group once; raises ``ShardReadError``."""
        path = self.files[segment.row_group.file_index]
        try:
            with _open(path) as source:
                parquet = pq.ParquetFile(source, metadata=self.metadata[segment.row_group.file_index])
                table = parquet.read_row_group(
                    segment.row_group.index, columns=list(columns), use_threads=False
                )
        except (OSError, pa.ArrowException, ValueError) as error:
            raise ShardReadError(
                f"{path}: row group {segment.row_group.index} cannot be read ({error}); the file is "
                "truncated, corrupt or was changed after the pass was planned"
            ) from error
        return table.slice(segment.start, segment.num_rows)


@dataclass
class PassPlan:
    """One pass: ``lines[g]`` is reader ``g``'s segments in reading order.

    ``steps`` is the number of batches of every process in training (0 in evaluation, where readers hold
    what they hold); ``dropped_records`` the records of the split a training pass leaves out;
    ``fetched_records`` the rows the readers fetch, all together (the split's records when no row group is
    cut between readers, bad files aside); ``mode`` is ``"whole row groups"`` or ``"cut row groups"``.
    """

    lines: list[list[Segment]]
    steps: int
    dropped_records: int
    fetched_records: int
    mode: str

    def line_records(self, reader: int) -> int:
        return sum(segment.num_rows for segment in self.lines[reader])


def split_parquet_files(source: str | os.PathLike, split: str) -> list[str] | None:
    """The split's parquet files as ``datasets`` resolves them (the dataset card's ``configs`` included),
    or None when the dataset is not stored as parquet. Raises what ``datasets.load_dataset_builder`` raises
    for a source that does not exist, and ``ValueError`` for a split that does not."""
    builder = datasets.load_dataset_builder(os.fspath(source))
    if builder.name != "parquet":
        return None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise ValueError(
            f"dataset {os.fspath(source)!r} has no split {split!r}: its splits are {list(data_files)}"
        )
    return [str(path) for path in data_files[split]]


def read_layout(
    files: Sequence[str], required_columns: Sequence[str], *, skip_unreadable: bool = False
) -> SplitLayout:
    """Read every file's footer (in threads). ``columns`` are the first readable file's; a file whose
    footer cannot be read, or that lacks one of ``required_columns`` the first file has, raises
    ``ShardReadError`` naming it, or with ``skip_unreadable`` is left out, logged and listed in
    ``skipped_files``. (A dataset whose files all lack a column is the caller's error to word.)"""
    files = list(files)
    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_READ_THREADS, len(files)))) as pool:
        results = list(pool.map(_read_footer, files))
    readable = [result for result in results if not isinstance(result, ShardReadError)]
    columns = readable[0].schema.to_arrow_schema().names if readable else []
    required = [name for name in required_columns if name in columns]
    metadata, row_groups, skipped = [], [], []
    first_record = 0
    for file_index, (path, result) in enumerate(zip(files, results)):
        if not isinstance(result, ShardReadError):
            names = result.schema.to_arrow_schema().names
            missing = [name for name in required if name not in names]
            if missing:
                result = ShardReadError(
                    f"{path}: no {' or '.join(repr(m) for m in missing)} column (its columns are {names})"
                )
        if isinstance(result, ShardReadError):
            if not skip_unreadable:
                raise result
            logger.warning("skipping %s", result)
            skipped.append((path, str(result)))
            metadata.append(None)
            continue
        metadata.append(result)
        for index in range(result.num_row_groups):
            num_rows = result.row_group(index).num_rows
            if num_rows:
                row_groups.append(RowGroup(file_index, index, num_rows, first_record))
                first_record += num_rows
    return SplitLayout(files, metadata, row_groups, columns, skipped)


def _open(path: str):
    """A binary file object: local paths natively, URLs (``hf://``, any fsspec protocol) through fsspec
    without read-ahead, so that a row group costs the ranges of its columns and nothing more."""
    if "://" not in path:
        return pa.OSFile(path, "rb")
    filesystem, inner_path = fsspec.core.url_to_fs(path)
    return filesystem.open(inner_path, "rb", cache_type="none")


def _read_footer(path: str) -> pq.FileMetaData | ShardReadError:
    """The file's footer, reading its 8 last bytes and then exactly the footer (parquet readers read the
    last 64 kB at once: a large part of a small file)."""
    try:
        with _open(path) as source:
            size = source.seek(0, os.SEEK_END)
            if size < 12:
                raise ValueError(f"{size} bytes, too short for parquet")
            source.seek(size - 8)
            tail = source.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or length + 12 > size:
                raise ValueError("no parquet footer at the end of the file")
            source.seek(size - 8 - length)
            footer = source.read(length + 8)
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
    except (OSError, pa.ArrowException, ValueError) as error:
        return ShardReadError(
            f"{path}: not a readable parquet file ({error}); it may be truncated (an interrupted copy) "
            "or corrupt"
        )


# ---- planning ------------------------------------------------------------------------------------------------


def plan_pass(
    layout: SplitLayout,
    *,
    num_processes: int,
    readers_per_process: int,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int,
) -> PassPlan:
    """The plan of one pass (see the module docstring); the same arguments give the same plan."""
    num_readers = num_processes * readers_per_process
    groups = layout.row_groups
    if not training:
        if len(groups) >= num_readers:
            return _whole_evaluation(groups, num_readers)
        total = layout.num_records
        shares = [total * (g + 1) // num_readers - total * g // num_readers for g in range(num_readers)]
        return _cut(groups, shares, steps=0, dropped=0)

    rng = np.random.default_rng([_ROW_GROUP_ORDER_STREAM, _seed_word(seed), int(epoch)])
    line = [groups[i] for i in rng.permutation(len(groups))]
    total = layout.num_records
    readers = list(range(readers_per_process)) * num_processes  # reader g = r * R + j is reader j of r

    def quotas(steps: int) -> list[int]:
        return [reader_records(steps, j, batch_size, readers_per_process) for j in readers]

    steps = total // (num_processes * batch_size)
    cut = _cut(line, quotas(steps), steps, dropped=total - steps * num_processes * batch_size)
    whole = _whole_training(line, readers, batch_size, readers_per_process, total, quotas)
    # Whole row groups unless they drop more than the cut would read twice (and than a small allowance).
    cut_extra_reads = cut.fetched_records - (total - cut.dropped_records)
    allowance = max(num_processes * batch_size, total // 100, cut_extra_reads)
    if whole is not None and whole.dropped_records - cut.dropped_records <= allowance:
        return whole
    return cut


def part_size(step: int, reader: int, batch_size: int, readers_per_process: int) -> int:
    """Records that reader ``reader`` of a process gives to the process's training batch ``step``."""
    share, extra = divmod(batch_size, readers_per_process)
    if share == 0:  # fewer records than readers: one from each of the first readers, always the same
        return int(reader < extra)
    return share + ((reader + step) % readers_per_process < extra)


def reader_records(steps: int, reader: int, batch_size: int, readers_per_process: int) -> int:
    """Records that reader ``reader`` gives to the first ``steps`` batches."""
    rounds, rest = divmod(steps, readers_per_process)
    per_round = sum(
        part_size(step, reader, batch_size, readers_per_process) for step in range(readers_per_process)
    )
    return rounds * per_round + sum(
        part_size(step, reader, batch_size, readers_per_process) for step in range(rest)
    )


def reader_buffer_size(buffer_batches: int, batch_size: int, readers_per_process: int) -> int:
    """A training reader's shuffle buffer: its share of ``buffer_batches`` batches."""
    return max(1, buffer_batches * batch_size // readers_per_process)


def _seed_word(seed: int) -> int:
    return int(seed) % 2**63


def _cut(line: Sequence[RowGroup], quotas: Sequence[int], steps: int, dropped: int) -> PassPlan:
    """Lay ``line`` end to end and give each reader its next ``quotas[g]`` records."""
    lines: list[list[Segment]] = []
    position, offset = 0, 0  # row group of the line, row within it
    for quota in quotas:
        segments = []
        while quota > 0:
            group = line[position]
            take = min(quota, group.num_rows - offset)
            segments.append(Segment(group, offset, offset + take))
            quota -= take
            offset += take
            if offset == group.num_rows:
                position, offset = position + 1, 0
        lines.append(segments)
    fetched = sum(segment.row_group.num_rows for segments in lines for segment in segments)
    return PassPlan(lines, steps, dropped, fetched, "cut row groups")


def _greedy(line: Sequence[RowGroup], readers: Sequence[int]) -> dict[int, list[RowGroup]]:
    """Each row group in turn to the reader of ``readers`` with the fewest records so far (the lowest
    index on ties)."""
    assigned: dict[int, list[RowGroup]] = {reader: [] for reader in readers}
    heap = [(0, reader) for reader in readers]
    for group in line:
        load, reader = heapq.heappop(heap)
        assigned[reader].append(group)
        heapq.heappush(heap, (load + group.num_rows, reader))
    return assigned


def _whole_training(
    line: Sequence[RowGroup],
    readers: Sequence[int],
    batch_size: int,
    readers_per_process: int,
    total: int,
    quotas: Callable[[int], list[int]],
) -> PassPlan | None:
    """Whole row groups to the readers that give records (``readers[g]`` is reader ``g``'s index in its
    process); None when some reader would get none, or no step can be filled."""
    active = [
        g
        for g, j in enumerate(readers)
        if reader_records(readers_per_process, j, batch_size, readers_per_process)
    ]
    if len(line) < len(active):
        return None
    assigned = _greedy(line, active)
    steps = min(
        _most_steps(sum(group.num_rows for group in assigned[g]), readers[g], batch_size, readers_per_process)
        for g in active
    )
    if steps == 0:
        return None
    lines: list[list[Segment]] = [[] for _ in readers]
    for g, quota in enumerate(quotas(steps)):
        for group in assigned.get(g, []):
            if quota == 0:
                break
            take = min(quota, group.num_rows)
            lines[g].append(Segment(group, 0, take))
            quota -= take
    fetched = sum(segment.row_group.num_rows for segments in lines for segment in segments)
    return PassPlan(lines, steps, total - sum(quotas(steps)), fetched, "whole row groups")


def _most_steps(records: int, reader: int, batch_size: int, readers_per_process: int) -> int:
    """The most steps whose parts reader ``reader`` can fill with ``records`` records."""
    per_round = reader_records(readers_per_process, reader, batch_size, readers_per_process)
    steps = records // per_round * readers_per_process
    while reader_records(steps + 1, reader, batch_size, readers_per_process) <= records:
        steps += 1
    return steps


def _whole_evaluation(groups: Sequence[RowGroup], num_readers: int) -> PassPlan:
    lines = [
        [Segment(group, 0, group.num_rows) for group in assigned]
        for assigned in _greedy(groups, range(num_readers)).values()
    ]
    fetched = sum(group.num_rows for group in groups)
    return PassPlan(lines, 0, 0, fetched, "whole row groups")


# ---- order within a reader -----------------------------------------------------------------------------------


class ReaderOrder:
    """The order in which a reader emits the positions ``0 .. count - 1`` of its line.

    In training a buffer shuffle as ``datasets`` does it (fill a buffer of ``buffer_size``, then each
    incoming position takes the place of a random one, which is emitted; at the end the rest in random
    order), with its own seeded generator; otherwise the identity. It never looks at the records, so
    passing over emitted positions needs no data. ``buffered()`` and ``next_input`` tell which positions
    are still to come: those in the buffer and those from ``next_input`` on.
    """

    _RANDOM_BATCH = 1000

    def __init__(self, count: int, buffer_size: int = 0, rng: np.random.Generator | None = None):
        self.count = count
        self.next_input = 0
        self.buffer_size = buffer_size if rng is not None else 0
        self._buffer: list[int] = []
        self._rng = rng
        self._randoms: Iterator[int] = iter(())
        self._flushing = False

    @classmethod
    def for_reader(
        cls, count: int, *, training: bool, buffer_size: int, seed: int, epoch: int, reader: int
    ) -> ReaderOrder:
        if not training:
            return cls(count)
        return cls(count, buffer_size, np.random.default_rng([_seed_word(seed), int(epoch), int(reader)]))

    def buffered(self) -> list[int]:
        return self._buffer

    def __iter__(self) -> ReaderOrder:
        return self

    def __next__(self) -> int:
        if self.buffer_size == 0:
            if self.next_input >= self.count:
                raise StopIteration
            self.next_input += 1
            return self.next_input - 1
        while not self._flushing and self.next_input < self.count:
            incoming = self.next_input
            self.next_input += 1
            if len(self._buffer) < self.buffer_size:
                self._buffer.append(incoming)
                continue
            slot = self._random_slot()
            emitted, self._buffer[slot] = self._buffer[slot], incoming
            return emitted
        if not self._flushing:
            self._flushing = True
            self._rng.shuffle(self._buffer)
            self._buffer.reverse()  # popped from the end: emitted in shuffled order
        if not self._buffer:
            raise StopIteration
        return self._buffer.pop()

    def _random_slot(self) -> int:
        slot = next(self._randoms, None)
        if slot is None:
            self._randoms = iter(self._rng.integers(0, self.buffer_size, size=self._RANDOM_BATCH).tolist())
            slot = next(self._randoms)
        return slot


def describe(plan: PassPlan, layout: SplitLayout, num_readers: int) -> str:
    """A line for the log: how the pass reads the split."""
    groups = len(layout.row_groups)
    amplification = plan.fetched_records / max(1, layout.num_records - plan.dropped_records)
    text = (
        f"{len(layout.files)} parquet files, {groups} row groups, {layout.num_records} records for "
        f"{num_readers} readers: {plan.mode}, {plan.dropped_records} records dropped per pass, "
        f"{plan.fetched_records} fetched (x{amplification:.2f} the records used)"
    )
    if groups < num_readers:
        text += f"; fewer row groups than readers ({groups} < {num_readers}), so row groups are shared"
    return text


__all__ = [
    "PassPlan",
    "ReaderOrder",
    "RowGroup",
    "Segment",
    "ShardReadError",
    "SplitLayout",
    "describe",
    "part_size",
    "plan_pass",
    "read_layout",
    "reader_buffer_size",
    "reader_records",
    "split_parquet_files",
]
