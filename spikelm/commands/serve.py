"""``spikelm serve``: a causal LM (spiking or not) behind the OpenAI API, on transformers' own server."""

from __future__ import annotations

from spikelm.errors import UserError

from .argtypes import integer, model_source


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a causal LM (SpikeLM, converted, real-valued) behind the OpenAI API (chat completions)",
        description=(
            "Start transformers' server (the one `transformers serve` runs: /v1/chat/completions with streaming, "
            "/v1/completions, /v1/responses, /v1/models, /health) in this process with spikelm registered, pinned to "
            "MODEL: a SpikeLMForCausalLM directory, a converted model (spikelm spikify; it decodes on its spike-code "
            "cache, checked on every request), a real-valued transformers causal LM, smollm2-135m or "
            "gemma3-270m. The model's "
            "tokenizer must have a chat template. Requests name the model as given here. Ctrl-C stops the server. "
            "Needs the `serve` extra: pip install -e '.[serve]'."
        ),
    )
    p.add_argument(
        "model", type=model_source, metavar="MODEL", help="a causal LM directory, smollm2-135m or gemma3-270m"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--continuous-batching",
        action="store_true",
        help="not available: transformers' paged cache would bypass the spike-code cache (refused)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="server logs"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from spikelm.evaluation.serving import (
        Server,
        check_address,
        describe,
        prepare,
        serve_dependencies_missing,
    )

    if args.continuous_batching:
        raise UserError(
            "--continuous-batching: transformers' continuous batching keeps K and V real-valued in its own paged "
            "cache, bypassing the spike-code cache; serve without it (requests are generated one at a time)"
        )
    missing = serve_dependencies_missing()
    if missing:
        raise UserError(
            f"serving needs {', '.join(missing)} (the `serve` extra): pip install -e '.[serve]' (or `make install`)"
        )
    check_address(args.host, args.port)
    servable = prepare(args.model)
    server = Server(servable, args.host, args.port, log_level=args.log_level)
    print(f"serving {args.model} ({describe(servable)})", flush=True)
    print(f"OpenAI API at {server.base_url} (model name {args.model!r}); Ctrl-C stops the server", flush=True)
    server.run()
    print("server stopped", flush=True)
    return 0
