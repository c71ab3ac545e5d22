"""Generate benchmark data: a SimpleCoT-shaped Parquet and synthetic Bedrock outputs for it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl

from tasks.pipeline.plan import RunPlan

_WORDS = [
    "river",
    "mountain",
    "energy",
    "cell",
    "protein",
    "market",
    "history",
    "theory",
    "signal",
    "ocean",
    "planet",
    "engine",
    "voltage",
    "climate",
    "species",
    "letter",
    "number",
    "triangle",
    "circle",
    "velocity",
    "pressure",
    "bridge",
    "city",
    "law",
    "court",
    "music",
    "poem",
    "novel",
    "author",
    "atom",
    "molecule",
    "reaction",
    "price",
    "demand",
    "supply",
    "forest",
    "desert",
]
_POOL = 4096
# Every input line starts with {"recordId":"<11 chars>","modelInput": (39 characters).
_PREFIX = len('{"recordId":"R0000000000","modelInput":')


def _texts(rng: random.Random, count: int, words: int) -> pl.Series:
    return pl.Series([" ".join(rng.choices(_WORDS, k=words)) for _ in range(count)])


def _pick(values: pl.Series, rng: np.random.Generator, n: int) -> pl.Expr:
    return pl.lit(values).gather(pl.lit(pl.Series(rng.integers(0, len(values), n))))


# Tokens that real questions carry and that JSON must escape or that are not ASCII: quotes,
# braces (also str.format's), backslashes, tabs, newlines, emoji, accents, CJK, maths.
_TRICKY = [
    '"quoted"',
    "'single'",
    "{braces}",
    '{"k": [1, 2]}',
    "}{",
    "C:\\Users\\data\\x.csv",
    "a\\b",
    "\\n",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "caf\u00e9",
    "na\u00efve",
    "\u6771\u4eac",
    "\u0416\u0438\u0437\u043d\u044c",
    "\U0001f600",
    "\U0001f680",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u2211 x\u00b2",
    "\u2014",
    "\u2019s",
    "<b>",
    "&amp;",
    "50%",
]


def _escaped_texts(rng: random.Random, count: int, low: int, high: int) -> pl.Series:
    """Texts of `low` to `high` tokens, about one in four a quote, brace, escape or non-ASCII."""
    texts = []
    for _ in range(count):
        k = rng.randint(low, high)
        tokens = [
            rng.choice(_TRICKY) if rng.random() < 0.25 else rng.choice(_WORDS) for _ in range(k)
        ]
        texts.append(" ".join(tokens))
    return pl.Series(texts)


def simplecot(n: int, seed: int = 0, text: str = "clean") -> pl.DataFrame:
    """N rows shaped like SimpleCoT: `source` (~500 bytes), `target`, `rationale`, `task`, `type`.

    Text comes from small pools picked by random index and is made unique by a question
    number, so 2.2M rows are a few vectorised gathers, not a Python loop per row.
    `text="escaped"` gives the realistic, escape-heavy text (see `simplecot_escaped`).
    """
    if text == "escaped":
        return simplecot_escaped(n, seed)
    if text != "clean":
        msg = f'text={text!r}; use "clean" or "escaped".'
        raise ValueError(msg)
    rng = random.Random(seed)
    picks = np.random.default_rng(seed)
    return pl.select(
        source=pl.concat_str(
            [
                pl.lit("Question "),
                pl.int_range(n).cast(pl.String),
                pl.lit(": "),
                _pick(_texts(rng, _POOL, 62), picks, n),
                pl.lit("? Options: (A) yes (B) no (C) maybe (D) none of these."),
            ]
        ),
        target=_pick(pl.Series(["(A)", "(B)", "(C)", "(D)"]), picks, n),
        rationale=_pick(_texts(rng, _POOL, 30), picks, n),
        task=_pick(pl.Series([f"task{i:03d}_synthetic" for i in range(64)]), picks, n),
        type=pl.lit("cot"),
    )


def simplecot_escaped(n: int, seed: int = 0) -> pl.DataFrame:
    """SimpleCoT-shaped rows whose text needs JSON escapes: quotes, braces, backslashes, tabs,
    newlines, emoji and other non-ASCII, with lengths that vary like SimpleCoT's.

    `source` is a question of 20 to 140 tokens (about 190 to 1,100 bytes, ~620 on average) with
    its options, `rationale` 10 to 80 tokens, `target` a short answer. Both long columns are
    (nearly) unique per row, as in the real set.
    """
    rng = random.Random(seed)
    picks = np.random.default_rng(seed)
    answers = pl.Series(
        ["(A)", "(B)", "(C)", "(D)", "yes", "no", '"it depends"', "42", "caf\u00e9", "\U0001f44d"]
    )
    return pl.select(
        source=pl.concat_str(
            [
                pl.lit("Question "),
                pl.int_range(n).cast(pl.String),
                pl.lit(": "),
                _pick(_escaped_texts(rng, _POOL, 20, 140), picks, n),
                pl.lit('?\nOptions:\n(A) "yes"\n(B) no\n(C) {maybe}\n(D) none \u2014 \U0001f914'),
            ]
        ),
        target=_pick(answers, picks, n),
        # Two picks joined: 16M combinations, so like real rationales the values barely
        # repeat and Parquet cannot dictionary-encode them.
        rationale=pl.concat_str(
            [
                _pick(_escaped_texts(rng, _POOL, 5, 40), picks, n),
                _pick(_escaped_texts(rng, _POOL, 5, 40), picks, n),
            ],
            separator=" ",
        ),
        task=_pick(pl.Series([f"task{i:03d}_synthetic" for i in range(64)]), picks, n),
        type=pl.lit("cot"),
    )


def _input_lines(run_dir: Path, input_file: str) -> pl.DataFrame:
    """A shard's JSONL input lines, undecoded, as the column `line`."""
    return pl.read_csv(
        Path(run_dir) / input_file,
        has_header=False,
        separator="\x01",
        quote_char=None,
        new_columns=["line"],
        schema_overrides={"line": pl.String},
    )


def _write_outputs(out: pl.DataFrame, outputs_dir: Path, index: int, input_file: str) -> Path:
    """Write the lines of `out` where Bedrock would: `<outputs_dir>/job<index>/<input>.out`."""
    dest = Path(outputs_dir) / f"job{index:05d}" / (Path(input_file).name + ".out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    out.write_csv(dest, include_header=False, quote_style="never")
    return dest


def anthropic_outputs(
    run_dir: Path, outputs_dir: Path, error_rate: float = 0.01, seed: int = 0
) -> list[Path]:
    """Write Bedrock-shaped `.out` files (Anthropic, shuffled, with error lines) for a run.

    Files go to `outputs_dir/job<index>/<input file>.out`, like Bedrock's `<jobId>/` layout.
    """
    plan = RunPlan.load(run_dir)
    picks = np.random.default_rng(seed)
    answers = _texts(random.Random(seed), _POOL, 45)
    written = []
    for shard in plan.shards:
        lines = _input_lines(run_dir, shard.input_file)
        n = lines.height
        line = pl.col("line")
        is_error = pl.lit(pl.Series(picks.random(n) < error_rate))
        success = pl.concat_str(
            [
                pl.lit(',"modelOutput":{"id":"msg_bench","type":"message","role":"assistant",'),
                pl.lit('"content":[{"type":"text","text":"Reasoning: '),
                _pick(answers, picks, n),
                pl.lit('. Answer: (A)"}],"stop_reason":"end_turn","usage":{"input_tokens":'),
                (line.str.len_bytes() // 4).cast(pl.String),
                pl.lit(',"output_tokens":'),
                pl.lit(pl.Series(picks.integers(40, 90, n))).cast(pl.String),
                pl.lit("}}}"),
            ]
        )
        error = pl.lit(
            ',"error":{"errorCode":400,"errorMessage":"Malformed input request, please reformat '
            'your input and try again."}}'
        )
        out = lines.select(
            pl.concat_str(
                [
                    line.str.slice(0, line.str.len_chars() - 1),
                    pl.when(is_error).then(error).otherwise(success),
                ]
            ).alias("line")
        ).sample(fraction=1.0, shuffle=True, seed=seed + shard.index)
        written.append(_write_outputs(out, outputs_dir, shard.index, shard.input_file))
    return written


def titan_outputs(
    run_dir: Path, outputs_dir: Path, dimensions: int = 1024, seed: int = 0
) -> list[Path]:
    """Write Titan Text Embeddings v2 `.out` files (shuffled) for an embedding run.

    Each line echoes its input line and answers `{"embedding": [...], "inputTextTokenCount": n,
    "embeddingsByType": {"float": [...]}}`, the shape of the Titan v2 docs' InvokeModel response
    (the vector twice: "embeddingsByType ... will always appear") that the emulator writes:
    unit vectors of float32 values, ~26 kB a line at 1,024 dimensions.
    """
    plan = RunPlan.load(run_dir)
    rng = np.random.default_rng(seed)
    written = []
    for shard in plan.shards:
        lines = _input_lines(run_dir, shard.input_file)
        n = lines.height
        vectors = rng.standard_normal((n, dimensions), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        line = pl.col("line")
        embedding = pl.Series(vectors).arr.to_list()
        output = pl.struct(
            embedding=embedding,
            inputTextTokenCount=(line.str.len_bytes() // 6).cast(pl.Int64),
            embeddingsByType=pl.struct(float=embedding),
        ).struct.json_encode()
        del vectors
        out = lines.select(
            pl.concat_str(
                [line.str.head(-1), pl.lit(',"modelOutput":'), output, pl.lit("}")]
            ).alias("line")
        ).sample(fraction=1.0, shuffle=True, seed=seed + shard.index)
        written.append(_write_outputs(out, outputs_dir, shard.index, shard.input_file))
    return written


if __name__ == "__main__":
    import os

    rows = int(os.environ.get("BENCH_ROWS", "2200000"))
    text = os.environ.get("BENCH_TEXT", "clean")
    suffix = "" if text == "clean" else f"-{text}"
    target = Path(os.environ.get("BENCH_DIR", "/tmp/bench")) / f"simplecot{suffix}-{rows}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    simplecot(rows, text=text).write_parquet(target)
    print(target)
