"""Latency of a running ``spikelm serve`` as a client sees it: streamed chat completions with the ``openai`` client.

    spikelm serve runs/smollm2-gif &                       # in another terminal
    python benchmarks/serve_latency.py --model runs/smollm2-gif [--base-url http://127.0.0.1:8000/v1]
        [--prompt TEXT] [--max-tokens 32] [--repeats 3]

Each repeat sends the same greedy request (temperature 0, streaming) and times, from the moment the request is sent,
the first content chunk (first-token latency: the chat template, the prompt's forward pass, one decoding step and
the HTTP round trip) and the chunks after it (per-token latency: the time from the first to the last chunk over the
tokens after the first). One warm-up request first. Prints one JSON object: the request, the answer, the medians and
every repeat's figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    stamps, parts, usage = [], [], None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter() - sent)
            parts.append(chunk.choices[0].delta.content)
    tokens = usage.completion_tokens if usage is not None else len(parts)
    return {
        "first_token_s": stamps[0],
        "per_token_s": (stamps[-1] - stamps[0]) / max(tokens - 1, 1),
        "total_s": time.perf_counter() - sent,
        "completion_tokens": tokens,
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "answer": "".join(parts),
    }


def main() -> None:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model name the server was started with")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused", timeout=600, max_retries=0)
    one_request(client, args.model, args.prompt, 2)  # warm-up
    runs = [one_request(client, args.model, args.prompt, args.max_tokens) for _ in range(args.repeats)]
    print(
        json.dumps(
            {
                "request": {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens},
                "answer": runs[0]["answer"],
                "same_answer_every_time": len({r["answer"] for r in runs}) == 1,
                "median_first_token_s": round(statistics.median(r["first_token_s"] for r in runs), 3),
                "median_per_token_s": round(statistics.median(r["per_token_s"] for r in runs), 4),
                "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
