"""Evaluation: CIDEr/BLEU (:mod:`.caption`), FID (:mod:`.fid`), generation with CLIP score (:mod:`.generation`), the
lm-eval adapter (:mod:`.lm_adapter`, :mod:`.text`), the lmms-eval adapter for VLM bases (:mod:`.lmms_adapter`,
:mod:`.understanding`), the Table-1 report (:mod:`.report`). The command line (``lmfusion eval
generation|caption|text|lmms``) is :mod:`.cli`.
"""
