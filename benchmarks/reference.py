"""Reference preprocess and merge in the AWS sample's style: pandas, one Python dict per row.

Run as `python -m benchmarks.reference preprocess SOURCE RUN_DIR PER_SHARD` or
`python -m benchmarks.reference merge RUN_DIR OUTPUTS_DIR`. The layout matches ours
(`input/shard-NNNNN.jsonl`, `rows/shard-NNNNN.parquet`, `output/part-NNNNN.parquet`), so the
same synthetic outputs merge onto either run and the two can be timed side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from prompt_templates import get_template

PROMPT_ID = "question_answering"
ANTHROPIC_VERSION = "bedrock-2023-05-31"


def preprocess(source: str, run_dir: Path, per_shard: int) -> int:
    """Render every row's prompt with str.format, json.dumps its body, write JSONL shards."""
    template = get_template(PROMPT_ID)
    frame = pd.read_parquet(source)
    frame["record_id"] = [f"R{i:010d}" for i in range(len(frame))]
    (run_dir / "input").mkdir(parents=True, exist_ok=True)
    (run_dir / "rows").mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, len(frame), per_shard):
        chunk = frame.iloc[start : start + per_shard]
        lines = []
        for row in chunk.to_dict("records"):
            body = {
                "anthropic_version": ANTHROPIC_VERSION,
                "max_tokens": template.max_tokens,
                "system": template.system,
                "messages": [{"role": "user", "content": template.text.format(**row)}],
                "temperature": template.temperature,
            }
            lines.append(json.dumps({"recordId": row["record_id"], "modelInput": body}))
        name = f"shard-{shards:05d}"
        with open(run_dir / "input" / f"{name}.jsonl", "w") as handle:
            handle.write("\n".join(lines) + "\n")
        chunk.to_parquet(run_dir / "rows" / f"{name}.parquet", index=False)
        shards += 1
    return shards


def _result(record: dict) -> dict:
    output = record.get("modelOutput")
    if output is not None and record.get("error") is None:
        usage = output.get("usage") or {}
        return {
            "record_id": record["recordId"],
            "response_text": "".join(
                part.get("text", "")
                for part in output.get("content") or []
                if part.get("type") == "text"
            ),
            "stop_reason": output.get("stop_reason"),
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
            "error_code": None,
            "error_message": None,
        }
    error = record.get("error") or {}
    return {
        "record_id": record["recordId"],
        "response_text": None,
        "stop_reason": None,
        "input_tokens": None,
        "output_tokens": None,
        "error_code": str(error.get("errorCode", "InvalidOutput")),
        "error_message": error.get("errorMessage"),
    }


def merge(run_dir: Path, outputs_dir: Path) -> int:
    """json.loads every output line, keep results by recordId, pandas-merge onto the rows."""
    outputs: dict[str, list[Path]] = {}
    for path in sorted(outputs_dir.rglob("*.jsonl.out")):
        outputs.setdefault(path.name.removesuffix(".jsonl.out"), []).append(path)
    (run_dir / "output").mkdir(parents=True, exist_ok=True)
    parts = 0
    for rows_file in sorted((run_dir / "rows").glob("shard-*.parquet")):
        rows = pd.read_parquet(rows_file)
        results: dict[str, dict] = {}
        for path in outputs.get(rows_file.stem, []):
            with open(path) as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    result = _result(record)
                    # A success wins over an error for the same record id.
                    if record["recordId"] not in results or result["error_code"] is None:
                        results[record["recordId"]] = result
        merged = rows.merge(pd.DataFrame(list(results.values())), on="record_id", how="left")
        missing = merged["response_text"].isna() & merged["error_code"].isna()
        merged.loc[missing, "error_code"] = "MissingOutput"
        merged.loc[missing, "error_message"] = "No output line for this record."
        merged["job_id"] = rows_file.stem
        merged["served_by"] = "batch"
        merged["attempts"] = 1
        index = rows_file.stem.removeprefix("shard-")
        merged.to_parquet(run_dir / "output" / f"part-{index}.parquet", index=False)
        parts += 1
    return parts


def main(argv: list[str]) -> None:
    if argv[0] == "preprocess":
        print(preprocess(argv[1], Path(argv[2]), int(argv[3])))
    elif argv[0] == "merge":
        print(merge(Path(argv[1]), Path(argv[2])))
    else:
        msg = f"unknown step {argv[0]!r}; use preprocess or merge"
        raise SystemExit(msg)


if __name__ == "__main__":
    main(sys.argv[1:])
