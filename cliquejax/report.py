"""Reporting: metric logs (JSONL + TensorBoard), curve plots, a progress bar, result files."""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time

import numpy as np

METRICS_FILE = "metrics.jsonl"
LOSS_KEYS = ("loss",)
ACCURACY_KEYS = ("accuracy", "acc")
LR_KEYS = ("lr", "learning_rate")
SPLITS = ("train", "test")


def to_builtin(value):
    """numpy / jax scalars and arrays -> Python numbers and lists; anything else unchanged."""
    if isinstance(value, dict):
        return {key: to_builtin(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(item) for item in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "__array__") or isinstance(value, np.generic):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricWriter:
    """Appends metrics to `workdir/metrics.jsonl` and to TensorBoard; a no-op when disabled."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, METRICS_FILE)
        self._summary_writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._summary_writer = SummaryWriter(workdir)

    def write(self, step: int, metrics: dict, split: str) -> None:
        if not self.enabled:
            return
        values = to_builtin(dict(metrics))
        record = {"step": int(step), "split": split, **values}
        with open(self.jsonl_path, "a") as jsonl:
            jsonl.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if _is_number(value):
                self._summary_writer.add_scalar(f"{split}/{name}", value, int(step))

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text in TensorBoard's Text tab (the run's config), not in the JSONL."""
        if self.enabled:
            self._summary_writer.add_text(tag, text, int(step))

    def flush(self) -> None:
        if self.enabled:
            self._summary_writer.flush()

    def close(self) -> None:
        if self.enabled and self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None


def drop_rows_after(path: str, step: int) -> None:
    """Rewrites the metrics file without rows past `step` (atomically): a run resumed from
    the checkpoint of `step` writes them again, so no epoch appears twice."""
    if not os.path.exists(path):
        return
    with open(path) as jsonl:
        lines = [line for line in jsonl if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a row cut short by a kill
        if int(record.get("step", 0)) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as jsonl:
        jsonl.writelines(kept)
    os.replace(temporary, path)


def read_metrics(path: str) -> list[dict]:
    with open(path) as jsonl:
        return [json.loads(line) for line in jsonl if line.strip()]


def _series(records: list[dict], split: str | None, keys, x_key: str | None):
    """(xs, ys) of the first of `keys` present in each record of `split` (None: any)."""
    xs, ys = [], []
    for record in records:
        if split is not None and record.get("split") != split:
            continue
        key = next((k for k in keys if _is_number(record.get(k))), None)
        if key is None:
            continue
        x = record.get(x_key) if x_key else None
        xs.append(x if _is_number(x) else record["step"])
        ys.append(record[key])
    return xs, ys


def _plot_panel(axes, records, keys, ylabel, x_key, splits) -> None:
    for split in splits:
        xs, ys = _series(records, split, keys, x_key)
        if xs:
            axes.plot(xs, ys, marker="." if len(xs) > 1 else "o", label=split or ylabel)
    axes.set_xlabel(x_key or "step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()


def plot_curves(metrics_jsonl_path: str, png_path: str, title: str | None = None) -> None:
    """Loss and accuracy (train epochs, test) vs epoch, and lr vs step when logged, into a
    PNG."""
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl_path)
    x_key = "epoch" if any(_is_number(r.get("epoch")) for r in records) else "step"
    panels = [(LOSS_KEYS, "loss", x_key, SPLITS), (ACCURACY_KEYS, "accuracy", x_key, SPLITS)]
    # the rate at each logged step (the loop's `train_step` rows), else whatever carries one
    lr_split = "train_step" if _series(records, "train_step", LR_KEYS, None)[0] else None
    if _series(records, lr_split, LR_KEYS, None)[0]:
        panels.append((LR_KEYS, "learning rate", "step", (lr_split,)))
    figure = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for axes, (keys, ylabel, panel_x_key, splits) in zip(
        figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        _plot_panel(axes, records, keys, ylabel, panel_x_key, splits)
        if ylabel == "loss" and axes.has_data():
            axes.set_yscale("log")  # an untrained net's test loss can be 1000x the final one
    if title:
        figure.suptitle(title)
    figure.savefig(png_path, dpi=100)


class ProgressBar:
    """tqdm on stderr showing step, loss, acc and images/s over the last `window` updates.

    Elapsed time, rate and ETA count from the end of the first update, which includes the
    compilation of the step (seconds to minutes) that later steps do not pay.
    """

    def __init__(self, total_steps: int, initial: int = 0, desc: str = "train",
                 enabled: bool = True, batch_size: int | None = None, window: int = 20):
        from tqdm import tqdm

        self.enabled = enabled
        self.batch_size = batch_size
        self.step = initial
        self._recent = collections.deque([(time.perf_counter(), initial)], maxlen=window + 1)
        self._timed = False
        self._shown: dict = {}
        # smoothing=0: the rate is the mean since the timer started (evaluations included)
        self._bar = tqdm(total=total_steps, initial=initial, desc=desc, disable=not enabled,
                         file=sys.stderr, dynamic_ncols=True, mininterval=0.5, smoothing=0)

    def images_per_second(self) -> float | None:
        (first_time, first_step), (last_time, last_step) = self._recent[0], self._recent[-1]
        if self.batch_size is None or last_time <= first_time:
            return None
        return self.batch_size * (last_step - first_step) / (last_time - first_time)

    def update(self, n: int = 1, **postfix) -> None:
        if not self.enabled:
            return
        self.step += n
        self._recent.append((time.perf_counter(), self.step))
        shown = self._shown = {"step": self.step}
        for name, value in postfix.items():
            value = to_builtin(value)
            shown[name] = f"{value:.4g}" if _is_number(value) else value
        rate = self.images_per_second()
        if rate is not None:
            shown["img/s"] = f"{rate:.0f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)
        if not self._timed:  # restart the clock once the first (compiling) step is done
            self._timed = True
            self._bar.initial = self._bar.last_print_n = self._bar.n
            self._bar.start_t = self._bar.last_print_t = self._bar._time()

    def show(self, **postfix) -> None:
        """Replaces the postfix's given fields now (e.g. the test accuracy after an eval)."""
        if self.enabled:
            self._shown.update(postfix)
            self._bar.set_postfix(self._shown, refresh=True)

    def eta_seconds(self) -> float | None:
        """Seconds left at the mean rate since the first step (None before two steps)."""
        if not self.enabled:
            return None
        done = self._bar.n - self._bar.initial
        elapsed = self._bar._time() - self._bar.start_t
        if done <= 0 or elapsed <= 0:
            return None
        return (self._bar.total - self._bar.n) * elapsed / done

    def write(self, line: str) -> None:
        """A line above the bar (the bar is redrawn below it)."""
        if self.enabled:
            self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_results(path: str, results: dict) -> None:
    """JSON (sorted keys, indent 2) written atomically: temp file in the same dir, then replace."""
    text = json.dumps(to_builtin(results), sort_keys=True, indent=2) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as temp_file:
            temp_file.write(text)
        os.chmod(temp_path, 0o644)  # mkstemp creates 0600
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
