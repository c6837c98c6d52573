"""`flexspec report compat | communication | adaptation`: each regenerates one results report in-process
(no Ray). The serving report needs Ray and is `python -m benchmarks.serve`."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path("docs/results")


def add_commands(rsub, family_args, family_dir) -> None:
    """Register the report subcommands; `family_args(parser)` adds --family/--profile/--seed and
    `family_dir(args)` resolves them (both from the core CLI)."""
    c = rsub.add_parser("compat", help="frozen draft vs re-distilled draft vs unconstrained, per target version")
    family_args(c)
    c.add_argument("--prompts", type=int, default=20, help="HumanEval prompts for measured acceptance")
    c.add_argument("--max-new", type=int, default=64, help="tokens generated per prompt")
    c.add_argument("--files", type=int, default=8, help="held-out stdlib files for teacher-forced alpha")
    c.add_argument("--out", type=Path, default=RESULTS)
    c.set_defaults(func=lambda a: cmd_compat(a, family_dir(a)))

    m = rsub.add_parser("communication", help="bytes sent per target update (frozen vs coupled) and per token "
                                              "(ids vs probability vectors)")
    family_args(m)
    m.add_argument("--target", default="v1")
    m.add_argument("--devices", type=int, default=1000, help="fleet size for the coupled design's update cost")
    m.add_argument("--prompts", type=int, default=10)
    m.add_argument("--max-new", type=int, default=48)
    m.add_argument("--out", type=Path, default=RESULTS)
    m.set_defaults(func=lambda a: cmd_communication(a, family_dir(a)))

    a = rsub.add_parser("adaptation", help="adaptive K vs fixed K vs cloud-only per device class and channel "
                                           "(emulated time, real models), plus load-test comparisons through Serve")
    family_args(a)
    a.add_argument("--target", default="v1", help="target version (default: %(default)s)")
    a.add_argument("--classes", nargs="+", default=["flagship-phone", "midrange-phone", "wearable"])
    a.add_argument("--settings", nargs="+", help="channel settings (default: every carried trace + good fading poor)")
    a.add_argument("--fixed-k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    a.add_argument("--devices-per-cell", type=int, default=4)
    a.add_argument("--max-new", type=int, default=48)
    a.add_argument("--serve-summaries", type=Path, nargs="*", default=None,
                   help="summary.json files of one fleet replayed per policy through Serve (default: "
                        "docs/results/fleet/lte-*/summary.json when present)")
    a.add_argument("--out", type=Path, default=RESULTS / "adaptation")
    a.set_defaults(func=lambda a: cmd_adaptation(a, family_dir(a)))


def _meta(args, family: Path, **extra) -> dict:
    from flexspec_serve.reports import machine

    return {"command": "flexspec " + " ".join(sys.argv[1:]), "machine": machine(), "family": family.name,
            "seed": args.seed, **extra}


def cmd_compat(args, family: Path) -> int:
    from flexspec_serve.reports import compat
    from flexspec_serve.zoo.report import acceptance_table

    manifest = compat.require_coupled(family)
    rows = acceptance_table(family, n_prompts=args.prompts, max_new=args.max_new, n_files=args.files)
    meta = _meta(args, family, profile=manifest.profile, prompts=args.prompts, max_new=args.max_new,
                 versions=[m.name for m in manifest.targets()])
    files = compat.write(args.out, rows, compat.goal_rows(rows, manifest), meta)
    print(files[0].read_text())
    return 0


def cmd_communication(args, family: Path) -> int:
    from flexspec_serve.reports import communication as comm
    from flexspec_serve.zoo.corpus import humaneval_problems
    from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(family / "draft")
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"][-192:] for p in humaneval_problems(args.prompts)]
    draft = load_causal_lm(family / "draft")
    tokens = comm.token_rows(draft, load_causal_lm(family / args.target), prompts, args.max_new)
    meta = _meta(args, family, target=args.target, prompts=args.prompts, max_new=args.max_new, devices=args.devices)
    files = comm.write(args.out, comm.update_rows(family / "draft", args.devices), tokens, meta)
    print(files[0].read_text())
    return 0


def cmd_adaptation(args, family: Path) -> int:
    from flexspec_serve.edge import bench
    from flexspec_serve.reports import adaptation

    cfg = bench.BenchConfig(family=family, target=args.target, classes=tuple(args.classes),
                            fixed_ks=tuple(args.fixed_k), devices_per_cell=args.devices_per_cell,
                            max_new_tokens=args.max_new, seed=args.seed)
    if args.settings:
        cfg.settings = tuple(args.settings)
    cells = bench.run_bench(cfg)
    serve_files = args.serve_summaries
    if serve_files is None:
        serve_files = sorted((RESULTS / "fleet").glob("lte-*/summary.json"))
    meta = _meta(args, family, target=args.target, devices_per_cell=args.devices_per_cell, max_new=args.max_new)
    files = adaptation.write(args.out, cells, bench.analyse(cells, cfg), meta, serve_files)
    print(files[0].read_text())
    return 0
