"""builder.tune: the search space, the closed loop and search loop with fake servers, the objectives, the report."""
import contextlib
import json

import pytest

from builder.errors import TargetError
from builder.repository import target_for
from builder.spec import load_spec
from builder.tune import measure as M
from builder.tune.report import table, write_report
from builder.tune.select import choose
from builder.tune.space import Candidate, SearchSpace, default_space, parse_levels
from edgestack import cli
from tests.conftest import SPEC


def test_candidates_respect_the_thread_cap_and_skip_a_delay_without_batching():
    space = SearchSpace((1, 2), (1, 2), max_batch_size=(1, 8), max_queue_delay_us=(0, 2000), max_threads=2)
    cands = space.candidates()
    assert all(c.detector_instances * c.intra_op_threads <= 2 for c in cands)
    assert not [c for c in cands if c.max_batch_size == 1 and c.max_queue_delay_us > 0]
    assert len(cands) == 3 * 3  # (1x1, 1x2, 2x1) x (batch 1 delay 0, batch 8 delay 0, batch 8 delay 2000)


def test_default_space_uses_one_and_all_cores_and_refuses_gpu_targets():
    quick = default_space("cpu", 2, quick=True).candidates()
    assert {(c.detector_instances, c.intra_op_threads) for c in quick} == {(1, 1), (1, 2), (2, 1)}
    full = default_space("intel", 4).candidates()
    assert {c.max_queue_delay_us for c in full} == {0, 2000} and any(c.intra_op_threads == 4 for c in full)
    with pytest.raises(TargetError, match="nvidia-gpu"):
        default_space("nvidia-gpu", 2)


def test_a_candidate_is_a_target_override_with_explicit_threads():
    spec = load_spec(SPEC)
    target = target_for(spec, **Candidate(1, 2, 4, 1000, None, 2).overrides())
    assert (target.detector_instances, target.intra_op_threads, target.max_batch_size) == (1, 2, 4)
    assert (target.max_queue_delay_us, target.postprocess_instances, target.preprocess_instances) == (1000, 2, 2)


@pytest.mark.parametrize("fields, name", [((0, 1), "detector_instances"), ((1, 0), "intra_op_threads"),
                                          ((1, 1, 8, -1), "max_queue_delay_us")])
def test_bad_candidate_names_the_field(fields, name):
    with pytest.raises(TargetError, match=name):
        Candidate(*fields)


def test_a_candidate_on_another_target_renders_that_targets_runtime():
    spec = load_spec(SPEC)
    cand = Candidate(2, 1, target="intel")
    own = cand.spec_for(spec)
    assert own.target == "intel" and Candidate(2, 1).spec_for(spec) is spec
    target = target_for(own, **cand.overrides())
    assert (target.name, target.detector_engine, target.detector_instances) == ("intel", "python_openvino", 2)
    assert cand.label.startswith("intel: det 2x1t") and cand.build_flags().startswith("--target intel ")
    with pytest.raises(TargetError, match="nvidia-gpu"):
        Candidate(1, 1, target="nvidia-gpu")


def test_openvino_streams_are_searched_on_intel_only_with_a_thread_each():
    intel = default_space("intel", 2).candidates()
    streamed = [c for c in intel if c.detector_streams > 1]
    assert streamed and all(c.intra_op_threads >= c.detector_streams and c.max_batch_size > 1 for c in streamed)
    assert not any(c.detector_streams > 1 for c in default_space("cpu", 2).candidates())
    with pytest.raises(TargetError, match="empty"):
        SearchSpace((1,), (2,), detector_streams=(2,), targets=("cpu",)).candidates()
    spec = load_spec(SPEC)
    cand = Candidate(1, 2, target="intel", detector_streams=2)
    own = cand.spec_for(spec)
    target = target_for(own, **cand.overrides())
    assert (target.detector_streams, target.intra_op_threads) == (2, 2)
    assert "1x2t 2s" in cand.label and "--detector-streams 2" in cand.build_flags()
    with pytest.raises(TargetError, match="detector_streams"):
        target_for(spec, **Candidate(1, 2, detector_streams=2).overrides())  # the spec's cpu target: ONNX Runtime


def test_targets_search_both_runtimes_and_openvino_never_spins():
    from edgestack.tune_cli import _candidates, add_parser
    import argparse

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--images", "x", "--targets", "cpu,intel", "--cores", "2"])
    cands = _candidates(args, "cpu")
    by_target = {t: [c for c in cands if c.target == t] for t in ("cpu", "intel")}
    assert by_target["cpu"] and by_target["intel"] and len(cands) == len(by_target["cpu"]) + len(by_target["intel"])
    assert any(c.intra_op_spinning for c in by_target["cpu"])
    assert not any(c.intra_op_spinning for c in by_target["intel"])
    assert {c.target for c in _candidates(parser.parse_args(["--images", "x"]), "cpu")} == {None}
    with pytest.raises(TargetError, match="--targets"):
        _candidates(parser.parse_args(["--images", "x", "--targets", "cpu,jetson"]), "cpu")
    explicit = parser.parse_args(["--images", "x", "--targets", "intel", "--spinning", "on,off",
                                  "--intra-op-threads", "2"])
    assert not any(c.intra_op_spinning for c in _candidates(explicit, "cpu"))


def test_parse_levels():
    assert parse_levels("1, 2,4", "--x") == (1, 2, 4)
    assert parse_levels("auto,3", "--pre", allow_auto=True) == (None, 3)
    with pytest.raises(TargetError, match="--x: 'two'"):
        parse_levels("1,two", "--x")


def fake_sender_factory(fail_every: int = 0):
    calls = []

    def make():
        def send(data):
            calls.append(data)
            if fail_every and len(calls) % fail_every == 0:
                raise RuntimeError("boom")
        return send
    return make, calls


def test_closed_loop_counts_answers_and_errors():
    make, calls = fake_sender_factory(fail_every=3)
    level = M.closed_loop(make, [b"a", b"b"], concurrency=2, seconds=0.05)
    assert level.requests + level.errors == len(calls) and level.errors == len(calls) // 3
    assert level.requests > 0 and level.images_per_s > 0 and level.p99_ms >= level.p50_ms
    with pytest.raises(ValueError, match="concurrency"):
        M.closed_loop(make, [b"a"], 0, 1.0)


def test_run_search_records_a_failing_candidate_and_goes_on():
    good, bad = Candidate(1, 1), Candidate(2, 1)

    @contextlib.contextmanager
    def serve(candidate):
        if candidate == bad:
            raise RuntimeError("tritonserver exited")
        yield fake_sender_factory()[0]

    lines = []
    trials = M.run_search([bad, good], serve, [b"x"],
                          M.SearchSettings(concurrencies=(1, 2), seconds=0.02, warmup_s=0, log=lines.append))
    assert [t.ok for t in trials] == [False, True] and "tritonserver exited" in trials[0].error
    assert [lv.concurrency for lv in trials[1].levels] == [1, 2] and len(lines) == 2
    assert M.Trial.from_dict(json.loads(json.dumps(trials[1].to_dict()))) == trials[1]


def trial(c, levels, error=""):
    return M.Trial(c, tuple(M.Level(n, 10, 0, 1.0, ips, p99 / 2, p99) for n, ips, p99 in levels), error)


A = trial(Candidate(1, 2), [(1, 16.0, 80), (8, 25.0, 400)])  # one image on both cores
B = trial(Candidate(2, 1), [(1, 9.0, 130), (8, 31.0, 300)])  # one instance per core
C = trial(Candidate(2, 2), [(1, 15.0, 90), (8, 30.0, 320)])  # close to both
D = trial(Candidate(1, 1), [], error="RuntimeError: no")


def test_objectives():
    assert choose([A, B, C, D], "latency")[0] is A
    assert choose([A, B, C, D], "throughput")[0] is B
    assert choose([A, B, C, D], "throughput", slo_p99_ms=310)[0] is B
    assert choose([A, B, C, D], "throughput", slo_p99_ms=200)[0] is None
    best, why = choose([A, B, C, D], "balanced")
    assert best is C and "at worst" in why
    assert choose([D], "latency") == (None, "no candidate ran without errors (1 tried)")
    with pytest.raises(TargetError, match="objective"):
        choose([A], "cheapest")


def test_report_table_and_files(tmp_path):
    text = table([A, C, D], (1, 8), chosen=C)
    assert "**chosen** | det 2x2t" in text and "failed: RuntimeError: no" in text and "not readable" in text
    md, js = write_report(tmp_path, [A, C, D], (1, 8), "balanced", C, "why", {"cores": 2})
    assert "- cores: 2" in md.read_text()
    data = json.loads(js.read_text())
    assert data["chosen"]["candidate"]["intra_op_threads"] == 2 and len(data["trials"]) == 3


def test_cli_bad_levels_are_named(tmp_path, capsys):
    rc = cli.main(["tune", "--images", str(tmp_path), "--intra-op-threads", "1,x"])
    assert rc == 2 and "--intra-op-threads" in capsys.readouterr().err


def test_energy_window_covers_the_measured_levels_only():
    windows = []

    @contextlib.contextmanager
    def energy():
        windows.append("open")
        yield lambda: 6.0
        windows.append("closed")

    @contextlib.contextmanager
    def serve(candidate):
        yield fake_sender_factory()[0]

    [t] = M.run_search([Candidate(1, 1)], serve, [b"x"],
                       M.SearchSettings(concurrencies=(1,), seconds=0.02, warmup_s=0.01, energy=energy))
    assert windows == ["open", "closed"]
    assert t.joules_per_inference == pytest.approx(6.0 / t.levels[0].requests)


def test_rounds_alternate_the_order_and_keep_the_median_pass():
    order = []

    @contextlib.contextmanager
    def serve(candidate):
        order.append(candidate.detector_instances)
        yield fake_sender_factory()[0]

    cands = [Candidate(1, 1), Candidate(2, 1), Candidate(3, 1)]
    trials = M.run_search(cands, serve, [b"x"], M.SearchSettings(concurrencies=(1,), seconds=0.01, warmup_s=0,
                                                                 rounds=3))
    assert order == [1, 2, 3, 3, 2, 1, 1, 2, 3] and [t.candidate for t in trials] == cands
    passes = [trial(Candidate(1, 1), [(1, ips, p99)]) for ips, p99 in ((5.0, 300), (9.0, 120), (7.0, 200))]
    assert M.merge_rounds(passes).at(1).images_per_s == 7.0
    assert M.merge_rounds(passes[:2]).at(1).images_per_s == 9.0  # of two, the better
    assert not M.merge_rounds([passes[0], trial(Candidate(1, 1), [], error="x")]).ok


def test_spinning_threads_are_tried_only_where_there_is_a_pool_to_spin():
    cpu = default_space("cpu", 2).candidates()
    spinning = [c for c in cpu if c.intra_op_spinning]
    assert spinning and all(c.intra_op_threads > 1 for c in spinning)
    assert {(c.detector_instances, c.intra_op_threads) for c in spinning} == {
        (c.detector_instances, c.intra_op_threads) for c in cpu if c.intra_op_threads > 1}
    assert not any(c.intra_op_spinning for c in default_space("intel", 2).candidates())  # OpenVINO: no such knob
    one = spinning[0]
    assert " spin," in one.label and one.build_flags().endswith("--intra-op-spinning")
    assert target_for(load_spec(SPEC), **one.overrides()).intra_op_spinning is True
