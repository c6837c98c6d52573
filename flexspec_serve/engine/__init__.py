"""The speculative-decoding engine (Ray-free): draft proposer, target verifier, batched KV handling.

Glossary — the terms every module, metric and wire field of this project uses, defined once:

session
    One generation stream (one device, one prompt). Its *committed tokens* are the prompt plus every
    token the target has approved so far. The cloud keeps a KV cache per session and target version.
round
    One draft → verify exchange: the edge proposes K draft tokens, the cloud verifies them in one
    forward pass and returns how many it accepted plus one token of its own.
draft tokens (d_1..d_K)
    Tokens proposed by the frozen draft model on the edge, sampled from q (the draft distribution);
    K may change every round and may be 0.
q, p
    q_i = draft probability vector at draft position i; p_i = target probability vector at the same
    position (both after temperature and top-p). p_{K+1} is the target's distribution after d_K.
accepted tokens
    The longest prefix d_1..d_n the target keeps: in greedy mode d_i == argmax p_i; in sampling mode each
    d_i survives with probability min(1, p_i(d_i) / q_i(d_i)) (Leviathan et al. 2023, Chen et al. 2023).
recovered (correction) token
    When d_{n+1} is rejected, the target's replacement: argmax p_{n+1} (greedy) or a sample from
    normalize(max(0, p_{n+1} - q_{n+1})) (sampling). It makes the output follow p exactly.
bonus token
    When all K drafts are accepted, one extra token from p_{K+1} for free (argmax or sample).
token tree
    A round whose draft tokens are nodes with parents, several candidates per position (shapes in
    `flexspec_serve.tree`). The *accepted path* runs from the root: greedy follows argmax p; sampling tries a
    node's candidates in the order the draft drew them, by recursive rejection sampling (`engine.sampling`).
    The bonus token follows a path that ends on a leaf; otherwise the token after the path is recovered.
acceptance length (tau)
    Tokens gained per round: accepted + 1 (the recovered or bonus token). Cloud-only rounds (K = 0)
    have tau = 1.
acceptance rate (alpha)
    Per-token probability that a draft token is accepted; with i.i.d. acceptance the expected
    acceptance length at draft length K is (1 - alpha^(K+1)) / (1 - alpha).
resync
    Rebuilding a session's cache from the full committed context the client resends, after the
    server lost it (eviction, replica restart). Results are identical to an uninterrupted session.

What this package does not do: networking, batching policy across time (the Serve deployment's
batcher decides when to call the verifier), channel emulation, or choosing K (see `edge/`).
"""

# errors only: importing the package (e.g. `engine.stats` for the edge controller) must not pull in torch
from flexspec_serve.engine.errors import EngineError, InvalidRequest, ResyncRequired, SequenceError

__all__ = ["EngineError", "InvalidRequest", "ResyncRequired", "SequenceError"]
