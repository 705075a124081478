"""The benchmark harness: ISA detection, the NOISY rule, the byte/flop counts against hand counts,
peak memory, targets, and `xlsparse bench --plot` on a fake family; the baselines against a
float64 reference and against ours on small inputs. Nothing here is timed."""
import importlib
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

import xlsparse
from xlsparse import cli, functional
from xlsparse.optim import MaskedAdamW

harness = importlib.import_module("xlsparse.benchmarks.harness")
baselines = importlib.import_module("xlsparse.benchmarks.baselines")
bench_matmul = importlib.import_module("xlsparse.benchmarks.bench_matmul")
bench_optim = importlib.import_module("xlsparse.benchmarks.bench_optim")
bench_compose = importlib.import_module("xlsparse.benchmarks.bench_compose")
real_masks = importlib.import_module("xlsparse.benchmarks.real_masks")
plot = importlib.import_module("xlsparse.benchmarks.plot")

EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\n"
XEON_AMX = ("model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: sse avx avx2 fma avx512f avx512bw avx512_bf16 "
            "amx_bf16 amx_tile amx_int8\n")
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: avx avx2 fma avx512f avx512_bf16 avx512_vnni\n"


def test_isa_detection_from_cpuinfo():
    assert harness.cpu_model(EPYC_AVX2) == "AMD EPYC 7B13"
    epyc, xeon, zen4 = (harness.cpu_flags(t) for t in (EPYC_AVX2, XEON_AMX, ZEN4))
    assert harness.vector_isa(epyc) == ["AVX2", "FMA"]
    assert harness.vector_isa(xeon) == ["AVX2", "FMA", "AVX-512", "AVX-512-BF16", "AMX-BF16"]
    assert harness.vector_isa(zen4) == ["AVX2", "FMA", "AVX-512", "AVX-512-BF16"]
    assert not harness.has_bf16_hardware(epyc)
    assert harness.has_bf16_hardware(xeon) and harness.has_bf16_hardware(zen4)
    assert harness.cpu_flags("model name : x\n") == set()


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_gemm_rows_only_where_the_hardware_multiplies_bf16(bf16, monkeypatch, capsys):
    monkeypatch.setattr(bench_matmul, "bf16_in_hardware", lambda device: bf16)
    monkeypatch.setattr(bench_matmul, "_real_mask_cases", lambda tokens, device: [])
    rows = bench_matmul.cases(quick=True)
    gemm_bf16 = [c for c in rows if c.dtype == "bfloat16" and "ensemble" not in c.op]
    assert bool(gemm_bf16) == bf16
    assert any(c.dtype == "bfloat16" for c in rows)  # the ensemble ops need no GEMM and keep their bf16 rows
    assert ("bf16 matmul rows skipped" in capsys.readouterr().out) == (not bf16)


def _ceilings(copy=20.0, fp32=100.0, bf16=None):
    return harness.Ceilings(copy, fp32, bf16)


def _load(before=0.5, others=0.0):
    return harness.RunLoad(load_before=before, others_cores=others)


def test_noisy_marking():
    quiet = harness.noisy_reasons(_ceilings(), _ceilings(copy=19.0, fp32=105.0), _load(1.9, 0.1), threads=2)
    assert quiet == []
    copy_drop = harness.noisy_reasons(_ceilings(), _ceilings(copy=17.0), _load(), threads=2)
    assert len(copy_drop) == 1 and "copy bandwidth" in copy_drop[0]
    gemm_rise = harness.noisy_reasons(_ceilings(fp32=80.0), _ceilings(fp32=100.0), _load(), threads=2)
    assert len(gemm_rise) == 1 and "fp32 GEMM" in gemm_rise[0]  # up counts as down
    # the change is taken relative to the lower value: 20 -> 18.1 is 10.5% (9.5% of the higher)
    assert "copy bandwidth" in harness.noisy_reasons(_ceilings(), _ceilings(copy=18.1), _load(), threads=2)[0]
    bf16 = harness.noisy_reasons(_ceilings(bf16=500.0), _ceilings(bf16=400.0), _load(), threads=2)
    assert len(bf16) == 1 and "bf16" in bf16[0]
    loaded = harness.noisy_reasons(_ceilings(), _ceilings(), _load(before=2.5), threads=2)
    assert len(loaded) == 1 and "load average" in loaded[0]
    assert harness.noisy_reasons(_ceilings(), _ceilings(), _load(before=2.0), threads=2) == []  # equal is not above
    # Other processes' CPU time: 10% of the run's threads is the limit (0.2 cores of 2 threads).
    busy = harness.noisy_reasons(_ceilings(), _ceilings(), _load(others=0.3), threads=2)
    assert len(busy) == 1 and "other processes" in busy[0]
    assert harness.noisy_reasons(_ceilings(), _ceilings(), _load(others=0.2), threads=2) == []
    assert "could not be read" in harness.noisy_reasons(_ceilings(), _ceilings(), _load(others=None), threads=2)[0]
    both = harness.noisy_reasons(_ceilings(), _ceilings(copy=10.0), _load(before=7.0), threads=2)
    assert len(both) == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_load_monitor_counts_other_processes_cpu_time():
    # A child spinning for about a second is another process's load; the monitor must see most of
    # a core of it (read before the child is reaped, when its time would join this process's).
    monitor = harness.LoadMonitor()
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"])
    time.sleep(1.2)
    load = monitor.finish()
    spinner.wait()
    assert load.others_cores is not None and load.others_cores > 0.4


def test_copy_ceiling_is_the_faster_of_a_copy_and_an_in_place_add(monkeypatch):
    # A CPU's copy_ reads each destination line before writing it (write-allocate), bytes its count
    # (source + destination, 2 n) leaves out; an in-place add_ (3 n: both read, one written back)
    # moves only what it counts. Judged against the copy_ alone, in-place kernels (apply, AdamW)
    # showed shares above 100% of the "ceiling". Here each timed call takes 1 s: the copy counts
    # 2 n bytes, the add 3 n, so the ceiling is the add's 3 n per second.
    timed = []

    def one_second(fn, device, seconds):
        timed.append(fn)
        return 1.0

    monkeypatch.setattr(harness, "_best_seconds", one_second)
    machine = harness.Machine("cpu", "x", [], "none", 1, "2.13.0", False)
    n = 64 * 2**20 // 4  # --quick's vectors
    ceilings = harness.measure_ceilings(machine, quick=True)
    assert ceilings.copy_gbs == pytest.approx(3 * n * 4 / 1e9)
    assert len(timed) == 3  # copy_, add_, the fp32 GEMM (no bf16 in hardware)
    # and where the copy is the faster (a GPU, or a CPU with streaming stores), the copy's rate
    times = iter([1.0, 2.0, 1.0])
    monkeypatch.setattr(harness, "_best_seconds", lambda fn, device, seconds: next(times))
    assert harness.measure_ceilings(machine, quick=True).copy_gbs == pytest.approx(2 * n * 4 / 1e9)


def test_header_says_noisy_only_when_noisy():
    machine = harness.Machine("cpu", "AMD EPYC 7B13", ["AVX2", "FMA"], "avx2", 2, "2.13.0", False)
    quiet = harness.header_lines(machine, _ceilings(), _ceilings(), _load(1.0), quick=False)
    assert not any("NOISY" in line for line in quiet)
    assert any("AMD EPYC 7B13" in line and "AVX2, FMA" in line and "CPU kernels: avx2" in line for line in quiet)
    assert any("2 threads" in line and "torch 2.13.0" in line for line in quiet)
    assert sum("ceilings" in line and "copy 20.0 GB/s" in line for line in quiet) == 2  # before and after
    noisy = harness.header_lines(machine, _ceilings(), _ceilings(), _load(5.0), quick=False)
    assert noisy[0].startswith("**NOISY")


def test_cache_line_counts():
    idx = torch.tensor([0, 1, 15, 16, 100, 101, 160])
    assert harness.cache_lines(idx, 4) == 4  # fp32 lines 0, 1, 6 and 10
    assert harness.cache_lines(idx, 2) == 3  # bf16: 32 per line -> lines 0, 3, 5
    assert harness.cache_lines(idx[:0], 4) == 0
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[0, 3, 17, 39]] = True  # lines 0, 1, 2 (the last one padded)
    assert bench_optim.lines_with_selection(mask) == 3
    assert bench_optim.dense_mode_bytes([mask]) == 40 + 7 * 64 * 3
    indices = torch.tensor([0, 3, 17, 39], dtype=torch.int32)
    assert bench_optim.compact_mode_bytes([indices]) == 3 * 64 * 3 + 4 * (4 + 16)
    assert bench_optim.k_vector_bytes(10) == 280
    assert bench_compose.axpy_bytes(indices.long(), 4) == 4 * (8 + 4) + 2 * 64 * 3
    assert bench_compose.apply_bytes(nnz=10, lines=3) == 120 + 384
    assert bench_compose.revert_bytes(nnz=10, lines=3) == 80 + 192  # written lines only, once each


def test_global_topk_rows_count_one_read_of_the_data():
    # A global top-K must read each value once and write each mask entry once (5 bytes an fp32
    # entry); the rows counted the implementation's second read pass too (9 bytes), which put
    # their share of copy bandwidth 1.8x above what the op itself has to move.
    assert bench_compose.topk_bytes(10) == 50
    rows = bench_compose._topk_cases(quick=True, device="cpu")
    assert len(rows) == 2
    full, subset = rows  # the quick shapes: 4 x (512x768, 768x768), and its first 2 tensors
    sizes = [(512, 768), (768, 768)] * 4
    n_full = sum(a * b for a, b in sizes)
    n_subset = sum(a * b for a, b in sizes[:2])
    assert full.bytes == 5 * n_full and subset.bytes == 5 * n_subset


def test_flop_counts():
    # 2 languages: 3 tokens with 2 mask entries, 5 tokens with 1 -> 2 * (3*2 + 5*1)
    masks = torch.zeros(2, 2, 3, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 1, 2] = True
    assert bench_optim.masked_weight_grad_flops(torch.tensor([3, 5]), masks) == 22
    assert bench_matmul.dense_flops(2, 3, 5) == 60
    assert bench_matmul.sddmm_flops(4, 7) == 56
    # T=8, 16x4 weight, K=5: forward 2*8*16*4, dX as much again, SDDMM 2*8*5.
    assert bench_matmul.delta_linear_train_flops(8, 16, 4, 5) == 1024 + 1024 + 80
    # two deltas: 3 tokens x 5 entries and 5 tokens x 2 entries
    assert bench_matmul.hard_routed_train_flops(8, 16, 4, [3, 5], [5, 2]) == 2048 + 30 + 20
    assert bench_matmul.gated_forward_flops(8, 16, 4, [5, 2]) == 1024 + 80 + 32


def test_roofline_judges_a_row_against_the_roof_that_binds_it():
    # An SDDMM at 1% does ~4 flops per byte of dY and X it must read, below the machine's balance
    # (170 GFLOP/s / 31.5 GB/s = 5.4): against the GEMM rate alone its share read 18%, not 24%.
    ceil = _ceilings(copy=31.5, fp32=170.0, bf16=421.0)
    tokens, out_f, in_f, nnz = 2048, 4096, 1024, 41943
    flops = bench_matmul.sddmm_flops(tokens, nnz)
    nbytes = bench_matmul.sddmm_bytes(tokens, out_f, in_f, nnz, 4, 8)
    assert nbytes == 2048 * 5120 * 4 + nnz * 12
    row = harness.judge(_row(ms=5.54, flops=flops, bytes=nbytes), ceil)
    assert row.bound == "memory" and row.roofline_pct == pytest.approx(100 * nbytes / 5.54e-3 / 1e9 / 31.5)
    # at 5% the same op is compute-bound: judged against the GEMM rate
    dense = harness.judge(_row(ms=16.0, flops=bench_matmul.sddmm_flops(tokens, 5 * nnz),
                               bytes=bench_matmul.sddmm_bytes(tokens, out_f, in_f, 5 * nnz, 4, 8)), ceil)
    assert dense.bound == "compute"
    # the script's SDDMM rows carry both counts
    sddmm_rows = [c for c in bench_matmul._delta_linear_cases(16, 32, 24, bench_matmul._uniform_indices(32, 24, 0.05, 2),
                                                             torch.float32, "cpu", torch_sddmm_row=True)
                  if c.op == "sddmm"]
    assert len(sddmm_rows) == 2 and all(c.flops and c.bytes == bench_matmul.sddmm_bytes(16, 32, 24, 38, 4, 8)
                                        for c in sddmm_rows)


def test_peak_memory_counts_tensors_alive_at_once():
    assert harness.peak_of_running_total([100, -100, 50, 60, -110]) == 110
    assert harness.peak_of_running_total([]) == 0
    mib = 2**20 // 4  # float32 elements in one MiB

    def three_alive():
        return [torch.ones(mib) for _ in range(3)]

    def four_in_turn():
        for _ in range(4):
            torch.ones(mib).sum()

    assert harness.peak_mib(three_alive) == pytest.approx(3, abs=0.01)
    assert harness.peak_mib(four_in_turn) == pytest.approx(1, abs=0.01)


def test_time_alternately_interleaves():
    calls = []
    ours, theirs = harness.time_alternately(lambda: calls.append("a"), lambda: calls.append("b"), warmup=1, reps=3)
    # one warm-up pair, then ABBA: neither side always runs second
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and len(ours) == len(theirs) == 3
    alone, none = harness.time_alternately(lambda: calls.append("c"), None, warmup=0, reps=2)
    assert len(alone) == 2 and none == []


def _row(**kw):
    base = dict(op="op", shape="s", density=0.01, dtype="float32", backend="cpu", masks="uniform", ms=10.0, ms_min=9.0,
                ms_max=12.0, baseline="base", baseline_ms=25.0, baseline_ms_min=24.0, baseline_ms_max=30.0, speedup=2.5,
                peak_mib=5.0, baseline_peak_mib=4.0)
    base.update(kw)
    return harness.Row(**base)


def test_roofline_and_targets():
    ceil = _ceilings(copy=20.0, fp32=100.0, bf16=400.0)
    row = harness.judge(_row(flops=int(5e8), goals=(harness.Target("x >= 2", "speedup", 2.0),
                                                     harness.Target("share >= 80%", "roofline", 0.8))), ceil)
    assert row.bound == "compute" and row.roofline_pct == pytest.approx(50.0)  # 50 GFLOP/s of 100
    assert [t["met"] for t in row.targets] == [True, False]
    bf16 = harness.judge(_row(dtype="bfloat16", flops=int(5e8)), ceil)
    assert bf16.roofline_pct == pytest.approx(12.5)  # against the bf16 GEMM
    emulated = harness.judge(_row(dtype="bfloat16", flops=int(5e8)), _ceilings(fp32=100.0))
    assert emulated.roofline_pct == pytest.approx(50.0)  # no bf16 ceiling: against fp32
    mem = harness.judge(_row(bytes=int(1.6e8)), ceil)
    assert mem.bound == "memory" and mem.roofline_pct == pytest.approx(80.0)
    unit = 4 * 2**20  # one O x I weight of 4 MiB; 1 MiB extra is 0.25 of it
    extra = harness.judge(_row(goals=(harness.Target("mem", "extra_memory", 0.25, unit),)), ceil)
    assert extra.targets[0]["value"] == pytest.approx(0.25) and extra.targets[0]["met"]
    lines = harness.format_targets([row, extra], quick=True)
    assert any("**no**" in line for line in lines) and "do not count" in lines[-1]
    near = harness.judge(_row(speedup=0.9498, goals=(harness.Target("x >= 0.95", "speedup", 0.95),)), ceil)
    assert "| 0.9498x | **no** |" in harness.format_targets([near], quick=False)[-1]  # not "0.95x | no"
    with pytest.raises(ValueError, match="metric"):
        harness.Target("bad", "speed", 1.0).judge(row)
    # the same for the other metrics: a miss never prints as the bound it missed
    share = harness.judge(_row(ms=10.0, bytes=int(0.15992e9), goals=(harness.Target("80%", "roofline", 0.8),)), ceil)
    assert "| 79.96% of the ceiling | **no** |" in harness.format_targets([share], quick=False)[-1]
    over = harness.judge(_row(peak_mib=5.0 + 0.2549 * 4, baseline_peak_mib=5.0,
                              goals=(harness.Target("mem", "extra_memory", 0.25, 4 * 2**20),)), ceil)
    assert "| 0.255 of one O x I weight | **no** |" in harness.format_targets([over], quick=False)[-1]
    met = harness.judge(_row(ms=10.0, bytes=int(0.17e9), goals=(harness.Target("80%", "roofline", 0.8),)), ceil)
    assert "| 85% of the ceiling | yes |" in harness.format_targets([met], quick=False)[-1]
    # a FAILED row (NaN times) is not measured, for its roofline and speed-up targets alike
    failed = harness.judge(_row(ms=float("nan"), speedup=float("nan"), bytes=int(0.17e9),
                                goals=(harness.Target("80%", "roofline", 0.8), harness.Target("2x", "speedup", 2.0))), ceil)
    assert [t["met"] for t in failed.targets] == [None, None]
    assert all("not measured" in line for line in harness.format_targets([failed], quick=False)[-2:])


def test_real_masks_load_and_pick(tmp_path, capsys):
    from safetensors.torch import save_file

    names = {"encoder.layer.0.attention.self.query.weight": (4, 4, [0, 5]),
             "encoder.layer.0.attention.self.key.weight": (4, 4, [1, 2, 3]),
             "encoder.layer.1.attention.self.query.weight": (4, 4, [1, 2, 3, 4, 5, 6, 7]),
             "encoder.layer.0.intermediate.dense.weight": (8, 4, [0]),
             "encoder.layer.1.intermediate.dense.weight": (8, 4, list(range(20)))}
    shapes = json.dumps({n: [o, i] for n, (o, i, _) in names.items()})
    save_file({n: torch.tensor(i, dtype=torch.int32) for n, (_, _, i) in names.items()},
              str(tmp_path / real_masks.FILE), metadata={"shapes": shapes})
    masks = real_masks.load(str(tmp_path))
    assert masks["encoder.layer.0.intermediate.dense.weight"][1] == (8, 4)
    assert masks["encoder.layer.1.intermediate.dense.weight"][0].dtype == torch.int64
    assert real_masks.skewed_ffn(masks) == "encoder.layer.1.intermediate.dense.weight"
    assert real_masks.typical_attention(masks) == "encoder.layer.0.attention.self.key.weight"
    assert real_masks.same_shape_group(masks, "encoder.layer.1.intermediate.dense.weight", 4) == [
        "encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.intermediate.dense.weight"]
    assert real_masks.load(str(tmp_path / "missing")) is None
    assert "real-mask rows skipped" in capsys.readouterr().out


def test_bench_plot_writes_png_for_a_fake_family(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # the `examples` extra
    x = torch.randn(64)

    def cases(quick=False, device="cpu"):
        return [harness.Case("fake op", "[64]", "float32", lambda: x * 2, lambda: x + x, "x + x", 0.5, "cpu",
                             bytes=512, targets=(harness.Target("fake >= 0x", "speedup", 0.0),)),
                harness.Case("fake gemm", "4x4", "float32", lambda: x.sum(), None, "", None, "cpu", flops=128)]

    fake = types.ModuleType("xlsparse.benchmarks.bench_fake")
    fake.cases = cases
    monkeypatch.setitem(sys.modules, "xlsparse.benchmarks.bench_fake", fake)
    monkeypatch.setattr(cli, "_families", lambda: {"fake": "bench_fake"})
    monkeypatch.setattr(harness, "measure_ceilings", lambda machine, quick=False: _ceilings(copy=10.0, fp32=50.0))
    png = tmp_path / "plots" / "bench.png"  # a folder that does not exist yet
    assert cli.main(["bench", "--family", "fake", "--quick", "--out", str(tmp_path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| fake op | [64] | 50% | uniform | float32 | cpu |" in out
    assert "fake >= 0x" in out and "ceilings before" in out
    saved = json.loads((tmp_path / "fake.json").read_text())
    assert saved["rows"][0]["targets"][0]["met"] is True and saved["ceilings_before"]["copy_gbs"] == 10.0


def _fake_family(monkeypatch) -> list:
    """`bench --family fake`: one case; returns the list its calls are counted in."""
    calls = []
    x = torch.randn(8)

    def cases(quick=False, device="cpu"):
        return [harness.Case("fake op", "[8]", "float32", lambda: calls.append(1) or x * 2, lambda: x + x, "x + x")]

    fake = types.ModuleType("xlsparse.benchmarks.bench_fake")
    fake.cases = cases
    monkeypatch.setitem(sys.modules, "xlsparse.benchmarks.bench_fake", fake)
    monkeypatch.setattr(cli, "_families", lambda: {"fake": "bench_fake"})
    monkeypatch.setattr(harness, "measure_ceilings", lambda machine, quick=False: _ceilings())
    return calls


@pytest.mark.parametrize("argv, name", [(["--plot", "{tmp}/bench.xyz"], "--plot"),
                                        (["--plot", "{tmp}/adir"], "--plot"),
                                        (["--plot", "{tmp}/afile/bench.png"], "--plot"),
                                        (["--plot", ""], "--plot: an empty path"),
                                        (["--out", "{tmp}/afile"], "--out"),
                                        (["--out", "{tmp}/afile/results"], "--out"),
                                        (["--threads", "-1"], "--threads")])
def test_bench_refuses_bad_arguments_before_measuring(argv, name, tmp_path, monkeypatch, capsys):
    # They were found after the whole run (the JSON written, the table lost) or named no option.
    pytest.importorskip("matplotlib")  # the `examples` extra
    calls = _fake_family(monkeypatch)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["bench", "--family", "fake", "--quick", "--out", str(tmp_path / "results"), *argv]) == 1
    assert name in capsys.readouterr().err
    assert calls == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir", "afile"]
    assert (tmp_path / "afile").read_text() == "keep"


def test_bench_plot_prints_the_file_it_writes(tmp_path, monkeypatch, capsys):
    # matplotlib adds .png to a name without a suffix: "plot written to bench" wrote bench.png.
    pytest.importorskip("matplotlib")  # the `examples` extra
    _fake_family(monkeypatch)
    assert cli.main(["bench", "--family", "fake", "--quick", "--out", str(tmp_path), "--plot", str(tmp_path / "bench")]) == 0
    written = capsys.readouterr().out.splitlines()[-1].removeprefix("plot written to ")
    assert written == str(tmp_path / "bench.png") and os.path.isfile(written)


def test_bench_plot_without_a_path_writes_into_the_out_folder(tmp_path, monkeypatch, capsys):
    # it wrote benchmarks/results/bench.png under the working folder, whatever --out said
    pytest.importorskip("matplotlib")  # the `examples` extra
    _fake_family(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--family", "fake", "--quick", "--out", "elsewhere", "--plot"]) == 0
    written = capsys.readouterr().out.splitlines()[-1].removeprefix("plot written to ")
    assert written == os.path.join("elsewhere", "bench.png")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["elsewhere", "elsewhere/bench.png",
                                                                                  "elsewhere/fake.json"]


def test_plot_labels_tell_every_row_apart():
    # On CUDA a sparse_delta_linear shape has two SpIEL rows; cut at " (" both read "vs SpIEL".
    rows = [dict(op="sparse_delta_linear fwd+bwd", shape="T=8 4x4", density=0.01, dtype="float32", masks="uniform",
                 baseline=name) for name in ("SpIEL (normal step: re-merge, SDDMM dv by sampled_addmm)",
                                             "SpIEL (hook path: dense dW)", "frozen linear fwd+dX")]
    labels = plot.row_labels(rows)
    assert len(set(labels)) == 3 and "hook path" in labels[1] and labels[2].endswith("vs frozen linear fwd+dX")


def test_plot_rejects_an_empty_result_set(tmp_path):
    pytest.importorskip("matplotlib")  # the `examples` extra
    with pytest.raises(ValueError, match="no benchmark rows"):
        plot.plot([], str(tmp_path / "x.png"))


def _run_gpu_script(tmp_path, nvidia_smi_says: str):
    """benchmarks/gpu.sh with a fake nvidia-smi first on PATH."""
    import os
    import stat
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho '{nvidia_smi_says}'\n")
    (fake / "nvidia-smi").chmod(stat.S_IRWXU)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu.sh")
    if not os.path.exists(script):
        pytest.skip("benchmarks/gpu.sh is in the source tree only")
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHON=sys.executable,
               XLSPARSE_GPU_OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)


def test_gpu_script_stops_at_once_without_a_gpu(tmp_path):
    done = _run_gpu_script(tmp_path, "No devices were found")
    assert done.returncode == 2 and "nvidia-smi lists no GPU" in done.stderr
    assert not (tmp_path / "out").exists()  # stopped before writing anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU")
def test_gpu_script_stops_when_torch_sees_no_gpu(tmp_path):
    done = _run_gpu_script(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-0)")
    assert done.returncode == 2 and "sees no CUDA device" in done.stderr


def test_a_failing_case_is_a_failed_row_not_a_lost_target(tmp_path, monkeypatch, capsys):
    def broken():
        raise RuntimeError("no kernel")

    def cases(quick=False, device="cpu"):
        return [harness.Case("broken op", "[1]", "float32", broken, lambda: None, "nothing",
                             targets=(harness.Target("broken >= 1x", "speedup", 1.0),)),
                harness.Case("fine op", "[1]", "float32", lambda: None, None, "")]

    fake = types.ModuleType("xlsparse.benchmarks.bench_fake")
    fake.cases = cases
    monkeypatch.setitem(sys.modules, "xlsparse.benchmarks.bench_fake", fake)
    monkeypatch.setattr(cli, "_families", lambda: {"fake": "bench_fake"})
    monkeypatch.setattr(harness, "measure_ceilings", lambda machine, quick=False: _ceilings())
    assert cli.main(["bench", "--family", "fake", "--quick", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: no kernel" in out and "| fine op |" in out
    assert "| broken >= 1x | broken op" in out and "not measured" in out


@pytest.mark.slow  # every family's quick table: ~30 s
def test_bench_quick_runs_every_family(tmp_path, monkeypatch, capsys):
    """The README's `xlsparse bench --quick` on the real families, and the LT-SFT family that runs
    only when named (about 30 s on 2 cores): a benchmark that no longer runs against the library
    fails here, not at a user's prompt (one read a private attribute that the multi-device apply
    had renamed)."""
    monkeypatch.setattr(harness, "measure_ceilings", lambda machine, quick=False: _ceilings())
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "--family", "ltsft", "--quick", "--out", str(tmp_path)]) == 0
    assert "FAILED" not in capsys.readouterr().out
    for family in ("compose", "optim", "matmul", "ltsft"):
        rows = json.loads((tmp_path / f"{family}.json").read_text())["rows"]
        assert rows and all(r["ms"] > 0 and (r["baseline_ms"] is None or r["baseline_ms"] > 0) for r in rows)


# --- baselines: each must compute what ours computes, or its timing means nothing --------------

def _close(got, want):
    """fp32 against a float64 reference (or against ours)."""
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-5)


def _linear_inputs(tokens=37, out_f=24, in_f=40, k=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(tokens, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
    b, gy = torch.randn(out_f, generator=gen), torch.randn(tokens, out_f, generator=gen)
    idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values
    return x, w, b, gy, idx, torch.randn(k, generator=gen)


def test_torch_sddmm_baseline_matches_reference():
    from xlsparse.ops.matmul import sddmm

    x, w, _, gy, idx, _ = _linear_inputs()
    support = baselines.support_csr(idx, w.shape, torch.float32)
    got = baselines.torch_sddmm(gy, x, support)
    _close(got, (gy.double().t() @ x.double()).flatten()[idx])
    _close(got, sddmm(gy, x, idx))
    with pytest.raises(ValueError, match="sorted"):  # the CSR values would come out in another order
        baselines.support_csr(idx.flip(0), w.shape, torch.float32)


@pytest.mark.parametrize("way", ["dense dW", "SDDMM"])
def test_spiel_baselines_match_reference(way):
    x, w, b, gy, idx, vals = _linear_inputs()
    full = w.double().flatten().index_add(0, idx, vals.double()).view(w.shape)
    want = (x.double() @ full.t() + b.double(), gy.double() @ full, (gy.double().t() @ x.double()).flatten()[idx])
    xg, vg = x.clone().requires_grad_(), vals.clone().requires_grad_()
    if way == "SDDMM":
        y = baselines.spiel_sddmm_delta_linear(xg, w, b, idx, vg, baselines.support_csr(idx, w.shape, w.dtype))
    else:
        y = baselines.spiel_delta_linear(xg, w, b, idx, vg)
    got = (y, *torch.autograd.grad(y, [xg, vg], gy))
    ours_y = functional.sparse_delta_linear(xg, w, b, idx, vg)
    ours = (ours_y, *torch.autograd.grad(ours_y, [xg, vg], gy))
    for g, r, o in zip(got, want, ours):
        _close(g, r)
        _close(g, o)


def test_merged_per_language_matches_reference():
    gen = torch.Generator().manual_seed(1)
    tokens, out_f, in_f, num = 41, 12, 20, 3
    x, w = torch.randn(tokens, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
    b, gy = torch.randn(out_f, generator=gen), torch.randn(tokens, out_f, generator=gen)
    route = torch.randint(-1, num, (tokens,), generator=gen)
    route[:num + 1] = torch.arange(-1, num)  # every language and the base own a token
    idx = [torch.randperm(out_f * in_f, generator=gen)[:30].sort().values for _ in range(num)]
    vals = [torch.randn(30, generator=gen) for _ in range(num)]
    # float64: each token times its own W0 + Δ (W0 alone for route −1)
    x64, v64 = x.double().requires_grad_(), [v.double().requires_grad_() for v in vals]
    weights = torch.stack([w.double()] + [w.double().flatten().index_add(0, i, v).view(w.shape)
                                          for i, v in zip(idx, v64)])
    y64 = torch.einsum("ti,toi->to", x64, weights[route + 1]) + b.double()
    want = (y64, *torch.autograd.grad(y64, [x64, *v64], gy.double()))
    xg, vg = x.clone().requires_grad_(), [v.clone().requires_grad_() for v in vals]
    y = baselines.merged_per_language(xg, w, b, idx, vg, route)
    got = (y, *torch.autograd.grad(y, [xg, *vg], gy))
    ours_y = functional.multi_delta_linear(xg, w, b, idx, vg, route=route)
    ours = (ours_y, *torch.autograd.grad(ours_y, [xg, *vg], gy))
    for g, r, o in zip(got, want, ours):
        _close(g, r)
        _close(g, o)


def test_ensemble_baselines_match_reference():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 9, 50, generator=gen)
    lw = torch.log_softmax(torch.randn(9, 3, generator=gen), -1)
    y = torch.randint(0, 50, (9,), generator=gen)
    mixture = torch.log((lw.double().T.exp()[:, :, None] * torch.softmax(z.double(), -1)).sum(0))
    got = baselines.composite_ensemble_logprobs(z, lw)
    _close(got, mixture)
    _close(got, functional.ensemble_logprobs(z, lw))
    nll = baselines.composite_ensemble_nll(z, lw, y)
    _close(nll, -mixture.gather(1, y[:, None]).squeeze(1))
    _close(nll, functional.ensemble_nll(z, lw, y))


def test_compose_baselines_match_xlsparse_apply():
    shapes = {"w": (7, 5), "b": (9,)}
    diffs = [bench_compose._random_diff(shapes, 0.4, seed) for seed in (2, 3)]
    gen = torch.Generator().manual_seed(4)
    start = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    want = {n: p.double().flatten() for n, p in start.items()}
    for diff in diffs:
        for n, d in diff.deltas.items():
            want[n] = want[n].index_add(0, d.indices.long(), d.values.double())
    ours = {n: p.clone() for n, p in start.items()}
    xlsparse.apply(diffs, ours, [1.0, 1.0])
    loaded = [{n: baselines.composable_sft_decode(enc, shapes[n])
               for n, enc in bench_compose._encode_composable(d).items()} for d in diffs]
    theirs = {n: p.clone() for n, p in start.items()}
    baselines.composable_sft_apply(theirs, loaded)
    plain = [{n: (d.indices, d.values) for n, d in diff.deltas.items()} for diff in diffs]
    assert all(i.dtype == torch.int32 for diff in plain for i, _ in diff.values())  # as ours gets them
    looped = {n: p.clone() for n, p in start.items()}
    baselines.index_add_apply(looped, plain, [1.0, 1.0])
    for n in shapes:
        for got in (theirs[n], looped[n]):
            _close(got, want[n].view(shapes[n]))
            _close(got, ours[n])
    baselines.composable_sft_revert(theirs, loaded)
    for n in shapes:
        _close(theirs[n], start[n])


def test_indexed_adamw_baseline_matches_compact_masked_adamw():
    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 10), (13,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt = MaskedAdamW(ours, masks, lr=1e-3, mode="compact")
    indices = [opt.state[p]["indices"] for p in ours]
    assert all(i.dtype == torch.int32 for i in indices)  # the baseline gets the same tensors
    opt.step()
    baselines.indexed_adamw_step(theirs, indices, [torch.zeros(i.numel()) for i in indices],
                                 [torch.zeros(i.numel()) for i in indices], step=1)
    for p, q, s in zip(ours, theirs, start):
        _close(q.detach(), p.detach())
        assert not torch.equal(q.detach(), s)  # the step moved something


def test_matmul_rows_give_each_baseline_the_inputs_ours_gets():
    # The rows' closures, not only the functions: a baseline fed other inputs times other work.
    idx = bench_matmul._uniform_indices(32, 24, 0.05, seed=2)
    deltas = [bench_matmul._uniform_indices(32, 24, 0.05, seed=20 + e) for e in range(bench_matmul.LANGUAGES)]
    rows = (bench_matmul._delta_linear_cases(16, 32, 24, idx, torch.float32, "cpu", torch_sddmm_row=True)
            + bench_matmul._multi_cases(16, 32, 24, deltas, torch.float32, "cpu")
            + bench_matmul._ensemble_cases(8, 50, torch.float32, "cpu"))
    other_work = {"frozen linear fwd+dX", "dense dYᵀX"}  # the references: no delta, a dense dW
    compared = [c for c in rows if c.baseline_name not in other_work]
    assert "torch SDDMM (sparse.sampled_addmm)" in [c.baseline_name for c in compared] and len(compared) == 7
    for case in compared:
        ours, theirs = case.fn(), case.baseline()
        ours, theirs = (ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,))
        assert len(ours) == len(theirs), case.baseline_name
        for o, t in zip(ours, theirs):
            _close(t, o)


def test_merged_ensemble_baseline_makes_no_extra_temporaries():
    # The soft-gated rows' baseline (4 merged dense passes) accumulated with `out = out + g * y`:
    # two [T, O] temporaries more per pass than a user's in-place mix, which slowed the baseline
    # and flattered the row's speed-up (its target sat at 3.01x against a bound of 3).
    gen = torch.Generator().manual_seed(8)
    tokens, out_f, in_f, experts = 256, 512, 64, 4
    x = torch.randn(tokens, in_f, generator=gen)
    ws = [torch.randn(out_f, in_f, generator=gen) for _ in range(experts)]
    b = torch.randn(out_f, generator=gen)
    gates = torch.softmax(torch.randn(tokens, experts, generator=gen), -1)
    want = sum(gates[:, e:e + 1].double() * torch.nn.functional.linear(x.double(), ws[e].double(), b.double())
               for e in range(experts))
    _close(baselines.merged_ensemble(x, ws, b, gates), want)
    peak = harness.peak_mib(lambda: baselines.merged_ensemble(x, ws, b, gates))
    if peak == peak:  # NaN: a torch without the profiler's event tree
        assert peak <= 2 * tokens * out_f * 4 / 2**20 + 1e-9  # the mix and one pass's output


def test_assert_same_passes_equal_outputs_and_refuses_others():
    a = torch.randn(5, 3)
    harness.assert_same("x", (a, a.sum(0)), (a.clone(), a.sum(0)))
    harness.assert_same("x", a.bfloat16(), (a * (1 + 1e-3)).bfloat16())
    with pytest.raises(ValueError, match="differs"):
        harness.assert_same("x", a, a + 1)
    with pytest.raises(ValueError, match="shape"):
        harness.assert_same("x", a, a.t())
    with pytest.raises(ValueError, match="outputs"):
        harness.assert_same("x", (a, a), (a,))
    with pytest.raises(ValueError, match="finite"):
        harness.assert_same("x", a, torch.full_like(a, float("nan")))


def test_a_row_whose_baseline_computes_something_else_fails_before_timing(monkeypatch):
    calls = []

    def wrong():
        calls.append(1)
        return torch.zeros(3)

    case = harness.Case("op", "3", "float32", lambda: torch.ones(3), wrong, "wrong", None, "cpu", bytes=12,
                        check=lambda: harness.assert_same("op", torch.ones(3), wrong()))
    with pytest.raises(ValueError, match="check op"):
        harness.measure(case, quick=True)
    assert len(calls) == 1  # the check ran it once; nothing was timed


def test_masked_adamw_checks_see_a_step_that_differs_by_a_little(monkeypatch):
    # The checks compared the values after one step to 1e-5 of the largest value (about 5): a
    # step moves an entry by about lr = 1e-3, so a baseline with half the weight decay, or a
    # learning rate 2% off, passed as "the same step". They compare the step's change now.
    params = bench_optim._params([(64, 48), (96, 32), (40,)], "cpu")
    masks = bench_optim._uniform_masks(params, 0.3)
    k_vector = bench_optim._contiguous_case(4000, 0.5, "cpu")
    bench_optim._step_check(params, masks)()  # the same step: passes
    k_vector.check()
    for other in (dict(lr=1e-3, weight_decay=5e-3), dict(lr=1.02e-3)):
        monkeypatch.setattr(bench_optim, "_fused", lambda ps, other=other: torch.optim.AdamW(ps, fused=True, **other))
        with pytest.raises(ValueError, match="step's change"):
            bench_optim._step_check(params, masks)()
        with pytest.raises(ValueError, match="step's change"):
            k_vector.check()


def test_masked_adamw_checks_see_either_mode_move_an_entry_outside_the_mask(monkeypatch):
    # Only the compact mode was checked outside the mask: a dense step that also moved unselected
    # entries (more work than the masked step the rows time) passed its check.
    params = bench_optim._params([(64, 48), (96, 32), (40,)], "cpu")
    masks = bench_optim._uniform_masks(params, 0.3)

    def leaky(leaking_mode):
        class Leaky(MaskedAdamW):
            def step(self, closure=None):
                out = super().step(closure)
                if self.mode == leaking_mode:
                    for p, m in zip(self.param_groups[0]["params"], masks):
                        p.data[~m] += 1e-3
                return out
        return Leaky

    for mode in ("dense", "compact"):
        monkeypatch.setattr(bench_optim, "MaskedAdamW", leaky(mode))
        with pytest.raises(ValueError, match=f"MaskedAdamW {mode}: an entry outside the mask"):
            bench_optim._step_check(params, masks)()


def test_every_compared_row_checks_ours_against_its_baseline_in_the_script(monkeypatch):
    # Each row whose baseline computes what ours computes carries a check, run before timing at
    # the row's own sizes; the frozen linear (no delta) is the one reference that computes less.
    rows = bench_matmul.cases(quick=True) + bench_optim.cases(quick=True) + bench_compose.cases(quick=True)
    unchecked = {(c.op, c.baseline_name) for c in rows if c.check is None}
    assert {name for _, name in unchecked} <= {
        "frozen linear fwd+dX",  # other work by definition (no Δ)
        "index_add_ loop, subtract (not exact)",  # the sibling apply row checks these diffs
        "composable-sft revert (param -= sparse COO; not exact)",  # and that the restore is bit-exact
    }, unchecked
    assert any(c.op == "MaskedAdamW dense" and c.check for c in rows)
    for case in rows:
        if case.check is not None:
            case.check()
    # a baseline that computes something else makes the row fail
    monkeypatch.setattr(baselines, "merged_ensemble", lambda x, ws, b, g: torch.zeros(x.shape[0], ws[0].shape[0]))
    gated = [c for c in bench_matmul.cases(quick=True) if c.op == "multi_delta_linear gates fwd"][0]
    with pytest.raises(ValueError, match="gates fwd"):
        gated.check()


def test_table_cells_escape_a_pipe_so_no_column_shifts():
    # The op "global top-K |x|" split its row into two more cells than the header: rendered, every
    # later value (ms, baseline, speed-up, share) sat under the wrong column.
    import re

    row = _row(op="global top-K |x|")
    row.baseline, row.note = "a | b", "FAILED: x|y"
    cells = lambda line: len(re.split(r"(?<!\\)\|", line)) - 2  # noqa: E731
    header, _, line = harness.format_table([harness.judge(row, _ceilings())])
    assert cells(line) == cells(header) == 15
    assert "global top-K \\|x\\|" in line
    row.goals = (harness.Target("a |x| target", "speedup", 1.0),)
    targets = harness.format_targets([harness.judge(row, _ceilings())], quick=False)
    assert cells(targets[2]) == cells(targets[0]) == 4


def test_hard_routed_train_check_compares_the_forward_output(monkeypatch):
    # The hard-routed fwd+bwd row times Y, dX and dvalues, but its check compared only the
    # gradients: a baseline (or ours) whose forward output is off by a constant, or leaves the
    # deltas or the bias out of Y, has the same dX and dvalues, and passed as the same work.
    deltas = [bench_matmul._uniform_indices(24, 16, 0.1, seed=20 + e) for e in range(bench_matmul.LANGUAGES)]
    train = [c for c in bench_matmul._multi_cases(16, 24, 16, deltas, torch.float32, "cpu")
             if c.op == "multi_delta_linear hard fwd+bwd"][0]
    train.check()  # the same computation: passes
    merged = baselines.merged_per_language
    monkeypatch.setattr(baselines, "merged_per_language", lambda *a, **k: merged(*a, **k) + 1.0)
    with pytest.raises(ValueError, match="hard fwd\\+bwd"):
        train.check()


def test_hard_routed_forward_baseline_keeps_its_merged_weights():
    # The forward-only (no_grad, inference) row of the merged way made its 4 merged weights in
    # every timed call, as the training row must; a user of that way keeps them, as the soft-gated
    # row's baseline was already given them.
    tokens, out_f, in_f = 16, 96, 80  # few tokens: the output and the token selections stay well below a weight
    deltas = [bench_matmul._uniform_indices(out_f, in_f, 0.05, seed=20 + e) for e in range(bench_matmul.LANGUAGES)]
    rows = bench_matmul._multi_cases(tokens, out_f, in_f, deltas, torch.float32, "cpu")
    forward = [c for c in rows if c.op == "multi_delta_linear hard fwd"][0]
    forward.check()
    peak = harness.peak_mib(forward.baseline)
    if peak == peak:  # NaN: a torch without the profiler's event tree
        assert peak * 2**20 < out_f * in_f * 4  # below one merged weight: none is made per call


def test_profile_rows_finds_each_row_and_counts_a_calls_work():
    from xlsparse.benchmarks import profile_rows

    def case(op, density, baseline, dtype="float32", masks="uniform"):
        return harness.Case(op, "[1]", dtype, lambda: None, None, baseline, density=density, masks=masks)

    cases = [case("sddmm", 0.01, "dense dYᵀX", dtype="bfloat16"), case("sddmm", 0.05, "dense dYᵀX"),
             case("sddmm", 0.0099998, "torch SDDMM"), case("sddmm", 0.0099998, "dense dYᵀX", masks="real"),
             case("sddmm", 0.0099998, "dense dYᵀX")]
    assert profile_rows.find(cases, "sddmm", 0.01, "dense") is cases[-1]
    assert profile_rows.find(cases, "spmm_", 0.01, "") is None
    for op, density, word in [(op, d, w) for _, op, d, w in profile_rows.ROWS]:
        assert isinstance(op, str) and 0 < density < 1 and isinstance(word, str)
    x = torch.randn(64, 64)
    got = profile_rows.profile_call(lambda: (x @ x).sum(), "cpu")
    assert got["wall_ms"] > 0 and got["syncs"] == got["memcpys"] == got["launches"] == 0 and got["kernel_ms"] == 0
    assert "aten::mm" in got["table"]


def test_bench_refuses_an_empty_family_rather_than_running_every_one(tmp_path, monkeypatch, capsys):
    # `xlsparse bench --family "$F"` with F unset measured every family and exited 0
    calls = _fake_family(monkeypatch)
    assert cli.main(["bench", "--family", "", "--quick", "--out", str(tmp_path / "results")]) == 1
    assert "--family: unknown family ''" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "results").exists()
