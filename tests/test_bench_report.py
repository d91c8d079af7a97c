"""The benchmark report's arithmetic, on made-up timings (nothing here is timed): every
ratio it prints is the ratio of the medians it prints beside it, every time shows its
interquartile range, and a run whose rounds disagree is marked noisy."""
from __future__ import annotations

import numpy as np
import pytest

import hwoptim
from hwoptim.bench import report_text, timing


def _timings(**samples):
    return {k: {"samples": list(v), "reps": 1, "first_call_s": v[0]} for k, v in samples.items()}


def _records(**samples):
    recs = timing.records_from(_timings(**samples), device="cpu", rule="Adam",
                               options="default", dtype="float32", n=10**6, nbytes=28 * 10**6)
    return {r["impl"]: r for r in recs}


def test_a_busy_run_prints_the_ratio_of_its_medians_and_says_it_is_noisy():
    # the rounds of a run where another process shared the cores: the median of per-round
    # ratios says 1.02, the medians say 5.9 ms against 3.8 ms
    floor = [5.9e-3, 5.9e-3, 5.9e-3, 2.0e-3, 2.0e-3]
    step = [5.8e-3, 5.8e-3, 3.8e-3, 3.8e-3, 2.0e-3]
    r = _records(floor=floor, **{"hwoptim-numba": step})["hwoptim-numba"]
    assert r["time_s"] == 3.8e-3 and r["frac_floor"] == pytest.approx(5.9 / 3.8)
    assert r["frac_floor_paired"] == pytest.approx(5.9 / 5.8)
    assert "frac_floor" in r["noisy"] and "time_s" in r["noisy"]
    assert (r["time_q1_s"], r["time_q3_s"]) == (3.8e-3, 5.8e-3)


def test_a_quiet_run_is_not_flagged():
    rng = np.random.default_rng(0)
    floor = 5.9e-3 * (1 + 0.01 * rng.random(15))
    step = 6.1e-3 * (1 + 0.01 * rng.random(15))
    recs = _records(floor=floor, **{"hwoptim-numba": step, "torch-fused": 2 * step})
    assert all(not r["noisy"] for r in recs.values())
    r = recs["hwoptim-numba"]
    assert r["frac_floor"] == pytest.approx(np.median(floor) / np.median(step))
    assert r["vs_torch"] == pytest.approx(2.0) and r["torch_best"] == "torch-fused"
    assert report_text.noisy_note(list(recs.values())) is None


def test_the_summary_shows_both_medians_with_their_spread_and_the_flag():
    floor = [5.9e-3, 5.9e-3, 5.9e-3, 2.0e-3, 2.0e-3]
    step = [5.8e-3, 5.8e-3, 3.8e-3, 3.8e-3, 2.0e-3]
    recs = list(_records(floor=floor, **{"hwoptim-numba": step}).values())
    row = dict(zip(report_text.SUMMARY_HEAD, report_text.summary_rows(recs)[0]))
    assert row["µs/step [IQR]"] == "3,800 [3,800–5,800] (noisy)"
    assert row["floor µs/step [IQR]"].startswith("5,900 [2,000–5,900]")
    assert row["× floor"] == "1.55× (noisy)"
    assert report_text.noisy_note(recs).startswith("noisy run:")


def test_quartiles_of_one_sample():
    assert timing.quartiles([2.0]) == (2.0, 2.0, 2.0) and timing.spread([2.0]) == 0.0


def test_launch_count_of_a_flat_step_is_one():
    if hwoptim.backends.unavailable("numba"):
        pytest.skip("numba")
    flat = hwoptim.FlatParams([(100, 10), (10,), (3, 3)], np.float32)
    opt = hwoptim.Adam(flat.params)
    opt.step(flat.grads)
    assert timing.count_launches(lambda: opt.step(flat.grads)) == 1
    per_tensor = hwoptim.Adam([np.zeros(5, np.float32), np.zeros(7, np.float32)])
    grads = [np.ones(5, np.float32), np.ones(7, np.float32)]
    per_tensor.step(grads)
    assert timing.count_launches(lambda: per_tensor.step(grads)) == 2


# ----------------------------------------------------------------------------- sections

def test_spinners_stop_on_the_way_out_even_after_an_error():
    from hwoptim.bench.contention import Spinners
    with pytest.raises(KeyboardInterrupt):
        with Spinners(2, settle_s=0) as s:
            procs = list(s.procs)
            assert [p.poll() for p in procs] == [None, None]      # spinning
            raise KeyboardInterrupt
    assert all(p.poll() is not None for p in procs) and not s.procs


def test_contention_and_interleaved_commands_write_their_reports(tmp_path, capsys):
    if hwoptim.backends.unavailable("numba"):
        pytest.skip("numba")
    from hwoptim import cli
    assert cli.main(["bench", "--contention", "--interleaved", "--sizes", "1e3",
                     "--pairs", "2", "--sample-ms", "0.5", "--no-torch",
                     "--out", str(tmp_path)]) == 0
    names = sorted(p.name.split("-")[-1] for p in tmp_path.iterdir())
    assert names == ["contention.json", "contention.md", "interleaved.json", "interleaved.md"]
    import json
    c = json.loads(next(tmp_path.glob("*-contention.json")).read_text())
    assert [r["case"] for r in c["rows"]] == ["quiet", "one core busy", "every core busy"]
    assert c["threading"]["layer"] and all(r["ratio"] > 0 for r in c["rows"])
    i = json.loads(next(tmp_path.glob("*-interleaved.json")).read_text())
    assert [r["pool"] for r in i["rows"]] == ["numpy matmul", "numpy MLP"]
    assert "numpy_blas" in i["pools"] and "torch" not in i["pools"]
    out = capsys.readouterr().out
    assert "default / one thread" in out and "pair / (work + step)" in out


def test_gpu_report_shows_the_formats_section():
    """The GPU report's formats section (no GPU needed: the report is a function of the
    result): every format's row in the Markdown and the console table, its ratios in the
    summary, an error row kept."""
    from hwoptim.bench.gpu import format_markdown, format_table, summary
    fm = [{"device": "X", "rule": "Adam", "format": "fp16 p+g, int8 state", "dtype": "float16",
           "n": 2**28, "time_s": 2e-3, "bytes": int(10.06 * 2**28), "gbps": 1350.0,
           "state_bytes": 2.03, "frac_copy": 0.45, "vs_torch_fused_fp32": 2.71},
          {"device": "X", "rule": "Adam", "format": "fp32, int8 state", "dtype": "float32",
           "n": 2**28, "time_s": None, "bytes": None, "gbps": None, "state_bytes": None,
           "error": "RuntimeError: out of memory"}]
    result = {"device": {"name": "X"}, "copy_gbps": 3000.0, "records": [], "models": [],
              "overhead": [], "capturable": [], "formats": fm, "skipped": []}
    s = summary(result)
    assert s["formats_adam"] == {"fp16 p+g, int8 state": {
        "n": 2**28, "gbps": 1350.0, "frac_copy": 0.45, "vs_torch_fused_fp32": 2.71,
        "state_bytes": 2.03}}
    result["summary"] = s
    md = format_markdown(result)
    row = next(ln for ln in md.splitlines() if ln.startswith("| fp16 p+g, int8 state"))
    assert all(c in row for c in ("268435456", "10.06", "1350", "0.45", "2.71", "2.03")), row
    assert "out of memory" in next(ln for ln in md.splitlines()
                                   if ln.startswith("| fp32, int8 state"))
    text = format_table(result)
    assert "format fp16 p+g, int8 state" in text and "vs torch fused fp32 2.71" in text
    assert "RuntimeError: out of memory" in text


def test_gpu_report_shows_the_adafactor_section():
    """The factored Adafactor rows (hwoptim's staged kernels beside torch's): in the
    Markdown and the console table, and in the summary with the ratio to torch."""
    from hwoptim.bench.gpu import format_markdown, format_table, summary
    n = 2**28
    af = [{"device": "X", "rule": "Adafactor", "impl": "hwoptim-cupy", "shape": [2**14, 2**14],
           "n": n, "time_s": 4e-3, "bytes": 24 * n, "gbps": 1610.6, "frac_copy": 0.54,
           "frac_minimum": 0.27, "vs_torch": 3.5},
          {"device": "X", "rule": "Adafactor", "impl": "torch", "shape": [2**14, 2**14],
           "n": n, "time_s": None, "bytes": 24 * n, "error": "RuntimeError: out of memory"}]
    result = {"device": {"name": "X"}, "copy_gbps": 3000.0, "records": [], "models": [],
              "overhead": [], "capturable": [], "formats": [], "adafactor": af,
              "skipped": []}
    s = summary(result)
    assert s["adafactor_factored"] == {"hwoptim-cupy": {
        "shape": [2**14, 2**14], "gbps": 1610.6, "frac_copy": 0.54, "frac_minimum": 0.27,
        "vs_torch": 3.5}}
    result["summary"] = s
    md = format_markdown(result)
    row = next(ln for ln in md.splitlines() if ln.startswith("| hwoptim-cupy | 16384x16384"))
    assert all(c in row for c in ("1611", "0.54", "0.27", "3.50")), row
    assert "out of memory" in next(ln for ln in md.splitlines() if ln.startswith("| torch |"))
    text = format_table(result)
    assert "adafactor 16384x16384" in text and "vs torch 3.50" in text
    assert "RuntimeError: out of memory" in text
