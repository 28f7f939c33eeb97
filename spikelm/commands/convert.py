"""``spikelm convert-official``: the authors' SpikeLM-BERT checkpoint -> a SpikeLMForPreTraining directory."""

from __future__ import annotations

from .argtypes import add_output_dir, existing_file, text_file


def register(sub) -> None:
    p = sub.add_parser(
        "convert-official",
        help="convert a checkpoint saved by the authors' SpikeLM code",
        description=(
            "Read a checkpoint saved by the authors' SpikeLM-BERT code (.bin/.pt via torch.load(weights_only=True), "
            "or .safetensors) and write a SpikeLMForPreTraining directory (config.json + model.safetensors)."
        ),
    )
    p.add_argument("checkpoint", type=existing_file, help="the authors' checkpoint file")
    p.add_argument(
        "--config",
        type=text_file,
        help="their BertConfig-style JSON with 'T' (default: the safetensors metadata 'config')",
    )
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from spikelm.conversion.official import load_official_checkpoint
    from spikelm.outputs import new_files_follow_umask, prepare_output_dir

    model = load_official_checkpoint(args.checkpoint, args.config)  # validate before touching the output
    out = prepare_output_dir(
        args.output_dir,
        "convert-official",
        args.overwrite,
        inputs={"checkpoint": args.checkpoint, "--config": args.config},
    )
    with new_files_follow_umask(out):  # safetensors writes 0600
        model.save_pretrained(out)
    n_init = sum(neuron.is_initialized() for _, neuron in model.neurons())
    print(
        f"wrote {out} ({type(model).__name__}: {model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}, T={model.config.num_steps}, decoder "
        f"{'tied' if model.config.tie_word_embeddings else 'untied'}; {n_init}/{len(model.neurons())} neurons "
        "with initialised alpha)"
    )
    return 0
