"""The canonical records every source is converted into, and the fixed list of problem reason codes.

A preference pair follows the PKU-SafeRLHF schema (midpo-method.md); a label a source does not carry is
``None``. Two more record types serve evaluation and the judges: labeled completions (XSTest style) and
prompts of an eval set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

PROMPT_KINDS = ("harmful", "borderline", "benign")


@dataclass
class PreferencePair:
    """One PKU-SafeRLHF record. ``context`` holds earlier dialogue turns (``[{"role", "content"}]``)."""

    prompt: str
    response_0: str
    response_1: str
    is_response_0_safe: bool | None = None
    is_response_1_safe: bool | None = None
    better_response_id: int | None = None
    safer_response_id: int | None = None
    context: list[dict[str, str]] = field(default_factory=list)
    prompt_kind: str | None = None
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)  # optional PKU fields (*_source, *_harm_category...)

    @property
    def pair_id(self) -> str:
        """Content hash of everything that defines the pair (not where it came from), so duplicates collide."""
        return content_hash({k: v for k, v in asdict(self).items() if k not in ("source", "extras")})

    def prompt_key(self) -> str:
        """What "the same prompt" means for splits: the dialogue up to the response."""
        return content_hash({"context": self.context, "prompt": self.prompt})

    def to_row(self) -> dict[str, Any]:
        """A flat row for Arrow: ``extras`` is free-form, so it travels as a JSON string."""
        row = asdict(self)
        row["extras"] = json.dumps(self.extras, sort_keys=True, ensure_ascii=False)
        return {"pair_id": self.pair_id, **row}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "PreferencePair":
        fields = {k: v for k, v in row.items() if k != "pair_id"}
        fields["extras"] = json.loads(fields.get("extras") or "{}")
        fields["context"] = list(fields.get("context") or [])
        return cls(**fields)


@dataclass
class LabeledCompletion:
    """One response with human labels (XSTest style): did it refuse, is it safe, which model wrote it."""

    prompt: str
    response: str
    is_refusal: bool
    is_safe: bool
    model: str = ""
    prompt_type: str = ""
    prompt_kind: str | None = None
    source: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalPrompt:
    """A prompt of an eval set; ``category`` carries e.g. the XSTest type for per-category breakdowns."""

    prompt: str
    kind: str | None = None
    category: str | None = None
    id: str = ""
    source: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def content_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys), hex."""
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


class Severity(str, Enum):
    ERROR = "error"  # the record cannot be read as the format says: exit 1
    WARNING = "warning"  # a readable record excluded for data quality: counted, exit 0


class Reason(str, Enum):
    """Why a record was rejected or excluded. The list is fixed and documented in docs/data.md."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_LABEL = "bad_label"
    EMPTY_TEXT = "empty_text"
    TOO_LONG = "too_long"
    IDENTICAL_RESPONSES = "identical_responses"
    NO_SHARED_PREFIX = "no_shared_prefix"
    TIE = "tie"
    UNKNOWN_FIELD = "unknown_field"
    DUPLICATE = "duplicate"

    @property
    def severity(self) -> Severity:
        return Severity.ERROR if self in _ERRORS else Severity.WARNING


_ERRORS = {
    Reason.INVALID_JSON,
    Reason.INVALID_UTF8,
    Reason.TRUNCATED,
    Reason.CORRUPT,
    Reason.MISSING_FIELD,
    Reason.WRONG_TYPE,
    Reason.BAD_LABEL,
}


@dataclass(frozen=True)
class Problem:
    """A problem at a place: ``line N`` (1-based, decompressed text) or ``record N`` (1-based)."""

    place: str
    reason: Reason
    detail: str

    @property
    def severity(self) -> Severity:
        return self.reason.severity

    def __str__(self) -> str:
        return f"{self.place}: {self.severity.value} {self.reason.value}: {self.detail}"
