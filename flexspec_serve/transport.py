"""How a round reaches a verifier. The in-process transports run the real wire encoding both ways, so
byte counts are the ones a network would carry; Ray-handle and HTTP transports implement the same
interfaces in the serving package:

- `Transport.round_trip(rounds)`: a batch of rounds, blocking (the batched generation loop);
- `AsyncTransport.send(round)`: one round, awaited (asyncio fleet devices). Failures of the path itself
  (connection lost, replica died mid-call) raise `TransportError`; answers from the service, errors
  included, come back as an `Exchange`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flexspec_serve import protocol as P
from flexspec_serve.batching import MicroBatcher
from flexspec_serve.engine.errors import EngineError
from flexspec_serve.engine.verifier import Verifier


class RoundFailed(Exception):
    def __init__(self, body: P.ErrorBody):
        super().__init__(f"{body.error.code}: {body.error.message}")
        self.body = body


class TransportError(Exception):
    """The round may or may not have reached the service; resending it is safe (rounds are idempotent)."""


@dataclass
class Exchange:
    """One round as it crossed the wire."""

    result: P.RoundResult | P.ErrorBody
    bytes_up: int
    bytes_down: int


class Transport(Protocol):
    def round_trip(self, rounds: list[P.DraftRound]) -> list[Exchange]: ...


class AsyncTransport(Protocol):
    async def send(self, rnd: P.DraftRound) -> Exchange: ...


class LocalTransport:
    """Encode -> decode -> verify (as one batch) -> encode -> decode, all in this process."""

    def __init__(self, verifier: Verifier, version: str | None = None, compact: bool = True):
        self.verifier, self.version, self.compact = verifier, version or verifier.name, compact

    def round_trip(self, rounds: list[P.DraftRound]) -> list[Exchange]:
        payloads = [P.encode_round(r) if self.compact else r.model_dump_json().encode() for r in rounds]
        decoded = [P.decode_round(b) if self.compact else P.DraftRound.model_validate_json(b) for b in payloads]
        outcomes = self.verifier.verify([r.to_request() for r in decoded])
        exchanges = []
        for up, out in zip(payloads, outcomes):
            if isinstance(out, EngineError):
                body = P.ErrorBody.of(out.code, str(out), getattr(out, "field", None), getattr(out, "value", None))
                exchanges.append(Exchange(body, len(up), len(body.model_dump_json())))
                continue
            result = P.RoundResult.from_outcome(out, self.version)
            down = P.encode_result(result) if self.compact else result.model_dump_json().encode()
            back = P.decode_result(down) if self.compact else P.RoundResult.model_validate_json(down)
            exchanges.append(Exchange(back, len(up), len(down)))
        return exchanges


class AsyncLocalTransport:
    """`send` for asyncio clients in this process: rounds that arrive while the previous batch runs (or within
    `batch_wait_ms` after it) are verified as one batch on a worker thread, as a verifier replica does."""

    def __init__(self, verifier: Verifier, batch_wait_ms: float = 2.0, max_batch_size: int = 64):
        self.batcher = MicroBatcher(LocalTransport(verifier).round_trip, batch_wait_ms, max_batch_size, "verify")

    async def send(self, rnd: P.DraftRound) -> Exchange:
        return await self.batcher.submit(rnd)
