"""Progress of a running stage, on the terminal of whoever started it: `stemqa <stage>`, `stemqa pipeline`, and
`stemqa submit` (which follows the job's driver output).

    progress = Progress()                                  (driver)
    t = progress.task("filter: embed", total=4000, unit="texts"); t.update(1200)   (work on the driver)
    r = progress.remote("sft", unit="steps")               (work in Ray workers and tasks, on any node)
    r.update(12, 50, loss=1.23, tokens_per_s=840)          (inside the Train worker, rank 0)
    progress.close()

Lines look like `[sft] step 12/50 (24%)  loss 1.230  840 tokens/s  ETA 1m10s`. On a terminal one line is
redrawn in place; elsewhere (a pipe, a job's log) a line is written at most every `interval_s` seconds (10 by
default, $STEMQA_PROGRESS_INTERVAL_S), plus the first and the last. Lines go to stderr, so a command's result
on stdout stays machine-readable.

Why an actor: Ray Train workers and Ray tasks run in other processes, on other nodes, and with a quiet
config their output does not reach the driver (`log_to_driver=False`). A small actor (no CPU reserved) holds
the latest numbers of each remote task; workers send it fire-and-forget updates, at most two a second, and
a driver thread polls it once a second. It works the same on one machine, on a cluster, and inside `ray job
submit`, where the driver's stderr is the job's log.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any, Optional, TextIO


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt_field(key: str, value: Any) -> str:
    if key == "tokens_per_s":
        return f"{value:,.0f} tokens/s"
    if key.endswith("_per_s"):
        return f"{value:,.1f} {key[:-6]}/s"
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class Task:
    """One piece of work's progress: `update(done, total=None, **fields)`; numbers, not messages."""

    def __init__(self, board: "Progress", label: str, total: Optional[int], unit: str):
        self.board, self.label, self.total, self.unit = board, label, total, unit
        self.done, self.fields, self.started, self.first = 0, {}, time.time(), None
        self.printed_at, self.finished, self.printed_final = 0.0, False, False

    def update(self, done: int, total: Optional[int] = None, **fields) -> None:
        now = time.time()
        if self.first is None:
            self.first = (now, done)  # ETA from the rate since the first update: start-up is not a step
        self.done, self.fields = done, {k: v for k, v in fields.items() if v is not None}
        self.total = total if total is not None else self.total
        self.finished = self.total is not None and done >= self.total
        self.board.show(self)

    def line(self) -> str:
        unit = self.unit.rstrip("s") if self.unit.endswith("s") and self.done == 1 else self.unit
        if self.total:
            head = f"[{self.label}] {self.unit.rstrip('s')} {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
        else:
            head = f"[{self.label}] {self.done} {unit}"
        parts = [head] + [_fmt_field(k, v) for k, v in self.fields.items()]
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {_fmt_duration(eta)}")
        elif self.finished:
            parts.append(f"in {_fmt_duration(time.time() - self.started)}")
        return "  ".join(parts)

    def eta(self) -> Optional[float]:
        if not self.total or self.first is None or self.finished:
            return None
        t0, d0 = self.first
        rate = (self.done - d0) / max(time.time() - t0, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None


class RemoteTask:
    """A task updated from Ray workers or tasks (picklable): sends its numbers to the progress actor."""

    def __init__(self, sink, key: str, min_interval_s: float = 0.5):
        self.sink, self.key, self.min_interval_s = sink, key, min_interval_s
        self._sent = 0.0

    def update(self, done: int, total: Optional[int] = None, **fields) -> None:
        now = time.time()
        if now - self._sent < self.min_interval_s and (total is None or done < total):
            return
        self._sent = now
        self.sink.update.remote(self.key, done, total, fields)  # fire and forget: never waits on the driver

    def __call__(self, done: int, total: Optional[int] = None, **fields) -> None:
        self.update(done, total, **fields)


class _Sink:
    """The actor: the latest (done, total, fields) of each remote task."""

    def __init__(self):
        self.latest: dict[str, tuple] = {}

    def update(self, key: str, done: int, total: Optional[int], fields: dict) -> None:
        self.latest[key] = (done, total, fields)

    def snapshot(self) -> dict:
        return dict(self.latest)


class Progress:
    """The driver's progress display for every task of a command (see the module docstring)."""

    def __init__(self, stream: Optional[TextIO] = None, interval_s: Optional[float] = None,
                 enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else float(
            os.environ.get("STEMQA_PROGRESS_INTERVAL_S", "0.2" if self.tty else "10"))
        self._remote: dict[str, Task] = {}
        self._sink = None
        self._poller: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open_line = False

    # ---- tasks
    def task(self, label: str, total: Optional[int] = None, unit: str = "") -> Task:
        return Task(self, label, total, unit)

    def remote(self, label: str, total: Optional[int] = None, unit: str = "") -> Optional[RemoteTask]:
        """A task Ray workers update; None when progress is off (callers pass it on as is)."""
        if not self.enabled:
            return None
        import ray

        if self._sink is None:
            self._sink = ray.remote(num_cpus=0, max_restarts=0)(_Sink).remote()
            self._poller = threading.Thread(target=self._poll, name="stemqa-progress", daemon=True)
            self._poller.start()
        key = f"{label}:{uuid.uuid4().hex[:6]}"
        self._remote[key] = self.task(label, total, unit)
        return RemoteTask(self._sink, key)

    def callback(self, label: str, unit: str = ""):
        """`fn(done, total)` for library functions that report progress by a callable (Ray Data jobs, eval)."""
        task = self.task(label, unit=unit)
        return lambda done, total=None, **fields: task.update(done, total, **fields)

    # ---- display
    def show(self, task: Task) -> None:
        if not self.enabled:
            return
        now = time.time()
        with self._lock:
            if task.finished:
                if task.printed_final:
                    return
                task.printed_final = True
            elif task.printed_at and now - task.printed_at < self.interval_s:
                return
            task.printed_at = now
            line = task.line()
            if self.tty:
                self.stream.write("\r\033[K" + line + ("\n" if task.finished else ""))
                self._open_line = not task.finished
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def _poll(self) -> None:
        while not self._stop.wait(1.0) and self._poll_once():
            pass

    def _poll_once(self, timeout_s: float = 10.0) -> bool:
        """Show what the workers sent since the last poll; False once the actor is gone (stop polling)."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            latest = ray.get(self._sink.snapshot.remote(), timeout=timeout_s)
        except GetTimeoutError:  # a busy machine: the actor may still be starting; try again next time
            return True
        except Exception:  # the actor or the cluster went away: the command itself reports that
            return False
        for key, (done, total, fields) in latest.items():
            task = self._remote.get(key)
            if task is not None and (done, total, fields) != (task.done, task.total, task.fields):
                task.update(done, total, **fields)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poll_once(timeout_s=60)  # the last numbers the workers sent
        if self._sink is not None:
            import ray

            try:
                ray.kill(self._sink)
            except Exception:  # already gone with its cluster
                pass
            self._sink = None
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
