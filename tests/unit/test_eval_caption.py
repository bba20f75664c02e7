"""Caption evaluation (lmfusion.evaluation.caption): CIDEr through pycocoevalcap agrees with the CIDEr-D definition
(Vedantam et al. 2015, the COCO server's variant) on a hand-checkable corpus; the tokenizer fallback drops PTB's
punctuation; reference files in both formats. Exact float comparisons up to 1e-9 (same formula, summation order)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from lmfusion.evaluation.caption import caption_scores, read_references, simple_tokenize

REFS = {
    "a.png": ["a black dog runs on the grass", "a dog running on grass"],
    "b.png": ["a red bus parked on a street", "a bus on the street"],
    "c.png": ["two cats sleep on a sofa", "cats sleeping on the sofa"],
}


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _cider_d(cands, refs, n_max=4, sigma=6.0):
    """CIDEr-D written from the definition: tf-idf n-gram vectors (idf from the references' document frequency),
    clipped cosine with a Gaussian length penalty, mean over n and references, times 10."""
    df = Counter()
    for rs in refs.values():
        df.update({g for r in rs for n in range(1, n_max + 1) for g in _ngrams(r.split(), n)})
    log_n = math.log(len(refs))

    def vec(words):
        return [{g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()}
                for n in range(1, n_max + 1)]

    scores = {}
    for k, cand in cands.items():
        cw = cand.split()
        vc = vec(cw)
        total = 0.0
        for r in refs[k]:
            rw = r.split()
            vr = vec(rw)
            for n in range(n_max):
                num = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vc[n].items())
                nc = math.sqrt(sum(v * v for v in vc[n].values()))
                nr = math.sqrt(sum(v * v for v in vr[n].values()))
                if nc and nr:
                    total += num / (nc * nr) * math.exp(-((len(cw) - len(rw)) ** 2) / (2 * sigma ** 2))
        scores[k] = total / n_max / len(refs[k]) * 10
    return sum(scores.values()) / len(scores), scores


def test_cider_identical_caption_scores_ten_and_disjoint_zero():
    refs = {"a": ["a dog runs", "a dog runs"], "b": ["red bus", "red bus"], "c": ["cats sleep", "cats sleep"]}
    cands = {"a": "a dog runs", "b": "green tram", "c": "cats sleep"}
    out = caption_scores(cands, refs, tokenizer="simple")
    # identical to every reference: each n-gram order's cosine is 1 with no length penalty; an order the caption
    # has no n-grams of scores 0, so "a dog runs" (1..3-grams) gets (1 + 1 + 1 + 0) / 4 * 10
    assert out["per_image_cider"]["a"] == pytest.approx(7.5)
    assert out["per_image_cider"]["c"] == pytest.approx(5.0)  # uni- and bigram only
    assert out["per_image_cider"]["b"] == 0.0
    assert out["cider"] == pytest.approx((7.5 + 0 + 5.0) / 3)


def test_cider_matches_definition():
    cands = {"a.png": "a dog runs on the grass", "b.png": "a bus on a street", "c.png": "a cat on a sofa"}
    out = caption_scores(cands, REFS, tokenizer="simple")
    want, per = _cider_d(cands, REFS)
    assert out["cider"] == pytest.approx(want, abs=1e-9)
    for k in cands:
        assert out["per_image_cider"][k] == pytest.approx(per[k], abs=1e-9)
    assert 0 < out["bleu4"] < 1 and out["tokenizer"] == "simple" and out["n_images"] == 3


def test_simple_tokenizer_and_errors():
    assert simple_tokenize("A Dog's toy, on the grass.") == "a dog 's toy on the grass"
    with pytest.raises(ValueError, match="no references"):
        caption_scores({"x.png": "a dog"}, REFS, tokenizer="simple")


def test_read_references_both_formats(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "a.png"}],
            "annotations": [{"image_id": 7, "caption": "one"}, {"image_id": 7, "caption": "two"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "plain.json").write_text(json.dumps({"a": ["one", "two"]}))
    assert read_references(tmp_path / "coco.json") == {"a.png": ["one", "two"]}
    assert read_references(tmp_path / "plain.json") == {"a": ["one", "two"]}
