"""The report's figures (matplotlib's object API on the Agg canvas: no pyplot, no GUI).

Each ``fig_*`` function returns a :class:`matplotlib.figure.Figure`, or None when the runs
hold no data for it (e.g. per-expert plots of the dense baseline).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from fedmoe_flwr.report.runs import STRATEGY_ORDER, Run, series

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_STYLES = ["-", "--", ":", "-."]


def _colors(runs: list[Run]) -> dict[str, str]:
    """One colour per group; plain strategy groups keep fixed colours across reports."""
    groups = list(dict.fromkeys(r.group for r in runs))
    out = {g: _PALETTE[STRATEGY_ORDER.index(g)] for g in groups if g in STRATEGY_ORDER}
    used = {STRATEGY_ORDER.index(g) for g in out}
    free = (i for i in range(10_000) if i >= len(_PALETTE) or i not in used)
    for g in groups:
        if g not in out:
            out[g] = _PALETTE[next(free) % len(_PALETTE)]
    return out


def _legend_entries(runs: list[Run]):
    """Label each line by run when few, else once per group ("aligned (5 runs)")."""
    counts = Counter(r.group for r in runs)
    per_run = len(runs) <= 6
    done = set()
    for r in runs:
        if per_run:
            yield r, r.label
        elif r.group not in done:
            done.add(r.group)
            yield r, f"{r.group} ({counts[r.group]} runs)" if counts[r.group] > 1 else r.label
        else:
            yield r, None


def fig_curves(runs: list[Run], x_key: str, x_label: str, x_scale: float = 1.0, targets: list[float] = ()) -> Figure | None:
    """Accuracy and loss of the global model against ``x_key`` (one line per run)."""
    if not any(r.evals for r in runs):
        return None
    fig = Figure(figsize=(12, 4.0), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    colors = _colors(runs)
    seeds_in_group: dict[str, list] = {}
    for r, label in _legend_entries(runs):
        seeds_in_group.setdefault(r.group, []).append(r)
        style = _STYLES[(len(seeds_in_group[r.group]) - 1) % len(_STYLES)] if len(runs) <= 6 else "-"
        alpha = 1.0 if len(runs) <= 6 else 0.7
        for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            x, y = series(r, x_key, key, x_scale)
            ax.plot(x, y, style, color=colors[r.group], lw=1.6, alpha=alpha, label=label if ax is ax_acc else None,
                    marker="o" if len(x) <= 12 else None, ms=3)
    for t in targets:
        ax_acc.axhline(t, color="0.5", lw=0.8, ls=":")
        ax_acc.annotate(f"target {t:g}", xy=(0.01, t), xycoords=("axes fraction", "data"), ha="left", va="bottom", fontsize=8, color="0.4")
    ax_acc.set(title=f"Global test accuracy vs {x_label}", xlabel=x_label, ylabel="accuracy")
    ax_loss.set(title=f"Global test loss vs {x_label}", xlabel=x_label, ylabel="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    return fig


def fig_bytes_per_round(runs: list[Run]) -> Figure | None:
    """Bytes down and up per round: stacked bars for one run, lines for several."""
    if not any(r.get("bytes_down") is not None for run in runs for r in run.rows):
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax = fig.subplots()
    colors = _colors(runs)
    if len(runs) == 1:
        rows = [r for r in runs[0].rows if r.get("bytes_down") is not None]
        x = [r["round"] for r in rows]
        down = np.array([r["bytes_down"] for r in rows]) / 1e6
        up = np.array([r.get("bytes_up", 0.0) for r in rows]) / 1e6
        ax.bar(x, down, color="#1f77b4", label="down (server -> clients)")
        ax.bar(x, up, bottom=down, color="#ff7f0e", label="up (clients -> server)")
    else:
        for r, label in _legend_entries(runs):
            rows = [row for row in r.rows if row.get("bytes_down") is not None]
            ax.plot([row["round"] for row in rows], [(row["bytes_down"] + row.get("bytes_up", 0.0)) / 1e6 for row in rows],
                    color=colors[r.group], lw=1.4, alpha=0.8, label=label)
    ax.set(title="Bytes per round (down + up)", xlabel="round", ylabel="MB")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def fig_load_cv(runs: list[Run]) -> Figure | None:
    """Coefficient of variation of per-expert load (clients and tokens) per round (MoE runs only)."""
    runs = [r for r in runs if r.strategy != "dense"]  # the dense baseline has no experts
    if not any(r.get("load_cv") is not None for run in runs for r in run.rows if r["round"] > 0):
        return None
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    ax_c, ax_t = fig.subplots(1, 2, sharey=False)
    colors = _colors(runs)
    for r, label in _legend_entries(runs):
        for ax, key in ((ax_c, "load_cv"), (ax_t, "token_load_cv")):
            x, y = series(r, "round", key)
            pts = [(a, b) for a, b in zip(x, y) if a > 0]
            if pts:
                ax.plot(*zip(*pts), color=colors[r.group], lw=1.4, alpha=0.85, label=label if ax is ax_c else None)
    ax_c.set(title="Expert load CV (clients per expert)", xlabel="round", ylabel="CV")
    ax_t.set(title="Expert load CV (tokens per expert)", xlabel="round", ylabel="CV")
    for ax in (ax_c, ax_t):
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=8, loc="upper right")
    return fig


# ---------------------------------------------------------------------------- from details.jsonl
def expert_details(run: Run) -> list[dict]:
    return [d for d in run.details if "expert_keys" in d]


def tiers_of(run: Run) -> dict[str, str]:
    tiers: dict[str, str] = {}
    for d in run.details:
        tiers.update(d.get("tiers", {}))
    return tiers


def _ticks(ax, axis: str, labels: list[str], max_labels: int = 32) -> None:
    step = max(1, int(np.ceil(len(labels) / max_labels)))
    idx = list(range(0, len(labels), step))
    if axis == "y":
        ax.set_yticks(idx, [labels[i] for i in idx], fontsize=7 if len(idx) > 16 else 8)
    else:
        ax.set_xticks(idx, [labels[i] for i in idx], fontsize=8)


def _round_ticks(ax, rounds: list[int]) -> None:
    step = max(1, int(np.ceil(len(rounds) / 20)))
    idx = list(range(0, len(rounds), step))
    ax.set_xticks(idx, [str(rounds[i]) for i in idx], fontsize=8)


def fig_expert_load(run: Run) -> Figure | None:
    """Heatmaps experts x rounds: clients that trained each expert, and its share of tokens."""
    det = expert_details(run)
    if not det:
        return None
    keys = det[-1]["expert_keys"]
    rounds = [d["round"] for d in det]
    clients = np.array([d.get("expert_clients", [0.0] * len(keys)) for d in det], dtype=float).T
    tokens = np.array([d.get("expert_tokens", [0.0] * len(keys)) for d in det], dtype=float).T
    share = tokens / np.maximum(tokens.sum(axis=0, keepdims=True), 1e-12)
    h = min(9.0, 1.6 + 0.22 * len(keys))
    fig = Figure(figsize=(12, 2 * h), layout="constrained")
    ax_c, ax_t = fig.subplots(2, 1)
    for ax, mat, title, cmap, clabel in (
        (ax_c, clients, "Clients whose update of the expert was aggregated, per round", "viridis", "clients"),
        (ax_t, share, "Share of the round's tokens routed to each expert", "magma", "token share"),
    ):
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap, origin="upper")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("expert")
        _ticks(ax, "y", keys)
        _round_ticks(ax, rounds)
        fig.colorbar(im, ax=ax, label=clabel, pad=0.01)
    return fig


def sample_clients(run: Run, k: int = 6) -> list[str]:
    """Up to ``k`` clients, spread over tiers, preferring those that took part most often."""
    det = expert_details(run)
    count = Counter(c for d in det for c in d.get("assignment", {}))
    if not count:
        return []
    tiers = tiers_of(run)
    by_tier: dict[str, list[str]] = {}
    for c, _ in sorted(count.items(), key=lambda kv: (-kv[1], _cid_key(kv[0]))):
        by_tier.setdefault(tiers.get(c, ""), []).append(c)
    picked: list[str] = []
    while len(picked) < k and any(by_tier.values()):
        for t in sorted(by_tier):
            if by_tier[t] and len(picked) < k:
                picked.append(by_tier[t].pop(0))
    return sorted(picked, key=lambda c: (tiers.get(c, ""), _cid_key(c)))


def _cid_key(c: str):
    return (0, int(c), "") if str(c).isdigit() else (1, 0, str(c))


_STATUS = ListedColormap(["#f4f4f4", "#2c7fb8", "#fdae61", "#d7191c"])


def fig_assignment(run: Run, clients: list[str] | None = None) -> Figure | None:
    """For a sample of clients, the experts assigned each round: aggregated, dropped, rejected.

    Rows are (client, expert) pairs, grouped by client; only experts the client was ever
    given are shown.
    """
    det = expert_details(run)
    clients = clients if clients is not None else sample_clients(run)
    if not det or not clients:
        return None
    keys = det[-1]["expert_keys"]
    rounds = [d["round"] for d in det]
    tiers = tiers_of(run)
    rows, labels, bounds = [], [], []
    for c in clients:
        status = np.zeros((len(keys), len(det)))
        for j, d in enumerate(det):
            held = d.get("assignment", {}).get(c)
            if held is None:
                continue
            code = 3 if c in d.get("rejected", {}) else 2 if c in d.get("dropped", {}) else 1
            for key in held:
                if key in keys:
                    status[keys.index(key), j] = code
        used = [i for i in range(len(keys)) if status[i].any()]
        if not used:
            continue
        bounds.append(len(rows))
        for i in used:
            rows.append(status[i])
            labels.append(f"{keys[i]}")
        mid = bounds[-1] + (len(used) - 1) / 2
        labels_client = f"client {c}" + (f" ({tiers[c]})" if tiers.get(c) else "")
        bounds[-1] = (bounds[-1], mid, labels_client)
    if not rows:
        return None
    mat = np.array(rows)
    fig = Figure(figsize=(12, min(14.0, 1.4 + 0.16 * len(rows))), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=_STATUS, vmin=-0.5, vmax=3.5)
    for start, _, _ in bounds[1:]:
        ax.axhline(start - 0.5, color="black", lw=1.0)
    ax.set_yticks(range(len(labels)), labels, fontsize=6 if len(labels) > 40 else 7)
    sec = ax.secondary_yaxis("left")
    sec.set_yticks([m for _, m, _ in bounds], [lab for _, _, lab in bounds], fontsize=8)
    sec.tick_params(length=0, pad=48)
    _round_ticks(ax, rounds)
    ax.set_xlabel("round")
    ax.set_title("Client-expert assignment over time (sampled clients)", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color=_STATUS(i), label=s) for i, s in
               ((1, "assigned, aggregated"), (2, "assigned, dropped"), (3, "assigned, rejected"), (0, "not assigned"))]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    return fig


def fig_fitness(run: Run, max_clients: int = 40) -> Figure | None:
    """The last recorded fitness matrix Q (clients x experts), clients grouped by tier."""
    fit = next((d for d in reversed(run.details) if d.get("fitness")), None)
    if fit is None:
        return None
    keys = fit.get("expert_keys") or expert_details(run)[-1]["expert_keys"]
    cids = list(fit["fitness"]["clients"])
    q = np.array([[np.nan if v is None else v for v in row] for row in fit["fitness"]["Q"]], dtype=float)
    if q.size == 0:
        return None
    tiers = tiers_of(run)
    order = sorted(range(len(cids)), key=lambda i: (tiers.get(cids[i], ""), _cid_key(cids[i])))
    if len(order) > max_clients:
        order = [order[int(i)] for i in np.linspace(0, len(order) - 1, max_clients).round()]
    q = q[order]
    labels = [f"{cids[i]} ({tiers[cids[i]]})" if tiers.get(cids[i]) else str(cids[i]) for i in order]
    fig = Figure(figsize=(min(12.0, 3.5 + 0.45 * len(keys)), min(12.0, 1.6 + 0.24 * len(order))), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(q, aspect="auto", interpolation="nearest", cmap="YlGnBu")
    _ticks(ax, "y", labels, max_labels=40)
    ax.set_xticks(range(len(keys)), keys, rotation=90 if len(keys) > 12 else 0, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("client (tier)")
    ax.set_title(f"Fitness Q[client, expert] after round {fit['round']}", fontsize=10)
    fig.colorbar(im, ax=ax, label="fitness", pad=0.01)
    return fig


def tier_rates(run: Run) -> dict[str, dict[str, float]]:
    """Per tier: ``participation`` (share of the tier's clients sent work, per round),
    ``dropout`` (share of sent work dropped: no reply, simulated dropout, missed deadline),
    ``rejected`` (share rejected by validation), ``clients``."""
    det = expert_details(run)
    tiers = tiers_of(run)
    if not det or not tiers:
        return {}
    size = Counter(tiers.values())
    sent, dropped, rejected = Counter(), Counter(), Counter()
    for d in det:
        for c in d.get("assignment", {}):
            t = tiers.get(c, "")
            sent[t] += 1
            dropped[t] += c in d.get("dropped", {})
            rejected[t] += c in d.get("rejected", {})
    declared = [t.get("name") for t in ((run.config.get("fleet") or {}).get("tiers") or []) if isinstance(t, dict)]
    rank = {t: i for i, t in enumerate(declared)}  # the fleet config's order (small -> large)
    out = {}
    for t in sorted(size, key=lambda t: (t == "", rank.get(t, len(rank)), t)):
        out[t or "?"] = {
            "clients": float(size[t]),
            "participation": sent[t] / (size[t] * len(det)),
            "dropout": dropped[t] / sent[t] if sent[t] else 0.0,
            "rejected": rejected[t] / sent[t] if sent[t] else 0.0,
        }
    return out


def fig_tiers(runs: list[Run]) -> Figure | None:
    """Per-tier participation and dropout rates, one bar per run (or per group when many)."""
    rates = {r.label: (r, tier_rates(r)) for r in runs}
    rates = {k: v for k, v in rates.items() if v[1]}
    if not rates:
        return None
    if len(rates) > 6:  # average the runs of each group
        grouped: dict[str, list] = {}
        for r, tr in rates.values():
            grouped.setdefault(r.group, []).append((r, tr))
        rates = {}
        for g, items in grouped.items():
            tiers = sorted({t for _, tr in items for t in tr})
            avg = {t: {m: float(np.mean([tr[t][m] for _, tr in items if t in tr])) for m in ("clients", "participation", "dropout", "rejected")}
                   for t in tiers}
            rates[f"{g} (mean of {len(items)})"] = (items[0][0], avg)
    tiers = list(dict.fromkeys(t for _, tr in rates.values() for t in tr))
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_p, ax_d = fig.subplots(1, 2)
    colors = _colors([r for r, _ in rates.values()])
    n = len(rates)
    width = 0.8 / n
    x = np.arange(len(tiers))
    nth: Counter = Counter()
    for i, (label, (r, tr)) in enumerate(rates.items()):
        hatch = ["", "//", "..", "xx", "\\\\", "++"][nth[r.group] % 6]  # runs of one group: same colour
        nth[r.group] += 1
        for ax, m in ((ax_p, "participation"), (ax_d, "dropout")):
            vals = [tr.get(t, {}).get(m, 0.0) for t in tiers]
            bars = ax.bar(x + (i - (n - 1) / 2) * width, vals, width, label=label if ax is ax_p else None,
                          color=colors[r.group], edgecolor="white", hatch=hatch)
            if n <= 4:
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    names = [f"{t}\n({int(next(tr[t]['clients'] for _, tr in rates.values() if t in tr))} clients)" for t in tiers]
    ax_p.set(title="Participation: share of the tier's clients sent work per round", ylabel="rate")
    ax_d.set(title="Dropout: share of sent work not aggregated (dropped)", ylabel="rate")
    for ax in (ax_p, ax_d):
        ax.set_xticks(x, names, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, max(0.05, ax.get_ylim()[1] * 1.12))
    ax_p.legend(fontsize=8, loc="upper left")
    return fig
