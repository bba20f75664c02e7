"""The CPU mini-study of the paper's ablations (Section 5.1; examples/ablations.md): separation depth x text
learning-rate ratio on the quickstart's setting.

Each setting is one ``lmfusion quickstart`` run (SmolLM2-135M-Instruct base, Fashion-MNIST latents, 2 data-parallel
ranks) with a 50/50 blend of a text-only shard set, plus ``model.separation`` and ``optimizer.text_lr_ratio``. The
text corpus is the Debian package ``fortunes`` (``/usr/share/games/fortunes``: ~1.2 MB of English quotations and
jokes, entries between ``%`` lines); every 10th entry is held out. Measured per run:

* text: perplexity of the held-out entries, base vs trained (in-domain: text that trains on fortunes gets better at
  them), and the quickstart's fixed text (an encyclopedia sentence: out of domain, where forgetting shows) and greedy
  continuation; both drifts are 0 where the text is frozen and separated;
* images: the quickstart's generated-class accuracy (an independent CNN's verdict on 10 drawings per class) and
  feature FID.

Usage (about the quickstart's time per setting on an idle 2-core machine)::

    apt-get install fortunes                          # the text corpus
    python examples/ablation_study.py [--out runs/ablation-study] [--steps 280] \\
        [--settings none:0,shallow:0,deep:0,none:1,shallow:1,deep:1]

A finished setting (its ``results.json`` present) is not rerun; ``study.json`` and ``study.md`` (the table) are
rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lmfusion.errors import UserError  # noqa: E402
from lmfusion.utils import atomic_write_text  # noqa: E402

CORPUS = Path("/usr/share/games/fortunes")
HELD_OUT_EVERY = 10
HELD_OUT_MAX = 200


def fortunes(corpus: Path) -> list[str]:
    """Every entry of the fortune files in ``corpus`` (plain-text files; ``.dat`` indexes and links skipped)."""
    if not corpus.is_dir():
        raise UserError(f"{corpus}: no such folder; the text corpus is Debian's fortunes (apt-get install fortunes)")
    entries = []
    for path in sorted(p for p in corpus.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix):
        text = path.read_text(encoding="utf-8", errors="replace")
        entries += [" ".join(e.split()) for e in text.split("\n%\n")]
    entries = [e for e in entries if len(e) >= 20]
    if len(entries) < 100:
        raise UserError(f"{corpus}: {len(entries)} fortune entries found, expected thousands")
    return entries


def text_shards(entries: list[str], out: Path) -> tuple[Path, list[str]]:
    """Build the training text shards (entries not held out) once; returns them and the held-out entries."""
    held = entries[::HELD_OUT_EVERY][:HELD_OUT_MAX]
    train = [e for i, e in enumerate(entries) if i % HELD_OUT_EVERY]
    shards = out / "text-shards"
    if not (shards / "manifest.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / "fortunes-train.jsonl"
        atomic_write_text(jsonl, "".join(json.dumps({"text": t}) + "\n" for t in train))
        subprocess.run([sys.executable, str(REPO / "data_tools" / "build_shards.py"), str(jsonl), "--kind", "text",
                        "--output", str(shards), "--samples-per-shard", "1000", "--no-progress"], check=True)
    return shards, held


def table(rows: list[dict]) -> str:
    lines = ["| separation | text lr ratio | held-out fortunes ppl (base -> trained) | fixed-text ppl (base -> trained) | "
             "greedy text | generated-class accuracy | feature FID | final LM / diffusion loss | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['separation']} | {r['ratio']:g} | {r['heldout_ppl_base']:.3f} -> "
                     f"{r['heldout_ppl_trained']:.3f} ({r['heldout_ppl_trained'] / r['heldout_ppl_base'] - 1:+.2%}) | "
                     f"{r['fixed_ppl_base']:.3f} -> {r['fixed_ppl_trained']:.3f} "
                     f"({r['fixed_ppl_trained'] / r['fixed_ppl_base'] - 1:+.2%}) | "
                     f"{'identical' if r['text_identical'] else 'changed'} | {r['accuracy']:.2f} | {r['fid']:.1f} | "
                     f"{r['lm_loss']:.3f} / {r['diffusion_loss']:.3f} | {r['train_seconds'] / r['steps']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablation-study"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the quickstart config's)")
    p.add_argument("--settings", default="none:0,shallow:0,deep:0,none:1,shallow:1,deep:1",
                   help="comma-separated SEPARATION:RATIO pairs")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--text-weight", type=float, default=0.5,
                   help="share of samples drawn from the text set (0.5: half the samples; a fortune is ~44 tokens "
                        "with its specials (SmolLM2's tokenizer), a quickstart image-caption document ~17, so 0.28 "
                        "gives the paper's 50/50 in tokens)")
    p.add_argument("--smoke", action="store_true", help="the quickstart's smoke sizes (checks the pipeline)")
    args = p.parse_args(argv)
    settings = [tuple(s.split(":")) for s in args.settings.split(",") if s]
    for s in settings:
        if len(s) != 2 or s[0] not in ("none", "shallow", "deep"):
            raise UserError(f"--settings: {':'.join(s)!r}: expected SEPARATION:RATIO, SEPARATION none|shallow|deep")

    from lmfusion.inference.load import load_for_inference
    from lmfusion.quickstart import base as base_mod
    from lmfusion.quickstart import evaluate as ev
    from lmfusion.quickstart.run import run_quickstart

    import os

    import torch

    out = args.out.expanduser().resolve()
    shards, held = text_shards(fortunes(args.corpus), out)
    # the thread count run_quickstart evaluates with: the same GEMM blocking, so frozen text scores bit-equal
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base_ppl = ev.text_perplexity(load_for_inference(base_mod.prepare_base(log=print), device="cpu"), held)
    rows = []
    for separation, ratio in settings:
        name = f"{separation}_ratio{ratio}"
        run = out / name
        if not (run / "results.json").is_file():
            run_quickstart(run, smoke=args.smoke, steps=args.steps, text_shards=shards, text_weight=args.text_weight,
                           overrides=(f"model.separation={separation}", f"optimizer.text_lr_ratio={ratio}"))
        r = json.loads((run / "results.json").read_text())
        trained = ev.text_perplexity(load_for_inference(run / "train", device="cpu"), held)
        rows.append({"separation": separation, "ratio": float(ratio), "heldout_ppl_base": base_ppl,
                     "heldout_ppl_trained": trained, "text_identical": r["text_identical"],
                     "fixed_ppl_base": r["text"]["before"]["perplexity"],
                     "fixed_ppl_trained": r["text"]["after"]["perplexity"],
                     "accuracy": r["generated_class_accuracy"], "fid": r["generated_feature_fid"],
                     "lm_loss": r["final_loss"]["lm_loss"], "diffusion_loss": r["final_loss"]["diffusion_loss"],
                     "steps": r["steps"], "train_seconds": r["train_seconds"]})
        atomic_write_text(out / "study.json", json.dumps({"held_out_texts": len(held), "corpus": str(args.corpus),
                                                          "rows": rows}, indent=1) + "\n")
        atomic_write_text(out / "study.md", table(rows))
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"ablation_study: error: {e}", file=sys.stderr)
        sys.exit(2)
