import json

from spikelm.commands.main import main


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
    # int8 codes of K and V for T=2 steps: 2 * T * hidden bytes per token and layer
    assert spiking["cache_bytes_per_token"] == 2 * 2 * 16
    assert "cache tok/s" in capsys.readouterr().out
    assert main(["benchmark", "--skip-training", "--generation-lengths", "--output-dir", str(tmp_path / "x")]) == 2
