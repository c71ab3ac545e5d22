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


def simplecot(n: int, seed: int = 0) -> pl.DataFrame:
    """N rows shaped like SimpleCoT: `source` (~500 bytes), `target`, `rationale`, `task`, `type`.

    Text comes from small pools picked by random index and is made unique by a question
    number, so 2.2M rows are a few vectorised gathers, not a Python loop per row.
    """
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
        lines = pl.read_csv(
            Path(run_dir) / shard.input_file,
            has_header=False,
            separator="\x01",
            quote_char=None,
            new_columns=["line"],
            schema_overrides={"line": pl.String},
        )
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
        dest = Path(outputs_dir) / f"job{shard.index:05d}" / (Path(shard.input_file).name + ".out")
        dest.parent.mkdir(parents=True, exist_ok=True)
        out.write_csv(dest, include_header=False, quote_style="never")
        written.append(dest)
    return written


if __name__ == "__main__":
    import os

    rows = int(os.environ.get("BENCH_ROWS", "2200000"))
    target = Path(os.environ.get("BENCH_DIR", "/tmp/bench")) / f"simplecot-{rows}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    simplecot(rows).write_parquet(target)
    print(target)
