"""perf/ (the benchmark harness): the pure parts, without a server: workloads, generated configs, metrics parsing,
load-generator summaries, the SLO-rate search, padding estimate, results summaries and the README section."""

from __future__ import annotations

import json
import tarfile

import pytest

from perf import bench, loadgen, repos, summarize, workload
from perf.loadgen import Outcome
from perf.workload import Row


def test_poisson_offsets_are_seeded_and_have_the_rate():
    a = workload.poisson_offsets(200.0, 10.0, seed=1)
    assert a == workload.poisson_offsets(200.0, 10.0, seed=1) != workload.poisson_offsets(200.0, 10.0, seed=2)
    assert all(0 <= x < 10 for x in a) and a == sorted(a)
    assert 1800 < len(a) < 2200


def test_phases_and_intervals():
    offs = workload.phased_offsets([(1.0, 10.0), (1.0, 1000.0)], seed=0)
    assert sum(t < 1 for t in offs) < 40 and sum(t >= 1 for t in offs) > 800
    us = workload.intervals_us([0.5, 0.75, 0.75])
    assert us == [500000, 250000, 1]  # never 0: perf_analyzer reads each line as a wait


def test_pa_input_data_text_and_ids():
    rows = [Row("a", "good film", "positive"), Row("b", "bad", "negative")]
    data = workload.pa_input_data(rows)["data"]
    assert data[0] == {"TASK": {"content": ["a"], "shape": [1]}, "TEXT": {"content": ["good film"], "shape": [1]}}

    class Tok:
        def encode(self, text):
            return type("E", (), {"ids": [101] + [7] * len(text.split()) + [102]})()

    ids = workload.pa_input_data(rows, tokenizer=Tok())["data"]
    assert ids[0]["INPUT_IDS"] == {"content": [101, 7, 7, 102], "shape": [4]} and "TEXT" not in ids[0]


def test_interleave_mixes_every_task_early():
    out = workload.interleave([[Row("a", str(i), None) for i in range(3)], [Row("b", "x", None)]])
    assert [r.task for r in out] == ["a", "b", "a", "a"]


def test_config_round_trip_keeps_shipped_parameters(tmp_path):
    shipped = tmp_path / "shipped"
    (shipped / "1").mkdir(parents=True)
    (shipped / "1" / "model.py").write_text("# model\n")
    (shipped / "tasks").mkdir()
    (shipped / "config.pbtxt").write_text(
        'name: "chorus"\nbackend: "python"\n# a comment\nmax_batch_size: 64\n'
        'dynamic_batching { max_queue_delay_microseconds: 0 }\n'
        'parameters [\n'
        '  { key: "scheduler", value: { string_value: "{\\"default_deadline_s\\": 5.0}" } },\n'
        '  { key: "batching", value: { string_value: "auto" } }\n]\n')
    model = repos.write_model(tmp_path / "repo", "chorus_db500", {"batching": "triton"}, 500, shipped=shipped)
    text = (model / "config.pbtxt").read_text()
    head, params = repos.split_config(text)
    assert 'name: "chorus_db500"' in head and "dynamic_batching { max_queue_delay_microseconds: 500 }" in head
    assert head.count("dynamic_batching") == 1  # the variant's delay replaces the shipped block
    kept = repos.split_config((repos.write_model(tmp_path / "repo", "chorus", {}, shipped=shipped) / "config.pbtxt")
                              .read_text())[0]
    assert "dynamic_batching { max_queue_delay_microseconds: 0 }" in kept
    # the linked tasks/ folder is the generated model's task root (chorus.backends.paths)
    assert params == {"scheduler": '{"default_deadline_s": 5.0}', "batching": "triton",
                      "task_roots": json.dumps([str((shipped / "tasks").resolve())])}
    assert (model / "tasks").is_symlink() and (model / "1" / "model.py").is_file()
    with pytest.raises(ValueError, match="instance_group"):  # this config has no instance_group line to change
        repos.write_model(tmp_path / "repo", "chorus_i2", {}, shipped=shipped, instances=2)
    assert not (tmp_path / "repo" / "chorus_i2").exists()
    head = repos.render_config("name: \"chorus\"\ninstance_group [ { count: 1, kind: KIND_CPU } ]\n", "c", {}, instances=4)
    assert "instance_group [ { count: 4, kind: KIND_CPU } ]" in head


def test_prometheus_parsing_sums_labels_and_filters_models():
    text = ('# HELP x\nnv_inference_count{model="a",version="1"} 10\nnv_inference_count{model="b",version="1"} 5\n'
            "chorus_queue_depth 3\n")
    assert loadgen.parse_prometheus(text) == {"nv_inference_count": 15.0, "chorus_queue_depth": 3.0}
    assert loadgen.parse_prometheus(text, model="b") == {"nv_inference_count": 5.0, "chorus_queue_depth": 3.0}


def outcomes(latencies, refused=0, t_step=0.1):
    out = [Outcome(i * t_step, i * t_step, i * t_step + ms / 1000, "a", "ok", correct=i % 2 == 0)
           for i, ms in enumerate(latencies)]
    out += [Outcome(0.0, 0.0, 0.001, "a", "refused") for _ in range(refused)]
    return out


def test_summary_and_slo():
    s = loadgen.summarize(outcomes([10.0] * 99 + [100.0], refused=1), duration_s=10.0)
    assert s["sent"] == 101 and s["ok"] == 100 and s["refused"] == 1
    assert s["p50_ms"] == pytest.approx(10.0) and 10 < s["p99_ms"] <= 100 and s["accuracy"] == 0.5
    assert loadgen.passes_slo(s, slo_ms=100.0)
    assert not loadgen.passes_slo(loadgen.summarize(outcomes([10.0] * 50, refused=5), 5.0), slo_ms=100.0)


def test_timeline_and_recovery():
    lat = [50.0] * 10 + [500.0] * 10 + [50.0] * 10  # overload in the middle second
    bins = loadgen.timeline(outcomes(lat), [{"t": 0.0, "chorus_queue_depth": 4.0}], bin_s=1.0)
    assert [b["answered"] for b in bins[:3]] == [10, 10, 10] and bins[0]["queue_depth"] == 4.0
    assert loadgen.recovery_s(bins, after_s=1.0, slo_ms=100.0) == pytest.approx(1.0)
    assert loadgen.recovery_s(bins, after_s=0.0, slo_ms=10.0) is None


def test_max_rate_at_slo_interpolates_on_latency_only():
    assert bench.max_rate_at_slo([(10, 5.0, True), (20, 15.0, True), (30, 25.0, True)], 20.0) == pytest.approx(25.0)
    assert bench.max_rate_at_slo([(10, 5.0, True), (20, 15.0, False)], 20.0) == 10  # failed on refusals: no credit
    assert bench.max_rate_at_slo([(10, 50.0, True)], 20.0) is None


def test_expected_padding():
    assert bench.expected_padding([10, 10, 10], 8) == 0.0
    assert bench.expected_padding([5, 15], 1.0) == 0.0
    assert 0.2 < bench.expected_padding([5, 15], 16) < 0.34  # almost always padded to 15: 1 - 10/15


def test_summary_files_and_readme_section(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "cpu2-2026-01-01"
    folder.mkdir(parents=True)
    values = {k: None for k in bench.SUMMARY_KEYS} | {"padding_fraction": 0.12}
    (folder / "results.json").write_text(json.dumps({
        "profile": {"name": "cpu"}, "date": "2026-01-01T00:00:00+00:00", "commit": "abc", "slo_ms": 300,
        "summary": {"values": values, "null_because": {"model_flops_utilisation": "GPU only"}}}))
    monkeypatch.setattr(summarize, "ROOT", tmp_path)
    monkeypatch.setattr(summarize, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(summarize, "SUMMARY", {"gpu": tmp_path / "s.json", "cpu": tmp_path / "s-cpu.json"})
    assert summarize.latest("cpu") == folder
    summarize.write_summary(folder)
    s = json.loads((tmp_path / "s-cpu.json").read_text())
    assert s["padding_fraction"] == 0.12 and s["run"] == "results/cpu2-2026-01-01"
    assert set(bench.SUMMARY_KEYS) <= set(s) and s["null_because"] == {"model_flops_utilisation": "GPU only"}
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{summarize.BEGIN}\nSTALE-LINE\n{summarize.END}\n\nafter\n")
    summarize.update_readme(readme)
    text = readme.read_text()
    assert "STALE-LINE" not in text and text.endswith("after\n") and "| `padding_fraction` | null | 0.12 |" in text
    assert text.count(summarize.BEGIN) == 1


def test_import_refuses_unsafe_tarballs(tmp_path, monkeypatch):
    monkeypatch.setattr(summarize, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bad = tmp_path / "two.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "a", arcname="a")
        tar.add(tmp_path / "b", arcname="b")
    with pytest.raises(SystemExit, match="one top folder"):
        summarize.import_tarball(bad)


def test_encoder_flops_counts_matmuls(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "intermediate_size": 32,
                                                      "num_hidden_layers": 2}))
    world = bench.World(str(tmp_path), {}, [], tmp_path, {}, None, "cpu", "")
    T, C, inter = 4, 8, 32
    per_layer = 2 * T * (4 * C * C + 2 * C * inter) + 4 * T * T * C  # q, k, v, o + FFN; scores and mixing
    assert bench.encoder_flops(world, T) == 2 * per_layer


def test_stage_means_are_per_answered_request_over_the_run():
    from perf.bench import stage_means

    before = "chorus_answered_total 10\nchorus_queue_duration_us 1000\nchorus_compute_duration_us 5000\n"
    after = ("chorus_answered_total 30\nchorus_queue_duration_us 5000\nchorus_compute_duration_us 15000\n"
             "chorus_decode_duration_us 6000\nchorus_encode_duration_us 2000\n")
    assert stage_means(before, after) == {"decode": 0.3, "queue": 0.2, "compute": 0.5, "encode": 0.1, "answered": 20}
    assert stage_means(after, after) is None  # nothing answered


def bare_bench(tmp_path, hf_python):
    b = bench.Bench.__new__(bench.Bench)
    b.p, b.out, b.hf_python, b.result = bench.PROFILES["cpu"], tmp_path, str(hf_python), {"notes": [], "skipped": []}
    return b


def fake_python(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_hf_baseline_runs_in_a_subprocess_and_a_failure_is_a_skip(tmp_path):
    spec = {"backbone": "b", "task_dirs": {}, "texts_by_task": {}, "batch": 64, "device": "cuda", "dtype": "float16"}
    # args: -m perf.inprocess hf SPEC OUT; the child gets the spec as a file and writes its figures to OUT
    ok = fake_python(tmp_path / "ok", 'test "$3" = hf && grep -q float16 "$4" && echo \'{"rows_per_s": 5.0}\' > "$5"\n')
    assert bare_bench(tmp_path, ok).hf_baseline(spec)["rows_per_s"] == 5.0
    assert json.loads((tmp_path / "raw" / "hf_spec.json").read_text()) == spec
    b = bare_bench(tmp_path, fake_python(tmp_path / "bad", "echo 'ImportError: no BertModel' >&2\nexit 3\n"))
    assert b.hf_baseline(spec) is None
    (skip,) = b.result["skipped"]
    assert skip["what"] == "hf_transformers" and "exited with 3" in skip["why"] and "no BertModel" in skip["why"]
    b = bare_bench(tmp_path, tmp_path / "no-such-python")
    assert b.hf_baseline(spec) is None and "no-such-python" in b.result["skipped"][0]["why"]


def test_loadgen_sender_processes_share_one_clock(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: every request fails at once, as UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [Row("a", "x", None), Row("b", "y", None)]
    arrivals = [(0.01 * i, rows[i % 2]) for i in range(40)]
    gen = loadgen.LoadGenerator(f"127.0.0.1:{port}", lambda t: f"model_{t}", timeout_s=5)
    try:
        out, samples = gen.run(arrivals, drain_timeout_s=5, processes=3)
    finally:
        gen.close()
    assert [(o.t_sched, o.task) for o in out] == [(t, r.task) for t, r in arrivals]  # every one, in order
    assert all(o.status == "refused" and o.t_done is not None for o in out) and samples == []
    assert max(o.t_send - o.t_sched for o in out) < 0.5  # sent on the common schedule, not each from its own start


def test_per_phase_summaries_split_by_scheduled_arrival():
    out = outcomes([10.0] * 10 + [200.0] * 20 + [10.0] * 10)  # every 0.1 s: 1 s calm, 2 s slow, 1 s calm
    base, burst, after = loadgen.per_phase(out, [(1.0, 10.0), (2.0, 100.0), (1.0, 10.0)])
    assert (base["sent"], burst["sent"], after["sent"]) == (10, 20, 10)
    assert burst["start_s"] == 1.0 and burst["rate"] == 100.0 and burst["p50_ms"] == pytest.approx(200.0)
    assert base["offered_per_s"] == 10.0 and burst["accuracy"] == 0.5


@pytest.mark.parametrize("chorus_rate,db,skipped,want", [
    (40.0, None, [{"what": "dynbatch", "why": "time budget: 20 s left, needs ~45 s"}],
     "the dynamic batcher was not measured (time budget: 20 s left, needs ~45 s)"),
    (40.0, {"pa_poisson": {"max_rate_at_slo": None}}, [],
     "no Poisson rate tried met p99 <= 300 ms for the dynamic batcher"),
    (None, {"pa_poisson": {"max_rate_at_slo": 30.0}}, [], "no Poisson rate tried met p99 <= 300 ms for chorus"),
])
def test_scheduler_rate_key_says_why_it_is_null(tmp_path, chorus_rate, db, skipped, want):
    b = bare_bench(tmp_path, "python3")
    b.w = bench.World("b", {}, [], tmp_path, {}, None, "cpu", "")
    systems = {"chorus": {"pa_poisson": {"max_rate_at_slo": chorus_rate}}}
    if db is not None:
        systems["triton_dynbatch_5000us"] = db
    b.result.update(systems=systems, skipped=skipped, dynamic_batcher_best="triton_dynbatch_5000us" if db else None)
    keys = b.keys()
    assert keys["values"]["scheduler_rate_vs_dynamic_batcher"] is None
    assert keys["null_because"]["scheduler_rate_vs_dynamic_batcher"] == want


@pytest.mark.parametrize("v,cell", [(None, "null"), (0.0, "0.00"), (0.0048, "0.0048"), (0.0576, "0.058"),
                                    (0.85, "0.85"), (29.87, "29.9"), (126711, "126,711"), (342.7, "343")])
def test_readme_cells_keep_small_ratios_readable(v, cell):
    assert summarize._cell(v) == cell
