"""The wire protocol between edge and cloud: pydantic models and two encodings.

- JSON: `model.model_dump_json()` / `Model.model_validate_json()`, for debugging and curl;
- compact: msgpack arrays in a fixed field order, with token lists bit-packed at the width the largest
  id needs (11 bits for a 2048-token vocabulary), trailing empty fields omitted. Content type
  `application/x-flexspec`.

The uplink carries token ids only, never probability vectors: the draft is frozen and shared, so the
cloud recomputes q with its own copy. Both encodings decode into the same validated models, so every
limit below applies to both. Errors travel as `ErrorBody`; exceptions stay inside the process.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.verifier import RoundOutcome, VerifyRequest

PROTOCOL_VERSION = 1
COMPACT_CONTENT_TYPE = "application/x-flexspec"
MAX_TOKENS_PER_FIELD = 32_768
MAX_DRAFT_TOKENS_WIRE = 64
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]


class ProtocolError(ValueError):
    """A payload that cannot be decoded or does not validate; `field` names the first bad field."""

    def __init__(self, message: str, field: str | None = None, value: object = None):
        super().__init__(message)
        self.field, self.value = field, value


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Wire):
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass; 1 = off")
    seed: int = Field(0, ge=0, lt=1 << 63, description="seeds the session's random numbers")


class DraftRound(_Wire):
    """One round from the edge: draft tokens to verify on top of the session's committed context."""

    protocol_version: Literal[1] = Field(PROTOCOL_VERSION, description="wire protocol version")
    session_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")
    seq: int = Field(ge=0, lt=1 << 31, description="round sequence number: 0, 1, 2, ... per session")
    target: str | None = Field(None, max_length=64, description="version or alias; None = the pinned one")
    new_context: list[TokenId] = Field(default_factory=list, max_length=MAX_TOKENS_PER_FIELD,
                                       description="context tokens the client added since its last round")
    draft_tokens: list[TokenId] = Field(default_factory=list, max_length=MAX_DRAFT_TOKENS_WIRE,
                                        description="d_1..d_K (K may be 0: cloud-only step)")
    sampling: Sampling | None = Field(None, description="set on the first round; None = greedy")
    full_context: list[TokenId] | None = Field(None, max_length=MAX_TOKENS_PER_FIELD,
                                               description="every committed token: first round and resync")
    assume: list[TokenId] | None = Field(None, min_length=1, max_length=MAX_DRAFT_TOKENS_WIRE + 1,
                                         description="pipelined round: the tokens round seq-1 must have committed "
                                         "(its drafts and the draft's guess); else condition_not_met")
    tree_parents: list[Annotated[int, Field(ge=-1, lt=MAX_DRAFT_TOKENS_WIRE)]] | None = Field(
        None, max_length=MAX_DRAFT_TOKENS_WIRE, description="a token tree: the parent of each "
        "draft token, -1 for the last context token, else an earlier draft token's index")

    def to_request(self) -> VerifyRequest:
        s = self.sampling or Sampling()
        return VerifyRequest(
            session_id=self.session_id, seq=self.seq, draft_tokens=tuple(self.draft_tokens),
            new_context=tuple(self.new_context),
            full_context=None if self.full_context is None else tuple(self.full_context),
            sampling=SamplingParams(s.temperature, s.top_p, s.seed),
            assume=None if self.assume is None else tuple(self.assume),
            parents=None if self.tree_parents is None else tuple(self.tree_parents),
        )


class ServerTimings(_Wire):
    queue_ms: float = Field(0.0, description="time waiting for a batch")
    verify_ms: float = Field(0.0, description="forward passes and decisions for the batch")
    batch_size: int = Field(1, ge=1, description="rounds verified together")
    held_ms: float = Field(0.0, ge=0, description="an emulated cloud (VersionSpec.emulate_cloud): how long the batch "
                           "was held after verify_ms to take its profile's time")


class RoundResult(_Wire):
    protocol_version: Literal[1] = PROTOCOL_VERSION
    session_id: str
    seq: int
    accepted: int = Field(ge=0, description="n: draft tokens kept")
    token: int = Field(ge=0, description="recovered token (n < K) or bonus token (n == K)")
    bonus: bool
    version: str = Field(description="the target version that served the round")
    context_len: int = Field(ge=1, description="committed tokens after this round")
    cache_hit: bool = True
    timings: ServerTimings = Field(default_factory=ServerTimings)
    path: list[int] | None = Field(None, description="a token tree: the accepted draft tokens' indices, root first")

    @classmethod
    def from_outcome(cls, out: RoundOutcome, version: str, queue_ms: float = 0.0, held_ms: float = 0.0) -> RoundResult:
        return cls(session_id=out.session_id, seq=out.seq, accepted=out.accepted, token=out.token, bonus=out.bonus,
                   version=version, context_len=out.context_len, cache_hit=out.cache_hit,
                   timings=ServerTimings(queue_ms=round(queue_ms, 3), verify_ms=out.verify_ms,
                                         batch_size=out.batch_size, held_ms=round(held_ms, 3)),
                   path=None if out.path is None else list(out.path))


class ErrorDetail(_Wire):
    code: str = Field(description="stable machine-readable name, e.g. resync_required, invalid_request")
    message: str
    field: str | None = None
    value: str | None = Field(None, description="the offending value, shortened")
    retry_after_s: float | None = None


class ErrorBody(_Wire):
    error: ErrorDetail

    @classmethod
    def of(cls, code: str, message: str, field: str | None = None, value: object = None, **kw) -> ErrorBody:
        shown = None if value is None else repr(value)[:200]
        return cls(error=ErrorDetail(code=code, message=message, field=field, value=shown, **kw))


# --------------------------------------------------------------------------- compact encoding

_ROUND_FIELDS = ("protocol_version", "session_id", "seq", "target", "new_context", "draft_tokens", "sampling",
                 "full_context", "assume", "tree_parents")
_TOKEN_FIELDS = {"new_context", "draft_tokens", "full_context", "assume"}
_RESULT_FIELDS = ("protocol_version", "session_id", "seq", "accepted", "token", "bonus", "version", "context_len",
                  "cache_hit", "timings", "path")


def pack_tokens(tokens: list[int]) -> bytes:
    """[header byte: width (5 bits) | padding bits (3 bits) << 5][ids bit-packed at `width` bits, MSB first]."""
    if not tokens:
        return b"\x00"
    arr = np.asarray(tokens, dtype=np.uint64)
    width = max(1, int(arr.max()).bit_length())
    if width > 31:
        raise ProtocolError(f"token id {int(arr.max())} does not fit 31 bits", "tokens", int(arr.max()))
    bits = ((arr[:, None] >> np.arange(width - 1, -1, -1, dtype=np.uint64)) & 1).astype(np.uint8)
    pad = -(len(tokens) * width) % 8
    return bytes([width | pad << 5]) + np.packbits(bits.reshape(-1)).tobytes()


def unpack_tokens(blob: bytes, field: str) -> list[int]:
    if not blob:
        raise ProtocolError(f"{field}: empty token blob", field)
    width, pad, body = blob[0] & 31, blob[0] >> 5, np.frombuffer(blob[1:], dtype=np.uint8)
    if width == 0:
        if pad or body.size:
            raise ProtocolError(f"{field}: malformed empty token list", field)
        return []
    n_bits = body.size * 8 - pad
    if n_bits <= 0 or n_bits % width:
        raise ProtocolError(f"{field}: {body.size} bytes do not hold whole {width}-bit tokens", field)
    bits = np.unpackbits(body)[:n_bits].reshape(-1, width).astype(np.uint64)
    return (bits << np.arange(width - 1, -1, -1, dtype=np.uint64)).sum(axis=1).astype(np.int64).tolist()


def encode_round(r: DraftRound) -> bytes:
    row = []
    for name in _ROUND_FIELDS:
        value = getattr(r, name)
        if name in _TOKEN_FIELDS and value is not None:
            value = pack_tokens(value) if (value or name == "draft_tokens") else None
        elif name == "sampling" and value is not None:
            value = [value.temperature, value.top_p, value.seed]
        row.append(value)
    while row and row[-1] is None:
        row.pop()
    return msgpack.packb(row, use_bin_type=True)


def decode_round(payload: bytes) -> DraftRound:
    row = _unpack_array(payload, len(_ROUND_FIELDS))
    data = {}
    for name, value in zip(_ROUND_FIELDS, row):
        if value is None:
            continue
        if name in _TOKEN_FIELDS:
            if not isinstance(value, bytes):
                raise ProtocolError(f"{name}: expected packed token bytes", name, type(value).__name__)
            value = unpack_tokens(value, name)
        elif name == "sampling":
            if not isinstance(value, list) or len(value) != 3:
                raise ProtocolError("sampling: expected [temperature, top_p, seed]", name, value)
            value = dict(zip(("temperature", "top_p", "seed"), value))
        data[name] = value
    return validate(DraftRound, data)


def encode_result(r: RoundResult) -> bytes:
    t = r.timings
    timings = [t.queue_ms, t.verify_ms, t.batch_size] + ([t.held_ms] if t.held_ms else [])  # no bytes unless held
    row = [timings if n == "timings" else getattr(r, n) for n in _RESULT_FIELDS]
    while row and row[-1] is None:
        row.pop()
    return msgpack.packb(row, use_bin_type=True)


def decode_result(payload: bytes) -> RoundResult:
    row = _unpack_array(payload, len(_RESULT_FIELDS))
    data = dict(zip(_RESULT_FIELDS, row))
    if isinstance(data.get("timings"), list):
        data["timings"] = dict(zip(("queue_ms", "verify_ms", "batch_size", "held_ms"), data["timings"]))
    return validate(RoundResult, data)


def _unpack_array(payload: bytes, max_len: int) -> list:
    try:
        row = msgpack.unpackb(payload, raw=False, max_bin_len=1 << 20, max_array_len=1 << 16, max_str_len=4096)
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError) as err:
        raise ProtocolError(f"not a valid compact payload: {err}") from None
    if not isinstance(row, list) or not 1 <= len(row) <= max_len:
        raise ProtocolError(f"compact payload must be an array of 1..{max_len} fields")
    return row


def validate(cls: type[BaseModel], data) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ProtocolError(f"{field}: {first['msg']}", field, first.get("input")) from None
