"""The demo's summary plot and report on small hand-made figures (no demo run): the LLM's energy panel shows the
spiking bar beside the real-valued one with the perplexity ratio printed next to it."""

from __future__ import annotations

from PIL import Image

from spikelm.experiments.demo_report import markdown, plot_summary, summary_panels


def _figures():
    same = {"blocks": 0.5, "whole_model": 0.6, "whole_model_with_memory": 0.9}
    return {
        "settings": {"window": 512},
        "seconds": {"total": 60.0, "llm": 30.0, "energy": 30.0},
        "peak_rss_mb": 1024.0,
        "llm": {
            "source": "SmolLM2-135M",
            "time_steps": 2,
            "perplexity": {"real": 40.0, "spiking": 50.0, "ratio": 1.25, "tokens_scored": 1000},
            "recipe": {"neuron": "gif", "gif_bits": 4},
            "parameters": 135e6,
            "calibration": "text",
            "conversion_seconds": 10.0,
            "evaluation": "Brown",
            "window": 512,
            "generations": [],
        },
        "energy": {
            "llm": {
                "sequences": 2,
                "tokens": 1024,
                "snn_mJ_per_sequence": 200.0,
                "ann_mJ_per_sequence": 300.0,
                "ratio": 1.5,
                "mean_firing_rate": 0.3,
                "snn_over_ann": {"fp32": same, "int8": {**same, "blocks": 0.7}},
                "energy_json": "energy/llm/energy.json",
                "plots": [],
            }
        },
    }


def test_the_llm_energy_panel_prints_the_perplexity_ratio_beside_the_spiking_bar(tmp_path):
    figures = _figures()
    panels = summary_panels(figures)
    energy = panels[-1]
    assert energy["labels"] == ["real-valued", "spiking"] and energy["values"] == [300.0, 200.0]
    assert "perplexity 1.25x" in energy["note"] and "energy 0.67x" in energy["note"]  # 50 / 40; 200 / 300
    assert "note" not in panels[0]  # the perplexity panel itself
    assert panels[0]["labels"] == ["real-valued", "spiking\nGIF T=2"]  # the recipe's neuron
    path = tmp_path / "summary.png"
    assert plot_summary(figures, path)
    with Image.open(path) as image:
        assert image.size[0] > image.size[1] > 0
    report = markdown(figures, "summary.png")
    assert "| llm | int8 | 0.700 | 0.600 | 0.900 |" in report


def test_figures_from_before_the_same_precision_fields_still_report(tmp_path):
    figures = _figures()
    del figures["energy"]["llm"]["snn_over_ann"]
    assert "same weight precision" not in markdown(figures, None)
    assert plot_summary(figures, tmp_path / "summary.png")
