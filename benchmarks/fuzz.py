"""Schema-driven fuzz of the HTTP API (`python -m benchmarks.fuzz [--cases 10000] [--profile tiny]`).

Starts a local app (Ray + Serve, two versions of the family), reads the router's own `/openapi.json` and
lets schemathesis generate requests for every operation, in both its positive mode (valid by the schema)
and its negative mode (each breaking the schema somewhere), sent over HTTP like any client. Round and
completion requests carry an API key; admin requests carry none (the auth boundary is what is fuzzed
there, against a configured admin token: mutating the registry with random but valid admin calls would only test the fuzzer). Completion
cases ask for at most 8 tokens, so the run spends its time on input handling rather than decoding.

Every answer must be below 500, and every 4xx must carry the JSON error body naming the problem. After
the run, one valid round must still be answered exactly as the in-process engine answers it.
Writes `fuzz.md` under --out (default docs/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import time
from collections import Counter
from pathlib import Path

import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

COMPLETION_TOKEN_CAP = 8
WEIGHTS = {"/v1/round": 0.6, "/v1/completions": 0.12}  # the rest share what is left equally


class FuzzRecord:
    def __init__(self) -> None:
        self.status: Counter = Counter()  # (operation, mode, status) -> cases
        self.failures: list[dict] = []
        self.no_negative: list[str] = []  # operations with nothing to break (no parameters, no body)

    @property
    def cases(self) -> int:
        return sum(self.status.values())


def check_response(resp: requests.Response) -> str | None:
    """Why this answer is wrong, or None: never a 5xx; every 4xx a JSON error body with a code and message."""
    if resp.status_code >= 500:
        return f"server error {resp.status_code}"
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{resp.status_code} without a JSON error body: {resp.text[:120]!r}"
        if not err.get("code") or not err.get("message"):
            return f"{resp.status_code} error body lacks code or message: {err}"
    return None


def has_inputs(op) -> bool:
    return bool(len(op.body) or len(op.path_parameters) or len(op.query))


def plan_cases(operations: list, total: int) -> dict[str, int]:
    """Cases per operation: 1 for an operation without inputs; fixed shares for rounds and completions; the
    rest split equally among the other operations with inputs."""
    plan = {op.label: 1 for op in operations if not has_inputs(op)}
    budget = total - len(plan)
    named = {op.label: WEIGHTS.get(op.path, 0.0) for op in operations if has_inputs(op)}
    others = [k for k, w in named.items() if w == 0.0]
    rest = (1.0 - sum(named.values())) / max(1, len(others))
    return plan | {k: max(1, int(budget * (w or rest))) for k, w in named.items()}


def fuzz_operation(op, n: int, base_url: str, headers: dict, record: FuzzRecord) -> None:
    from schemathesis import GenerationMode

    session = requests.Session()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=max(1, n // 2), database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            if op.path == "/v1/completions" and isinstance(case.body, dict):
                if isinstance(case.body.get("max_tokens"), int) and case.body["max_tokens"] > COMPLETION_TOKEN_CAP:
                    case.body["max_tokens"] = COMPLETION_TOKEN_CAP
            resp = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
            record.status[(op.label, mode.value, resp.status_code)] += 1
            problem = check_response(resp)
            if problem:
                record.failures.append({"operation": op.label, "mode": mode.value, "problem": problem,
                                        "curl": case.as_curl_command(headers=headers)})

        try:
            run()
        except Unsatisfiable:  # nothing to break: an operation without parameters or body has no negative cases
            record.no_negative.append(op.label)


def fuzz(base_url: str, total: int, api_key: str) -> FuzzRecord:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    record, plan = FuzzRecord(), plan_cases(operations, total)
    for op in operations:
        _fuzz_logged(op, plan[op.label], base_url, api_key, record)
    rounds = next(op for op in operations if op.path == "/v1/round")
    while record.cases < total:  # operations without negative cases fall short: rounds make up the rest
        _fuzz_logged(rounds, total - record.cases + 1, base_url, api_key, record)
    return record


def _fuzz_logged(op, n: int, base_url: str, api_key: str, record: FuzzRecord) -> None:
    headers = {} if op.path.startswith("/admin") else {"authorization": f"Bearer {api_key}"}
    before, started = record.cases, time.monotonic()
    fuzz_operation(op, n, base_url, headers, record)
    logging.info("%s: %d cases in %.0f s", op.label, record.cases - before, time.monotonic() - started)


def valid_round_still_correct(base_url: str, api_key: str, family: Path) -> bool:
    """A first round through HTTP equals the in-process engine's answer for the same round."""
    from flexspec_serve import protocol as P
    from flexspec_serve.engine.verifier import Verifier, VerifyRequest
    from flexspec_serve.zoo.loading import load_causal_lm

    prompt, drafts = [5, 17, 42, 7, 99, 3], [11, 12, 13, 14]
    rnd = P.DraftRound(session_id=f"after-fuzz-{secrets.token_hex(4)}", seq=0, target="v1",
                       full_context=prompt, draft_tokens=drafts)
    resp = requests.post(f"{base_url}/v1/round", data=rnd.model_dump_json(), timeout=30,
                         headers={"authorization": f"Bearer {api_key}", "content-type": "application/json"})
    served = P.RoundResult.model_validate(resp.json())
    local = Verifier(load_causal_lm(family / "v1"), load_causal_lm(family / "draft")).verify(
        [VerifyRequest("x", 0, tuple(drafts), full_context=tuple(prompt))])[0]
    return resp.status_code == 200 and (served.accepted, served.token) == (local.accepted, local.token)


def write(out: Path, record: FuzzRecord, still_correct: bool, meta: dict) -> Path:
    rows: dict[tuple[str, str], Counter] = {}
    for (label, mode, status), n in record.status.items():
        rows.setdefault((label, mode), Counter())[status] += n
    lines = [
        "# HTTP API fuzz (schemathesis, from the router's own OpenAPI schema)\n",
        f"Command: `{meta['command']}`  \nmachine: {meta['machine']}; family {meta['family']}; schemathesis "
        f"{meta['schemathesis']}; {meta['seconds']:.0f} s\n",
        f"**{record.cases} generated cases; {len(record.failures)} failed the checks (a 5xx, or a 4xx without the "
        f"JSON error body); a valid round afterwards was answered {'exactly as the in-process engine' if still_correct else 'WRONGLY'}.**\n",
        "| operation | mode | cases | statuses |", "|---|---|---|---|",
        *[f"| `{label}` | {mode} | {sum(c.values())} | "
          + ", ".join(f"{s}: {n}" for s, n in sorted(c.items())) + " |" for (label, mode), c in sorted(rows.items())],
        "\npositive: valid by the schema; negative: each case breaks the schema somewhere (types, bounds, "
        "unknown fields, bodies, binary garbage on the compact content type). Round and completion cases carry "
        f"an API key; admin cases none. Completion cases ask for at most {COMPLETION_TOKEN_CAP} tokens. "
        f"No negative cases exist for: {', '.join(f'`{x}`' for x in record.no_negative) or 'none'} (nothing to "
        "break: no parameters, no body).\n",
    ]
    if record.failures:
        lines += ["## Failures (first 20)\n", *[f"- {f['operation']} ({f['mode']}): {f['problem']}\n  `{f['curl']}`"
                                               for f in record.failures[:20]]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.md").write_text("\n".join(lines) + "\n")
    return out / "fuzz.md"


def main() -> None:
    import schemathesis

    from deployments.cli import family_app_config, start_local_app
    from flexspec_serve import paths
    from flexspec_serve.config import zoo_profile
    from flexspec_serve.reports import machine
    from flexspec_serve.zoo.family import build_family

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    family = paths.family_dir(args.profile)
    build_family(zoo_profile(args.profile), family)
    api_key = secrets.token_urlsafe(16)
    os.environ["FLEXSPEC_API_KEYS"] = f"fuzz:{api_key}"  # the local Ray's replicas inherit both
    os.environ["FLEXSPEC_ADMIN_TOKEN"] = secrets.token_urlsafe(16)  # admin cases carry none: 401 expected
    cfg = family_app_config(family, ["v1", "v2"], session_rounds_per_s=1e6, session_burst=1e6)
    start_local_app(cfg, port=args.port)
    base = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    record = fuzz(base, args.cases, api_key)
    seconds = time.monotonic() - started
    ok = valid_round_still_correct(base, api_key, family)
    meta = {"command": f"python -m benchmarks.fuzz --profile {args.profile} --cases {args.cases}",
            "machine": machine(), "family": family.name, "schemathesis": schemathesis.__version__, "seconds": seconds}
    print(write(args.out, record, ok, meta).read_text())
    print(json.dumps({"cases": record.cases, "failures": len(record.failures), "valid_round_ok": ok}))


if __name__ == "__main__":
    main()
