"""Inspect a StreamRLHF recording (the directory written by learner.recording.store.RecordingWriter).

Without options: a summary -- header (format / protocol version, run id, creation time), segments,
record count, messages per kind and per producer, step records, time span, and any damage found
(a torn last record after a crash is reported, everything before it is still summarised).

  --steps         one line per optimizer-step record: step, consumed message records, weight
                  version, and the loss / reward / KL metrics the record holds
  --samples N     decode the packed_batch messages (protocol.codec.decode) and print the first N
                  samples: record, producer, step, weight version, prompt id, sample index,
                  response length, finish reason (plus the prompt and response text with
                  --tokenizer)
  --tokenizer DIR a Hugging Face tokenizer directory (transformers.AutoTokenizer) for --samples
  --validate      check every record's CRC and decode every message with protocol.codec.decode;
                  exit 1 with the error (file, record number, byte offset) if the recording is
                  damaged or a message fails to decode

Exit status: 0 OK (the summary, --steps and --samples still exit 0 on a damaged recording and
report the damage); 1 --validate failed, or the recording cannot be opened (missing header,
protocol version mismatch, ...); 2 usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

import msgpack

from learner.recording.store import RecordingError, RecordingReader

if TYPE_CHECKING:
    from protocol import PackedBatch

_METRIC_WORDS = ("loss", "reward", "kl")


def _peek_header(frames: list[bytes]) -> dict | None:
    """The msgpack header map of a wire message, without validating the rest (None if unreadable)."""
    if not frames:
        return None
    try:
        header = msgpack.unpackb(frames[0], raw=False, max_bin_len=0, max_ext_len=0,
                                 max_str_len=1 << 16, max_array_len=1 << 17, max_map_len=1 << 16)
    except Exception:
        return None
    return header if isinstance(header, dict) else None


def _peer_name(peer: bytes | None) -> str:
    return (peer or b"").decode("utf-8", "backslashreplace")


def _time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


def _ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out: list[str] = []
    nums = sorted(set(int(n) for n in numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _open(path: str, on_damage: str) -> RecordingReader:
    return RecordingReader(path, on_damage=on_damage)


# --------------------------------------------------------------------------- summary


def summary(path: str, out=None) -> RecordingError | None:
    out = out or sys.stdout
    reader = _open(path, "stop")
    h = reader.header
    run_config = h.get("run_config") or {}
    print(f"recording        {path}", file=out)
    print(f"format           {h.get('format')} v{h.get('format_version')}, protocol schema v{h.get('protocol_version')}",
          file=out)
    if isinstance(run_config, dict) and run_config.get("run_id"):
        print(f"run id           {run_config['run_id']}", file=out)
    if isinstance(h.get("created_at"), (int, float)):
        print(f"created          {_time(h['created_at'])}", file=out)
    try:
        segments = reader.segments()
    except RecordingError:
        segments = []  # reported as damage below
    print(f"segments         {len(segments)} ({sum(p.stat().st_size for p in segments)} bytes)", file=out)

    n_records = n_steps = 0
    kinds: Counter[str] = Counter()
    producers: Counter[str] = Counter()
    msg_bytes = 0
    first = last = None
    step_numbers: list[int] = []
    for rec in reader:
        n_records += 1
        first = rec.received_at if first is None else min(first, rec.received_at)
        last = rec.received_at if last is None else max(last, rec.received_at)
        if rec.kind == "step":
            n_steps += 1
            step_numbers.append(rec.step)
            continue
        msg_bytes += sum(len(fr) for fr in rec.frames)
        header = _peek_header(rec.frames)
        kind = header.get("kind") if header else None
        kinds[kind if isinstance(kind, str) else "<undecodable>"] += 1
        producer = header.get("producer_id") if header else None
        peer = _peer_name(rec.peer)
        name = producer if isinstance(producer, str) else "<unknown>"
        producers[name if name == peer else f"{name} (peer {peer!r})"] += 1
    n_messages = sum(kinds.values())
    print(f"records          {n_records}", file=out)
    print(f"messages         {n_messages} ({msg_bytes} bytes of frames)", file=out)
    for kind, count in sorted(kinds.items()):
        print(f"  kind {kind:<20} {count}", file=out)
    for producer, count in sorted(producers.items()):
        print(f"  from {producer:<20} {count}", file=out)
    if step_numbers:
        print(f"steps            {n_steps} (step {min(step_numbers)} .. {max(step_numbers)})", file=out)
    else:
        print("steps            0", file=out)
    if first is not None:
        print(f"time span        {_time(first)} .. {_time(last)} ({last - first:.3f} s)", file=out)
    if reader.damage is not None:
        print(f"DAMAGE           {reader.damage} (the {n_records} records before it are intact)", file=out)
    return reader.damage


# --------------------------------------------------------------------------- steps


def _metrics(info: dict) -> dict[str, Any]:
    found: dict[str, Any] = {}
    sources = [info]
    if isinstance(info.get("metrics"), dict):
        sources.append(info["metrics"])
    for src in sources:
        for key, value in src.items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and any(w in key.lower() for w in _METRIC_WORDS)):
                found[key] = value
    return found


def steps(path: str, out=None) -> RecordingError | None:
    out = out or sys.stdout
    reader = _open(path, "stop")
    for rec in reader.steps():
        info = rec.info or {}
        consumed = info.get("consumed", info.get("consumed_messages"))
        if isinstance(consumed, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in consumed):
            consumed_txt = f"{len(consumed)} [{_ranges(consumed)}]"
        else:
            consumed_txt = "-" if consumed is None else _fmt(consumed)
        parts = [f"step {rec.step}", f"record {rec.number}", f"consumed {consumed_txt}",
                 f"weight_version {info.get('weight_version', '-')}"]
        parts += [f"{k} {_fmt(v)}" for k, v in _metrics(info).items()]
        print("  ".join(parts), file=out)
    if reader.damage is not None:
        print(f"DAMAGE: {reader.damage}", file=out)
    return reader.damage


# --------------------------------------------------------------------------- samples


def _versions(batch: PackedBatch, b: int) -> str:
    """`weight_version v`, or `weight_versions v..w` for a sample generated across an update."""
    first, last = int(batch.weight_versions[b]), int(batch.last_weight_versions[b])
    return f"weight_version {first}" if first == last else f"weight_versions {first}..{last}"


def samples(path: str, n: int, tokenizer_dir: str | None, out=None) -> RecordingError | None:
    out = out or sys.stdout
    from protocol import ProtocolError, decode

    tok = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    reader = _open(path, "stop")
    shown = 0
    for rec in reader.messages():
        if shown >= n:
            break
        header = _peek_header(rec.frames)
        if not header or header.get("kind") != "packed_batch":
            continue
        try:
            env = decode(rec.frames)
        except ProtocolError as exc:
            print(f"record {rec.number}: packed_batch does not decode: {exc}", file=out)
            continue
        batch: PackedBatch = env.body
        cu = batch.cu_seqlens
        for b in range(batch.num_sequences):
            if shown >= n:
                break
            start, end, plen = int(cu[b]), int(cu[b + 1]), int(batch.prompt_lens[b])
            parts = [f"record {rec.number}", f"producer {env.producer_id}", f"step {batch.step}",
                     _versions(batch, b), f"prompt_id {int(batch.prompt_ids[b])}",
                     f"sample {int(batch.sample_indices[b])}", f"response_len {end - start - plen}",
                     f"finish {batch.finish_reasons[b]}"]
            if tok is not None:
                prompt = tok.decode(batch.tokens[start : start + plen].tolist())
                response = tok.decode(batch.tokens[start + plen : end].tolist())
                parts += [f"prompt {prompt!r}", f"response {response!r}"]
            print("  ".join(parts), file=out)
            shown += 1
    if shown == 0:
        print("no packed_batch samples in this recording", file=out)
    if reader.damage is not None:
        print(f"DAMAGE: {reader.damage}", file=out)
    return reader.damage


# --------------------------------------------------------------------------- validate


def validate(path: str, out=None) -> bool:
    """Check every CRC and decode every message; print a verdict; True if everything is sound."""
    out = out or sys.stdout
    from protocol import ProtocolError, decode

    reader = _open(path, "raise")
    run_config = reader.header.get("run_config")
    run_id = run_config.get("run_id") if isinstance(run_config, dict) else None
    expected_run_id = run_id if isinstance(run_id, str) and run_id else None
    records = messages = 0
    bad: list[str] = []
    try:
        for rec in reader:
            records += 1
            if rec.kind != "message":
                continue
            messages += 1
            try:
                decode(rec.frames, expected_run_id=expected_run_id)
            except ProtocolError as exc:
                bad.append(f"record {rec.number} (peer {_peer_name(rec.peer)!r}): {exc}")
    except RecordingError as err:
        print(f"DAMAGED after {records} intact records: {err}", file=out)
        return False
    for line in bad:
        print(f"message does not decode: {line}", file=out)
    if bad:
        print(f"INVALID: {len(bad)} of {messages} messages do not decode ({records} records, CRCs OK)", file=out)
        return False
    print(f"OK: {records} records, {messages} messages decode, every CRC matches", file=out)
    return True


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.recording.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="recording directory (holds header.json and segment-*.log)")
    parser.add_argument("--steps", action="store_true", help="one line per optimizer-step record")
    parser.add_argument("--samples", type=int, metavar="N", default=None,
                        help="decode packed_batch messages and print the first N samples")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="Hugging Face tokenizer directory; --samples then prints the prompt and response text")
    parser.add_argument("--validate", action="store_true",
                        help="check every CRC and decode every message; exit 1 if anything is wrong")
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 0:
        parser.error("--samples must be >= 0")
    if args.tokenizer and args.samples is None:
        parser.error("--tokenizer only applies to --samples")
    try:
        if args.validate:
            return 0 if validate(args.path) else 1
        damage = summary(args.path)
        if args.steps:
            print()
            damage = steps(args.path) or damage
        if args.samples is not None:
            print()
            damage = samples(args.path, args.samples, args.tokenizer) or damage
    except RecordingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if damage is not None:
        print(f"warning: recording is damaged: {damage}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
