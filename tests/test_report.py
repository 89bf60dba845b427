"""The run report: every plot drawn from a real short run, non-empty, referenced by the HTML."""

import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmoe_flwr.config import Backend, Config, StrategyName, TierConfig
from fedmoe_flwr.report import find_runs, write_report
from fedmoe_flwr.report.__main__ import main as report_main
from fedmoe_flwr.simulation import run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["curves_rounds.png", "curves_bytes.png", "curves_simtime.png", "bytes_per_round.png", "load_cv.png", "tiers.png"]
PER_RUN = ["load_{}.png", "assignment_{}.png", "fitness_{}.png"]


def _cfg(strategy: StrategyName, rounds: int) -> Config:
    cfg = Config(backend=Backend.local, num_rounds=rounds, quiet=True, save_model=False, targets=[0.3, 0.99],
                 checkpoint_every=0)
    cfg.strategy.name = strategy
    cfg.dataset.num_clients = 12
    cfg.train.local_epochs = 1
    cfg.fleet.deadline_s = 3.0
    cfg.fleet.tiers = [
        TierConfig(name="small", fraction=0.5, max_experts=2, samples_per_s=100, uplink_mbps=1, downlink_mbps=4, reliability=0.8),
        TierConfig(name="large", fraction=0.5, max_experts=-1, samples_per_s=2000, uplink_mbps=50, downlink_mbps=200),
    ]
    return cfg


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A Hydra-multirun-like directory with an aligned run and a dense run."""
    base = tmp_path_factory.mktemp("multirun")
    run(_cfg(StrategyName.aligned, 4), base / "strategy=aligned")
    run(_cfg(StrategyName.dense, 2), base / "strategy=dense")
    return base


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 2000, f"{path.name} is missing or tiny"
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[0] > 150 and img.shape[1] > 300
    assert img.std() > 5, f"{path.name} looks blank"


def test_report_of_a_sweep_draws_every_plot_and_the_html_embeds_and_links_them(sweep, tmp_path):
    assert [p.name for p in find_runs([sweep])] == ["strategy=aligned", "strategy=dense"]
    html_path = write_report([sweep], tmp_path / "rep")
    html = html_path.read_text()
    expected = SHARED + [f.format("aligned-s0") for f in PER_RUN]
    for name in expected:
        _png_ok(tmp_path / "rep" / name)
        assert f"data-file='{name}'" in html and f"href='{name}'" in html, name
    # self-contained: each figure is embedded, and the embedded bytes are the PNG file's
    embedded = dict(re.findall(r"src='data:image/png;base64,([^']+)' alt='[^']*' data-file='([^']+)'", html)[i][::-1]
                    for i in range(len(expected)))
    assert set(embedded) == set(expected)
    for name, b64 in embedded.items():
        assert base64.b64decode(b64) == (tmp_path / "rep" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == sorted(expected)  # nothing for dense
    # the summary table names both runs; the dense run explains why it has no expert plots
    assert "aligned s0" in html and "dense s0" in html and "rounds to 0.3" in html
    assert "the dense baseline has no experts" in html


def test_single_run_report_goes_into_the_run_and_the_cli_works(sweep, tmp_path, capsys):
    one = tmp_path / "one"
    shutil.copytree(sweep / "strategy=aligned", one)
    assert report_main([str(one)]) == 0
    assert "report written to" in capsys.readouterr().out
    html = (one / "report" / "report.html").read_text()
    assert "load_cv.png" in html and "Client-expert assignment" in html
    assert find_runs([one]) == [one.resolve()]  # the report directory is not taken for a run
    assert report_main([str(tmp_path / "nothing-here")]) == 2


def test_report_of_a_run_in_progress_summarises_its_metrics(sweep, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(sweep / "strategy=aligned", part)
    (part / "summary.json").unlink()
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed mid-line
    html = write_report([part], tmp_path / "rep").read_text()
    assert "(partial)" in html
    _png_ok(tmp_path / "rep" / "curves_rounds.png")


def test_the_rendered_page_is_not_empty(sweep, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the screenshot check needs it")
    html_path = write_report([sweep / "strategy=aligned"], tmp_path / "rep")
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--window-size=1400,2400", f"--screenshot={shot}",
                        html_path.resolve().as_uri()], capture_output=True, timeout=120)
    _png_ok(shot)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    colourful = (img.max(axis=2) - img.min(axis=2)) > 60  # plot lines and heatmaps, not just text
    assert colourful.mean() > 0.01
