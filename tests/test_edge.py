"""Edge side: channels, traces, the FlexSpec controller and its baselines, fleet specs, the emulator."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import yaml

from flexspec_serve.ahead import Ahead
from flexspec_serve.config import ConfigError, load_yaml
from flexspec_serve.edge.channels import (
    STATISTICAL_SETTINGS, LinkObserver, RadioSetting, StatisticalChannel, TraceChannel, TraceFormatError, make_link, parse_mahimahi,
    trace_names,
)
from flexspec_serve.edge.controller import (
    AcceptanceAdaptive, AcceptanceEstimator, CloudOnly, FixedK, FlexSpecController, RoundView, expected_tau, make_policy,
)
from flexspec_serve.edge.devices import DEVICE_CLASSES, CloudProfile, DeviceProfile
from flexspec_serve.fleet.spec import FleetSpec

PHONE = DEVICE_CLASSES["midrange-phone"]
CLOUD = CloudProfile()


def test_same_seed_gives_the_same_channel_realisation():
    s = STATISTICAL_SETTINGS["fading"]
    times = np.arange(0, 20_000, 97.0)
    a = [StatisticalChannel(s, 5).delivery_ms(400, t) for t in times]
    b = [StatisticalChannel(s, 5).delivery_ms(400, t) for t in times]
    c = [StatisticalChannel(s, 6).delivery_ms(400, t) for t in times]
    assert a == b and a != c


def test_observation_noise_does_not_change_the_true_channel():
    s = STATISTICAL_SETTINGS["fading"]
    quiet, watched = StatisticalChannel(s, 1), StatisticalChannel(s, 1)
    for t in range(0, 5000, 50):
        watched.reported_rate_bps(t)
    assert [quiet.delivery_ms(100, t) for t in range(0, 5000, 50)] == [
        watched.delivery_ms(100, t) for t in range(0, 5000, 50)]


def test_rician_line_of_sight_fades_less_than_rayleigh():
    def spread(k):
        ch = StatisticalChannel(RadioSetting(rician_k=k, coherence_ms=5), 3)
        rates = np.array([ch.rate_bps_at(t) for t in range(0, 200_000, 25)])
        return rates.std() / rates.mean()

    assert spread(10.0) < spread(0.0)


def test_mahimahi_repeated_timestamps_are_several_packets(tmp_path):
    path = tmp_path / "t.up"
    path.write_text("1\n1\n1\n5\n")
    channel = lambda: TraceChannel.from_file(path, one_way_delay_ms=0)  # noqa: E731 (a fresh, idle link each)
    assert channel().delivery_ms(3 * 1500, 0) == 1  # three packets in millisecond 1
    assert channel().delivery_ms(4 * 1500, 0) == 5


def test_mahimahi_trace_loops(tmp_path):
    path = tmp_path / "t.up"
    path.write_text("2\n10\n")
    channel = lambda: TraceChannel.from_file(path, one_way_delay_ms=0)  # noqa: E731
    assert channel().delivery_ms(100, 11) == 12  # next loop: 10 + 2
    assert channel().delivery_ms(3 * 1500, 0) == 12  # 2, 10, then 12


def test_a_links_messages_queue_behind_each_other(tmp_path):
    path = tmp_path / "t.up"
    path.write_text("1\n1\n5\n9\n")
    ch = TraceChannel.from_file(path, one_way_delay_ms=3)
    assert [ch.delivery_ms(100, 0) for _ in range(4)] == [4, 4, 8, 12]  # two opportunities at 1 ms, then 5, 9
    assert ch.delivery_ms(100, 10) == 13  # a message sent after the queue drained: the next loop's 1 ms
    fading = STATISTICAL_SETTINGS["fading"]
    alone, queued = StatisticalChannel(fading, 2), StatisticalChannel(fading, 2)
    first = queued.delivery_ms(20_000, 0.0)
    assert queued.delivery_ms(20_000, 0.0) > first == alone.delivery_ms(20_000, 0.0)


@pytest.mark.parametrize("n_bytes, start, expected", [(1, 0, 1), (1500, 0, 1), (1501, 0, 2), (15_000, 3, 13)])
def test_constant_rate_trace_delivery_is_the_arithmetic(tmp_path, n_bytes, start, expected):
    path = tmp_path / "12mbps.up"
    path.write_text("1\n")  # one 1500-byte packet every millisecond
    ch = TraceChannel.from_file(path, one_way_delay_ms=7)
    assert ch.delivery_ms(n_bytes, start) == expected + 7


@pytest.mark.parametrize("text, where", [("", "no delivery"), ("1\nabc\n", ":2:"), ("5\n3\n", ":2:"), ("0\n", "no delivery")])
def test_malformed_traces_are_refused_naming_the_line(tmp_path, text, where):
    path = tmp_path / "bad.up"
    path.write_text(text)
    with pytest.raises(TraceFormatError, match=where):
        parse_mahimahi(path)


def test_reported_rate_counts_the_opportunities_in_its_window_at_fractional_times():
    link = make_link("TMobile-LTE-short", 3)
    ch = link.up
    stamps, period = [int(x) for x in ch.stamps], ch.period_ms
    rng = np.random.default_rng(0)
    for t in rng.uniform(0, 3 * period, 50).tolist() + [0.25, 200.5, 1199.75]:
        end = (t + ch.offset_ms - 200.0) % period  # the docstring's window: 1 s ending 200 ms before t
        looped = stamps + [s - period for s in stamps]  # the loop before, for windows that wrap
        n = sum(1 for s in looped if end - 1000.0 <= s < end)
        assert ch.reported_rate_bps(t) == max(1, n) * 1500 * 8, t


def test_carried_real_traces_parse_and_look_cellular():
    names = trace_names()
    assert {"ATT-LTE-driving", "TMobile-LTE-short", "TMobile-UMTS-driving", "Verizon-EVDO-driving"} <= set(names)
    for name in names:
        link = make_link(name, 0)
        assert 50e3 < link.up.mean_rate_bps() < 50e6 and 50e3 < link.down.mean_rate_bps() < 50e6


def view(up_ms=30.0, down_ms=30.0, **kw):
    return RoundView(up_ms=up_ms, down_ms=down_ms, **kw)


def controller(alpha, device=PHONE, cloud=CLOUD):
    est = AcceptanceEstimator(prior_a=alpha * 1000, prior_b=(1 - alpha) * 1000)
    return FlexSpecController(device, cloud, k_max=8, estimator=est)


def test_a_batched_verify_costs_the_widest_round_plus_the_others_positions():
    cloud = CloudProfile(10.0, 1.0, 0.1)
    assert cloud.batch_verify_ms([5]) == cloud.verify_ms(4) == 15.0
    assert cloud.batch_verify_ms([2, 5, 3]) == pytest.approx(15.0 + 0.1 * (2 + 3))


def test_controller_picks_smaller_k_when_acceptance_drops():
    assert controller(0.5).choose(view()) < controller(0.9).choose(view())


def test_controller_picks_smaller_k_when_each_draft_token_costs_more_airtime():
    """A collapsing uplink makes every drafted token's bytes expensive (here a scheme sending 256 B/token)."""
    fast = view(up_ms_per_byte=8e3 / 2e6, bytes_per_draft_token=256)  # 2 Mbit/s: ~1 ms per token
    slow = view(up_ms_per_byte=8e3 / 64e3, bytes_per_draft_token=256)  # 64 kbit/s: 32 ms per token
    assert controller(0.8).choose(slow) < controller(0.8).choose(fast)


def test_controller_drafts_more_when_the_round_trip_grows():
    assert controller(0.8).choose(view(200, 200)) > controller(0.8).choose(view(10, 10))


@pytest.mark.parametrize("tree, most_k", [("chain", 12), ("second", 8), ("branches", 8)])
def test_controller_never_picks_a_k_whose_token_tree_the_server_would_refuse(tree, most_k):
    """16 nodes at most: K + K runner-ups (+ branch tokens, grown only within the limit)."""
    est = AcceptanceEstimator(prior_a=999.0, prior_b=1.0)  # acceptance so high that longer always pays
    c = FlexSpecController(PHONE, CloudProfile(18.0, 0.0), k_max=12, estimator=est, tree=tree)
    k = c.choose(view(300, 300))
    assert k == most_k and c.nodes(k) <= 16 and [k for k, *_ in c.plan(view(300, 300))][-1] == most_k


def test_controller_picks_cloud_only_when_drafting_cannot_pay():
    slow = DeviceProfile("slow", 400.0, 10.0, 2.0, 1.0, 1.0, 0.1, 5.0, 512)
    assert controller(0.6, device=slow).choose(view()) == 0


def test_a_session_opens_cloud_only_when_drafting_through_its_prefill_costs_more():
    """A cloud-only round hides the draft's prefill in its wait; a small prefill is paid and K stays put."""
    c = controller(0.8)
    k_steady = c.choose(view())
    assert k_steady > 0
    cloud_round_ms = c.round_ms(0, view())
    assert controller(0.8).choose(view(prefill_ms=cloud_round_ms)) == 0  # the wait would hide it all
    assert controller(0.8).choose(view(prefill_ms=1.0)) == k_steady  # prefill cannot change which K drafts best
    assert controller(0.8).choose(view(prefill_ms=cloud_round_ms, predrafted=3)) > 0  # a hit's pre-draft fed it


def test_the_controller_opens_cloud_only_exactly_when_that_overruns_steady_rounds_less():
    c = controller(0.8)
    steady = max(r.tokens_per_s for r in c.plan(view()))
    for prefill_ms in np.linspace(0.5, 150.0, 60):
        v = view(prefill_ms=float(prefill_ms))
        rows = c.plan(v)
        cloud = min(c.overrun_ms(r, v.prefill_ms, steady) for r in rows if r.k == 0)
        drafted = min(c.overrun_ms(r, v.prefill_ms, steady) for r in rows if r.k > 0)
        assert (c.choose(v) == 0) == (cloud < drafted), prefill_ms
    assert c.choose(view(prefill_ms=0.5)) > 0 and c.choose(view(prefill_ms=150.0)) == 0


def test_a_cloud_only_opening_leaves_the_next_round_no_prefill_to_wait_for():
    """The emulated clock: the prompt's prefill runs during the cloud-only round's wait."""
    from flexspec_serve.edge.emulator import EmulatedDevice

    flagship = DEVICE_CLASSES["flagship-phone"]
    dev = EmulatedDevice("d", flagship, make_link("good", 0), controller(0.8, device=flagship), CLOUD)
    dev.start_session(250)  # 150 ms of prefill, more than a cloud-only round's 119 ms (50 ms each way)
    assert dev.choose_k() == 0
    _answered(dev, 0, 0, hit=None, wait=(50.0, 60.0, 50.0))
    assert dev.critical_prefill_ms() == 0.0 and dev.choose_k() > 0
    assert dev.draft_latency_ms(4) == pytest.approx(flagship.draft_ms(4))


def test_the_opening_benchmarks_old_arm_takes_the_rounds_own_best_goodput():
    """`benchmarks.opening_ab` compares against the rule before: the highest goodput of the round alone."""
    from benchmarks.opening_ab import goodput_opening

    flagship = DEVICE_CLASSES["flagship-phone"]
    v = view(prefill_ms=controller(0.8, device=flagship).round_ms(0, view()))  # the wait would hide it all
    with goodput_opening():
        c = controller(0.8, device=flagship)
        k = c.choose(v)
    assert k == max(c.plan(v), key=lambda r: r.tokens_per_s).k > 0
    assert controller(0.8, device=flagship).choose(v) == 0  # restored


def test_the_estimators_tables_equal_the_products_they_stand_for_after_every_update():
    est, rng = AcceptanceEstimator(k_max=4), random.Random(0)  # K past the 4 positions kept apart: pooled alpha
    for _ in range(40):
        k = rng.randint(0, 6)
        est.update(k, rng.randint(0, k), hit=rng.random() < 0.5)
        alphas = [est.position_alpha(i) for i in range(9)]
        for n in range(9):
            assert est.p_all(n) == pytest.approx(math.prod(alphas[:n]))
            assert est.expected_tau(n) == pytest.approx(1 + sum(math.prod(alphas[: j + 1]) for j in range(n)))
    est.reset()
    assert est.p_all(2) == pytest.approx(est.alpha ** 2)


def test_controller_keeps_within_the_energy_budget():
    thirsty = DeviceProfile("thirsty", 20.0, 1.0, 30.0, 1.0, 1.0, 0.1, 0.1, 512)  # 0.6 J per drafted token
    c = controller(0.85, device=thirsty)
    k = c.choose(view())
    assert c.round_j(k, view()) / expected_tau(0.85, k) <= 0.1
    assert k < controller(0.85, device=DeviceProfile("free", 20.0, 1.0, 30.0, 1.0, 1.0, 0.1, 10.0, 512)).choose(view())


def test_acceptance_estimate_follows_a_changed_target():
    est = AcceptanceEstimator()
    for _ in range(60):
        est.update(4, 4)
    high = est.alpha
    for _ in range(150):  # forgetting at 0.97 per round: the old target fades within ~100 rounds
        est.update(4, 0)
    assert high > 0.9 and est.alpha < 0.3


def test_baselines_behave_as_specified():
    assert FixedK(k=3).choose(view()) == 3 and FixedK(k=3).name == "fixed-3"
    assert CloudOnly().choose(view()) == 0
    p = AcceptanceAdaptive(k_max=8, k=4)
    p.observe(4, 4)
    assert p.choose(view()) == 6
    p.observe(6, 2)
    assert p.choose(view()) == 5
    for _ in range(10):
        p.observe(p.k, 0)
    assert p.choose(view()) == 1


def test_link_observer_separates_latency_from_rate():
    obs = LinkObserver(prior_delay_ms=0.0, smoothing=1.0)
    obs.report_rate("up", 8e3)  # 1 byte per ms
    obs.record("up", 100, 130.0)
    assert obs.delay_ms["up"] == pytest.approx(30.0) and obs.predict_ms("up", 50) == pytest.approx(80.0)


def test_fleet_spec_assigns_classes_by_share():
    spec = FleetSpec(devices=10, mix=[{"device_class": "wearable", "share": 0.25},
                                      {"device_class": "flagship-phone", "share": 0.75, "channel": "good"}])
    classes = [a.device_class for a in spec.assignments()]
    assert len(classes) == 10 and classes.count("wearable") in (2, 3)


@pytest.mark.parametrize("patch, field", [
    ({"devices": 0}, "devices"), ({"policy": "fastest"}, "policy"), ({"colour": 1}, "colour"),
    ({"mix": [{"device_class": "toaster", "share": 1.0}]}, "toaster"),
    ({"mix": [{"device_class": "wearable", "share": 0.5}]}, "sum to 0.5"),
])
def test_fleet_yaml_errors_name_the_field(tmp_path, patch, field):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"mix": [{"device_class": "wearable", "share": 1.0}], **patch}))
    with pytest.raises(ConfigError, match=field):
        load_yaml(FleetSpec, path)


def test_emulated_devices_account_time_energy_and_bytes(family_models, humaneval_prompts):
    from flexspec_serve.edge.controller import make_policy
    from flexspec_serve.edge.emulator import EmulatedDevice, run_devices
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.verifier import Verifier

    devices = [EmulatedDevice(f"d{i}", DEVICE_CLASSES[c], make_link(s, i), make_policy(p, DEVICE_CLASSES[c], CLOUD))
               for i, (c, s, p) in enumerate([("flagship-phone", "good", "adaptive"), ("wearable", "poor", "fixed-3"),
                                               ("midrange-phone", "TMobile-LTE-short", "cloud-only")])]
    summaries = run_devices(devices, [p[-64:] for p in humaneval_prompts[:3]], DraftProposer(family_models["draft"]),
                            Verifier(family_models["v1"], family_models["draft"]), max_new_tokens=24)
    for dev, s in zip(devices, summaries):
        assert s.tokens >= 24 and s.seconds > 0 and s.j_per_token > 0
        for r in dev.records:
            assert r.round_ms == pytest.approx(r.draft_ms + r.up_ms + r.verify_ms + r.down_ms)
            assert r.bytes_up > 0 and r.bytes_down > 0
    assert summaries[2].mean_k == 0 and summaries[1].mean_k == pytest.approx(3, abs=0.5)
    # the same seeds give the same emulation
    again = [EmulatedDevice(d.device_id, d.profile, make_link(d.link.name, i), make_policy(d.policy.name, d.profile, CLOUD))
             for i, d in enumerate(devices)]
    assert run_devices(again, [p[-64:] for p in humaneval_prompts[:3]], DraftProposer(family_models["draft"]),
                       Verifier(family_models["v1"], family_models["draft"]), max_new_tokens=24) == summaries


def test_bursty_acceptance_raises_the_expected_gain_of_long_drafts():
    """All-or-nothing rounds: per-position rates see that a draft which starts right stays right."""
    bursty, iid = AcceptanceEstimator(), AcceptanceEstimator()
    for r in range(200):
        bursty.update(6, 6 if r % 2 else 0)  # half the rounds accept everything, half nothing
        iid.update(6, 3)
    assert bursty.expected_tau(6) > iid.expected_tau(6)
    assert bursty.position_alpha(3) > 0.9 and bursty.position_alpha(0) < 0.6


def test_fading_channel_memory_stays_bounded_over_hours_and_draws_the_same_rates(monkeypatch):
    from flexspec_serve.edge import channels

    long_run = make_link("fading", seed=3).up
    assert isinstance(long_run, StatisticalChannel)
    times = [i * 1000.0 for i in range(3 * 3600)]  # three emulated hours, one query a second
    rates = [long_run.rate_bps_at(t) for t in times]
    assert len(long_run._rates) <= 2 * channels.HISTORY_MS / long_run.s.block_ms + 1  # a window, not 3 h of blocks
    with pytest.raises(ValueError, match="older than the kept window"):
        long_run.rate_bps_at(0.0)
    # trimming changes nothing: the same seed with the whole past kept gives the same rates
    monkeypatch.setattr(channels, "HISTORY_MS", 1e12)
    keep_all = make_link("fading", seed=3).up
    assert [keep_all.rate_bps_at(t) for t in times[::97]] == rates[::97]
    assert len(keep_all._rates) > 2 * 3600e3 / keep_all.s.block_ms


def test_a_query_far_past_the_window_jumps_the_gap_instead_of_drawing_it(monkeypatch):
    """A device back from minutes of think time asks for its channel's rate: drawing every 5 ms block of the
    gap held a fleet actor's event loop for 0.2 s per direction (400 s); the jump draws one second's worth."""
    from flexspec_serve.edge import channels

    ch = StatisticalChannel(STATISTICAL_SETTINGS["fading"], 3)
    drawn = []
    draw = ch._next_block_rate
    monkeypatch.setattr(ch, "_next_block_rate", lambda: drawn.append(1) or draw())
    ch.rate_bps_at(400_000.0)
    assert len(drawn) <= channels.SKIP_KEEP_MS / ch.s.block_ms + 1
    ch.rate_bps_at(400_000.0 - 20)  # a stale report's lookback still answers
    with pytest.raises(ValueError, match="older than the kept window"):
        ch.rate_bps_at(400_000.0 - 2 * channels.SKIP_KEEP_MS)
    gap_in_window = StatisticalChannel(STATISTICAL_SETTINGS["fading"], 3)
    gap_in_window.rate_bps_at(channels.HISTORY_MS / 2)  # within the window: drawn block by block, as before
    assert len(gap_in_window._rates) == channels.HISTORY_MS / 2 / gap_in_window.s.block_ms + 1


@pytest.mark.parametrize("setting", ["fading", "poor"])
def test_a_jump_over_a_gap_keeps_the_channels_fading_and_outage_statistics(setting):
    s = STATISTICAL_SETTINGS[setting]
    jumped = np.array([StatisticalChannel(s, seed).rate_bps_at(400_000.0) for seed in range(2000)])
    one = StatisticalChannel(s, 1)
    drawn = np.array([one.rate_bps_at(t) for t in np.arange(0.0, 400_000.0, 200.0)])  # every block drawn
    assert abs(np.mean(jumped == 0) - np.mean(drawn == 0)) < 0.05  # outage share (fading 6 %, poor 44 %)
    assert abs(jumped[jumped > 0].mean() / drawn[drawn > 0].mean() - 1) < 0.1


def _answered(dev, k, accepted, hit, wait=(30.0, 20.0, 30.0)):
    from flexspec_serve import protocol as P
    from flexspec_serve.engine.generate import RoundEvent

    result = P.RoundResult(session_id="s", seq=0, accepted=accepted, token=7, bonus=accepted == k, version="v1",
                           context_len=40)
    ev = RoundEvent(0, 0, k, accepted, 30, 20, result, hit)
    dev.ahead_now = dev.ahead.drafts  # what choose_k leaves when the policy lets the device draft ahead
    t0 = dev.clock_ms
    return dev.account(ev, t0, dev.draft_latency_ms(k), *wait)


def _device(ahead):
    from flexspec_serve.edge.emulator import EmulatedDevice

    flagship = DEVICE_CLASSES["flagship-phone"]
    return EmulatedDevice("d", flagship, make_link("good", 0), FixedK(k=4), CLOUD, ahead=ahead)


def test_a_lookahead_hit_hides_the_next_rounds_draft_in_the_wait():
    """80 ms of wait at 9 ms per draft step: d_{K+1}, then a next round of 4 tokens and its own guess."""
    dev = _device(Ahead.DRAFT)
    _answered(dev, 4, 4, hit=True)
    assert dev.predrafted == 5 and dev.view().predrafted == 5
    assert dev.draft_latency_ms(4) == 0.0 and dev.draft_latency_ms(7) == pytest.approx(2 * 9.0)
    nxt = _answered(dev, 7, 2, hit=False)
    assert nxt.predrafted == 5 and nxt.draft_ms == pytest.approx(18.0)
    assert dev.predrafted == 0 and dev.draft_latency_ms(4) > 4 * 9.0  # a miss: draft from scratch (+ prefill)


def test_drafting_ahead_costs_energy_on_a_miss_and_saves_nothing():
    flagship = DEVICE_CLASSES["flagship-phone"]
    ahead, idle = _device(Ahead.DRAFT), _device(Ahead.OFF)
    a, b = _answered(ahead, 4, 1, hit=False), _answered(idle, 4, 1, hit=False)
    assert a.round_ms == b.round_ms and ahead.predrafted == 0
    assert a.energy_j - b.energy_j == pytest.approx(6 * 9.0 * flagship.compute_w / 1e3)  # d_5 + 5 drafted ahead
    short = _device(Ahead.DRAFT)  # an answer back within one draft step leaves nothing drafted ahead
    _answered(short, 4, 4, hit=True, wait=(3.0, 2.0, 3.0))
    assert short.predrafted == 0


@pytest.mark.parametrize("ahead", [Ahead.DRAFT, Ahead.PIPELINE])
def test_after_all_k_accepted_the_draft_cache_misses_d_k_only_if_nothing_was_drafted_ahead(ahead):
    """Drafting d_{K+1} feeds d_K into the draft cache; a device that pipelines drafts ahead too."""
    flagship = DEVICE_CLASSES["flagship-phone"]
    drafted, idle, short = _device(ahead), _device(Ahead.OFF), _device(ahead)
    _answered(drafted, 4, 4, hit=False)
    _answered(idle, 4, 4, hit=False)
    _answered(short, 4, 4, hit=False, wait=(3.0, 2.0, 3.0))  # back within one draft step: nothing drafted ahead
    assert (drafted.backlog_tokens, idle.backlog_tokens, short.backlog_tokens) == (1, 2, 2)
    assert idle.critical_prefill_ms() == pytest.approx(2 * flagship.prefill_ms_per_token)


def test_controller_with_draft_ahead_expects_shorter_rounds_and_pays_the_predraft_energy():
    est = lambda: AcceptanceEstimator(prior_a=800, prior_b=200)  # noqa: E731
    flagship = DEVICE_CLASSES["flagship-phone"]
    plain = FlexSpecController(flagship, CLOUD, k_max=8, estimator=est())
    ahead = FlexSpecController(flagship, CLOUD, k_max=8, estimator=est(), ahead=Ahead.DRAFT)
    v = view(40, 40)
    for k in range(1, 9):
        assert ahead.round_ms(k, v) < plain.round_ms(k, v) and ahead.round_j(k, v) > plain.round_j(k, v)
        assert ahead.round_ms(k, v, ahead=False) == plain.round_ms(k, v)
    assert ahead.round_ms(0, v) == plain.round_ms(0, v) and ahead.round_j(0, v) == plain.round_j(0, v)
    ready = view(40, 40, predrafted=6)
    assert ahead.draft_ms(6, ready) == 0.0 and ahead.draft_ms(8, ready) == pytest.approx(2 * 9.0)
    assert ahead.choose(ready) >= 6  # tokens already drafted are cheap to send


def test_controller_drafts_ahead_only_when_the_energy_budget_allows_it():
    def chosen(budget_j):
        device = DeviceProfile("d", 9.0, 0.6, 4.5, 1.2, 0.9, 0.25, budget_j, 8192)
        c = FlexSpecController(device, CLOUD, k_max=8, estimator=AcceptanceEstimator(prior_a=700, prior_b=300),
                               ahead=Ahead.DRAFT)
        k = c.choose(view(40, 40))
        return k, c.ahead_now, c.round_j(k, view(40, 40), c.ahead_now) / c.estimator.expected_tau(k)

    k, ahead, j = chosen(10.0)
    assert ahead and k > 0
    k, ahead, j = chosen(0.12)  # drafting ahead would cost ~0.07 J per token more: the budget buys K instead
    assert not ahead and k > 0 and j <= 0.12


def test_controller_that_pipelines_expects_a_hit_to_cost_only_its_draft_steps_and_drafts_shorter():
    est = lambda: AcceptanceEstimator(prior_a=660, prior_b=340)  # noqa: E731
    midrange = dataclasses.replace(DEVICE_CLASSES["midrange-phone"], energy_budget_j_per_token=10.0)  # time alone
    ahead = FlexSpecController(midrange, CLOUD, k_max=8, estimator=est(), ahead=Ahead.DRAFT)
    piped = FlexSpecController(midrange, CLOUD, k_max=8, estimator=est(), ahead=Ahead.PIPELINE)
    v = view(50, 50)
    for k in range(1, 9):
        hit = piped.estimator.p_all(k + 1)
        fresh = piped.draft_ms(k, v) + piped.wait_ms(k, v)
        assert piped.round_ms(k, v) == pytest.approx(hit * min(fresh, (1 + k) * 22.0) + (1 - hit) * fresh)
        assert piped.round_ms(k, v) < ahead.round_ms(k, v)
        assert piped.round_ms(k, v, ahead=False) == ahead.round_ms(k, v, ahead=False)  # not drafting ahead: plain
    assert piped.ahead.drafts and piped.choose(v) < ahead.choose(v)  # short rounds hit more often and chain
    quick = piped.round_ms(2, v)
    for _ in range(30):  # the pipelined answers come 40 ms after their draft steps: hits save less
        piped.observe_pipelined(2, 3 * 22.0 + 40.0)
    assert piped.pipe_extra_ms == pytest.approx(40.0, rel=0.01)
    assert piped.round_ms(2, v) == pytest.approx(quick + piped.estimator.p_all(3) * piped.pipe_extra_ms)


def test_the_adaptive_controller_states_what_it_expects_of_the_round_it_chose():
    c = FlexSpecController(PHONE, CLOUD, k_max=8, ahead=Ahead.DRAFT)
    v = view(40, 40)
    k = c.choose(v)
    assert c.expected.k == k and c.expected.tokens == pytest.approx(c.estimator.expected_tau(k))
    assert c.expected.round_ms == pytest.approx(c.round_ms(k, v, c.ahead_now))
    assert FixedK(k=3).expected is None and make_policy("cloud-only", PHONE, CLOUD).expected is None


def test_a_round_is_expected_to_take_its_draft_and_wait_while_goodput_counts_the_next_rounds_saving():
    """The record's expectation is the round's own time (comparable with what it took); the pre-draft's expected
    saving, which the next round realizes, only enters the choice."""
    from flexspec_serve.edge.emulator import EmulatedDevice

    flagship = DEVICE_CLASSES["flagship-phone"]
    policy = FlexSpecController(flagship, CLOUD, k_max=8, estimator=AcceptanceEstimator(prior_a=800, prior_b=200),
                                ahead=Ahead.DRAFT)
    dev = EmulatedDevice("d", flagship, make_link("good", 0), policy, CLOUD, ahead=Ahead.DRAFT)
    dev.start_session(0)
    for predrafted in (False, True):
        k, v = dev.choose_k(), dev.view()
        plan = policy.expected
        assert plan.ahead and bool(v.predrafted) == predrafted
        assert plan.time_ms == pytest.approx(policy.draft_ms(k, v) + policy.wait_ms(k, v), rel=1e-3)  # (a 2nd view)
        assert plan.round_ms < plan.time_ms - 0.5 * policy.estimator.p_hit(k) * flagship.draft_ms(k)
        rec = _answered(dev, k, k, hit=True, wait=(60.0, 20.0, 40.0))
        assert rec.expected_round_ms == pytest.approx(plan.time_ms, abs=1e-3)
        assert rec.round_ms == pytest.approx(rec.draft_ms + 120.0)
    assert rec.draft_ms < 9.0 * k and plan.time_ms < plan.round_ms + flagship.draft_ms(k)  # (predrafted: cheap)


def test_a_pipelining_controller_pays_the_radio_energy_of_the_round_a_miss_gets_refused():
    est = lambda: AcceptanceEstimator(prior_a=660, prior_b=340)  # noqa: E731
    midrange, v = DEVICE_CLASSES["midrange-phone"], view(50, 50)
    ahead = FlexSpecController(midrange, CLOUD, k_max=8, estimator=est(), ahead=Ahead.DRAFT)
    piped = FlexSpecController(midrange, CLOUD, k_max=8, estimator=est(), ahead=Ahead.PIPELINE)
    sent = []
    for k in range(1, 9):
        radio_j = (piped.up_ms(k, v) * midrange.tx_w + v.down_ms * midrange.rx_w) / 1e3
        miss = 1 - piped.estimator.p_hit(k)
        in_time = midrange.draft_ms(1 + k) < piped.wait_ms(k, v)  # the next round is drafted before the answer
        sent.append(in_time)
        assert piped.round_j(k, v) == pytest.approx(ahead.round_j(k, v) + (miss * radio_j if in_time else 0.0))
        assert piped.round_j(k, v, ahead=False) == ahead.round_j(k, v, ahead=False)  # nothing sent ahead
    assert piped.round_j(0, v) == ahead.round_j(0, v)
    assert sent[0] and not sent[-1]  # 22 ms draft steps: K = 8 cannot be pipelined within a ~125 ms wait


def test_a_controller_whose_guesses_miss_stops_counting_on_lookahead_hits():
    """Two pipelining controllers see the same rounds, all K accepted; one's guesses d_{K+1} are always the
    cloud's token (a greedy chain), the other's never (a sampling session: the token ~ p, the guess ~ q)."""
    midrange, v = DEVICE_CLASSES["midrange-phone"], view(50, 50)
    right, wrong = (FlexSpecController(midrange, CLOUD, k_max=8, ahead=Ahead.PIPELINE,
                                       estimator=AcceptanceEstimator(prior_a=660, prior_b=340)) for _ in range(2))
    assert right.estimator.p_hit(3) == pytest.approx(right.estimator.p_all(4))  # nothing seen: the chain's rate
    for _ in range(40):
        right.observe(2, 2, hit=True)
        wrong.observe(2, 2, hit=False)
        right.observe(3, 1, hit=False)  # a round that did not accept all K says nothing about the guess
        wrong.observe(3, 1, hit=True)
    assert right.estimator.p_all(3) == pytest.approx(wrong.estimator.p_all(3))
    unguessed = AcceptanceEstimator()
    for _ in range(10):
        unguessed.update(2, 2, hit=None)  # no guess drafted: nothing learned about guesses
    assert unguessed.guess_rate(2) == pytest.approx(unguessed.position_alpha(2))
    assert wrong.estimator.guess_rate(2) < 0.15 < 0.85 < right.estimator.guess_rate(2)
    fresh = wrong.draft_ms(2, v) + wrong.wait_ms(2, v)
    assert right.round_ms(2, v) < 0.75 * fresh  # hits expected: the next round is mostly free
    assert wrong.round_ms(2, v) > 0.95 * fresh  # misses expected: pipelining saves next to nothing
    assert wrong.choose(v) >= right.choose(v)  # hits no longer pay for short rounds


def test_an_emulated_device_teaches_its_controller_the_guess_rate_only_from_rounds_that_drafted_a_guess():
    from flexspec_serve import protocol as P
    from flexspec_serve.edge.emulator import EmulatedDevice
    from flexspec_serve.engine.generate import RoundEvent

    result = P.RoundResult(session_id="s", seq=0, accepted=3, token=7, bonus=True, version="v1", context_len=40)
    rates = []
    for guessed in (False, True):
        policy = FlexSpecController(DEVICE_CLASSES["flagship-phone"], CLOUD, ahead=Ahead.DRAFT)
        dev = EmulatedDevice("d", DEVICE_CLASSES["flagship-phone"], make_link("good", 0), policy, CLOUD,
                             ahead=Ahead.DRAFT)
        for _ in range(30):  # all 3 accepted, never a hit: the guess was wrong, or (last round) never drafted
            dev.ahead_now = True
            dev.account(RoundEvent(0, 0, 3, 3, 30, 20, result, False if guessed else None), dev.clock_ms, 27.0, 30, 20,
                        30)
        rates.append((policy.estimator.guess_rate(3), policy.estimator.position_alpha(3)))
    (unguessed, alpha), (missed, _) = rates
    assert unguessed == pytest.approx(alpha) and missed < 0.2 * alpha


def test_emulated_pipelining_sends_after_a_hit_without_waiting_and_takes_less_time(family_models, humaneval_prompts):
    from flexspec_serve.edge.emulator import EmulatedDevice, run_devices
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.verifier import Verifier

    def run(ahead):
        devices = [EmulatedDevice(f"d{i}", DEVICE_CLASSES[c], make_link("TMobile-LTE-short", i, i * 7000.0),
                                  FixedK(k=2), CLOUD, ahead=ahead) for i, c in enumerate(["flagship-phone", "midrange-phone"])]
        summaries = run_devices(devices, [p[-64:] for p in humaneval_prompts[4:6]],
                                DraftProposer(family_models["draft"]), Verifier(family_models["v1"]), max_new_tokens=40)
        return devices, summaries

    ahead, ahead_sum = run(Ahead.DRAFT)
    piped, piped_sum = run(Ahead.PIPELINE)
    assert [s.tokens for s in piped_sum] == [s.tokens for s in ahead_sum]  # the same rounds and acceptance
    refused = [(r, b) for dev, a in zip(piped, ahead) for r, b in zip(dev.records, a.records) if r.refused_next]
    assert refused and all(not r.lookahead_hit for r, _ in refused)  # a miss with a round sent behind it
    for r, b in refused:  # that round's traffic and radio energy are booked on the miss
        assert r.bytes_up == 2 * b.bytes_up and r.bytes_down == 2 * b.bytes_down and r.energy_j > b.energy_j
    for dev, a in zip(piped, ahead):
        recs = dev.records
        assert [(r.k, r.accepted, r.lookahead_hit) for r in recs] == [(r.k, r.accepted, r.lookahead_hit) for r in a.records]
        sent = [r for r in recs if r.pipelined]
        assert sent and all(recs[i - 1].lookahead_hit for i, r in enumerate(recs) if r.pipelined)
        for r in sent:  # no draft on its path; from the previous answer to its own, less than a whole trip
            assert r.k > 0 and r.draft_ms == 0 and 0 <= r.round_ms < r.up_ms + r.verify_ms + r.down_ms
        assert sum(r.round_ms for r in recs) < sum(r.round_ms for r in a.records)
