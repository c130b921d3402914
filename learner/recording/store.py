"""On-disk recording of a run's received wire messages and optimizer steps (replay-from-disk debugging).

Layout of a recording directory::

    header.json            {"format", "format_version", "protocol_version", "run_config",
                            "created_at", "created_at_iso", "segment_bytes"}
    segment-000000.log     records, back to back
    segment-000001.log     ... a new segment starts when the next record would push the
                           current one past ``segment_bytes`` (a bigger record gets its own)

Every record is a fixed 32-byte little-endian header followed by its payload::

    magic     4s   b"SRRC"
    type      u8   1 = message, 2 = step
    flags     u8   0
    reserved  u16  0
    number    u64  record number: 0, 1, 2, ... across all segments
    length    u64  payload length in bytes
    crc       u32  CRC32 of the payload
    hdr_crc   u32  CRC32 of the 28 header bytes before it (so a corrupt length is caught
                   before it is used)

Message payload: ``received_at f64, peer_len u32, peer, n_frames u32``, then each frame as
``len u64, bytes`` -- the frames exactly as they were received, byte for byte.
Step payload: ``written_at f64, step i64``, then the step info as UTF-8 JSON.

Durability: each record is written and flushed (``fsync=True`` also fsyncs) before the append
returns, so a crash leaves at most a partially written last record; the reader stops in front of
it and :meth:`RecordingWriter.open_existing` cuts it off. Records are found by reading their
headers alone (:meth:`RecordingReader.locations`). Recordings written before this code also hold
an ``index.jsonl`` (a shortcut to those positions): it is not read, and ``open_existing`` removes it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from protocol.buffers import FrameListError, byte_view, frame_list_parts, read_frame_list
from protocol.messages import SCHEMA_VERSION

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Location",
    "Record",
    "RecordingError",
    "RecordingReader",
    "RecordingWriter",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "streamrlhf-recording"
FORMAT_VERSION = 1
MAGIC = b"SRRC"
HEADER_FILE = "header.json"
OLD_INDEX_FILE = "index.jsonl"  # written by earlier versions of this code; nothing reads it
_SEGMENT_RE = re.compile(r"^segment-(\d{6,})\.log$")

_HEAD = struct.Struct("<4sBBHQQI")  # magic, type, flags, reserved, number, payload length, payload crc
_HEAD_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _HEAD_CRC.size  # 32
_MSG_PREFIX = struct.Struct("<dI")  # received_at, peer length
_STEP_PREFIX = struct.Struct("<dq")  # written_at, step

_TYPE_MESSAGE, _TYPE_STEP = 1, 2
_KINDS = {_TYPE_MESSAGE: "message", _TYPE_STEP: "step"}
_READ_CHUNK = 1 << 20


def segment_name(index: int) -> str:
    return f"segment-{index:06d}.log"


# --------------------------------------------------------------------------- errors and records


class RecordingError(ValueError):
    """A recording is damaged or unusable.

    Attributes: ``file`` (path of the file at fault), ``record`` (record number or None),
    ``offset`` (byte offset of the record inside ``file`` or None), ``problem`` (what is wrong) and
    ``code``, a short stable string: ``missing_header``, ``bad_header``, ``protocol_version``,
    ``missing_segment``, ``bad_magic``, ``bad_record_header``, ``bad_number``, ``truncated``,
    ``crc_mismatch``, ``bad_payload``, ``not_resumable``.
    """

    def __init__(self, code: str, file: str | os.PathLike, problem: str, *, record: int | None = None,
                 offset: int | None = None) -> None:
        self.code = code
        self.file = str(file)
        self.record = record
        self.offset = offset
        self.problem = problem
        where = self.file
        if record is not None:
            where += f": record {record}"
        if offset is not None:
            where += f" at byte offset {offset}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Record:
    """One record. Message records have ``peer`` and ``frames``; step records ``step`` and ``info``.

    ``received_at`` is the receive time (messages) or write time (steps), seconds since the epoch.
    ``segment`` / ``offset``: where the record starts on disk.
    """

    number: int
    kind: str  # "message" | "step"
    received_at: float
    peer: bytes | None = None
    frames: list[bytes] | None = None
    step: int | None = None
    info: dict | None = None
    segment: int = field(default=0, compare=False)
    offset: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Location:
    """Where record ``number`` lies (segment index, byte offset of its header) and what its header says."""

    number: int
    kind: str
    segment: int
    offset: int
    payload_len: int
    crc: int

    @property
    def end(self) -> int:
        """The byte offset just after the record."""
        return self.offset + HEADER_BYTES + self.payload_len


def _pack_header(rtype: int, number: int, payload_len: int, crc: int) -> bytes:
    head = _HEAD.pack(MAGIC, rtype, 0, 0, number, payload_len, crc)
    return head + _HEAD_CRC.pack(zlib.crc32(head))


def _json_default(obj: Any) -> Any:
    # numpy scalars / arrays (and anything else exposing tolist / item) become plain Python values
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fully(fd: int, parts: list[Any]) -> None:
    """Write every buffer (no copies), resuming after partial writes."""
    bufs = [v for v in (byte_view(p) for p in parts) if v.nbytes]
    i = 0
    while i < len(bufs):
        if hasattr(os, "writev"):
            n = os.writev(fd, bufs[i : i + 512])
        else:  # pragma: no cover - platforms without writev
            n = os.write(fd, bufs[i])
        while n > 0:
            if n >= bufs[i].nbytes:
                n -= bufs[i].nbytes
                i += 1
            else:
                bufs[i] = bufs[i][n:]
                n = 0


# --------------------------------------------------------------------------- reading primitives


def _read_header(f: BinaryIO, path: Path, offset: int, size: int, expected: int) -> Location:
    """Parse and check the record header at ``offset`` (file position must be there)."""
    if size - offset < HEADER_BYTES:
        raise RecordingError("truncated", path, f"truncated record: only {size - offset} of the "
                             f"{HEADER_BYTES} header bytes are present", record=expected, offset=offset)
    raw = f.read(HEADER_BYTES)
    if len(raw) != HEADER_BYTES:
        raise RecordingError("truncated", path, "truncated record: short read of the header",
                             record=expected, offset=offset)
    magic, rtype, flags, reserved, number, length, crc = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise RecordingError("bad_magic", path, f"bad magic {magic!r} (expected {MAGIC!r})",
                             record=expected, offset=offset)
    (hcrc,) = _HEAD_CRC.unpack_from(raw, _HEAD.size)
    if zlib.crc32(raw[: _HEAD.size]) != hcrc:
        raise RecordingError("bad_record_header", path, "record header CRC mismatch (header bytes corrupt)",
                             record=expected, offset=offset)
    if rtype not in _KINDS or flags or reserved:
        raise RecordingError("bad_record_header", path, f"unknown record type {rtype} / flags {flags}",
                             record=expected, offset=offset)
    if number != expected:
        raise RecordingError("bad_number", path, f"record number {number} found where {expected} was expected",
                             record=expected, offset=offset)
    if offset + HEADER_BYTES + length > size:
        raise RecordingError("truncated", path, f"truncated record: payload of {length} bytes declared, "
                             f"only {size - offset - HEADER_BYTES} present", record=expected, offset=offset)
    return Location(number, _KINDS[rtype], -1, offset, length, crc)


class _PayloadReader:
    """Reads a payload piecewise from the file, bounds-checked, accumulating its CRC."""

    def __init__(self, f: BinaryIO, pos: Location, path: Path) -> None:
        self.f, self.pos, self.path = f, pos, path
        self.left = pos.payload_len
        self.crc = 0

    def fail(self, code: str, problem: str) -> RecordingError:
        return RecordingError(code, self.path, problem, record=self.pos.number, offset=self.pos.offset)

    def read(self, n: int, what: str) -> bytes:
        if n > self.left:
            # the CRC decides whether this is corruption or a writer bug; report the CRC first
            self.finish(check_left=False)
            raise self.fail("bad_payload", f"payload inconsistent: {what} needs {n} bytes, {self.left} left")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail("truncated", f"truncated record: short read of {what}")
        self.left -= n
        self.crc = zlib.crc32(data, self.crc)
        return data

    def finish(self, check_left: bool = True) -> None:
        while self.left and not check_left:
            chunk = self.f.read(min(self.left, _READ_CHUNK))
            if not chunk:
                raise self.fail("truncated", "truncated record: short read of the payload")
            self.left -= len(chunk)
            self.crc = zlib.crc32(chunk, self.crc)
        if self.crc != self.pos.crc:
            raise self.fail("crc_mismatch", f"CRC mismatch: payload CRC32 {self.crc:#010x}, "
                            f"header says {self.pos.crc:#010x}")
        if check_left and self.left:
            raise self.fail("bad_payload", f"payload inconsistent: {self.left} unparsed trailing bytes")


def _read_payload(f: BinaryIO, pos: Location, path: Path) -> Record:
    """Read and verify the payload of the record whose header ``pos`` describes (file positioned after it)."""
    p = _PayloadReader(f, pos, path)
    if pos.kind == "message":
        received_at, peer_len = _MSG_PREFIX.unpack(p.read(_MSG_PREFIX.size, "message prefix"))
        peer = p.read(peer_len, "peer identity")
        try:
            frames = read_frame_list(p.read, p.left)
        except FrameListError as exc:
            p.finish(check_left=False)
            raise p.fail("bad_payload", f"payload inconsistent: {exc}") from None
        p.finish()
        return Record(pos.number, "message", received_at, peer=peer, frames=frames,
                      segment=pos.segment, offset=pos.offset)
    written_at, step = _STEP_PREFIX.unpack(p.read(_STEP_PREFIX.size, "step prefix"))
    text = p.read(p.left, "step info")
    p.finish()
    try:
        info = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise p.fail("bad_payload", f"step info is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise p.fail("bad_payload", f"step info is a {type(info).__name__}, expected an object")
    return Record(pos.number, "step", written_at, step=step, info=info, segment=pos.segment, offset=pos.offset)


def _list_segments(directory: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for entry in directory.iterdir():
        m = _SEGMENT_RE.match(entry.name)
        if m and entry.is_file():
            found[int(m.group(1))] = entry
    segments = []
    for i in range(len(found)):
        if i not in found:
            missing = directory / segment_name(i)
            raise RecordingError("missing_segment", missing, f"segment file missing "
                                 f"(segments present: {sorted(found)})")
        segments.append(found[i])
    return segments


def _load_header(directory: Path, protocol_version: int | None) -> dict:
    path = directory / HEADER_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        what = "not a recording (missing header.json)" if directory.is_dir() else "recording directory does not exist"
        raise RecordingError("missing_header", path, what) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError("bad_header", path, f"cannot read header: {exc}") from None
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise RecordingError("bad_header", path, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise RecordingError("bad_header", path, f"not a {FORMAT_NAME} header")
    if header.get("format_version") != FORMAT_VERSION:
        raise RecordingError("bad_header", path, f"recording format version {header.get('format_version')!r} "
                             f"is not supported (this code reads version {FORMAT_VERSION})")
    if protocol_version is not None and header.get("protocol_version") != protocol_version:
        raise RecordingError("protocol_version", path, f"protocol version mismatch: recording was written with "
                             f"protocol schema version {header.get('protocol_version')!r}, this code speaks "
                             f"{protocol_version}")
    return header


def _cut_torn_tail(directory: Path, segments: list[Path], damage: RecordingError, fsync: bool) -> int:
    """Cut off a torn last record (a crash while writing it), found damaged as `damage`; returns the
    index of the segment cut. A damaged record that is not the last one is refused."""
    cut_seg = next((i for i, p in enumerate(segments) if str(p) == damage.file), None)
    if cut_seg is None or damage.offset is None:
        raise RecordingError("not_resumable", damage.file, f"cannot resume: {damage.problem}",
                             record=damage.record, offset=damage.offset)
    path = segments[cut_seg]
    last = cut_seg == len(segments) - 1 or all(p.stat().st_size == 0 for p in segments[cut_seg + 1:])
    if not (last and (damage.code == "truncated" or _unfinished(path, damage))):
        raise RecordingError("not_resumable", damage.file,
                             f"cannot resume: damage before the last record ({damage.problem})",
                             record=damage.record, offset=damage.offset)
    log.warning("recording %s: cutting off a torn last record: %s (%d bytes dropped)",
                directory, damage, path.stat().st_size - damage.offset)
    with open(path, "r+b") as f:
        f.truncate(damage.offset)
        if fsync:
            os.fsync(f.fileno())
    for extra in segments[cut_seg + 1:]:  # empty segments after the torn one
        extra.unlink()
    return cut_seg


def _unfinished(path: Path, damage: RecordingError) -> bool:
    """Whether the damaged bytes from `damage.offset` to the end of `path` are a last record whose
    writing did not finish: zeros (space allocated, nothing written), or exactly one record whose
    payload is wrong (written, not flushed)."""
    with open(path, "rb") as f:
        f.seek(damage.offset)
        tail = f.read()
    if not tail.strip(b"\0"):
        return True
    if len(tail) < HEADER_BYTES or damage.code not in ("crc_mismatch", "bad_payload"):
        return False
    length = _HEAD.unpack_from(tail)[5]
    return HEADER_BYTES + length == len(tail)


# --------------------------------------------------------------------------- reader


class RecordingReader:
    """Reads a recording directory.

    ``on_damage="raise"`` (default) raises :class:`RecordingError` at the first damaged record;
    ``"stop"`` ends iteration in front of it and keeps the error in :attr:`damage` (every record
    before the damage is yielded, so a crashed run's recording stays usable).
    ``protocol_version``: the header must match it (default: this code's
    ``protocol.messages.SCHEMA_VERSION``; None skips the check).
    """

    def __init__(self, directory: str | os.PathLike, *, on_damage: str = "raise",
                 protocol_version: int | None = SCHEMA_VERSION) -> None:
        if on_damage not in ("raise", "stop"):
            raise ValueError(f"on_damage must be 'raise' or 'stop', got {on_damage!r}")
        self.directory = Path(directory)
        self.on_damage = on_damage
        self.header: dict = _load_header(self.directory, protocol_version)
        self.damage: RecordingError | None = None
        self._located: tuple[list[Location], RecordingError | None] | None = None

    def segments(self) -> list[Path]:
        """The segment files, in order (RecordingError ``missing_segment`` if one is missing)."""
        return _list_segments(self.directory)

    def _damaged(self, err: RecordingError) -> None:
        self.damage = err
        if self.on_damage == "raise":
            raise err

    def __iter__(self) -> Iterator[Record]:
        """Every record in order, each CRC-checked (the recording as it is now: read afresh)."""
        self.damage = None
        try:
            segments = self.segments()
            locations, damage = _scan_headers(segments)
        except RecordingError as err:
            self._damaged(err)
            return
        for location in locations:
            try:
                record = _read_record(segments[location.segment], location)
            except RecordingError as err:
                self._damaged(err)
                return
            yield record
        if damage is not None:
            self._damaged(damage)

    def messages(self) -> Iterator[Record]:
        return (r for r in self if r.kind == "message")

    def steps(self) -> Iterator[Record]:
        return (r for r in self if r.kind == "step")

    # ----------------------------------------------------------- random access

    def locations(self) -> tuple[list[Location], RecordingError | None]:
        """Where every record with an intact header lies, in order, found by reading the headers
        alone (payloads are CRC-checked when a record is read), and the error at the first damaged
        header (None if there is none). Read once, on first use."""
        if self._located is None:
            self._located = _scan_headers(self.segments())
        return self._located

    def __len__(self) -> int:
        """Number of records with an intact header (their payloads are not CRC-checked here)."""
        locations, damage = self.locations()
        if damage is not None and self.on_damage == "raise":
            raise damage
        return len(locations)

    def record(self, number: int) -> Record:
        """Record ``number``, CRC-checked."""
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise IndexError(f"record number must be a non-negative int, got {number!r}")
        locations, damage = self.locations()
        if number >= len(locations):
            if damage is not None:
                raise damage
            raise IndexError(f"record {number} does not exist (the recording has {len(locations)} records)")
        location = locations[number]
        return _read_record(self.segments()[location.segment], location)


def _read_record(path: Path, location: Location) -> Record:
    """The record at `location` in segment `path`, its payload CRC-checked."""
    with open(path, "rb") as f:
        f.seek(location.offset + HEADER_BYTES)
        return _read_payload(f, location, path)


def _scan_headers(segments: list[Path]) -> tuple[list[Location], RecordingError | None]:
    """The locations of the records in `segments` up to the first damaged header, and its error."""
    locations: list[Location] = []
    for seg_idx, path in enumerate(segments):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < size:
                f.seek(offset)
                try:
                    head = _read_header(f, path, offset, size, len(locations))
                except RecordingError as err:
                    return locations, err
                locations.append(Location(head.number, head.kind, seg_idx, offset, head.payload_len, head.crc))
                offset = locations[-1].end
    return locations, None


# --------------------------------------------------------------------------- writer


class RecordingWriter:
    """Appends records to a new recording directory (or, via :meth:`open_existing`, to an old one).

    Thread-safe: appends are serialised by a lock. Every record is flushed to the OS before the
    append returns (``fsync=True`` also forces it to disk).
    """

    def __init__(self, directory: str | os.PathLike, *, run_config: dict, protocol_version: int,
                 segment_bytes: int = 256 << 20, fsync: bool = False) -> None:
        if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int) or segment_bytes <= HEADER_BYTES:
            raise ValueError(f"segment_bytes must be an int > {HEADER_BYTES}, got {segment_bytes!r}")
        if not isinstance(run_config, dict):
            raise TypeError(f"run_config must be a dict, got {type(run_config).__name__}")
        if isinstance(protocol_version, bool) or not isinstance(protocol_version, int):
            raise TypeError(f"protocol_version must be an int, got {protocol_version!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / HEADER_FILE).exists() or any(_SEGMENT_RE.match(p.name) for p in directory.iterdir()):
            raise FileExistsError(f"{directory} already holds a recording (use RecordingWriter.open_existing to append)")
        now = time.time()
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "protocol_version": protocol_version,
            "run_config": run_config,
            "created_at": now,
            "created_at_iso": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
            "segment_bytes": segment_bytes,
        }
        text = _to_json(header, "run_config")
        tmp = directory / (HEADER_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, directory / HEADER_FILE)
        self._setup(directory, segment_bytes=segment_bytes, fsync=fsync, seg_idx=0, seg_size=0, next_number=0)
        self.header = header
        if fsync:
            _fsync_dir(directory)

    def _setup(self, directory: Path, *, segment_bytes: int, fsync: bool, seg_idx: int, seg_size: int,
               next_number: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._closed = False
        self._broken: BaseException | None = None
        self._seg_idx = seg_idx
        self._seg_size = seg_size
        self._next = next_number
        self._seg = open(directory / segment_name(seg_idx), "ab", buffering=0)

    @classmethod
    def open_existing(cls, directory: str | os.PathLike, *, fsync: bool = False,
                      segment_bytes: int | None = None) -> "RecordingWriter":
        """Reopen a recording for appending; numbering continues after its last intact record.

        Every record header is read, and the last record's payload. A torn last record (a crash
        while writing it) is cut off with a log warning; a damaged header anywhere else raises
        :class:`RecordingError` (``code="not_resumable"``) and changes nothing (payload CRCs of
        earlier records are checked by the reader / ``--validate``). ``segment_bytes`` defaults to
        the value in the header.
        """
        directory = Path(directory)
        reader = RecordingReader(directory, on_damage="stop")
        segments = reader.segments()
        locations, damage = reader.locations()
        locations = list(locations)
        if locations and damage is None:
            try:  # the header scan does not read payloads: check the last one
                reader.record(locations[-1].number)
            except RecordingError as err:
                damage = err
                locations.pop()
        if damage is not None:
            seg_idx = _cut_torn_tail(directory, segments, damage, fsync)
        else:
            seg_idx = max(len(segments) - 1, 0)
        (directory / OLD_INDEX_FILE).unlink(missing_ok=True)
        segment = directory / segment_name(seg_idx)
        self = cls.__new__(cls)
        self._setup(directory, segment_bytes=segment_bytes or int(reader.header.get("segment_bytes", 256 << 20)),
                    fsync=fsync, seg_idx=seg_idx, seg_size=segment.stat().st_size if segment.exists() else 0,
                    next_number=len(locations))
        self.header = reader.header
        return self

    # ----------------------------------------------------------- appending

    @property
    def next_number(self) -> int:
        """Number the next record will get (= number of records written so far)."""
        return self._next

    def append_message(self, peer: bytes, frames: Sequence[Any], *, received_at: float | None = None) -> int:
        """Store one received wire message byte for byte; returns its record number.

        ``frames``: bytes-like objects (bytes, memoryview, zmq.Frame, numpy arrays), written as they
        are (no copy). ``received_at`` defaults to now.
        """
        peer_b = bytes(peer)
        frame_list = frame_list_parts(frames)
        if received_at is None:
            received_at = time.time()
        received_at = float(received_at)
        return self._append(_TYPE_MESSAGE, [_MSG_PREFIX.pack(received_at, len(peer_b)), peer_b, *frame_list])

    def append_step(self, step: int, info: dict, *, written_at: float | None = None) -> int:
        """Store one optimizer-step record; returns its record number.

        ``info`` is any JSON-able dict (numpy scalars / arrays are converted). Keys the inspector
        understands: ``consumed`` (list of message record numbers the step trained on),
        ``weight_version`` (version produced), ``seeds`` (dict), ``metrics`` (dict name -> float;
        loss / reward / kl entries are shown by ``--steps``). ``written_at`` defaults to now.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        if not isinstance(info, dict):
            raise TypeError(f"info must be a dict, got {type(info).__name__}")
        text = _to_json(info, f"step {step} info").encode("utf-8")
        written_at = time.time() if written_at is None else float(written_at)
        return self._append(_TYPE_STEP, [_STEP_PREFIX.pack(written_at, step), text])

    def _append(self, rtype: int, parts: list[Any]) -> int:
        length = 0
        crc = 0
        for part in parts:
            length += memoryview(part).nbytes
            crc = zlib.crc32(part, crc)
        with self._lock:
            if self._closed:
                raise ValueError("recording writer is closed")
            if self._broken is not None:
                raise RuntimeError(f"recording writer is unusable after an earlier write error: {self._broken}")
            if self._seg_size > 0 and self._seg_size + HEADER_BYTES + length > self.segment_bytes:
                self._roll()
            number = self._next
            start = self._seg_size
            try:
                _write_fully(self._seg.fileno(), [_pack_header(rtype, number, length, crc), *parts])
                if self.fsync:
                    os.fsync(self._seg.fileno())
            except BaseException as exc:
                self._undo(start, exc)
                raise
            self._seg_size = start + HEADER_BYTES + length
            self._next = number + 1
            return number

    def _undo(self, start: int, exc: BaseException) -> None:
        """Remove a partly written record so that the file ends at a record boundary again."""
        try:
            os.ftruncate(self._seg.fileno(), start)
        except Exception:
            self._broken = exc

    def _roll(self) -> None:
        self._seg.close()
        self._seg_idx += 1
        self._seg = open(self.directory / segment_name(self._seg_idx), "ab", buffering=0)
        self._seg_size = 0
        if self.fsync:
            _fsync_dir(self.directory)

    # ----------------------------------------------------------- closing

    def flush(self) -> None:
        """Force everything written so far to disk (fsync), whatever the ``fsync`` setting."""
        with self._lock:
            if not self._closed:
                os.fsync(self._seg.fileno())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.fsync:
                    os.fsync(self._seg.fileno())
            finally:
                self._seg.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass
