"""``build_shards.py --kind text``: plain text -> text shards (``key.txt`` + ``key.json``; no VAE, no latents).

Inputs: ``.txt`` files (each one document; a directory is walked for them, sorted) and ``.jsonl`` files (one
document per row, the ``--text-field`` field). Text is stored as text, not token ids: the loader tokenises it with
the base model's tokenizer when it reads a shard (:mod:`lmfusion.data.stream` says why), so one text shard set
serves any base model. Sharding, crash safety, resume and the merge are the image builder's (same shard naming,
same ``.build/`` stats, same manifest; ``kind: text`` and no ``vae``/``latent`` blocks). Empty or non-UTF-8
documents and bad rows are rejects, counted like the image builder's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

from data_tools._sources import Item, Loaded, Rejected, read_caption

__all__ = ["enumerate_text", "build_text"]

TEXT_EXTS = (".txt", ".jsonl")


def _iter_jsonl(path: Path, field: str) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            source = f"{path.name}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield {"source": source, "reject": "bad_row", "detail": f"{source}: invalid JSON ({e})"}
                continue
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                yield {"source": source, "reject": "bad_row",
                       "detail": f"{source}: field '{field}' missing or not a string (set --text-field)"}
                continue
            yield {"source": source, "caption_text": text}


def enumerate_text(inputs: list[str], field: str) -> list[Item]:
    """Every document of ``inputs`` in a fixed order, indexed 0..N-1."""
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec).expanduser().resolve()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if not any(x.startswith(".") for x in p.parts))
            rows: Iterator[dict[str, Any]] = ({"source": str(p.relative_to(path)), "caption_path": str(p),
                                               "caption_ext": "txt"} for p in files)
        elif not path.is_file():
            raise FileNotFoundError(f"input {spec}: no such file or directory")
        elif path.suffix.lower() == ".txt":
            rows = iter([{"source": path.name, "caption_path": str(path), "caption_ext": "txt"}])
        elif path.suffix.lower() == ".jsonl":
            rows = _iter_jsonl(path, field)
        else:
            raise ValueError(f"input {spec}: --kind text reads .txt files, folders of them, or .jsonl rows "
                             f"(field '{field}')")
        for row in rows:
            items.append(Item(index=len(items), **row))
    return items


def _load(item: Item) -> Loaded | Rejected:
    if item.reject:
        return Rejected(item.index, item.source, item.reject, item.detail)
    text, reason, detail = read_caption(item, "text")
    if text is None:
        return Rejected(item.index, item.source, reason, detail.replace("caption", "text"))
    return Loaded(item.index, item.source, text, None, (0, 0), (0, 0, 0, 0))  # type: ignore[arg-type]


def build_text(args: argparse.Namespace, out: Path, rank: int, world: int, bs) -> dict[str, Any] | None:
    """This rank's text shards, then the merge (None if other ranks' shards are still missing). ``bs``: the builder
    (``data_tools.build_shards``, passed in by it: its writer, completeness check, merge and error type)."""
    from lmfusion.data import shard_format as fmt

    items = enumerate_text(args.inputs, args.text_field)
    if not items:
        raise bs.BuildError(f"no text documents found in {args.inputs}")
    num_shards = math.ceil(len(items) / args.samples_per_shard)
    options = {"kind": "text", "inputs": [str(Path(i).expanduser().resolve()) for i in args.inputs],
               "samples_per_shard": args.samples_per_shard, "text_field": args.text_field,
               "items_sha256": hashlib.sha256("\n".join(i.source for i in items).encode()).hexdigest()}
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    plan = {"fingerprint": fingerprint, "num_shards": num_shards, "num_inputs": len(items), "kind": "text",
            "store": "none", "latent_dtype": None, "resolution": None, "samples_per_shard": args.samples_per_shard,
            "vae": None, "options": options}
    plan_path = out / fmt.BUILD_DIR / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text(encoding="utf-8")).get("fingerprint") != fingerprint:
        raise bs.BuildError(f"{out} holds a build with other inputs/options; use a new --output or delete it")
    fmt.atomic_write_json(plan_path, plan)
    for shard in range(rank, num_shards, world):
        if bs.shard_complete(out, shard, fingerprint):
            continue
        lo, hi = shard * args.samples_per_shard, min((shard + 1) * args.samples_per_shard, len(items))
        writer = bs.ShardWriter(out, shard, hi - lo, fingerprint)
        for item in items[lo:hi]:
            result = _load(item)
            if isinstance(result, Rejected):
                writer.rejects.append(result.record(shard))
            else:
                writer.add(result, None, None, "")
        writer.finalize()
    manifest = bs.merge(out, args.max_reject_fraction)
    if manifest is None:
        print(f"build_shards rank {rank}: done; other ranks' text shards are still missing", flush=True)
    return manifest
