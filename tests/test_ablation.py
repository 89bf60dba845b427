"""The ablation command runs real Hydra sweeps of ``aligned`` and its variants on paired seeds."""

from __future__ import annotations

import json

import pytest

from fedmoe_flwr.bench import ablation


@pytest.mark.slow
def test_ablation_runs_each_variant_on_paired_seeds_and_tables_the_difference(tmp_path, capsys):
    ablation.main(["--scenario", "quick", "--seeds", "1", "--rounds", "2", "--variants", "aligned,-pace",
                   "--out", str(tmp_path), "--jobs", "2"])
    summary = json.loads((tmp_path / "ablation-quick.json").read_text())
    assert set(summary["variants"]) == {"aligned", "-pace"} and summary["seeds"] == [0]
    pace = summary["variants"]["-pace"]
    assert pace["overrides"] == ["strategy.pace_margin=0"]
    assert pace["auc_minus_aligned"]["reached"] == 1, "the paired difference was computed"
    overrides = (tmp_path / "quick" / "-pace" / "seed0" / ".hydra" / "overrides.yaml").read_text()
    assert "strategy.pace_margin=0" in overrides
    out = capsys.readouterr().out
    assert "| -pace |" in out and "| aligned |" in out


def test_unknown_variants_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant"):
        ablation.main(["--variants", "aligned,-magic", "--out", str(tmp_path), "--summarize-only"])
