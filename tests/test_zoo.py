"""The model family: offline loading, the backbone contract, hashes, manifest, config errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from flexspec_serve.config import ConfigError, ZooProfile, load_yaml, parse_model, zoo_profile
from flexspec_serve.zoo.loading import TokenizerMismatch, check_tokenizers_match, load_causal_lm, load_tokenizer
from flexspec_serve.zoo.manifest import Manifest, backbone_prefixes, count_params, hash_tensors
from flexspec_serve.engine.stats import expected_acceptance_length
from flexspec_serve.zoo.report import acceptance_table, teacher_forced_alpha

TARGETS = ("v1", "v2", "v3")
REPO = Path(__file__).resolve().parents[1]


def test_every_member_loads_offline_with_from_pretrained(tiny_family, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = Manifest.load(tiny_family)
    assert {"v1", "v2", "v3", "v2-unconstrained", "draft"} <= {m.name for m in manifest.members}
    for m in manifest.members:
        model = AutoModelForCausalLM.from_pretrained(tiny_family / m.name)
        tok = AutoTokenizer.from_pretrained(tiny_family / m.name)
        assert model.config.vocab_size == len(tok)
        assert hash_tensors(model) == m.sha256


def test_constrained_versions_share_tokenizer_and_backbone(tiny_family, family_models):
    p = zoo_profile("tiny")
    manifest = Manifest.load(tiny_family)
    vocabs = [load_tokenizer(tiny_family / name).get_vocab() for name in TARGETS + ("draft",)]
    assert all(v == vocabs[0] for v in vocabs)
    hashes = {name: hash_tensors(family_models[name], backbone_prefixes(p.frozen_layers)) for name in TARGETS}
    assert len(set(hashes.values())) == 1
    assert {manifest.member(n).backbone_sha256 for n in TARGETS} == set(hashes.values())
    # the versions really differ above the backbone
    assert len({manifest.member(n).sha256 for n in TARGETS}) == len(TARGETS)


def test_draft_shares_the_backbone_layers_it_reuses(tiny_family, family_models):
    p = zoo_profile("tiny")
    shared = backbone_prefixes(p.draft_shared_layers)
    base = hash_tensors(family_models["draft"], shared)
    for name in TARGETS:
        assert hash_tensors(family_models[name], shared) == base


def test_unconstrained_version_breaks_the_backbone_hash(tiny_family):
    manifest = Manifest.load(tiny_family)
    assert manifest.member("v2-unconstrained").backbone_sha256 != manifest.member("v1").backbone_sha256


def test_draft_costs_at_most_a_third_of_a_target(family_models):
    """Per-token matmul cost scales with the decoder blocks' parameters (embeddings/LM head shared alike)."""

    def block_params(model):
        return sum(p.numel() for p in model.model.layers.parameters())

    assert block_params(family_models["draft"]) * 3 <= block_params(family_models["v1"])
    assert count_params(family_models["draft"])[1] < count_params(family_models["v1"])[1] / 2.9


def test_manifest_round_trips(tiny_family, tmp_path):
    manifest = Manifest.load(tiny_family)
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text())["members"][0]["name"] == "v1"


def test_valid_family_is_reused_not_rebuilt(tiny_family):
    from flexspec_serve.zoo.family import build_family

    started = time.monotonic()
    manifest = build_family(zoo_profile("tiny"), tiny_family, seed=0, coupled=True)
    assert time.monotonic() - started < 5
    assert manifest == Manifest.load(tiny_family)


def test_build_is_deterministic_for_a_seed(tmp_path):
    from flexspec_serve.config import PROFILES
    from flexspec_serve.zoo.family import build_family

    micro = dict(PROFILES["tiny"], name="micro", tokenizer_chars=60_000, corpus_chars=60_000, corpus="stdlib",
                 pretrain=dict(steps=3, lr=1e-3), distill=dict(steps=2, lr=1e-3),
                 evolve=dict(steps=2, lr=1e-3, rank=2), unconstrained=dict(steps=2, lr=1e-3))
    profile = parse_model(ZooProfile, micro, "micro")
    a = build_family(profile, tmp_path / "a", seed=3)
    b = build_family(profile, tmp_path / "b", seed=3)
    assert [m.sha256 for m in a.members] == [m.sha256 for m in b.members]


def test_a_rebuild_keeps_a_matching_v1_and_coupled_drafts_can_be_added_later(tmp_path, caplog):
    from flexspec_serve.config import PROFILES
    from flexspec_serve.zoo.family import build_family

    micro = dict(PROFILES["tiny"], name="micro", tokenizer_chars=60_000, corpus_chars=60_000, corpus="stdlib",
                 pretrain=dict(steps=3, lr=1e-3), distill=dict(steps=2, lr=1e-3),
                 evolve=dict(steps=2, lr=1e-3, rank=2), unconstrained=dict(steps=2, lr=1e-3))
    first = build_family(parse_model(ZooProfile, micro, "micro"), tmp_path / "f", seed=3)
    longer = parse_model(ZooProfile, dict(micro, distill=dict(steps=3, lr=1e-3)), "micro")
    with caplog.at_level("INFO", logger="flexspec_serve.zoo.family"):
        second = build_family(longer, tmp_path / "f", seed=3)
    assert "reusing the tokenizer and v1" in caplog.text and second.build_key != first.build_key
    sha = lambda m: {x.name: x.sha256 for x in m.members}  # noqa: E731
    assert sha(second)["v1"] == sha(first)["v1"] and sha(second)["draft"] != sha(first)["draft"]
    added = build_family(longer, tmp_path / "f", seed=3, coupled=True)
    assert added.coupled and sha(added).items() >= sha(second).items()
    one_shot = build_family(longer, tmp_path / "g", seed=3, coupled=True)
    assert sha(one_shot) == sha(added)  # adding coupled drafts later gives what a coupled build gives


def test_a_corpus_snapshot_answers_what_the_stdlib_answered_and_names_what_it_lacks(tmp_path):
    from flexspec_serve.zoo import corpus

    stdlib = corpus.StdlibCorpus()
    wanted = [("general", "train", 30_000), ("net", "validation", 20_000)]
    corpus.write_snapshot(tmp_path / "c.json.gz", wanted, stdlib)
    snap = corpus.SnapshotCorpus(tmp_path / "c.json.gz")
    assert all(snap.spread(*w) == stdlib.spread(*w) for w in wanted)
    with pytest.raises(KeyError, match="tests/train/30000"):
        snap.spread("tests", "train", 30_000)
    corpus.write_snapshot(tmp_path / "again.json.gz", wanted, stdlib)  # the same bytes: the same build key
    assert (tmp_path / "again.json.gz").read_bytes() == (tmp_path / "c.json.gz").read_bytes()


def test_the_carried_test_family_corpus_holds_every_text_its_build_reads(monkeypatch):
    from flexspec_serve.zoo import corpus

    def no_stdlib(*_):
        raise AssertionError("a snapshot build read this Python's stdlib")

    monkeypatch.setattr(corpus, "iter_source_files", no_stdlib)
    p = zoo_profile("tiny")
    snap = corpus.load_corpus(p.corpus, p.name)
    assert p.corpus == "snapshot" and snap.identity.startswith("snapshot ")
    for request in corpus.requests(p.tokenizer_chars, p.corpus_chars):
        assert sum(map(len, snap.spread(*request))) >= min(request[2], 20_000), request


def test_stdlib_profiles_keep_the_build_key_they_had_before_corpus_snapshots():
    from flexspec_serve.zoo.manifest import build_key

    committed = json.loads((REPO / "docs" / "results" / "family-manifest-default.json").read_text())
    assert build_key(zoo_profile("default"), committed["seed"], committed["python"]) == committed["build_key"]


def test_alpha_of_a_model_against_itself_is_one(family_models, tokenizer):
    v1 = family_models["v1"]
    windows = [tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]]
    greedy, sampling = teacher_forced_alpha(v1, v1, windows, temperature=0.8)
    assert greedy == 1.0
    assert sampling == pytest.approx(1.0, abs=1e-5)
    assert expected_acceptance_length(1.0, 4) == 5.0


def test_acceptance_report_runs_and_orders_contract_breaker_last(tiny_family):
    rows = acceptance_table(tiny_family, n_prompts=2, max_new=12, n_files=1, window=64)
    by_pair = {(r.draft, r.version): r for r in rows}
    assert {("draft", v) for v in TARGETS + ("v2-unconstrained",)} <= set(by_pair)
    assert ("coupled/draft-v2", "v2") in by_pair
    for r in rows:
        assert 0.0 <= r.alpha_greedy <= 1.0 and 1.0 <= r.tau_greedy <= 5.0 and 0 < r.distinct_share <= 1
    frozen_alpha = min(by_pair[("draft", v)].alpha_greedy for v in TARGETS)
    assert by_pair[("draft", "v2-unconstrained")].alpha_greedy < frozen_alpha


def test_mismatched_tokenizers_are_refused_naming_both_models(tokenizer, tmp_path):
    from flexspec_serve.zoo.tokenizer import train_tokenizer

    other = train_tokenizer(["def f(x):\n    return x * 2\n" * 50], 300, tmp_path / "other")
    check_tokenizers_match("draft", tokenizer, "v1", tokenizer)
    with pytest.raises(TokenizerMismatch, match="'draft'.*'other-target'"):
        check_tokenizers_match("draft", tokenizer, "other-target", other)


@pytest.mark.parametrize(
    "patch, field",
    [({"hidden_size": "wide"}, "hidden_size"), ({"num_layers": 1}, "num_layers"),
     ({"colour": "blue"}, "colour"), ({"pretrain": {"steps": 0, "lr": 1e-3}}, "pretrain.steps")],
)
def test_bad_zoo_config_names_field_and_value(tmp_path, patch, field):
    import yaml

    from flexspec_serve.config import PROFILES

    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({**PROFILES["tiny"], **patch}))
    with pytest.raises(ConfigError) as info:
        load_yaml(ZooProfile, path)
    assert field in str(info.value) and "zoo.yaml" in str(info.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        zoo_profile("huge")


def test_cli_zoo_build_reports_config_errors_without_traceback(tmp_path, capsys):
    from flexspec_serve.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvocab_size: 3\n")
    assert main(["zoo", "build", "--config", str(bad), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "vocab_size" in err and "Traceback" not in err


def test_loading_never_reaches_the_network(tmp_path):
    with pytest.raises(OSError):
        load_causal_lm("no-such-org/no-such-model-xyz")
    assert torch.get_num_threads() >= 1


def test_family_config_from_zoo_loads_every_pair(tiny_family):
    from flexspec_serve.models import FamilyConfig, load_pair

    cfg = FamilyConfig.from_zoo(tiny_family)
    assert [t.name for t in cfg.targets] == ["v1", "v2", "v3", "v2-unconstrained"]
    pair = load_pair(cfg, "v3")
    assert pair.target.config.vocab_size == pair.draft.config.vocab_size == len(pair.tokenizer)


def test_family_config_refuses_a_target_with_another_tokenizer(tiny_family, tmp_path):
    import shutil

    from flexspec_serve.models import FamilyConfig, load_pair
    from flexspec_serve.zoo.tokenizer import train_tokenizer

    other = tmp_path / "other-target"
    shutil.copytree(tiny_family / "v1", other)
    train_tokenizer(["import os\nprint(os.getcwd())\n" * 40], 300, other)
    cfg = FamilyConfig(draft={"name": "draft", "path": str(tiny_family / "draft")},
                       targets=[{"name": "other", "path": str(other)}])
    with pytest.raises(TokenizerMismatch, match="other-target"):
        load_pair(cfg, "other")


def test_family_config_errors_name_the_field():
    from flexspec_serve.models import FamilyConfig

    with pytest.raises(ConfigError, match="targets"):
        parse_model(FamilyConfig, {"draft": {"name": "d", "path": "x"}, "targets": []}, "family.yaml")
    with pytest.raises(ConfigError, match="repeated"):
        parse_model(FamilyConfig, {"draft": {"name": "d", "path": "x"},
                                   "targets": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "f")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        parse_model(FamilyConfig, {"draft": {"name": "d", "path": "x", "trust_remote_code": "maybe"},
                                   "targets": [{"name": "a", "path": "x"}]}, "f")


def test_every_cli_subcommand_has_help():
    from flexspec_serve.cli import build_parser

    parser = build_parser()
    commands = [["zoo", "build"], ["zoo", "report"], ["zoo", "info"], ["demo"],
                ["serve", "up"], ["serve", "status"], ["serve", "down"], ["loadtest"], ["plan"],
                ["report", "communication"], ["report", "compat"], ["report", "adaptation"],
                *[["versions", op] for op in ("list", "add", "check", "canary", "promote", "set-weights", "rollback",
                                              "retire")]]
    for argv in commands:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([*argv, "--help"])
        assert info.value.code == 0
