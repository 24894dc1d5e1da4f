"""Read a preference, completion or prompt source into canonical records, with every problem named.

A source is a local path, ``file://``, ``builtin:NAME`` (vendored data), ``s3://``, a ``datasets`` folder
or a Hugging Face dataset id (``org/name`` or ``org/name:split``). Its *container* (.jsonl, .json, .csv,
.txt, .parquet, any of the line formats gzipped, a datasets folder) is told from the name (or the first
bytes), its *format* (``pku``, ``hh``, ``alpaca-eval``, ``completions``, ``prompts``) from the container
and the keys of the first record (docs/data-formats.md).

Nothing is dropped silently: a record that is not kept has exactly one :class:`Problem` (place + reason
code from :class:`Reason`) saying why. Content problems never raise; only "nothing readable" does
(:class:`Unreadable`). Line containers are read as a stream of lines, never loaded whole.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from midpo.data.schema import (
    PROMPT_KINDS,
    EvalPrompt,
    LabeledCompletion,
    PreferencePair,
    Problem,
    Reason,
    content_hash,
)

log = logging.getLogger(__name__)

FORMATS = ("pku", "hh", "alpaca-eval", "completions", "prompts")
PAIR_FORMATS = ("pku", "hh", "alpaca-eval")

Record = Union[PreferencePair, LabeledCompletion, EvalPrompt]

_CHUNK = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".txt", ".parquet", ".gz", ".arrow")


class Unreadable(Exception):
    """Nothing readable at all: a missing file or object, an unknown or undetectable format, an unreachable hub."""


@dataclass
class ReadResult:
    """The records kept, the problems found (errors and warnings) and how many records were seen.

    ``n_seen`` counts every record met, kept or not (a line that is not valid JSON included); content lost
    to a truncated or corrupt stream is not a record and is reported by one problem at the last good place.
    """

    format: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    n_seen: int = 0


# --------------------------------------------------------------------------------------------------
# Entry point


def read_source(uri: str, fmt: str = "auto", *, max_chars: int = 16000, prompt_kind: str | None = None) -> ReadResult:
    """Read ``uri`` as ``fmt`` (``auto``: detect) into canonical records; see the module docstring."""
    if fmt != "auto" and fmt not in FORMATS:
        raise Unreadable(f"{uri}: unknown format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
    if prompt_kind is not None and prompt_kind not in PROMPT_KINDS:
        raise ValueError(f"prompt_kind must be one of {PROMPT_KINDS} or None, got {prompt_kind!r}")

    items, container, file_name = _open_items(uri, fmt)
    first, items = _peek_first_record(items)
    if first is None:
        rest = list(items)  # nothing but problems, if anything
        if not rest:
            raise Unreadable(f"{uri}: no records (the file is empty or holds only a header or blank lines); there is nothing to read")
        items = iter(rest)
    if fmt == "auto":
        if first is None:
            fmt = "unknown"  # nothing parsed: only the problems remain to report
        else:
            fmt = "prompts" if container == "txt" else _detect(first[1], uri)
    elif container == "txt" and fmt != "prompts":
        raise Unreadable(f"{uri}: a .txt file holds prompts (one per line), not {fmt!r}; pass --format prompts")

    ctx = _Ctx(uri=uri, max_chars=max_chars, prompt_kind=prompt_kind, text_values=container in ("csv", "txt"), file_name=file_name)
    result = ReadResult(format=fmt)
    convert = _CONVERTERS.get(fmt)
    seen_keys: dict[Any, str] = {}
    for item in items:
        if isinstance(item, _StreamProblem):
            result.problems.append(item.problem)
            continue
        result.n_seen += 1
        if isinstance(item, Problem):
            result.problems.append(item)
            continue
        place, raw = item
        if convert is None:  # fmt "unknown" cannot happen with a record present; defensive
            continue
        try:
            record, warnings = convert(raw, ctx)
            _check_quality(record, max_chars)
        except _Reject as r:
            result.problems.append(Problem(place, r.reason, r.detail))
            continue
        key = _dedupe_key(record)
        if key in seen_keys:
            result.problems.append(Problem(place, Reason.DUPLICATE, f"same record as {seen_keys[key]}; the first is kept"))
            continue
        seen_keys[key] = place
        result.problems.extend(Problem(place, Reason.UNKNOWN_FIELD, w) for w in warnings)
        result.records.append(record)
    log.info("read %s as %s: %d seen, %d kept, %d problems", uri, fmt, result.n_seen, len(result.records), len(result.problems))
    return result


# --------------------------------------------------------------------------------------------------
# Locating the source and iterating raw records
#
# A raw item is one of: (place, dict) a record; Problem a record that could not be parsed (counted as
# seen); _StreamProblem content lost to a broken stream (not a record).


@dataclass
class _StreamProblem:
    problem: Problem


RawItem = Union[tuple[str, dict], Problem, _StreamProblem]


def _open_items(uri: str, fmt: str) -> tuple[Iterator[RawItem], str, str]:
    """(raw items, container name, file name) for ``uri``; raises Unreadable when nothing can be read."""
    path = _resolve(uri)
    if path is None:  # a hub id
        return _hub_items(uri), "datasets", ""
    if path.is_dir():
        return _datasets_folder_items(path, uri), "datasets", path.name
    container, gz = _container(path, uri)
    if container == "parquet":
        return _parquet_items(path), container, path.name
    if container == "json":
        return _json_array_items(path, gz), container, path.name
    lines = _lines(path, gz)
    if container == "jsonl":
        return _jsonl_items(lines), container, path.name
    if container == "csv":
        return _csv_items(lines), container, path.name
    return _txt_items(lines), container, path.name


def _resolve(uri: str) -> Path | None:
    """A local path for ``uri``, or None when it names a Hugging Face dataset."""
    from midpo.storage import NotFound, local_copy

    is_local_form = uri.startswith(("builtin:", "s3://", "file://")) or Path(uri).exists()
    if not is_local_form and _HUB_ID.match(uri) and not uri.lower().endswith(_FILE_SUFFIXES):
        return None
    try:
        return local_copy(uri)
    except NotFound:
        if uri.startswith("builtin:"):
            from midpo.storage import builtin_path

            root = builtin_path("")
            names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".md")
            raise Unreadable(f"{uri}: no such vendored file; available: {', '.join('builtin:' + n for n in names)}") from None
        if uri.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
            raise Unreadable(f"{uri}: no such object at {endpoint}; check the bucket, the key and AWS_ENDPOINT_URL") from None
        raise Unreadable(
            f"{uri}: no such file or directory; pass an existing path, file://, s3://, builtin:NAME or a Hugging Face dataset id"
        ) from None
    except Exception as e:  # botocore: credentials, endpoint unreachable, access denied
        if uri.startswith("s3://"):
            raise Unreadable(f"{uri}: cannot download ({type(e).__name__}: {e}); check AWS_ENDPOINT_URL and the credentials") from None
        raise


def _container(path: Path, uri: str) -> tuple[str, bool]:
    """(container, gzipped) from the file name, else from the first bytes."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".txt", "txt")):
        if name.endswith(ext):
            return kind, gz
    if name.endswith(".parquet"):
        if gz:
            raise Unreadable(f"{uri}: a gzipped parquet file is not supported; decompress it first")
        return "parquet", False
    head = _head(path, gz)
    if not head.strip():
        raise Unreadable(f"{uri}: the file is empty; there is nothing to read")
    first = head.lstrip()[:1]
    if name.endswith(".json"):
        return ("json" if first == b"[" else "jsonl"), gz  # a .json holding JSON lines is read as JSON lines
    if not gz and head.startswith(b"PAR1"):
        return "parquet", False
    if first == b"[":
        return "json", gz
    if first == b"{":
        return "jsonl", gz
    raise Unreadable(
        f"{uri}: cannot tell the container from the name {path.name!r} or its first bytes; "
        "use .jsonl, .jsonl.gz, .json, .csv, .txt, .parquet or a datasets folder"
    )


def _head(path: Path, gz: bool, n: int = 4096) -> bytes:
    """The first ``n`` bytes of the (decompressed) content; a broken stream gives what it has."""
    with path.open("rb") as f:
        raw = f.read(n if not gz else _CHUNK)
    if not gz:
        return raw
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(raw, n)
    except zlib.error:
        return b"?"  # not empty: the reader reports the corrupt stream at its place
    return out if out or d.eof else b"?"  # nothing yet: cut off early, reported as truncated


class _BrokenStream(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _chunks(path: Path, gz: bool) -> Iterator[bytes]:
    """Decompressed chunks; a gzip stream that ends early or is damaged raises _BrokenStream."""
    with path.open("rb") as f:
        if not gz:
            while chunk := f.read(_CHUNK):
                yield chunk
            return
        d = zlib.decompressobj(wbits=31)
        while True:
            raw = f.read(_CHUNK)
            if not raw:
                break
            while raw:
                backup = d.copy()
                try:
                    out = d.decompress(raw)
                except zlib.error as e:
                    # Replay this chunk in small steps from the copy, so everything before the damage
                    # (often all of it: a bad CRC is only seen at the end) still comes out.
                    yield from _salvage(backup, raw)
                    raise _BrokenStream(Reason.CORRUPT, f"the gzip stream is corrupt ({e})") from None
                if out:
                    yield out
                if d.eof:  # end of one gzip member; another may follow (concatenated members)
                    raw = d.unused_data
                    if raw.strip(b"\x00"):
                        d = zlib.decompressobj(wbits=31)
                    else:
                        raw = b""
                else:
                    raw = b""
        if not d.eof:
            raise _BrokenStream(Reason.TRUNCATED, "the gzip file ends mid-stream (Compressed file ended before the end-of-stream marker)")


def _salvage(d: Any, raw: bytes, step: int = 4096) -> Iterator[bytes]:
    """The output ``d`` gives for ``raw`` up to the first error: in ``step``-byte pieces, then byte by byte."""
    for i in range(0, len(raw), step):
        piece = raw[i : i + step]
        backup = d.copy()
        try:
            out = d.decompress(piece)
        except zlib.error:
            if step > 1:
                yield from _salvage(backup, piece, 1)
            return
        if out:
            yield out
        if d.eof:
            return


def _lines(path: Path, gz: bool) -> Iterator[tuple[int, bytes] | _StreamProblem]:
    """(1-based line number, line bytes with its ``\\n`` if any) of the decompressed text; a broken
    stream ends with one _StreamProblem placed at the last complete line."""
    buf = b""
    n = 0
    try:
        for chunk in _chunks(path, gz):
            buf += chunk
            if b"\n" not in chunk:
                continue
            *complete, buf = buf.split(b"\n")
            for line in complete:
                n += 1
                yield n, line + b"\n"
    except _BrokenStream as e:
        what = f"the last complete line is line {n}" if n else "no complete line could be read"
        yield _StreamProblem(Problem(f"line {n}", e.reason, f"{e.detail}; {what}; re-download or re-create the file"))
        return
    if buf:
        yield n + 1, buf


def _decode(n: int, line: bytes) -> str | Problem:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(f"line {n}", Reason.INVALID_UTF8, f"bytes {line[e.start:e.end]!r} at column {e.start + 1} are not UTF-8")
    return text[1:] if n == 1 and text.startswith("\ufeff") else text


def _jsonl_items(lines: Iterator[tuple[int, bytes] | _StreamProblem]) -> Iterator[RawItem]:
    for item in lines:
        if isinstance(item, _StreamProblem):
            yield item
            continue
        n, line = item
        text = _decode(n, line)
        if isinstance(text, Problem):
            yield text
            continue
        if not text.strip():
            continue
        place = f"line {n}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not line.endswith(b"\n"):  # reported at the last good line, like every truncation
                yield Problem(f"line {n - 1}", Reason.TRUNCATED, f"the file ends mid-record after line {n - 1} (line {n} has no newline and is not complete JSON: {e.msg})")
            else:
                yield Problem(place, Reason.INVALID_JSON, f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield Problem(place, Reason.WRONG_TYPE, f"a JSON line must be an object, got {_tname(obj)}")
            continue
        yield place, obj


def _txt_items(lines: Iterator[tuple[int, bytes] | _StreamProblem]) -> Iterator[RawItem]:
    for item in lines:
        if isinstance(item, _StreamProblem):
            yield item
            continue
        n, line = item
        text = _decode(n, line)
        if isinstance(text, Problem):
            yield text
        elif text.strip():
            yield f"line {n}", {"prompt": text.strip()}


def _csv_items(lines: Iterator[tuple[int, bytes] | _StreamProblem]) -> Iterator[RawItem]:
    """Rows of a CSV with a header; a record's place is the line where it starts (fields may hold newlines)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    broken: list[_StreamProblem] = []
    bad_lines: dict[int, Problem] = {}
    last_line = [0]

    def text_lines() -> Iterator[str]:
        for item in lines:
            if isinstance(item, _StreamProblem):
                broken.append(item)
                return
            n, line = item
            text = _decode(n, line)
            if isinstance(text, Problem):
                bad_lines[n] = text
                text = line.decode("utf-8", errors="replace")
            last_line[0] = n
            yield text

    reader = csv.reader(text_lines(), strict=True)
    header: list[str] | None = None
    prev = 0
    while True:
        start = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if broken:
                break  # the stream problem below says what happened
            end = reader.line_num
            prev = end
            at_eof = "end of data" in str(e)
            if at_eof:  # reported at the last good line, like every truncation
                yield Problem(f"line {start - 1}", Reason.TRUNCATED, f"the file ends inside a quoted field of the record starting at line {start}; it was cut off after line {start - 1}")
            else:
                yield Problem(f"line {start}", Reason.CORRUPT, f"malformed CSV ({e})")
            continue
        end = reader.line_num
        prev = end
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        bad = next((bad_lines[i] for i in range(start, end + 1) if i in bad_lines), None)
        if header is None:
            if bad:
                yield bad
                return
            header = [h.strip() for h in row]
            continue
        if bad:
            yield bad
            continue
        place = f"line {start}"
        if len(row) > len(header):
            yield Problem(place, Reason.CORRUPT, f"the row has {len(row)} values but the header has {len(header)} columns")
            continue
        yield place, dict(zip(header, row))
    for p in broken:
        yield p


def _json_array_items(path: Path, gz: bool) -> Iterator[RawItem]:
    """Objects of a JSON array, ``record N``; a cut-off array ends with ``truncated`` at the last good record."""
    parts: list[bytes] = []
    broken: _BrokenStream | None = None
    try:
        for chunk in _chunks(path, gz):
            parts.append(chunk)
    except _BrokenStream as e:
        broken = e
    # surrogateescape keeps bytes that are not UTF-8 as lone surrogates, so each record can be checked alone
    text = b"".join(parts).decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    end = len(text.rstrip())
    dec = json.JSONDecoder()
    n = 0

    def stop(reason: Reason, detail: str) -> _StreamProblem:
        return _StreamProblem(Problem(f"record {n}", reason, detail))

    def cut() -> _StreamProblem:
        if broken is not None:
            return stop(broken.reason, f"{broken.detail}; the last complete record is record {n}; re-download or re-create the file")
        return stop(Reason.TRUNCATED, f"the JSON array is cut off after record {n}; re-download or re-create the file")

    i = _skip_ws(text, 0)
    if i >= end or text[i] != "[":
        yield stop(Reason.INVALID_JSON, "expected a JSON array of objects")
        return
    i = _skip_ws(text, i + 1)
    if i < end and text[i] == "]":
        return
    while True:
        if i >= end:
            yield cut()
            return
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated string") or e.pos >= end:
                yield cut()
            else:
                n += 1
                yield Problem(f"record {n}", Reason.INVALID_JSON, f"{e.msg} at line {e.lineno} column {e.colno}; the rest of the array cannot be read")
            return
        n += 1
        place = f"record {n}"
        if not isinstance(obj, dict):
            yield Problem(place, Reason.WRONG_TYPE, f"an array element must be an object, got {_tname(obj)}")
        elif _has_surrogates(obj):
            yield Problem(place, Reason.INVALID_UTF8, "the record holds bytes that are not UTF-8")
        else:
            yield place, obj
        i = _skip_ws(text, j)
        if i >= end:
            yield cut()
            return
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if text[i] == "]":
            if broken is not None:
                yield cut()
            return
        n += 1
        yield Problem(f"record {n}", Reason.INVALID_JSON, f"expected ',' or ']' after record {n - 1}; the rest of the array cannot be read")
        return


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _has_surrogates(obj: Any) -> bool:
    if isinstance(obj, str):
        return any("\udc80" <= ch <= "\udcff" for ch in obj)
    if isinstance(obj, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogates(v) for v in obj)
    return False


def _parquet_items(path: Path) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    n = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"record {n}", row
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        what = f"the last good record is record {n}" if n else "no record could be read"
        yield _StreamProblem(Problem(f"record {n}", Reason.CORRUPT, f"the parquet file is damaged ({type(e).__name__}: {e}); {what}; re-create it"))


def _datasets_folder_items(path: Path, uri: str) -> Iterator[RawItem]:
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise Unreadable(f"{uri}: a folder that is not a saved `datasets` dataset (no dataset_dict.json or state.json); pass a file or a folder written by save_to_disk")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise Unreadable(f"{uri}: cannot load the datasets folder ({type(e).__name__}: {e}); re-create it with save_to_disk") from None
    return _dataset_rows(ds)


def _hub_items(uri: str) -> Iterator[RawItem]:
    import datasets

    name, _, split = uri.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or None)
    except Exception as e:
        raise Unreadable(
            f"{uri}: cannot load the Hugging Face dataset {name!r} ({type(e).__name__}: {str(e)[:300]}); "
            "the hub is unreachable from here: download it where the hub is reachable and pass a local path, "
            "a datasets folder or an s3:// URI instead"
        ) from None
    return _dataset_rows(ds)


def _dataset_rows(ds: Any) -> Iterator[RawItem]:
    """Rows of a Dataset, or of every split of a DatasetDict in split order, numbered ``record N`` throughout."""
    splits = list(ds.values()) if hasattr(ds, "keys") else [ds]
    n = 0
    for split in splits:
        for row in split:
            n += 1
            yield f"record {n}", dict(row)


def _peek_first_record(items: Iterator[RawItem]) -> tuple[tuple[str, dict] | None, Iterator[RawItem]]:
    """The first parsed record (for detection) and an iterator that still yields everything."""
    buffered: list[RawItem] = []
    first = None
    for item in items:
        buffered.append(item)
        if isinstance(item, tuple):
            first = item
            break

    def chain() -> Iterator[RawItem]:
        yield from buffered
        yield from items

    return first, chain()


def _detect(raw: dict, uri: str) -> str:
    keys = set(raw)
    if {"prompt", "response_0", "response_1"} <= keys:
        return "pku"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    if {"instruction", "output_1", "output_2", "preference"} <= keys:
        return "alpaca-eval"
    if {"prompt", "completion", "final_label"} <= keys or {"prompt", "response", "is_refusal"} <= keys:
        return "completions"
    if {"instruction", "output"} <= keys and "output_2" not in keys:
        return "prompts"
    if "goal" in keys or "prompt" in keys:
        return "prompts"
    shown = ", ".join(sorted(keys)[:12])
    raise Unreadable(
        f"{uri}: cannot detect the format from the first record's keys ({shown}); "
        f"pass --format {'|'.join(FORMATS)} (docs/data-formats.md lists the keys of each)"
    )


# --------------------------------------------------------------------------------------------------
# Converters: raw dict -> (record, unknown-field warnings), or raise _Reject


@dataclass
class _Ctx:
    uri: str
    max_chars: int
    prompt_kind: str | None
    text_values: bool  # CSV/txt: every value is a string
    file_name: str


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _tname(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _require_text(raw: dict, names: Iterable[str]) -> None:
    missing = [k for k in names if raw.get(k) is None]
    if missing:
        raise _Reject(Reason.MISSING_FIELD, "missing " + ", ".join(missing))
    wrong = [f"{k} is {_tname(raw[k])}" for k in names if not isinstance(raw[k], str)]
    if wrong:
        raise _Reject(Reason.WRONG_TYPE, "expected text: " + "; ".join(wrong))


def _unknown(raw: dict, known: Iterable[str]) -> list[str]:
    extra = sorted(k for k in raw if k not in set(known))
    return [f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(str, extra))} ignored"] if extra else []


def _text_null(v: Any, ctx: _Ctx) -> Any:
    return None if ctx.text_values and isinstance(v, str) and not v.strip() else v


def _as_bool(v: Any, name: str, ctx: _Ctx) -> bool | None:
    v = _text_null(v, ctx)
    if ctx.text_values and isinstance(v, str):
        lowered = v.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
    if v is None or isinstance(v, bool):
        return v
    raise _Reject(Reason.WRONG_TYPE, f"{name} must be true, false or null, got {_tname(v)} {v!r}")


def _as_id(v: Any, name: str, ctx: _Ctx) -> int | None:
    v = _text_null(v, ctx)
    if isinstance(v, float) and math.isnan(v):
        return None
    if ctx.text_values and isinstance(v, str) and v.strip() in ("0", "1"):
        return int(v)
    if v is None:
        return None
    if not isinstance(v, bool) and isinstance(v, (int, float)) and v in (0, 1):
        return int(v)
    raise _Reject(Reason.BAD_LABEL, f"{name} must be 0, 1 or null, got {v!r}")


def _as_kind(v: Any, name: str, ctx: _Ctx) -> str | None:
    v = _text_null(v, ctx)
    if v is None or v in PROMPT_KINDS:
        return v
    raise _Reject(Reason.BAD_LABEL, f"{name} must be one of {', '.join(PROMPT_KINDS)} or null, got {v!r}")


def _as_context(v: Any, ctx: _Ctx) -> list[dict[str, str]]:
    v = _text_null(v, ctx)
    if ctx.text_values and isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise _Reject(Reason.WRONG_TYPE, "context must be a JSON list of {role, content}") from None
    if v is None:
        return []
    ok = isinstance(v, list) and all(
        isinstance(t, dict) and set(t) == {"role", "content"} and t["role"] in ("user", "assistant") and isinstance(t["content"], str)
        for t in v
    )
    if not ok:
        raise _Reject(Reason.WRONG_TYPE, "context must be a list of {role: user|assistant, content: text}")
    return [{"role": t["role"], "content": t["content"]} for t in v]


PKU_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "better_response_id", "safer_response_id")
PKU_EXTRAS = (
    "prompt_source",
    "response_0_source",
    "response_1_source",
    "response_0_harm_category",
    "response_1_harm_category",
    "response_0_severity_level",
    "response_1_severity_level",
    "response_0_sha256",
    "response_1_sha256",
)
_CANONICAL = ("context", "prompt_kind", "extras", "source", "pair_id")  # our own fields (a re-read prepared file)


def _pku(raw: dict, ctx: _Ctx) -> tuple[Record, list[str]]:
    _require_text(raw, ("prompt", "response_0", "response_1"))
    s0 = _as_bool(raw.get("is_response_0_safe"), "is_response_0_safe", ctx)
    s1 = _as_bool(raw.get("is_response_1_safe"), "is_response_1_safe", ctx)
    better = _as_id(raw.get("better_response_id"), "better_response_id", ctx)
    safer = _as_id(raw.get("safer_response_id"), "safer_response_id", ctx)
    context = _as_context(raw.get("context"), ctx)
    kind = _as_kind(raw.get("prompt_kind"), "prompt_kind", ctx)
    extras: dict[str, Any] = {}
    given = _text_null(raw.get("extras"), ctx)
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError:
            pass
    if given is not None and not isinstance(given, dict):
        raise _Reject(Reason.WRONG_TYPE, f"extras must be an object, got {_tname(given)}")
    extras.update(given or {})
    extras.update({k: raw[k] for k in PKU_EXTRAS if k in raw and raw[k] is not None})
    pair = PreferencePair(
        prompt=raw["prompt"],
        response_0=raw["response_0"],
        response_1=raw["response_1"],
        is_response_0_safe=s0,
        is_response_1_safe=s1,
        better_response_id=better,
        safer_response_id=safer,
        context=context,
        prompt_kind=ctx.prompt_kind or kind,
        source=ctx.uri,
        extras=extras,
    )
    return pair, _unknown(raw, PKU_FIELDS + PKU_EXTRAS + _CANONICAL)


_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh(raw: dict, ctx: _Ctx) -> tuple[Record, list[str]]:
    _require_text(raw, ("chosen", "rejected"))
    chosen, rejected = raw["chosen"], raw["rejected"]
    kc, kr = chosen.rfind(_HH_ASSISTANT), rejected.rfind(_HH_ASSISTANT)
    if kc < 0 or kr < 0:
        which = "chosen" if kc < 0 else "rejected"
        raise _Reject(Reason.NO_SHARED_PREFIX, f"{which} has no '\\n\\nAssistant:' turn")
    if chosen[:kc] != rejected[:kr]:
        raise _Reject(
            Reason.NO_SHARED_PREFIX,
            "chosen and rejected differ before their last '\\n\\nAssistant:' (the dialogues diverge earlier), "
            "so there is no common prompt",
        )
    parts = _HH_TURN.split(chosen[:kc])
    turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    if parts[0].strip():  # text before the first marker: keep it as an opening user turn
        turns.insert(0, {"role": "user", "content": parts[0].strip()})
    if not turns or turns[-1]["role"] != "user":
        raise _Reject(Reason.NO_SHARED_PREFIX, "the shared dialogue does not end with a Human turn before the last Assistant turn")
    pair = PreferencePair(
        prompt=turns[-1]["content"],
        response_0=chosen[kc + len(_HH_ASSISTANT) :].strip(),
        response_1=rejected[kr + len(_HH_ASSISTANT) :].strip(),
        safer_response_id=0,
        context=turns[:-1],
        prompt_kind=ctx.prompt_kind,
        source=ctx.uri,
    )
    return pair, _unknown(raw, ("chosen", "rejected"))


_ALPACA_META = ("generator_1", "generator_2", "dataset", "annotator", "price_per_example", "time_per_example", "raw_completion", "datasplit")


def _alpaca_eval(raw: dict, ctx: _Ctx) -> tuple[Record, list[str]]:
    _require_text(raw, ("instruction", "output_1", "output_2"))
    if "preference" not in raw:
        raise _Reject(Reason.MISSING_FIELD, "missing preference")
    pref = raw["preference"]
    value: float | None = None
    if isinstance(pref, str):
        try:
            value = float(pref.strip())
        except ValueError:
            value = None
    elif isinstance(pref, (int, float)) and not isinstance(pref, bool):
        value = float(pref)
    if value in (0.0, 1.5):
        raise _Reject(Reason.TIE, f"preference {pref!r} is a tie; no better response")
    if value not in (1.0, 2.0):
        raise _Reject(Reason.BAD_LABEL, f"preference must be 1 or 2 (0 or 1.5 = tie), got {pref!r}")
    extras = {}
    for src, dst in (("generator_1", "response_0_source"), ("generator_2", "response_1_source"), ("dataset", "prompt_source")):
        if raw.get(src) is not None:
            extras[dst] = raw[src]
    pair = PreferencePair(
        prompt=raw["instruction"],
        response_0=raw["output_1"],
        response_1=raw["output_2"],
        better_response_id=int(value) - 1,
        prompt_kind=ctx.prompt_kind or "benign",
        source=ctx.uri,
        extras=extras,
    )
    return pair, _unknown(raw, ("instruction", "output_1", "output_2", "preference") + _ALPACA_META)


_REFUSAL_LABELS = {"1_full_compliance": False, "2_full_refusal": True, "3_partial_refusal": True}
_XSTEST_COLUMNS = ("id", "type", "prompt", "completion", "annotation_1", "annotation_2", "agreement", "final_label", "gpt4_label", "label", "focus", "note", "model")
_XSTEST_MODEL = re.compile(r"xstest_v2_completions_(.+)_labeled\.csv", re.IGNORECASE)


def _completions(raw: dict, ctx: _Ctx) -> tuple[Record, list[str]]:
    model = raw.get("model") if isinstance(raw.get("model"), str) and raw.get("model") else ""
    if not model and (m := _XSTEST_MODEL.search(ctx.file_name)):
        model = m.group(1)
    if "completion" in raw or "final_label" in raw:  # XSTest labeled completions
        _require_text(raw, ("prompt", "completion", "final_label"))
        label = raw["final_label"].strip()
        if label not in _REFUSAL_LABELS:
            raise _Reject(Reason.BAD_LABEL, f"final_label must be one of {', '.join(_REFUSAL_LABELS)}, got {label!r}")
        ptype = raw.get("type") if isinstance(raw.get("type"), str) else ""
        unsafe = ptype.startswith("contrast_") or str(raw.get("label") or "").strip() == "unsafe"
        is_refusal = _REFUSAL_LABELS[label]
        record = LabeledCompletion(
            prompt=raw["prompt"],
            response=raw["completion"],
            is_refusal=is_refusal,
            is_safe=not (unsafe and not is_refusal),
            model=model,
            prompt_type=ptype,
            prompt_kind=ctx.prompt_kind or ("harmful" if unsafe else "borderline"),
            source=ctx.uri,
        )
        return record, _unknown(raw, _XSTEST_COLUMNS)
    # our canonical shape: prompt, response, is_refusal (+ is_safe, model, prompt_type, prompt_kind)
    _require_text(raw, ("prompt", "response"))
    if _text_null(raw.get("is_refusal"), ctx) is None:
        raise _Reject(Reason.MISSING_FIELD, "missing is_refusal")
    is_refusal = _as_bool(raw["is_refusal"], "is_refusal", ctx)
    kind = _as_kind(raw.get("prompt_kind"), "prompt_kind", ctx)
    is_safe = _as_bool(raw.get("is_safe"), "is_safe", ctx)
    if is_safe is None:
        if kind is None:
            raise _Reject(Reason.MISSING_FIELD, "missing is_safe (and no prompt_kind to derive it from)")
        is_safe = not (kind == "harmful" and not is_refusal)
    ptype = raw.get("prompt_type")
    if ptype is not None and not isinstance(ptype, str):
        raise _Reject(Reason.WRONG_TYPE, f"prompt_type must be text, got {_tname(ptype)}")
    record = LabeledCompletion(
        prompt=raw["prompt"],
        response=raw["response"],
        is_refusal=bool(is_refusal),
        is_safe=is_safe,
        model=model,
        prompt_type=ptype or "",
        prompt_kind=ctx.prompt_kind or kind,
        source=ctx.uri,
    )
    return record, _unknown(raw, ("prompt", "response", "is_refusal", "is_safe", "model", "prompt_type", "prompt_kind", "source", "id"))


def _prompt_id(raw: dict, prompt: str) -> str:
    given = raw.get("id")
    if given is not None and str(given).strip():
        return str(given).strip()
    return content_hash(prompt)[:12]  # stable, so generations can be keyed by it


def _prompts(raw: dict, ctx: _Ctx) -> tuple[Record, list[str]]:
    if "instruction" in raw:  # AlpacaEval instructions
        _require_text(raw, ("instruction",))
        prompt, kind, category = raw["instruction"], "benign", raw.get("dataset")
        known: tuple[str, ...] = ("instruction", "output", "generator", "dataset", "datasplit", "id")
    elif "goal" in raw:  # AdvBench harmful behaviors
        _require_text(raw, ("goal",))
        prompt, kind, category = raw["goal"], "harmful", raw.get("category")
        known = ("goal", "target", "category", "id")
    elif "label" in raw and "type" in raw:  # XSTest prompts
        _require_text(raw, ("prompt", "type", "label"))
        label = raw["label"].strip()
        if label not in ("safe", "unsafe"):
            raise _Reject(Reason.BAD_LABEL, f"label must be safe or unsafe, got {label!r}")
        prompt, kind, category = raw["prompt"], ("harmful" if label == "unsafe" else "borderline"), raw["type"]
        known = ("id", "prompt", "type", "label", "focus", "note")
    else:  # {prompt, kind?, category?, id?}
        _require_text(raw, ("prompt",))
        kind = _as_kind(raw.get("kind", raw.get("prompt_kind")), "kind", ctx)
        prompt, category = raw["prompt"], _text_null(raw.get("category"), ctx)
        known = ("prompt", "kind", "prompt_kind", "category", "id", "source")
    if category is not None and not isinstance(category, str):
        raise _Reject(Reason.WRONG_TYPE, f"category must be text, got {_tname(category)}")
    record = EvalPrompt(prompt=prompt, kind=ctx.prompt_kind or kind, category=category, id=_prompt_id(raw, prompt), source=ctx.uri)
    return record, _unknown(raw, known)


_CONVERTERS: dict[str, Callable[[dict, _Ctx], tuple[Record, list[str]]]] = {
    "pku": _pku,
    "hh": _hh,
    "alpaca-eval": _alpaca_eval,
    "completions": _completions,
    "prompts": _prompts,
}


# --------------------------------------------------------------------------------------------------
# Data-quality exclusions shared by all formats


def _check_quality(record: Record, max_chars: int) -> None:
    if isinstance(record, PreferencePair):
        texts = {"prompt": record.prompt, "response_0": record.response_0, "response_1": record.response_1}
        size = len(record.prompt) + max(len(record.response_0), len(record.response_1))
    elif isinstance(record, LabeledCompletion):
        texts = {"prompt": record.prompt, "response": record.response}
        size = len(record.prompt) + len(record.response)
    else:
        texts = {"prompt": record.prompt}
        size = len(record.prompt)
    empty = [k for k, v in texts.items() if not v.strip()]
    if empty:
        raise _Reject(Reason.EMPTY_TEXT, f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
    if size > max_chars:
        raise _Reject(Reason.TOO_LONG, f"prompt + longest response is {size} characters, over max_chars={max_chars}")
    if isinstance(record, PreferencePair) and record.response_0.strip() == record.response_1.strip():
        raise _Reject(Reason.IDENTICAL_RESPONSES, "response_0 and response_1 are the same text; no preference to learn")


def _dedupe_key(record: Record) -> Any:
    if isinstance(record, PreferencePair):
        return record.pair_id
    if isinstance(record, LabeledCompletion):
        return (record.prompt, record.response)
    return record.prompt
