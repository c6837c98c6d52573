"""The wire protocol: both encodings round-trip, the compact one is small, garbage never crashes it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexspec_serve.protocol import (
    DraftRound, ErrorBody, ProtocolError, RoundResult, Sampling, ServerTimings, decode_result, decode_round, encode_result,
    encode_round, pack_tokens, unpack_tokens,
)

token_lists = st.lists(st.integers(0, (1 << 31) - 1), max_size=70)


@given(token_lists)
def test_token_packing_round_trips(tokens):
    assert unpack_tokens(pack_tokens(tokens), "t") == tokens


@settings(max_examples=200)
@given(st.builds(
    DraftRound, session_id=st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True), seq=st.integers(0, 2**31 - 1),
    target=st.none() | st.sampled_from(["v1", "stable", "canary"]), new_context=st.lists(st.integers(0, 70_000), max_size=20),
    draft_tokens=st.lists(st.integers(0, 151_000), max_size=16),
    sampling=st.none() | st.builds(Sampling, temperature=st.floats(0, 10), top_p=st.floats(0.01, 1), seed=st.integers(0, 2**62)),
    full_context=st.none() | st.lists(st.integers(0, 151_000), min_size=1, max_size=50),
    assume=st.none() | st.lists(st.integers(0, 151_000), min_size=1, max_size=17),
))
def test_both_encodings_round_trip(round_):
    assert decode_round(encode_round(round_)) == round_
    assert DraftRound.model_validate_json(round_.model_dump_json()) == round_


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_payloads_raise_protocol_error_only(blob):
    try:
        decode_round(blob)
    except ProtocolError:
        pass


def test_compact_uplink_is_token_ids_at_vocabulary_width():
    drafts = [2047, 5, 1024, 77, 1500, 3, 999, 1]
    steady = DraftRound(session_id="dev-00042", seq=17, draft_tokens=drafts)
    blob = encode_round(steady)
    assert len(pack_tokens(drafts)) - 1 <= 11 * len(drafts) / 8 + 1  # 11 bits per id for a 2048 vocabulary
    assert len(blob) <= 4 * len(drafts) + 16
    assert len(blob) < len(steady.model_dump_json()) / 4


def test_result_round_trips_compact():
    r = RoundResult(session_id="a", seq=3, accepted=2, token=9, bonus=False, version="v2", context_len=40)
    assert decode_result(encode_result(r)) == r
    held = r.model_copy(update={"timings": ServerTimings(queue_ms=1.5, verify_ms=4.25, batch_size=3, held_ms=17.5)})
    assert decode_result(encode_result(held)) == held
    unheld = held.model_copy(update={"timings": held.timings.model_copy(update={"held_ms": 0.0})})
    assert len(encode_result(unheld)) < len(encode_result(held))  # a server that holds nothing sends no hold


@pytest.mark.parametrize("patch, field", [
    ({"protocol_version": 2}, "protocol_version"), ({"seq": -1}, "seq"), ({"draft_tokens": [-3]}, "draft_tokens.0"),
    ({"draft_tokens": list(range(65))}, "draft_tokens"), ({"session_id": "a b"}, "session_id"), ({"extra": 1}, "extra"),
    ({"assume": []}, "assume"),
])
def test_invalid_rounds_name_the_field(patch, field):
    with pytest.raises(ProtocolError) as info:
        from flexspec_serve.protocol import validate

        validate(DraftRound, {"session_id": "s", "seq": 0, **patch})
    assert info.value.field == field


def test_error_body_quotes_the_value():
    body = ErrorBody.of("invalid_request", "bad", field="draft_tokens", value=[1, 2])
    assert body.error.value == "[1, 2]" and body.model_dump()["error"]["field"] == "draft_tokens"
