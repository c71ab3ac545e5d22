"""What a run is: the fingerprint of everything that decides its answers, and its check.

The fingerprint covers the source's content (size and sha256 of local files, ETag and size of S3
objects, the dataset fingerprint of a Hugging Face split), the template text and system prompt,
the model, invocation type, inference parameters, id and text columns, on_missing and the shard
cut. It is written to ``run.json`` when the run is created (before anything is uploaded or
submitted) and compared on every resume and every re-run of a finished run, so changed inputs
never mix with, or hide behind, an earlier run of the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_templates import get_template
from tasks.aws import storage
from tasks.errors import RunIdentityError, SourceError
from tasks.pipeline.sources import hf_local_path, load_hf_dataset, local_files
from tasks.run.layout import RunLayout
from tasks.settings import get_settings

if TYPE_CHECKING:
    from tasks.run.params import BatchParams

MTIME = "mtime_ns"  # kept to skip re-hashing an unchanged file; not part of the identity


@dataclass
class RunIdentity:
    """A run's fingerprint, its digest, and the id of this incarnation of the run."""

    fingerprint: dict[str, Any]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str | None = None
    # Set when run.json was lost and made again: the run key its jobs' names carry, which the
    # lost run_id gave and a new one would not (`recover_identity`).
    run_key: str | None = None

    @property
    def digest(self) -> str:
        return fingerprint_digest(self.fingerprint)

    def to_json(self) -> bytes:
        body = {
            "digest": self.digest,
            "run_id": self.run_id,
            "created_at": self.created_at,
            "fingerprint": self.fingerprint,
        }
        if self.run_key:
            body["run_key"] = self.run_key
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunIdentity:
        body = json.loads(data)
        return cls(body["fingerprint"], body["run_id"], body.get("created_at"), body.get("run_key"))


def comparable(value: Any) -> Any:
    """``value`` without the modification times, which decide nothing (a touched file)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k != MTIME}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """sha256 of the fingerprint without the modification times."""
    return _sha256_json(comparable(fingerprint))


def name_digest(fingerprint: dict[str, Any]) -> str:
    """The digest a default run name follows: a local source by its files' contents.

    `data/x.csv` and its absolute path (another working folder, a deployment's path) named
    two runs, and the second paid for the same answers again. S3 and hf:// sources keep the
    fingerprint's digest, so their names are the ones they always had.
    """
    return _sha256_json(answers_alike(fingerprint))


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _local_files(source: str) -> list[str]:
    try:
        return local_files(source)[1]
    except SourceError:
        return []


def _local_source(
    source: str, known: dict[str, dict], names: list[str] | None = None
) -> dict[str, Any]:
    files = []
    for name in _local_files(source) if names is None else names:
        stat = os.stat(name)
        seen = known.get(name)
        if seen and seen.get("size") == stat.st_size and seen.get(MTIME) == stat.st_mtime_ns:
            digest = seen["sha256"]  # unchanged size and time: the recorded hash stands
        else:
            digest = storage.sha256_file(name)
        entry = {"name": name, "size": stat.st_size, "sha256": digest, MTIME: stat.st_mtime_ns}
        files.append(entry)
    if not files:
        msg = f"source {source!r} matches no file; give an existing file, folder or glob."
        raise SourceError(msg)
    return {"uri": source, "files": files}


def _s3_source(source: str) -> dict[str, Any]:
    files = [{"name": o.uri, "size": o.size, "etag": o.etag} for o in storage.glob_s3(source)]
    if not files:
        msg = f"source {source!r} matches no S3 object."
        raise SourceError(msg)
    return {"uri": source, "files": files}


def _hf_source(source: str, known: dict[str, dict]) -> dict[str, Any]:
    local = hf_local_path(source)
    if local is not None:
        # A save_to_disk folder or data files: the files themselves, like any local source.
        names = sorted(str(p) for p in local.rglob("*") if p.is_file())
        return _local_source(source, known, names)
    # The Hub's fingerprint of the split: it changes when the dataset's files do.
    return {"uri": source, "dataset_fingerprint": load_hf_dataset(source)._fingerprint}


def source_fingerprint(source: str, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the source holds now; ``known`` (an earlier result) spares re-hashing local files."""
    source = source.strip()
    earlier = {f["name"]: f for f in (known or {}).get("files", []) if MTIME in f}
    if source.startswith("hf://"):
        return _hf_source(source, earlier)
    if storage.is_s3(source):
        return _s3_source(source)
    return _local_source(source, earlier)


def fingerprint_of(params: BatchParams, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that decides a run's answers (``known``: an earlier fingerprint, as a cache)."""
    template = None
    if params.prompt_id:
        t = get_template(params.prompt_id)
        template = {"text": t.text, "system": t.system, "params": t.inference_params()}
        if t.output_schema is not None:  # only then, so earlier runs keep their identity
            template["output_schema"] = t.output_schema.schema_json()
    quotas = get_settings().quotas
    return {
        "source": source_fingerprint(params.source, (known or {}).get("source")),
        "prompt_id": params.prompt_id,
        "template": template,
        "text_column": params.text_column,
        "model_id": params.model_id,
        "invocation_type": params.invocation_type,
        "inference": params.inference.as_dict(),
        "id_column": params.id_column,
        "on_missing": params.on_missing,
        "csv_types": params.csv_types,
        "shard_cut": {
            "max_records_per_job": params.max_records_per_job,
            # The gate size spreads rows over jobs only when no cap per job is given.
            "target_jobs": None if params.max_records_per_job else params.max_concurrent_jobs,
            "min_records_per_job": quotas.min_records_per_job,
            "max_records": quotas.max_records_per_job,
            "max_bytes": min(quotas.max_file_bytes, quotas.max_job_bytes),
        },
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints, one line per changed field."""
    lines = []
    old, new = comparable(old), comparable(new)
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key == "source" and before and after and before.get("uri") == after.get("uri"):
            lines.append(
                f"source content of {after['uri']} changed ({_file_change(before, after)})"
            )
        else:
            lines.append(f"{key}: was {json.dumps(before)}, now {json.dumps(after)}")
    return lines


def _file_change(before: dict, after: dict) -> str:
    if "files" not in before or "files" not in after:
        return "dataset fingerprint differs"
    old = {f["name"]: f for f in before["files"]}
    new = {f["name"]: f for f in after["files"]}
    changed = [Path(n).name for n in new if n in old and old[n] != new[n]]
    added = [Path(n).name for n in new if n not in old]
    removed = [Path(n).name for n in old if n not in new]
    parts = [
        f"{label}: {', '.join(names[:5])}"
        for label, names in (("edited", changed), ("added", added), ("removed", removed))
        if names
    ]
    return "; ".join(parts)


def answers_alike(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint with a local source reduced to its files' contents, in order.

    The path as typed decides no answer: a run started with `data/x.csv` and resumed with
    its absolute path, from another folder or through a symlink, was refused as a different
    run. Only local files are reduced (an S3 or hf:// URI names one thing); their order stays,
    as it decides the record ids. The default run name follows this too (`name_digest`).
    """
    value = comparable(fingerprint)
    source = value.get("source") or {}
    uri = str(source.get("uri", ""))
    if "files" not in source or uri.startswith("hf://") or storage.is_s3(uri):
        return value
    contents = [(f.get("size"), f.get("sha256")) for f in source["files"]]
    return {**value, "source": {"local_contents": contents}}


def read_identity(layout: RunLayout) -> RunIdentity | None:
    """The identity recorded when the run was created, if there is one."""
    uri = layout.identity_uri
    return RunIdentity.from_json(storage.read_bytes(uri)) if storage.exists(uri) else None


def has_run_files(layout: RunLayout) -> bool:
    """Whether the run folder holds any file of an earlier run (its claim aside)."""
    return any(storage.exists(uri) for uri in (layout.plan_uri, layout.state_uri))


def changed_message(layout: RunLayout, changes: list[str]) -> str:
    """The refusal: what changed and the two ways forward."""
    return (
        f"Run {layout.run_name!r} in {layout.run_dir} was created from different inputs, so "
        "its shards, jobs and output are not answers to this request; nothing was sent. "
        "Changed: " + "; ".join(changes) + ". Use a new run_name (or none: the default name "
        "follows the inputs), or pass restart=True (`bedrock-batch run --restart`) to move the "
        "old run aside and start it again."
    )


def missing_identity_message(layout: RunLayout, reason: str) -> str:
    """The refusal of a run folder without run.json that cannot be recovered, and the way on."""
    return (
        f"Run {layout.run_name!r} has files but no {layout.identity_uri} (deleted, or made by "
        "a version before it), which records what the run is and the id its jobs' tokens "
        f"derive from; nothing was sent. It cannot be recovered: {reason}. Put run.json back "
        "(a copy, S3 versioning) and run again; restart=True (`bedrock-batch run --restart`) "
        "moves the old run aside and pays for every shard again."
    )


def check_identity(layout: RunLayout, recorded: RunIdentity | None, current: RunIdentity) -> None:
    """Raise RunIdentityError unless ``current`` is the run recorded in ``layout``."""
    if recorded is None:
        if has_run_files(layout):
            reason = "nothing tells that its plan and jobs are answers to these inputs"
            raise RunIdentityError(missing_identity_message(layout, reason))
        return
    if recorded.digest != current.digest:
        if answers_alike(recorded.fingerprint) == answers_alike(current.fingerprint):
            return  # the same local files, named another way (`data/x.csv`, `./data/x.csv`)
        changes = differences(recorded.fingerprint, current.fingerprint)
        raise RunIdentityError(changed_message(layout, changes or ["fingerprint"]))
