"""The durable local spool of one sink: events it could not take yet, in order, on disk until delivered.

Layout of a spool directory (one per sink, `<spool_dir>/<sink>/`):

    0000000000000007.seg   events as JSON lines, appended and fsync'd; read oldest segment first
    0000000000000007.ack   how many bytes of that segment were already delivered (absent: none)
    .lock                  flock held by the process that owns the directory

A segment is deleted once all of it was delivered. Sequence numbers order segments; `reserve()` hands one out
before a batch is sent, so if the sink fails half way the undelivered rest can be written *before* events
that overflowed to the spool meanwhile, and order holds.

Crash safety: an append returns only after fsync, so a spooled event survives a crash of the process or the
machine. A torn last line (a crash mid-append, before the append returned) is cut off at the next open. The
ack file is replaced without fsync: after a power loss it may be stale, which re-sends events (at least
once), never loses them.

Several processes (`serve --workers N`) may share a spool path: each claims a slot with flock (the directory
itself, then `worker-1`, `worker-2`, ...) and, at open, adopts the segments of slots no live process holds.

Blocking file I/O: the lane calls these methods in a worker thread; one lock serialises them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.billing._event import Record

__all__ = ["Spool"]

log = logging.getLogger("gateway.billing")

_MAX_SLOTS = 1024
# A batch read from the spool never needs more than this many bytes (unless one event is larger).
_READ_BYTES = 8 << 20


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    size: int  # bytes written and fsync'd
    offset: int  # bytes already delivered
    count: int  # events not yet delivered

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(".ack")


class Spool:
    def __init__(self, root: Path, *, segment_bytes: int = 64 << 20) -> None:
        self.root = root
        self.dir = root
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []  # ordered by seq
        self._last_seq = 0
        self._pending = 0
        self._peeked: list[int] = []  # byte length of each record the last peek returned
        self._lock = threading.Lock()
        self._lock_fd: int | None = None

    @property
    def pending(self) -> int:
        """Events waiting in the spool."""
        return self._pending

    def open(self) -> None:
        """Claim a slot, adopt orphaned slots, and load what a previous run left (blocking I/O)."""
        with self._lock:
            self.dir, self._lock_fd = _claim_slot(self.root)
            for path in sorted(self.dir.glob("*.seg")):
                segment = _load(path)
                if segment is not None:
                    self._segments.append(segment)
                    self._last_seq = max(self._last_seq, segment.seq)
            self._adopt_orphans()
            self._pending = sum(s.count for s in self._segments)

    def close(self) -> None:
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def reserve(self) -> int:
        """A sequence number for events about to be sent, should their undelivered rest come back here."""
        with self._lock:
            self._last_seq += 1
            return self._last_seq

    def append(self, records: Sequence[Record], seq: int | None = None) -> None:
        """Write `records` durably: to segment `seq` (from `reserve`), else after everything spooled so far."""
        if not records:
            return
        data = b"".join([payload + b"\n" for _, payload in records])
        with self._lock:
            tail = self._segments[-1] if self._segments else None
            if seq is None and tail is not None and tail.seq == self._last_seq and tail.size < self._segment_bytes:
                segment = tail
            else:
                if seq is None:
                    self._last_seq += 1
                    seq = self._last_seq
                segment = _Segment(seq, self.dir / f"{seq:016d}.seg", 0, 0, 0)
            new = segment is not tail
            _write(segment.path, data, segment.size)
            if new:
                _fsync_dir(self.dir)  # the new file's name must survive a crash too
                self._segments.append(segment)
                self._segments.sort(key=lambda s: s.seq)
            segment.size += len(data)
            segment.count += len(records)
            self._pending += len(records)

    def peek(self, limit: int) -> list[Record]:
        """Up to `limit` of the oldest events, in order; `commit` says how many of them were delivered."""
        with self._lock:
            self._peeked = []
            while self._segments:
                segment = self._segments[0]
                records = self._read(segment, limit)
                if records:
                    return records
                # Nothing readable is left in it (only corrupt lines were, and they are set aside).
                self._pending -= segment.count
                self._drop(segment)
            return []

    def commit(self, delivered: int) -> None:
        """The first `delivered` events of the last peek reached the sink: never send them again."""
        with self._lock:
            if delivered <= 0 or not self._segments:
                return
            segment = self._segments[0]
            segment.offset += sum(self._peeked[:delivered])
            segment.count -= delivered
            self._pending -= delivered
            self._peeked = []
            # The in-memory state above is what prevents a re-send in this run; the files only matter for
            # the next one, so failing to update them is logged, not raised.
            try:
                if segment.count == 0 and segment.offset >= segment.size:
                    self._drop(segment)
                else:
                    tmp = segment.ack_path.with_suffix(".ack.tmp")
                    tmp.write_bytes(str(segment.offset).encode())
                    os.replace(tmp, segment.ack_path)
            except OSError:
                log.warning("billing spool %s: cannot record progress; a restart may re-send events", self.dir)

    def _read(self, segment: _Segment, limit: int) -> list[Record]:
        if segment.count == 0 or segment.offset >= segment.size:
            return []
        with open(segment.path, "rb") as f:
            f.seek(segment.offset)
            want = segment.size - segment.offset
            data = f.read(min(want, _READ_BYTES))
            if b"\n" not in data:
                data += f.read(want - len(data))
        records: list[Record] = []
        start = 0
        while len(records) < limit:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            try:
                rid = orjson.loads(line)["id"]
                if not isinstance(rid, str):
                    raise TypeError("id")
            except (orjson.JSONDecodeError, KeyError, TypeError):
                if records:
                    break  # deliver the good ones first; the bad line is set aside on the next peek
                self._set_aside(segment, line)
                start = end + 1
                continue
            records.append((rid, line))
            self._peeked.append(end + 1 - start)
            start = end + 1
        return records

    def _set_aside(self, segment: _Segment, line: bytes) -> None:
        # Not a billing event (disk corruption): keep the bytes for a human, never block the events after it.
        log.error("billing spool %s: a corrupt line is set aside in corrupt.jsonl", self.dir)
        with open(self.dir / "corrupt.jsonl", "ab") as f:
            f.write(line + b"\n")
        segment.offset += len(line) + 1
        segment.count -= 1
        self._pending -= 1

    def _drop(self, segment: _Segment) -> None:
        self._segments.remove(segment)
        for path in (segment.path, segment.ack_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _adopt_orphans(self) -> None:
        """Move in the segments of slots whose process is gone (e.g. fewer workers than last time)."""
        slots = [self.root, *sorted(p for p in self.root.glob("worker-*") if p.is_dir())]
        for slot in slots:
            if slot == self.dir:
                continue
            fd = _try_lock(slot)
            if fd is None:
                continue  # a live process owns it
            try:
                for path in sorted(slot.glob("*.seg")):
                    segment = _load(path)
                    if segment is None:
                        continue
                    self._last_seq += 1
                    target = self.dir / f"{self._last_seq:016d}.seg"
                    if segment.offset:
                        os.replace(segment.ack_path, target.with_suffix(".ack"))
                    os.replace(path, target)
                    self._segments.append(_Segment(self._last_seq, target, segment.size, segment.offset, segment.count))
                    log.info("billing spool %s: adopted %d events from %s", self.dir, segment.count, slot)
            finally:
                os.close(fd)


def _slot(root: Path, k: int) -> Path:
    return root if k == 0 else root / f"worker-{k}"


def _try_lock(directory: Path) -> int | None:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _claim_slot(root: Path) -> tuple[Path, int]:
    for k in range(_MAX_SLOTS):
        directory = _slot(root, k)
        fd = _try_lock(directory)
        if fd is not None:
            return directory, fd
    raise OSError(f"no free spool slot under {root}")


def _load(path: Path) -> _Segment | None:
    """A segment left by an earlier run, its torn tail cut off; None (and deleted) if all of it was delivered."""
    seq = int(path.stem)
    ack = path.with_suffix(".ack")
    size = path.stat().st_size
    offset = 0
    with contextlib.suppress(FileNotFoundError, ValueError):
        offset = int(ack.read_bytes())
    if not 0 <= offset <= size:
        offset = 0  # a damaged ack: re-send rather than lose
    data = path.read_bytes()[offset:]
    if data and not data.endswith(b"\n"):
        keep = offset + data.rfind(b"\n") + 1
        os.truncate(path, keep)
        data, size = data[: keep - offset], keep
    count = data.count(b"\n")
    segment = _Segment(seq, path, size, offset, count)
    if count == 0:
        for p in (path, ack):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return None
    return segment


def append_durably(fd: int, data: bytes, size: int) -> None:
    """Append all of `data` and fsync; on failure cut the file back to `size`, so no torn line is left
    for the next append to glue onto."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def _write(path: Path, data: bytes, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        append_durably(fd, data, size)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
