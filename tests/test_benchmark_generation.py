import json
import statistics

import pytest
import torch
from conftest import save_tiny_llama

from spikelm.commands.main import main
from spikelm.models.modeling_spikelm_causal import DEFAULT_PACKING
from spikelm.nn import kernels


def test_generation_benchmark_section(tmp_path, capsys, monkeypatch):
    import spikelm.experiments.benchmark as bench

    monkeypatch.setattr(
        bench,
        "GENERATION_SHAPE",
        dict(
            vocab_size=101,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_steps=2,
        ),
    )
    assert (
        main(
            [
                "benchmark",
                "--skip-training",
                "--generation-lengths",
                "24",
                "40",
                "--repeats",
                "1",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "benchmark.json").read_text())["generation"]
    spiking = report["models"]["spiking"]
    assert {(r["length"], r["use_cache"]) for r in spiking["runs"]} == {
        (24, True),
        (24, False),
        (40, True),
        (40, False),
    }
    assert all(r["decode_tokens_per_s"] > 0 for r in spiking["runs"])
    # K and V codes for T=2 steps, 2 heads of 8 values packed (one 4-byte word at 4 per byte; ceil(8/5) = 2 at 5)
    assert spiking["cache_bytes_per_token"] == 2 * 2 * 2 * {4: 4, 5: 2}[DEFAULT_PACKING]
    assert "cache tok/s" in capsys.readouterr().out
    assert main(["benchmark", "--skip-training", "--generation-lengths", "--output-dir", str(tmp_path / "x")]) == 2


TEXT = "The quick brown fox jumps over the lazy dog. " * 100
PACKED = {4: 4, 5: 3}[DEFAULT_PACKING]  # head_dim 12: one 16-value word (4 bytes) at 4 per byte, ceil(12/5) at 5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA with a word-level tokenizer, saved with the public transformers API."""
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, sorted(set(TEXT.replace(".", " .").split())), eos_token_id=2)
    (d / "cal.txt").write_text(TEXT)
    return d


def _row(line):
    return line.split()


@pytest.mark.parametrize("recipe", ["elastic", "gif"])
def test_converted_generation_benchmark_prints_ratios_computed_from_its_timings(
    llama_dir, tmp_path, capsys, recipe, monkeypatch
):
    monkeypatch.delenv(kernels.ROWS_ENV_VAR, raising=False)  # the few-row threshold at its default
    out = tmp_path / "bench"
    args = ["benchmark", "--generation", "--model", str(llama_dir), "--recipe", recipe, "--batch-sizes", "1", "2"]
    args += ["--prompt-lengths", "6", "--new-tokens", "4", "--repeats", "2", "--threads", "1"]
    args += ["--calibration-text", str(llama_dir / "cal.txt"), "--calibration-sequences", "2"]
    args += ["--calibration-length", "16", "--output-dir", str(out)]
    args += ["--compare-unpacked", "--compare-pytorch"] if recipe == "elastic" else []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(args) == 0
        # --threads 1 held for the run, and the process got its own thread count back (later runs' sums depend on it)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "float32, 1 threads" in printed
    report = json.loads((out / "benchmark.json").read_text())
    assert report["attn_implementation"] == "sdpa"
    cases = report["generation"]["cases"]
    assert [(c["batch_size"], c["prompt_length"]) for c in cases] == [(1, 6), (2, 6)]
    steps = 4 if recipe == "elastic" else 1
    assert report["generation"]["num_steps"] == steps
    rows = [_row(line) for line in printed.splitlines() if line.split()[:1] in (["1"], ["2"])]
    ratio_lines = [line for line in printed.splitlines() if "ratios:" in line]
    assert len(ratio_lines) == 2
    if recipe == "elastic":  # the unpacked cache's row, and its bytes: one int8 code per value (+ the magnitudes)
        assert [r[2] for r in rows] == ["real", "spiking", "spiking_unpacked", "spiking_pytorch"] * 2
        assert report["cpu_kernels"]["enabled"] is True  # the kernels' row and the PyTorch one, side by side
        assert report["cpu_kernels"]["max_rows"] == kernels.MAX_ROWS == 16  # the default threshold, as documented
        assert report["decode_step"] is True
        for case in cases:
            tokens = case["batch_size"] * (6 + 4 - 1)
            unpacked = case["spiking_unpacked"]["cache_bytes_per_token"]
            assert unpacked == pytest.approx((2 * 2 * 4 * 2 * 12 * tokens + 2 * 2 * 4 * 4) / tokens)
        rows = [r for r in rows if r[2] not in ("spiking_unpacked", "spiking_pytorch")]
    assert len(rows) == 4
    pairs = zip(rows[::2], rows[1::2], strict=True)
    for case, ratio_line, (real, spiking) in zip(cases, ratio_lines, pairs, strict=True):
        assert real[2] == "real" and spiking[2] == "spiking"
        # the ratios, recomputed from the printed timings (ms, 2-3 decimals), match the printed ones
        decode = float(real[4]) / float(spiking[4])
        prefill = float(spiking[3]) / (steps * float(real[3]))
        printed_decode = float(ratio_line.split("decode spiking/real ")[1].split()[0])
        printed_prefill = float(ratio_line.split(f"(T={steps} x real) ")[1].split(";")[0])
        assert printed_decode == pytest.approx(decode, rel=0.02, abs=2e-3)
        assert printed_prefill == pytest.approx(prefill, rel=0.02, abs=2e-3)
        # and from the report's medians exactly
        r, s = case["real"], case["spiking"]
        assert case["decode_ratio"] == pytest.approx(s["decode_tokens_per_s"] / r["decode_tokens_per_s"], rel=1e-12)
        assert case["prefill_ratio_vs_T"] == pytest.approx(s["prefill_s"] / (steps * r["prefill_s"]), rel=1e-12)
        for entry in (r, s):
            assert entry["prefill_s"] == statistics.median(entry["times_s"]["first"])
            assert len(entry["times_s"]["full"]) == 2
        # cache bytes per token by hand: K and V, 2 layers, 2 KV heads of 12; the generated cache holds 6 + 3 tokens
        tokens = case["batch_size"] * (6 + 4 - 1)
        assert case["real_fp16_cache_bytes_per_token"] == 2 * 2 * 2 * 12 * 2
        if recipe == "elastic":  # T=4 steps, PACKED bytes per head row, plus one float32 magnitude per step, K and V
            expected = (2 * 2 * 4 * 2 * PACKED * tokens + 2 * 2 * 4 * 4) / tokens
            assert s["cache_decoded_bytes_per_token"] == 0
        else:  # 5 bit planes of ceil(12 / 8) = 2 bytes, and per token a grid of float32 scales and zero points
            grid = 2 * 2 * 2 * 4 * 4  # K and V, 2 layers, 2 heads, a scale and a zero point for each of 2 groups
            # held in the CPU path's buffers at their first capacity, 64 tokens per row
            expected = (2 * 2 * 2 * 5 * 2 + grid) * case["batch_size"] * 64 / tokens
            # and the float64 decoded copy of K and V the CPU path keeps: its first capacity, 64 tokens per row
            decoded = 2 * 2 * case["batch_size"] * 2 * 64 * 12 * 8 / tokens
            assert s["cache_decoded_bytes_per_token"] == pytest.approx(decoded)
            expected += decoded
        assert s["cache_bytes_per_token"] == pytest.approx(expected)


def test_an_unresolved_decode_is_printed_as_such_not_as_a_negative_speed():
    from spikelm.experiments.generation_benchmark import format_pair_table, ratios

    def row(prefill, decode_ms):
        return {
            "prefill_s": prefill,
            "decode_ms_per_step": decode_ms,
            "prefill_tokens_per_s": 16 * 1024 / prefill,
            "decode_tokens_per_s": None if decode_ms is None else 16e3 / decode_ms,
            "peak_rss_growth_bytes": None,
            "cache_bytes_per_token": 9360.0,
        }

    case = {"batch_size": 16, "prompt_length": 1024, "real": row(66.0, 1570.0), "spiking": row(336.0, None)}
    case["real_fp16_cache_bytes_per_token"] = 23040.0
    case.update(ratios(case, 4))
    assert case["decode_ratio"] is None
    assert case["prefill_ratio_vs_T"] == pytest.approx(336.0 / (4 * 66.0))
    text = format_pair_table({"num_steps": 4, "cases": [case]})
    assert "decode spiking/real not resolved" in text
    spiking_line = next(line for line in text.splitlines() if " spiking " in line)
    assert spiking_line.split()[4] == "-" and spiking_line.split()[6] == "-"  # decode ms/step and tokens/s
