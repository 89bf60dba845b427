"""Progress display: rounds, accuracy, bytes so far, ETA. Quiet for CI; plain lines when not a TTY."""

from __future__ import annotations

import sys
import time


class RoundProgress:
    """Called with each ``metrics.jsonl`` row; use as a context manager."""

    def __init__(self, total_rounds: int, *, quiet: bool = False, label: str = "fedmoe"):
        self.total = total_rounds
        self.quiet = quiet
        self.label = label
        self.tty = sys.stdout.isatty()
        self._bar = None
        self._task = None
        self.acc = None
        self._first: tuple[float, int] | None = None  # (time, round) of the first row seen

    def __enter__(self) -> "RoundProgress":
        if not self.quiet and self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, row: dict) -> None:
        if self.quiet:
            return
        if "accuracy" in row:
            self.acc = row["accuracy"]
        mb = row.get("bytes_total", 0.0) / 1e6
        info = f"acc {self.acc:.4f}  {mb:.1f} MB  sim {row.get('sim_time_total_s', 0.0):.0f} s" if self.acc is not None else ""
        now, rnd = time.monotonic(), int(row["round"])
        first = self._first is None
        if first:  # the first row seen (round 0, or the first round after a resume): the ETA starts here
            self._first = (now, rnd)
        if self._bar is not None:
            if first:
                self._bar.reset(self._task, completed=rnd, info=info)
            else:
                self._bar.update(self._task, completed=rnd, info=info)
        elif "accuracy" in row:
            t0, r0 = self._first
            eta = (now - t0) / (rnd - r0) * (self.total - rnd) if rnd > r0 else None
            eta_s = f"  eta {_clock(eta)}" if eta is not None and rnd < self.total else ""
            print(f"[{self.label}] round {rnd:>3}/{self.total}  {info}{eta_s}", flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
