"""On-disk recording: format round trip, segments, index, damage handling, resume, inspect CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from learner.recording.store import (
    HEADER_BYTES,
    Location,
    Record,
    RecordingError,
    RecordingReader,
    RecordingWriter,
)
from protocol import SCHEMA_VERSION, PackedBatch, decode, encode

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = {"run_id": "run-rec", "train": {"num_steps": 3}}


def _writer(path: Path, **kw) -> RecordingWriter:
    return RecordingWriter(path, run_config=RUN_CONFIG, protocol_version=SCHEMA_VERSION, **kw)


def _frames(i: int) -> list:
    """A message with several frames of different buffer types, including empty ones."""
    return [
        f"header-{i}".encode(),
        b"",
        memoryview(bytearray(range(i % 7 + 3))),
        np.arange(i + 1, dtype=np.float32),  # written as its raw bytes
        b"",
    ]


def _raw(frames: list) -> list[bytes]:
    return [memoryview(f).cast("B").tobytes() if memoryview(f).nbytes else b"" for f in frames]


def _build(path: Path, n_messages: int = 6, **kw) -> list[tuple[str, object]]:
    """Write messages with a step record after every second one; returns what was written, in order."""
    written = []
    with _writer(path, **kw) as w:
        for i in range(n_messages):
            frames = _frames(i)
            assert w.append_message(f"peer-{i % 2}".encode(), frames, received_at=1000.0 + i) == len(written)
            written.append(("message", (f"peer-{i % 2}".encode(), _raw(frames), 1000.0 + i)))
            if i % 2 == 1:
                info = {"consumed": [len(written) - 2, len(written) - 1], "weight_version": i // 2 + 1,
                        "seeds": {"torch": 7}, "metrics": {"policy_loss": np.float32(0.5), "reward_mean": 0.25}}
                assert w.append_step(i // 2, info) == len(written)
                written.append(("step", (i // 2, info)))
    return written


def _check(records: list[Record], written: list) -> None:
    assert [r.number for r in records] == list(range(len(records)))
    for rec, (kind, data) in zip(records, written):
        assert rec.kind == kind
        if kind == "message":
            peer, frames, ts = data
            assert rec.peer == peer and rec.frames == frames and rec.received_at == ts
            assert all(type(f) is bytes for f in rec.frames)
            assert rec.info is None and rec.step is None
        else:
            step, info = data
            assert rec.step == step and rec.peer is None and rec.frames is None
            assert rec.info == json.loads(json.dumps(info, default=lambda o: o.item()))


def _segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("segment-*.log"))


def _locations(path: Path) -> list[Location]:
    locations, damage = RecordingReader(path).locations()
    assert damage is None
    return locations


# --------------------------------------------------------------------------- format


def test_round_trip_messages_and_steps(tmp_path):
    rec_dir = tmp_path / "rec"
    written = _build(rec_dir)
    reader = RecordingReader(rec_dir)
    assert reader.header["protocol_version"] == SCHEMA_VERSION
    assert reader.header["run_config"] == RUN_CONFIG
    assert reader.header["format_version"] == 1 and isinstance(reader.header["created_at"], float)
    records = list(reader)
    assert len(records) == len(written) == 9 and reader.damage is None
    _check(records, written)
    assert [r.number for r in reader.messages()] == [0, 1, 3, 4, 6, 7]
    assert [r.step for r in reader.steps()] == [0, 1, 2]
    assert len(reader) == 9
    # the records' headers locate every one of them, back to back
    locations = _locations(rec_dir)
    assert [loc.number for loc in locations] == list(range(9))
    assert [loc.kind for loc in locations] == [r.kind for r in records]
    assert [loc.offset for loc in locations[1:]] == [loc.end for loc in locations[:-1]]
    assert locations[-1].end == sum(p.stat().st_size for p in _segment_files(rec_dir))
    assert not (rec_dir / "index.jsonl").exists()


def test_real_wire_message_is_stored_byte_for_byte(tmp_path):
    frames = encode(_batch(), run_id="run-rec", producer_id="rollout-0", seq=1, weight_version=0)
    with _writer(tmp_path / "rec") as w:
        w.append_message(b"rollout-0", frames)
    (rec,) = RecordingReader(tmp_path / "rec").messages()
    assert rec.frames == [bytes(f) for f in frames]
    assert decode(rec.frames, expected_run_id="run-rec").body == _batch()


def test_segment_roll_over_and_numbering(tmp_path):
    rec_dir = tmp_path / "rec"
    with _writer(rec_dir, segment_bytes=256) as w:
        for i in range(10):
            w.append_message(b"p", [bytes(60)])  # 32 + 25 + 68 = 125 bytes per record: 2 per segment
        big = w.append_message(b"p", [bytes(1000)])  # larger than a segment: a segment of its own
        after = w.append_step(0, {})
    segments = _segment_files(rec_dir)
    assert [p.name for p in segments[:2]] == ["segment-000000.log", "segment-000001.log"]
    assert len(segments) == 7
    assert all(p.stat().st_size <= 256 for i, p in enumerate(segments) if i != 5)
    assert segments[5].stat().st_size > 256
    reader = RecordingReader(rec_dir)
    records = list(reader)
    assert [r.number for r in records] == list(range(12)) and (big, after) == (10, 11)
    assert [r.segment for r in records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6]
    assert [loc.segment for loc in _locations(rec_dir)] == [r.segment for r in records]
    assert reader.record(10).frames == [bytes(1000)]


def test_random_access(tmp_path):
    rec_dir = tmp_path / "rec"
    written = _build(rec_dir, segment_bytes=300)
    assert len(_segment_files(rec_dir)) > 2
    expected = list(RecordingReader(rec_dir))
    reader = RecordingReader(rec_dir)
    for n in (7, 0, 8, 3):
        assert reader.record(n) == expected[n]
    with pytest.raises(IndexError, match="does not exist"):
        reader.record(len(written))


def test_recording_with_the_index_of_earlier_versions(tmp_path):
    """Earlier versions also wrote index.jsonl: such a recording reads the same, and appending to it
    removes the index (it would no longer match)."""
    rec_dir = tmp_path / "rec"
    _build(rec_dir)
    expected = list(RecordingReader(rec_dir))
    lines = [json.dumps({"number": loc.number, "kind": loc.kind, "segment": loc.segment, "offset": loc.offset,
                         "length": loc.end - loc.offset, "crc": loc.crc}) + "\n" for loc in _locations(rec_dir)]
    (rec_dir / "index.jsonl").write_text("".join(lines))
    assert list(RecordingReader(rec_dir)) == expected and RecordingReader(rec_dir).record(8) == expected[8]
    with RecordingWriter.open_existing(rec_dir) as w:
        assert w.append_step(9, {}) == len(expected)
    assert not (rec_dir / "index.jsonl").exists()
    assert list(RecordingReader(rec_dir))[:-1] == expected


# --------------------------------------------------------------------------- damage


def _cut_last_record_in_half(rec_dir: Path) -> tuple[Path, int, int]:
    last = _locations(rec_dir)[-1]
    seg = rec_dir / f"segment-{last.segment:06d}.log"
    with open(seg, "r+b") as f:
        f.truncate(last.offset + (last.end - last.offset) // 2)
    return seg, last.number, last.offset


def test_truncated_tail_stop_and_raise(tmp_path):
    rec_dir = tmp_path / "rec"
    written = _build(rec_dir, segment_bytes=300)
    seg, number, offset = _cut_last_record_in_half(rec_dir)

    reader = RecordingReader(rec_dir, on_damage="stop")
    records = list(reader)
    _check(records, written[:-1])
    assert len(records) == number
    err = reader.damage
    assert isinstance(err, RecordingError) and isinstance(err, ValueError)
    assert (err.code, err.file, err.record, err.offset) == ("truncated", str(seg), number, offset)
    assert seg.name in str(err) and f"record {number}" in str(err) and f"byte offset {offset}" in str(err)
    assert "truncated" in str(err)
    assert len(reader) == number
    with pytest.raises(RecordingError, match="truncated"):
        reader.record(number)
    assert reader.record(number - 1) == records[-1]

    with pytest.raises(RecordingError, match=rf"{seg.name}: record {number} at byte offset {offset}: truncated"):
        list(RecordingReader(rec_dir))


def test_corrupt_byte_in_the_middle(tmp_path):
    rec_dir = tmp_path / "rec"
    written = _build(rec_dir)
    entry = _locations(rec_dir)[4]
    seg = rec_dir / "segment-000000.log"
    data = bytearray(seg.read_bytes())
    data[entry.offset + HEADER_BYTES + 20] ^= 0x40  # inside record 4's payload
    seg.write_bytes(bytes(data))

    with pytest.raises(RecordingError) as info:
        list(RecordingReader(rec_dir))
    err = info.value
    assert (err.code, err.record, err.offset) == ("crc_mismatch", 4, entry.offset)
    assert f"record 4 at byte offset {entry.offset}" in str(err) and "CRC mismatch" in str(err)
    assert seg.name in str(err)
    reader = RecordingReader(rec_dir, on_damage="stop")
    _check(list(reader), written[:4])
    assert reader.damage.code == "crc_mismatch"
    with pytest.raises(RecordingError, match="CRC mismatch"):
        RecordingReader(rec_dir).record(4)
    assert RecordingReader(rec_dir).record(5).number == 5  # random access to intact records still works

    # a flipped bit in a record header (e.g. its length) is caught by the header CRC
    data[entry.offset + HEADER_BYTES + 20] ^= 0x40
    data[entry.offset + 16] ^= 0x01
    seg.write_bytes(bytes(data))
    reader = RecordingReader(rec_dir, on_damage="stop")
    assert len(list(reader)) == 4
    assert (reader.damage.code, reader.damage.record, reader.damage.offset) == ("bad_record_header", 4, entry.offset)
    # garbage instead of a record
    data[entry.offset : entry.offset + 4] = b"XXXX"
    seg.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="bad magic"):
        list(RecordingReader(rec_dir))


def test_header_problems(tmp_path):
    with pytest.raises(RecordingError, match="missing header") as info:
        RecordingReader(tmp_path)
    assert info.value.code == "missing_header" and info.value.file.endswith("header.json")

    rec_dir = tmp_path / "rec"
    with RecordingWriter(rec_dir, run_config={}, protocol_version=SCHEMA_VERSION + 1) as w:
        w.append_step(0, {})
    with pytest.raises(RecordingError, match="protocol version mismatch") as info:
        RecordingReader(rec_dir)
    assert info.value.code == "protocol_version" and "header.json" in str(info.value)
    assert str(SCHEMA_VERSION + 1) in str(info.value)
    assert len(list(RecordingReader(rec_dir, protocol_version=None))) == 1
    with pytest.raises(RecordingError, match="protocol version mismatch"):
        RecordingWriter.open_existing(rec_dir)

    with pytest.raises(FileExistsError):
        _writer(rec_dir)
    with pytest.raises(ValueError, match="on_damage"):
        RecordingReader(rec_dir, on_damage="ignore", protocol_version=None)


def test_missing_segment(tmp_path):
    rec_dir = tmp_path / "rec"
    _build(rec_dir, segment_bytes=300)
    (rec_dir / "segment-000001.log").unlink()
    with pytest.raises(RecordingError, match="segment-000001.log: segment file missing"):
        list(RecordingReader(rec_dir))


# --------------------------------------------------------------------------- resume


def test_open_existing_continues_numbering(tmp_path):
    rec_dir = tmp_path / "rec"
    written = _build(rec_dir, segment_bytes=300)
    n_segments = len(_segment_files(rec_dir))
    with RecordingWriter.open_existing(rec_dir) as w:
        assert w.next_number == len(written) and w.segment_bytes == 300
        assert w.append_message(b"late", [b"x"]) == len(written)
        assert w.append_step(99, {"consumed": [len(written)]}) == len(written) + 1
    records = list(RecordingReader(rec_dir))
    assert [r.number for r in records] == list(range(len(written) + 2))
    _check(records, written)
    assert records[-2].frames == [b"x"] and records[-1].step == 99
    assert len(_segment_files(rec_dir)) >= n_segments
    assert [loc.number for loc in _locations(rec_dir)] == list(range(len(written) + 2))


def test_open_existing_truncates_torn_tail(tmp_path, caplog):
    rec_dir = tmp_path / "rec"
    written = _build(rec_dir, segment_bytes=300)
    seg, number, offset = _cut_last_record_in_half(rec_dir)
    with caplog.at_level(logging.WARNING, logger="learner.recording.store"):
        w = RecordingWriter.open_existing(rec_dir)
    assert any("torn last record" in r.getMessage() and seg.name in r.getMessage() for r in caplog.records)
    assert seg.stat().st_size == offset
    with w:
        assert w.append_message(b"again", [b"", b"y"]) == number
    records = list(RecordingReader(rec_dir))
    _check(records[:-1], written[:-1])
    assert records[-1].number == number and records[-1].frames == [b"", b"y"]
    assert [loc.number for loc in _locations(rec_dir)] == list(range(number + 1))
    reader = RecordingReader(rec_dir)
    assert reader.record(number).peer == b"again"

    # a last record whose bytes are all there but wrong (not flushed before a crash) is torn too
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF
    seg.write_bytes(bytes(data))
    with RecordingWriter.open_existing(rec_dir) as w:
        assert w.next_number == number


def test_open_existing_refuses_damage_before_the_tail(tmp_path):
    rec_dir = tmp_path / "rec"
    _build(rec_dir)
    entry = _locations(rec_dir)[2]
    seg = rec_dir / "segment-000000.log"
    data = bytearray(seg.read_bytes())
    data[entry.offset] ^= 0xFF  # bad magic on record 2 of 9
    seg.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="cannot resume") as info:
        RecordingWriter.open_existing(rec_dir)
    assert info.value.code == "not_resumable" and info.value.record == 2
    assert seg.read_bytes() == bytes(data)  # nothing was cut


def test_writer_misuse(tmp_path):
    w = _writer(tmp_path / "rec")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.append_step(0, {})
    w2 = _writer(tmp_path / "rec2", fsync=True)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        w2.append_step(0, {"x": object()})
    assert w2.append_step(0, {"ok": True}) == 0  # nothing was written for the failed call
    w2.close()
    assert [r.info for r in RecordingReader(tmp_path / "rec2")] == [{"ok": True}]


def test_failed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    import learner.recording.store as recording

    rec_dir = tmp_path / "rec"
    w = _writer(rec_dir)
    w.append_message(b"p", [b"first"])
    size = (rec_dir / "segment-000000.log").stat().st_size
    real = recording._write_fully

    def half_then_fail(fd, parts):
        real(fd, parts[:2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recording, "_write_fully", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        w.append_message(b"p", [b"second", b"x" * 100])
    assert (rec_dir / "segment-000000.log").stat().st_size == size
    monkeypatch.undo()
    assert w.append_message(b"p", [b"third"]) == 1
    w.close()
    assert [r.frames for r in RecordingReader(rec_dir)] == [[b"first"], [b"third"]]


# --------------------------------------------------------------------------- inspect CLI


def _batch(step: int = 1, prompt_ids=(5, 6), tokens=None, prompt_lens=(2, 1), cu=(0, 5, 7)) -> PackedBatch:
    tokens = np.array(tokens if tokens is not None else [11, 12, 13, 14, 15, 21, 22], dtype=np.int32)
    cu = np.array(cu, dtype=np.int32)
    plens = np.array(prompt_lens, dtype=np.int32)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    lp = np.zeros(len(tokens), dtype=np.float32)
    for b in range(len(plens)):
        mask[cu[b] + plens[b] : cu[b + 1]] = 1
        lp[cu[b] + plens[b] : cu[b + 1]] = -0.5
    return PackedBatch(grant_id=3, step=step, tokens=tokens, cu_seqlens=cu, prompt_lens=plens, loss_mask=mask,
                       behaviour_logprobs=lp, prompt_ids=np.array(prompt_ids, dtype=np.int64),
                       sample_indices=np.arange(len(plens), dtype=np.int32),
                       weight_versions=np.full(len(plens), 2, dtype=np.int32),
                       last_weight_versions=np.full(len(plens), 2, dtype=np.int32),
                       finish_reasons=["stop", "length"][: len(plens)], labels=[None] * len(plens), gen_seconds=0.1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "learner.recording.inspect", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _cli_recording(path: Path) -> None:
    from protocol import Heartbeat

    with _writer(path) as w:
        for seq in range(3):
            w.append_message(b"rollout-0", encode(_batch(step=seq), run_id="run-rec", producer_id="rollout-0",
                                                  seq=seq + 1, weight_version=2), received_at=50.0 + seq)
        w.append_message(b"rollout-1", encode(Heartbeat(state="idle"), run_id="run-rec", producer_id="rollout-1",
                                              seq=1, weight_version=2), received_at=53.0)
        w.append_step(0, {"consumed": [0, 1, 2], "weight_version": 1,
                          "metrics": {"policy_loss": 0.125, "reward_mean": 0.5, "tokens": 14}}, written_at=55.0)


def test_cli_validate_good_and_damaged(tmp_path):
    rec_dir = tmp_path / "rec"
    _cli_recording(rec_dir)
    good = _cli(str(rec_dir), "--validate")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK: 5 records, 4 messages decode" in good.stdout

    seg, number, offset = _cut_last_record_in_half(rec_dir)
    bad = _cli(str(rec_dir), "--validate")
    assert bad.returncode == 1
    assert f"{seg}: record {number} at byte offset {offset}: truncated record" in bad.stdout



def test_cli_help_and_missing_recording(tmp_path, capsys):
    from learner.recording.inspect import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    helptext = capsys.readouterr().out
    for word in ("--steps", "--samples", "--validate", "--tokenizer", "CRC", "Exit status"):
        assert word in helptext
    assert main([str(tmp_path / "nope")]) == 1
    assert "recording directory does not exist" in capsys.readouterr().err


def test_cli_validate_reports_undecodable_message(tmp_path, capsys):
    from learner.recording.inspect import main

    rec_dir = tmp_path / "rec"
    with _writer(rec_dir) as w:
        w.append_message(b"rollout-0", [b"\xc1 not msgpack"])
    assert main([str(rec_dir), "--validate"]) == 1
    out = capsys.readouterr().out
    assert "record 0" in out and "bad_msgpack" in out and "INVALID: 1 of 1 messages" in out


def test_cli_summary_steps_and_samples(tmp_path, capsys):
    from learner.recording.inspect import main
    from learner.tiny.model import build_tokenizer

    tok = build_tokenizer()
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    ids = tok.convert_tokens_to_ids
    prompt, answer = [tok.bos_token_id, *ids(list("3+4="))], [*ids(list("7")), tok.eos_token_id]
    toks = prompt + answer + [tok.bos_token_id, *ids(list("1+1=")), *ids(list("2"))]
    batch = _batch(step=4, prompt_ids=(34, 11), tokens=toks, prompt_lens=(5, 5), cu=(0, 7, 13))
    batch.last_weight_versions[1] = 3  # the second sample was generated across an update

    rec_dir = tmp_path / "rec"
    _cli_recording(rec_dir)
    with RecordingWriter.open_existing(rec_dir) as w:
        w.append_message(b"rollout-1", encode(batch, run_id="run-rec", producer_id="rollout-1", seq=2,
                                              weight_version=3), received_at=60.0)

    assert main([str(rec_dir), "--steps", "--samples", "10", "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "records          6" in out and "messages         5" in out
    assert "kind packed_batch" in out and "kind heartbeat" in out
    assert "from rollout-0            3" in out and "from rollout-1            2" in out
    assert "steps            1 (step 0 .. 0)" in out and "(10.000 s)" in out
    assert "step 0  record 4  consumed 3 [0-2]  weight_version 1  policy_loss 0.125  reward_mean 0.5" in out
    sample_lines = [line for line in out.splitlines() if line.startswith("record ") and "prompt_id" in line]
    assert len(sample_lines) == 8  # 3 batches x 2 + 2
    last = sample_lines[-2]
    assert "producer rollout-1" in last and "step 4" in last and "weight_version 2" in last
    assert "prompt_id 34" in last and "response_len 2" in last and "finish stop" in last
    assert "prompt '<s>3+4='" in last and "response '7</s>'" in last
    assert "response '2'" in sample_lines[-1] and "finish length" in sample_lines[-1]
    assert "weight_versions 2..3" in sample_lines[-1]

    assert main([str(rec_dir), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "prompt_id" in line]) == 1 and "response '" not in out

    # a damaged recording: the summary still reports what is intact, and the damage
    _cut_last_record_in_half(rec_dir)
    assert main([str(rec_dir)]) == 0
    captured = capsys.readouterr()
    assert "records          5" in captured.out and "DAMAGE" in captured.out and "truncated" in captured.err
