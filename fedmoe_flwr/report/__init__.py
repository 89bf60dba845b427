"""A run report: one self-contained HTML page plus the PNGs it embeds.

    python -m fedmoe_flwr.report RUN_DIR [RUN_DIR ...] [-o OUT] [--all]

Each argument is a run directory (holding ``metrics.jsonl``) or any directory above runs,
such as a Hydra multirun directory: runs are found recursively and overlaid. The page
(``report.html``, PNGs embedded as base64, each also linked by file name) shows a summary
table (rounds, bytes and simulated time to each target, final accuracies, load CV; means
and spreads per group when a group has several seeds), accuracy and loss against rounds,
bytes and simulated time, bytes per round, expert-load CV, per-tier participation and
dropout, and per run an expert-load heatmap, the client-expert assignment over time for a
sample of clients and the fitness matrix (these need the run's ``details.jsonl``).

Default output: ``<dir>/report/`` for one argument, else ``report/`` under the arguments'
common parent.
"""

from __future__ import annotations

import base64
import html
import os
import re
import time
from pathlib import Path

from fedmoe_flwr.report.runs import Run, find_runs, load_runs

__all__ = ["find_runs", "load_runs", "write_report"]

# PNG files with the same content for every report (the per-run ones add a slug).
CURVES = ("curves_rounds.png", "curves_bytes.png", "curves_simtime.png")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _fmt(v, digits: int = 4, scale: float = 1.0) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, (int, float)):
        v = v * scale
        if float(v).is_integer() and (abs(v) >= 1 or v == 0):
            return f"{int(v):,}"
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def _targets(runs: list[Run]) -> list[float]:
    return sorted({t["target"] for r in runs for t in r.summary.get("to_target") or []})


def _to_target(run: Run, target: float) -> dict:
    return next((t for t in run.summary.get("to_target") or [] if t["target"] == target), {})


def _summary_table(runs: list[Run], targets: list[float]) -> str:
    head = ["run", "rounds", "final acc", "personal acc", "acc AUC"]
    for t in targets:
        head += [f"rounds to {t:g}", f"MB to {t:g}", f"sim s to {t:g}"]
    head += ["total MB", "sim time (s)", "load CV", "dropped", "rejected"]
    private = any("dp_epsilon" in r.summary for r in runs)  # differential privacy: its epsilon
    head += ["DP epsilon"] if private else []
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in runs:
        s = r.summary
        cells = [f"<td class='l'>{html.escape(r.label)}{' <em>(partial)</em>' if s.get('partial') else ''}</td>",
                 f"<td>{_fmt(s.get('rounds'))}</td>", f"<td>{_fmt(s.get('final_accuracy'))}</td>",
                 f"<td>{_fmt(s.get('final_personal_accuracy'))}</td>", f"<td>{_fmt(s.get('accuracy_auc'))}</td>"]
        for t in targets:
            tt = _to_target(r, t)
            cells += [f"<td>{_fmt(tt.get('rounds'))}</td>", f"<td>{_fmt(tt.get('bytes'), 1, 1e-6)}</td>",
                      f"<td>{_fmt(tt.get('sim_time_s'), 1)}</td>"]
        cells += [f"<td>{_fmt(s.get('bytes_total'), 1, 1e-6)}</td>", f"<td>{_fmt(s.get('sim_time_total'), 1)}</td>",
                  f"<td>{_fmt(None if r.strategy == 'dense' else s.get('load_cv'), 3)}</td>",
                  f"<td>{_fmt(s.get('dropped_total'))}</td>",
                  f"<td>{_fmt(s.get('rejected_total'))}</td>"]
        cells += [f"<td>{_fmt(s.get('dp_epsilon'), 2)}</td>"] if private else []
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _mean_sd(vals: list) -> str:
    import numpy as np

    vals = [v for v in vals if v is not None]
    if not vals:
        return "&ndash;"
    if len(vals) == 1:
        return _fmt(vals[0])
    return f"{np.mean(vals):.4f} &plusmn; {np.std(vals, ddof=1):.4f}"


def _group_table(runs: list[Run], targets: list[float]) -> str:
    import numpy as np

    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return ""
    head = ["group", "runs", "final acc", "acc AUC"] + [f"rounds to {t:g} (reached)" for t in targets] + \
           [f"MB to {t:g}" for t in targets] + ["load CV"]
    out = ["<h3>Per group (mean &plusmn; sd over runs)</h3>",
           "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for g, rs in groups.items():
        cells = [f"<td class='l'>{html.escape(g)}</td>", f"<td>{len(rs)}</td>",
                 f"<td>{_mean_sd([r.summary.get('final_accuracy') for r in rs])}</td>",
                 f"<td>{_mean_sd([r.summary.get('accuracy_auc') for r in rs])}</td>"]
        for t in targets:
            got = [_to_target(r, t).get("rounds") for r in rs]
            got = [v for v in got if v is not None]
            cells.append(f"<td>{np.mean(got):.1f} ({len(got)}/{len(rs)})</td>" if got else f"<td>&ndash; (0/{len(rs)})</td>")
        for t in targets:
            got = [_to_target(r, t).get("bytes") for r in rs]
            got = [v for v in got if v is not None]
            cells.append(f"<td>{np.mean(got) / 1e6:.1f}</td>" if got else "<td>&ndash;</td>")
        cells.append(f"<td>{_mean_sd([r.summary.get('load_cv') for r in rs])}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px} .meta{color:#666;font-size:12px} table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f3f5f8} td.l{text-align:left}
tr:nth-child(even) td{background:#fafafa} figure{margin:10px 0 18px 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555} .note{color:#777;font-size:12px;font-style:italic}
"""


def write_report(paths: list[str | os.PathLike], out: str | os.PathLike | None = None, *, all_runs: bool = False,
                 max_detail_runs: int = 4) -> Path:
    """Write the report for the runs under ``paths``; returns the HTML file.

    Per-run figures (load heatmap, assignment, fitness) are drawn for every run when there
    are at most ``max_detail_runs`` runs (or ``all_runs``), else for the first run of
    each group.
    """
    t0 = time.perf_counter()
    runs = load_runs(list(paths))
    if out is None:
        if len(paths) == 1:
            out = Path(paths[0]) / "report"
        else:
            common = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
            out = (common if str(common) not in ("/", "") else Path.cwd()) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    from fedmoe_flwr.report import plots

    targets = _targets(runs)
    images: dict[str, bytes] = {}

    def save(fig, name: str) -> str | None:
        if fig is None:
            return None
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        data = buf.getvalue()
        (out / name).write_bytes(data)
        images[name] = data
        return name

    def figure(name: str | None, caption: str, missing: str) -> str:
        if name is None:
            return f"<p class='note'>{html.escape(missing)}</p>"
        b64 = base64.b64encode(images[name]).decode("ascii")
        return (f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(caption)}' data-file='{name}'>"
                f"<figcaption>{html.escape(caption)} &middot; <a href='{name}'>{name}</a></figcaption></figure>")

    body = []
    nothing = "No evaluated rounds yet."
    body.append("<h2>Summary</h2>" + _summary_table(runs, targets) + _group_table(runs, targets))
    body.append("<h2>Learning curves</h2>")
    for fname, key, label, scale in (("curves_rounds.png", "round", "round", 1.0),
                                     ("curves_bytes.png", "bytes_total", "MB transferred (cumulative)", 1e-6),
                                     ("curves_simtime.png", "sim_time_total_s", "simulated time (s)", 1.0)):
        name = save(plots.fig_curves(runs, key, label, scale, targets), fname)
        body.append(figure(name, f"Accuracy and loss vs {label}", nothing))
    body.append("<h2>Communication and load</h2>")
    body.append(figure(save(plots.fig_bytes_per_round(runs), "bytes_per_round.png"), "Bytes per round",
                       "No byte counts recorded."))
    body.append(figure(save(plots.fig_load_cv(runs), "load_cv.png"), "Expert-load coefficient of variation per round",
                       "No expert-load metrics (dense runs have none)."))
    body.append("<h2>Participation by device tier</h2>")
    body.append(figure(save(plots.fig_tiers(runs), "tiers.png"), "Per-tier participation and dropout rates",
                       "No per-client details (details.jsonl) with device tiers in these runs."))

    detail = runs if (all_runs or len(runs) <= max_detail_runs) else list({r.group: r for r in reversed(runs)}.values())[::-1]
    detail = [r for r in runs if r in detail]
    slugs: set[str] = set()
    for r in detail:
        slug = _slug(r.label)
        while slug in slugs:
            slug += "-x"
        slugs.add(slug)
        body.append(f"<h2>Run {html.escape(r.label)}</h2><p class='meta'>{html.escape(str(r.path))}</p>")
        missing = ("This run has no per-expert details (details.jsonl)" +
                   (": the dense baseline has no experts." if r.strategy == "dense" else "."))
        if not plots.expert_details(r):
            body.append(f"<p class='note'>{html.escape(missing)}</p>")
            continue
        body.append(figure(save(plots.fig_expert_load(r), f"load_{slug}.png"), "Expert load per round (experts x rounds)", missing))
        body.append(figure(save(plots.fig_assignment(r), f"assignment_{slug}.png"),
                           "Client-expert assignment over time for a sample of clients (spread over tiers)", missing))
        body.append(figure(save(plots.fig_fitness(r), f"fitness_{slug}.png"), "Fitness matrix (clients x experts)",
                           "No fitness matrix recorded."))
    if len(detail) < len(runs):
        body.append(f"<p class='note'>Per-run figures shown for the first run of each group "
                    f"({len(detail)} of {len(runs)}); pass --all for every run.</p>")

    title = "fedmoe_flwr report: " + (runs[0].label if len(runs) == 1 else f"{len(runs)} runs")
    listing = "<br>".join(f"{html.escape(r.label)}: {html.escape(str(r.path))}" for r in runs)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>generated {time.strftime('%Y-%m-%d %H:%M:%S')} in {{elapsed}}<br>{listing}</p>"
            + "\n".join(body) + "</body></html>")
    page = page.replace("{elapsed}", f"{time.perf_counter() - t0:.1f} s")
    path = out / "report.html"
    from fedmoe_flwr.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, page.encode("utf-8"))
    return path
