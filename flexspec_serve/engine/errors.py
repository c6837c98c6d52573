"""Exceptions raised inside the engine; the wire layer turns them into error bodies."""


class EngineError(Exception):
    """Base class; `code` is the stable machine-readable name used on the wire."""

    code = "engine_error"
    http_status = 500


class InvalidRequest(EngineError):
    """The request itself is wrong (token out of vocabulary, K above the maximum, context too long)."""

    code = "invalid_request"
    http_status = 422

    def __init__(self, field: str, value: object, message: str):
        self.field, self.value = field, value
        super().__init__(f"{field}={value!r}: {message}")


class ContextTooLong(InvalidRequest):
    """Context + K + 1 would exceed the model's positions: the session cannot grow further on this model."""

    code = "context_too_long"

    def __init__(self, total: int, max_positions: int):
        super().__init__("context", total, f"context + K + 1 exceeds the model's {max_positions} positions")


class ResyncRequired(EngineError):
    """The server holds no state for this session: resend the round with the full context."""

    code = "resync_required"
    http_status = 409


class SequenceError(ResyncRequired):
    """The round's sequence number is stale or skips ahead: resend with the full context."""

    code = "bad_sequence"


class ConditionNotMet(EngineError):
    """A pipelined round whose assumption does not hold: its predecessor did not commit the tokens it assumed
    (a miss, or the predecessor is not verified yet). Nothing changed; an expected outcome, not a fault."""

    code = "condition_not_met"
    http_status = 409


class RoundFailed(EngineError):
    """Deciding this round failed inside the engine (a bug, not the client's doing). The session is dropped
    (its next round resyncs from the client's context) and the round's batch-mates are unaffected."""

    code = "round_failed"
    http_status = 500
