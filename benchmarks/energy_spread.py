"""How much the default recipe's energy ratio moves along the text: SmolLM2-135M converted once with the default
recipe's frontier row (outlier tokens at 2x), compute energy inside the blocks counted on all 64 windows of Brown's
first 32,768 tokens, in 8 chunks of 8 windows (4,096 tokens each); then the same with the outlier thresholds at 4x
(the thresholds rescaled: a threshold is ratio x the calibration median, so this equals converting at 4x).

    python benchmarks/energy_spread.py benchmarks/results/energy_spread_32k.jsonl

Each line: the ratio, the energy ratio over all windows, and per chunk (docs/CONVERSION.md, "Signed spikes and
energy")."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conversion_ladder import calibration_ids  # noqa: E402
from energy_frontier import ROWS  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.evaluation.brown_perplexity import brown_eval_tokens
    from spikelm.evaluation.energy import measure_energy

    torch.set_num_threads(2)
    out = Path(sys.argv[1])
    source = resolve_model_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = brown_eval_tokens(tokenizer, 32768)
    calibration = calibration_ids(tokenizer, 32)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    spikelm.spikify(model, dict(ROWS["s4-g64-sal5-10-clip1-vo-out2"]), calibration=list(calibration.split(4)))
    neurons = [m for m in model.modules() if hasattr(m, "outlier_threshold")]
    base = [float(n.outlier_threshold) for n in neurons]
    for ratio in (2.0, 4.0):
        for neuron, threshold in zip(neurons, base, strict=True):
            neuron.outlier_threshold.fill_(threshold / 2.0 * ratio)
            neuron.outlier_ratio = ratio
        chunks, snn, ann = [], 0.0, 0.0
        for c in range(8):
            batches = [{"input_ids": tokens[i * 512 : (i + 1) * 512].view(1, 512)} for i in range(c * 8, c * 8 + 8)]
            summary = measure_energy(model, batches)
            chunks.append(summary["snn_mJ_per_token"] / summary["ann_mJ_per_token"])
            snn += summary["snn_mJ_per_token"]  # chunks of equal length: the mean of per-token figures
            ann += summary["ann_mJ_per_token"]
        record = {"ratio": ratio, "windows": 64, "energy_ratio_all": snn / ann, "per_chunk_of_8_windows": chunks}
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
