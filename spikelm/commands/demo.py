"""``spikelm demo``: the embedded default job (see README)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the small default demo on real text (no downloads)",
        description="Build a tiny SpikeLM, run it on real tokenized text and print per-layer firing rates.",
    )
    p.add_argument("--num-steps", type=int, default=4, help="time steps T (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import SpikeLMConfig, SpikeLMForPreTraining, collect_spike_stats, record_spike_stats
    from ..tokenization import load_bert_tokenizer, sample_text_path

    torch.manual_seed(args.seed)
    tokenizer = load_bert_tokenizer()
    lines = [ln.strip() for ln in sample_text_path().read_text().splitlines() if len(ln.split()) > 4]
    batch = tokenizer(lines[:32], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    config = SpikeLMConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=512, max_position_embeddings=128, num_steps=args.num_steps)
    model = SpikeLMForPreTraining(config).eval()
    with torch.no_grad(), record_spike_stats(model):
        out = model(**batch)
    print(f"tiny SpikeLM: {config.num_hidden_layers} layers, hidden {config.hidden_size}, T={config.num_steps}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    print(f"input: {batch['input_ids'].shape[0]} lines of Shakespeare's Sonnets, {int(batch['attention_mask'].sum())} "
          f"real tokens; prediction_logits {tuple(out.prediction_logits.shape)}")
    print(f"{'neuron':<52} {'alpha per step':<30} firing rate per step (+/-)")
    for name, s in collect_spike_stats(model).items():
        alpha = " ".join(f"{a:.3f}" for a in s["alpha"])
        rates = " ".join(f"{p:.2f}/{n:.2f}" for p, n in zip(s["positive_rate"], s["negative_rate"]))
        print(f"{name.removeprefix('bert.encoder.'):<52} {alpha:<30} {rates}")
    return 0
