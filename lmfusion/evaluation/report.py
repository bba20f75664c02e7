"""Results as JSON plus a Markdown table in the layout of the paper's Table 1 (text: HellaSwag, PIQA, SIQA,
WinoGrande; image understanding: CIDEr; image generation: FID, CLIP). Each ``lmfusion eval`` command merges its
numbers into ``OUT/results.json`` and rewrites ``OUT/table1.md`` from everything recorded there."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TEXT_TASKS", "merge_results", "table1"]

TEXT_TASKS = ("hellaswag", "piqa", "siqa", "winogrande")
_TITLES = {"hellaswag": "HellaSwag", "piqa": "PIQA", "siqa": "SIQA", "winogrande": "WinoGrande"}


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table1(results: dict) -> str:
    text, cap, gen = results.get("text", {}), results.get("caption", {}), results.get("generation", {})
    scales = sorted(gen.get("per_cfg", {}), key=float)
    extra = sorted({t for s in (text.get("ours") or {}, text.get("base") or {}) for t in s} - set(TEXT_TASKS))
    head = ["Model", *(_TITLES[t] for t in TEXT_TASKS), "Avg", *extra, "CIDEr ↑",
            *(h for s in scales for h in (f"FID ↓ (cfg {s})", f"CLIP ↑ (cfg {s})"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, scores: dict, with_images: bool) -> str:
        acc = [scores.get(t) for t in TEXT_TASKS]
        known = [a for a in acc if a is not None]
        avg = sum(known) / len(known) if len(known) == len(TEXT_TASKS) else None
        cells = [name, *(_fmt(None if a is None else 100 * a) for a in acc), _fmt(None if avg is None else 100 * avg),
                 *(_fmt(None if scores.get(t) is None else 100 * scores[t]) for t in extra)]
        cells.append(_fmt(cap.get("cider") and 100 * cap["cider"]) if with_images else "-")
        for s in scales:
            r = gen["per_cfg"][s] if with_images else {}
            cells += [_fmt(r.get("fid"), 2), _fmt(r.get("clip_score"), 2)]
        return "| " + " | ".join(cells) + " |"

    trained = (text.get("text_lr_ratio") or 0) > 0
    if text.get("base"):
        lines.append(row("Base" if trained else "Base (frozen text)", text["base"], with_images=False))
    lines.append(row(results.get("name", "LMFusion"), text.get("ours", {}), with_images=True))
    notes = ["", "Text: accuracy (acc_norm where the task reports it) in %; Avg over the paper's four tasks. "
                 "CIDEr x 100 (COCO convention). FID on Inception pool features; CLIP score 100 * cos."]
    if text.get("differences") and trained:
        notes.append(f"Text trained in this run (optimizer.text_lr_ratio {text['text_lr_ratio']:g}); drift from the "
                     f"base: " + ", ".join(text["differences"]))
    elif text.get("differences"):
        notes.append("**Text scores differ from the base model's:** " + ", ".join(text["differences"]))
    return "\n".join(lines + notes + _understanding(results.get("lmms"), results.get("name", "LMFusion"))) + "\n"


def _understanding(lmms: dict | None, name: str) -> list[str]:
    """Image understanding (``lmfusion eval lmms``, VLM bases): every task's metrics x 100, base row first."""
    if not lmms:
        return []
    cols = [(t, m) for t, ms in sorted(lmms["metrics"].items()) for m in sorted(ms)]
    lines = ["", "Image understanding (lmms-eval; x 100):", "",
             "| Model | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    rows = ([("Base (frozen VLM)", lmms["base_metrics"])] if lmms.get("base_metrics") else []) + \
        [(name, lmms["metrics"])]
    for label, metrics in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(100 * metrics[t][m]) if m in metrics.get(t, {}) else "-"
                                                 for t, m in cols) + " |")
    if lmms.get("differences"):
        lines += ["", "**Understanding scores differ from the base model's:** " + ", ".join(lmms["differences"])]
    return lines


def merge_results(out_dir: Path, section: str, values: dict, name: str | None = None) -> dict:
    """Merge ``values`` under ``section`` of ``out_dir/results.json``; rewrite ``table1.md``; return all results."""
    from lmfusion.utils import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    results[section] = values
    if name:
        results["name"] = name
    atomic_write_text(path, json.dumps(results, indent=1))
    atomic_write_text(out_dir / "table1.md", table1(results))
    return results
