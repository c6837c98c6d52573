"""`flexspec versions list | add | check | canary | promote | set-weights | rollback | retire`: a thin client of
the router's admin API (the operations themselves live in `deployments.versions`, run by the router).
The admin token comes from `FLEXSPEC_ADMIN_TOKEN` or `--token-file`, never from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("versions", help="manage target versions on a running app (admin API)")
    p.add_argument("--url", default=os.environ.get("FLEXSPEC_URL", "http://127.0.0.1:8000"), help="router base URL")
    p.add_argument("--token-file", type=Path, help="file holding the admin token (else $FLEXSPEC_ADMIN_TOKEN)")
    vs = p.add_subparsers(dest="versions_cmd", required=True)
    vs.add_parser("list", help="versions, aliases, canary and draining state, per-version live stats")
    a = vs.add_parser("add", help="deploy a new version as its own application (takes no traffic yet)")
    a.add_argument("name")
    a.add_argument("path", help="checkpoint directory under the app's model root")
    a.add_argument("--spec", type=Path, help="YAML/JSON VersionSpec fields (replicas, resources, batching)")
    c = vs.add_parser("check", help="compatibility gate: frozen-draft acceptance vs the stable version")
    c.add_argument("name")
    c.add_argument("--min-fraction", type=float, default=0.8)
    c.add_argument("--prompts", type=int, default=8)
    k = vs.add_parser("canary", help="send a share of new `stable` sessions to a version; auto promote/rollback")
    k.add_argument("name")
    k.add_argument("--weight", type=float, default=0.1)
    _rule_flags(k)
    k.add_argument("--force", action="store_true", help="skip the compatibility gate")
    pr = vs.add_parser("promote", help="point an alias (default stable) at a version")
    pr.add_argument("name")
    pr.add_argument("--alias", default="stable")
    w = vs.add_parser("set-weights", help="alias -> version, or a split: set-weights stable v1=0.9 v3=0.1")
    w.add_argument("alias")
    w.add_argument("targets", nargs="+")
    r = vs.add_parser("rollback", help="end the running canary; its alias points at the baseline again")
    r.add_argument("--reason", default="rolled back by operator")
    t = vs.add_parser("retire", help="stop new sessions, drain, then delete the version's application")
    t.add_argument("name")
    t.add_argument("--mode", choices=["finish", "migrate"], default="finish")
    t.add_argument("--to", default="stable")
    p.set_defaults(func=cmd_versions)


def _rule_flags(parser) -> None:
    """A flag per rule of the canary judge; unset ones are left to the server's defaults (shown in the help)."""
    from deployments.config import CanaryRuleFields

    for name, field in CanaryRuleFields.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=field.annotation,
                            help=f"{field.description} (default {field.default:g})")


def _request(args) -> tuple[str, str, dict | None]:
    cmd = args.versions_cmd
    if cmd == "list":
        return "GET", "/admin/registry", None
    if cmd == "add":
        from flexspec_serve.config import load_yaml_dict

        extra = load_yaml_dict(args.spec) if args.spec else {}
        return "POST", "/admin/versions", {**extra, "name": args.name, "path": args.path}
    if cmd == "check":
        return "POST", f"/admin/versions/{args.name}/check", {"min_fraction": args.min_fraction, "prompts": args.prompts}
    if cmd == "canary":
        from deployments.config import CanaryRuleFields

        rules = {f: getattr(args, f) for f in CanaryRuleFields.model_fields}
        return "POST", f"/admin/versions/{args.name}/canary", {
            "weight": args.weight, "force": args.force, **{f: v for f, v in rules.items() if v is not None}}
    if cmd == "promote":
        return "POST", f"/admin/versions/{args.name}/promote", {"alias": args.alias}
    if cmd == "set-weights":
        if len(args.targets) == 1 and "=" not in args.targets[0]:
            return "PUT", f"/admin/aliases/{args.alias}", {"target": args.targets[0]}
        weights = {}
        for item in args.targets:
            name, _, weight = item.partition("=")
            weights[name] = float(weight)
        return "PUT", f"/admin/aliases/{args.alias}", {"target": weights}
    if cmd == "rollback":
        return "POST", "/admin/rollback", {"reason": args.reason}
    return "POST", f"/admin/versions/{args.name}/retire", {"mode": args.mode, "to": args.to}


def cmd_versions(args) -> int:
    import httpx

    from deployments.admin import read_admin_token

    token = read_admin_token(str(args.token_file) if args.token_file else None)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    method, path, body = _request(args)
    with httpx.Client(base_url=args.url, headers=headers, timeout=600) as client:
        resp = client.request(method, path, json=body)
        out = resp.json()
        if args.versions_cmd == "list" and resp.status_code == 200:
            out = {"registry": out, "stats": client.get("/v1/stats").json()}
    print(json.dumps(out, indent=2))
    return 0 if resp.status_code < 400 else 1
