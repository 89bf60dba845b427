"""Progress display: rounds, accuracy, bytes so far, ETA. Quiet for CI; plain lines when not a TTY."""

from __future__ import annotations

import sys


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
        if self._bar is not None:
            self._bar.update(self._task, completed=row["round"], info=info)
        elif "accuracy" in row:
            print(f"[{self.label}] round {row['round']:>3}/{self.total}  {info}", flush=True)
