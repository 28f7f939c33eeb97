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


def test_the_recipe_is_described_by_its_neuron_plug_in_not_a_fixed_name():
    """The default recipe (signed, value rotation): the perplexity panel, the printed summary line and the report
    name it through the neuron plug-in (display_name, summary, describe); nothing says GIF."""
    from spikelm.conversion.recipes import DEFAULT_RECIPE, RECIPES
    from spikelm.experiments.demo import llm_summary_lines, recipe_summary
    from spikelm.nn.neurons import neuron_class

    figures = _figures()
    recipe = dict(RECIPES[DEFAULT_RECIPE])
    figures["llm"].update(recipe=recipe, time_steps=1)
    figures["energy"]["llm"]["ratio"] = 0.5  # the spiking model costing more: the explanation must not say GIF
    cls = neuron_class(recipe["neuron"])
    panels = summary_panels(figures)
    assert panels[0]["labels"] == ["real-valued", f"spiking\n{cls.display_name} T=1"]
    line = llm_summary_lines(figures["llm"])[0]
    assert cls.summary(recipe) in line and "value/output rotation" in line and "(ratio 1.25)" in line
    assert recipe_summary(recipe).startswith(cls.summary(recipe))
    report = markdown(figures, None)
    assert cls.describe(recipe) in report and "value_rotation=True" in report
    assert "GIF" not in report + line + " ".join(panels[0]["labels"])
    gif = RECIPES["gif"]  # and the GIF recipe is named by its own plug-in, without a value rotation
    assert recipe_summary(gif) == f"{neuron_class('gif').summary(gif)}; residual-stream rotation, online FFN rotation"
