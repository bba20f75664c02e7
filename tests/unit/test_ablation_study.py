"""examples/ablation_study.py's own pieces (the study itself is an hour of training: examples/ablations.md): the
fortune corpus reader, the held-out split and the table's drift columns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmfusion.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _study():
    spec = importlib.util.spec_from_file_location("ablation_study", REPO / "examples" / "ablation_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fortunes_reads_every_entry_of_the_text_files_and_skips_indexes_links_and_scraps(tmp_path):
    study = _study()
    entries = [f"Entry number {i} says   something\nworth keeping." for i in range(120)]
    (tmp_path / "wisdom").write_text("\n%\n".join(entries[:70]) + "\n%\nshort\n")
    (tmp_path / "more").write_text("\n%\n".join(entries[70:]))
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (tmp_path / "link").symlink_to(tmp_path / "more")
    got = study.fortunes(tmp_path)
    assert sorted(got) == sorted(" ".join(e.split()) for e in entries)  # whitespace folded, "short" dropped
    (tmp_path / "more").unlink()
    with pytest.raises(UserError, match=r"70 fortune entries found, expected thousands"):
        study.fortunes(tmp_path)
    with pytest.raises(UserError, match=r"no such folder.*apt-get install fortunes"):
        study.fortunes(tmp_path / "absent")


def test_table_reports_both_drifts_from_the_measured_perplexities():
    study = _study()
    row = {"separation": "none", "ratio": 1.0, "heldout_ppl_base": 70.0, "heldout_ppl_trained": 35.0,
           "fixed_ppl_base": 10.0, "fixed_ppl_trained": 12.5, "text_identical": False, "accuracy": 0.5,
           "fid": 150.25, "lm_loss": 2.0, "diffusion_loss": 0.5, "steps": 100, "train_seconds": 360.0}
    line = study.table([row]).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["none", "1", "70.000 -> 35.000 (-50.00%)", "10.000 -> 12.500 (+25.00%)", "changed", "0.50",
                     "150.2", "2.000 / 0.500", "3.60"]
