"""Evaluation: CIDEr/BLEU (:mod:`.caption`), FID (:mod:`.fid`), generation with CLIP score (:mod:`.generation`), the
lm-eval adapter (:mod:`.lm_adapter`, :mod:`.text`), the Table-1 report (:mod:`.report`). The command line
(``lmfusion eval generation|caption|text``) is :mod:`.cli`.
"""
