"""The `flexspec` command line. Core subcommands live here; packages such as `deployments` add theirs
through the `flexspec_serve.commands` entry-point group (a function taking the subparsers object), so
the core never imports them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from importlib.metadata import entry_points
from pathlib import Path

from flexspec_serve import paths
from flexspec_serve.config import PROFILES, ConfigError, ZooProfile, load_yaml, zoo_profile

log = logging.getLogger("flexspec")


def _add_zoo(sub) -> None:
    zoo = sub.add_parser("zoo", help="build and inspect the offline model family")
    zsub = zoo.add_subparsers(dest="zoo_cmd", required=True)
    b = zsub.add_parser("build", help="train tokenizer, backbone v1, versions v2/v3, the unconstrained contrast "
                                      "and the frozen draft (offline, CPU)")
    b.add_argument("--profile", default="default", choices=sorted(PROFILES), help="size preset (default: %(default)s)")
    b.add_argument("--config", type=Path, help="YAML ZooProfile overriding --profile")
    b.add_argument("--out", type=Path, help="output directory (default: $FLEXSPEC_HOME/zoo/<profile>-seed<seed>)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--coupled", action="store_true", help="also re-distil a draft per version (coupled SD baseline)")
    b.add_argument("--force", action="store_true", help="rebuild even if a valid family exists")
    b.set_defaults(func=cmd_zoo_build)
    r = zsub.add_parser("report", help="acceptance of the frozen (and coupled) draft against every version")
    _family_args(r)
    r.add_argument("--prompts", type=int, default=20, help="HumanEval prompts for measured acceptance")
    r.add_argument("--max-new", type=int, default=64, help="tokens generated per prompt")
    r.add_argument("--files", type=int, default=8, help="held-out stdlib files for teacher-forced alpha")
    r.add_argument("--json", type=Path, help="also write the table as JSON")
    r.set_defaults(func=cmd_zoo_report)
    i = zsub.add_parser("info", help="print the family manifest as a table")
    _family_args(i)
    i.set_defaults(func=cmd_zoo_info)
    s = zsub.add_parser("snapshot", help="write the texts a profile's build reads from this Python's stdlib into the "
                                         "package (for profiles with `corpus: snapshot`: the same texts everywhere)")
    s.add_argument("--profile", default="tiny", choices=sorted(PROFILES))
    s.add_argument("--out", type=Path, help="file to write (default: the package's data/corpus/<profile>.json.gz)")
    s.set_defaults(func=cmd_zoo_snapshot)


def _family_args(p) -> None:
    p.add_argument("--family", type=Path, help="family directory (default: the --profile one)")
    p.add_argument("--profile", default="default", choices=sorted(PROFILES))
    p.add_argument("--seed", type=int, default=0)


def _family_dir(args) -> Path:
    return args.family or paths.family_dir(args.profile, args.seed)


def cmd_zoo_build(args) -> int:
    from flexspec_serve.zoo.family import build_family

    profile = load_yaml(ZooProfile, args.config) if args.config else zoo_profile(args.profile)
    out = args.out or paths.family_dir(profile.name, args.seed)
    manifest = build_family(profile, out, seed=args.seed, coupled=args.coupled, force=args.force)
    _print_manifest(manifest)
    print(f"family: {out}  (built in {manifest.build_seconds:.0f} s)")
    return 0


def cmd_zoo_snapshot(args) -> int:
    from flexspec_serve.zoo import corpus

    p = zoo_profile(args.profile)
    out = args.out or corpus.SNAPSHOT_DIR / f"{p.name}.json.gz"
    sizes = corpus.write_snapshot(out, corpus.requests(p.tokenizer_chars, p.corpus_chars), corpus.StdlibCorpus())
    print(f"{out}: {sizes['chars']:,} characters of Python {platform.python_version()}'s stdlib, "
          f"{sizes['bytes']:,} bytes")
    return 0


def cmd_zoo_info(args) -> int:
    from flexspec_serve.zoo.manifest import Manifest

    _print_manifest(Manifest.load(_family_dir(args)))
    return 0


def cmd_zoo_report(args) -> int:
    from flexspec_serve.zoo.report import acceptance_table, rows_as_dicts

    rows = acceptance_table(_family_dir(args), n_prompts=args.prompts, max_new=args.max_new, n_files=args.files)
    print_table("Frozen-draft compatibility (K = 4; tau = acceptance length)", rows_as_dicts(rows))
    if args.json:
        args.json.write_text(json.dumps(rows_as_dicts(rows), indent=2))
    return 0


def _print_manifest(manifest) -> None:
    rows = []
    for m in manifest.members:
        rows.append({"member": m.name, "role": m.role, "parent": m.parent or "-", "slice": m.slice,
                     "params (non-emb)": f"{m.params_non_embedding / 1e6:.2f}M",
                     "backbone": (m.backbone_sha256 or "-")[:10], "sha256": m.sha256[:10],
                     **{f"val {k}": f"{v:.3f}" for k, v in m.val_loss.items()}})
    print_table(f"Model family ({manifest.profile}, seed {manifest.seed})", rows)


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0] if rows else []:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=200).print(table)


def _add_report(sub) -> None:
    from flexspec_serve.reports.cli import add_commands

    rep = sub.add_parser("report", help="regenerate a results report (Markdown + PNG under docs/results)")
    add_commands(rep.add_subparsers(dest="report_cmd", required=True), _family_args, _family_dir)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="build the family if missing, print its compatibility table, and decode a "
                                    "HumanEval prompt speculatively (what `make demo` runs)")
    d.add_argument("--profile", default=os.environ.get("FLEXSPEC_PROFILE", "default"), choices=sorted(PROFILES),
                   help="family profile (default: $FLEXSPEC_PROFILE or %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--prompts", type=int, default=10, help="HumanEval prompts for the compatibility table")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from flexspec_serve.engine.generate import speculative_generate
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.verifier import Verifier
    from flexspec_serve.zoo.corpus import humaneval_problems
    from flexspec_serve.zoo.family import build_family
    from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer
    from flexspec_serve.zoo.report import acceptance_table, rows_as_dicts

    out = paths.family_dir(args.profile, args.seed)
    manifest = build_family(zoo_profile(args.profile), out, seed=args.seed)
    _print_manifest(manifest)
    rows = acceptance_table(out, n_prompts=args.prompts, max_new=48, n_files=4)
    print_table("Frozen draft vs every target version (K = 4)", rows_as_dicts(rows))
    tok, draft = load_tokenizer(out / "v1"), load_causal_lm(out / "draft")
    prompt = humaneval_problems(1)[0].prompt
    for version in ("v1", "v3"):
        res = speculative_generate(DraftProposer(draft), Verifier(load_causal_lm(out / version), draft),
                                   [tok(prompt, add_special_tokens=False)["input_ids"]], 64, 4)[0]
        print(f"\n--- {version}: acceptance length {res.stats.acceptance_length:.2f} over {res.stats.rounds} rounds ---")
        print(prompt[-200:] + "\033[1m" + tok.decode(res.tokens) + "\033[0m")
    print(f"\nfamily: {out}\nnext: `flexspec report adaptation --profile {args.profile}` for the channel-aware K study")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexspec", description="FlexSpec edge-cloud speculative decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_zoo(sub)
    _add_report(sub)
    _add_demo(sub)
    for ep in entry_points(group="flexspec_serve.commands"):
        try:
            ep.load()(sub)
        except ImportError as err:  # an optional part (e.g. Ray) is not installed
            log.debug("command plugin %s unavailable: %s", ep.name, err)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # one line per request
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
