"""Metric logs, curve plots, result files and the progress bar, on real files."""

import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax.report import (
    MetricWriter,
    ProgressBar,
    plot_curves,
    read_metrics,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def event_files(directory):
    return [name for name in os.listdir(directory) if name.startswith("events.out.tfevents")]


def test_metric_writer_writes_jsonl_and_events(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(10, {"loss": np.float32(0.5), "accuracy": jnp.asarray(0.75), "epoch": 0.5},
                 split="train")
    writer.write(20, {"loss": 0.25, "accuracy": np.float64(0.875)}, split="test")
    writer.flush()
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "split": "train", "loss": 0.5, "accuracy": 0.75, "epoch": 0.5},
        {"step": 20, "split": "test", "loss": 0.25, "accuracy": 0.875},
    ]
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[1]["split"] == "test"
    events = event_files(tmp_path)
    assert len(events) == 1 and (tmp_path / events[0]).stat().st_size > 0


def read_scalars(event_path):
    """(tag, step, value) of every scalar in a TFRecord event file (8-byte length, 4-byte
    length CRC, payload, 4-byte payload CRC per record)."""
    from tensorboardX.proto.event_pb2 import Event

    data, offset, scalars = event_path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        scalars += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return scalars


def test_metric_writer_events_hold_the_scalars(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(3, {"loss": 1.5, "accuracy": np.float32(0.25), "note": "text"}, split="train")
    writer.write(4, {"loss": 0.5}, split="test")
    writer.close()
    [events] = event_files(tmp_path)
    assert read_scalars(tmp_path / events) == [
        ("train/loss", 3, 1.5), ("train/accuracy", 3, 0.25), ("test/loss", 4, 0.5)]


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(str(workdir), enabled=False)
    writer.write(1, {"loss": 1.0}, split="train")
    writer.flush()
    writer.close()
    assert not workdir.exists()


def write_synthetic_metrics(path, epochs, with_test=True):
    with MetricWriterClosing(str(path)) as writer:
        for epoch in range(1, epochs + 1):
            step = epoch * 100
            writer.write(step, {"loss": 2.0 / epoch, "accuracy": 1 - 0.5 / epoch,
                                "lr": 0.1 / epoch, "epoch": float(epoch)}, split="train")
            if with_test:
                writer.write(step, {"loss": 2.5 / epoch, "accuracy": 1 - 0.6 / epoch,
                                    "epoch": float(epoch)}, split="test")
    return path / "metrics.jsonl"


class MetricWriterClosing(MetricWriter):
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@pytest.mark.parametrize("epochs, with_test", [(5, True), (4, False), (1, True), (1, False)])
def test_plot_curves_writes_png(tmp_path, epochs, with_test):
    metrics_path = write_synthetic_metrics(tmp_path, epochs, with_test)
    png_path = tmp_path / "curves.png"
    plot_curves(str(metrics_path), str(png_path), title="synthetic run")
    data = png_path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_curves_without_epoch_or_lr(tmp_path):
    metrics_path = tmp_path / "metrics.jsonl"
    records = [{"step": 5, "split": "train", "loss": 1.0, "acc": 0.5}]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    png_path = tmp_path / "curves.png"
    plot_curves(str(metrics_path), str(png_path))
    assert png_path.read_bytes().startswith(PNG_MAGIC)


def test_write_results_is_sorted_json_with_builtin_numbers(tmp_path):
    path = tmp_path / "out" / "results.json"
    results = {"best_error": np.float32(0.0625), "final": {"accuracy": jnp.asarray(0.5)},
               "epochs": np.int64(3), "name": "cliquenet"}
    write_results(str(path), results)
    text = path.read_text()
    assert json.loads(text) == {"best_error": 0.0625, "epochs": 3,
                                "final": {"accuracy": 0.5}, "name": "cliquenet"}
    assert text.index('"best_error"') < text.index('"epochs"') < text.index('"final"')
    assert '\n  "best_error"' in text
    write_results(str(path), {"replaced": True})
    assert json.loads(path.read_text()) == {"replaced": True}
    assert os.listdir(path.parent) == ["results.json"]


def test_progress_bar_enabled_writes_to_stderr(capsys):
    bar = ProgressBar(total_steps=5, desc="train", batch_size=64)
    for step in range(5):
        bar.update(loss=np.float32(1.0 / (step + 1)), acc=jnp.asarray(0.5))
    assert bar.images_per_second() > 0
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "train" in captured.err and "5/5" in captured.err
    assert "loss" in captured.err and "img/s" in captured.err


def test_progress_bar_resumes_from_initial(capsys):
    with ProgressBar(total_steps=10, initial=7, desc="resume") as bar:
        bar.update(3, loss=0.1)
    assert "10/10" in capsys.readouterr().err


def test_progress_bar_disabled_is_silent(capsys):
    bar = ProgressBar(total_steps=5, enabled=False, batch_size=64)
    for _ in range(5):
        bar.update(loss=1.0)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
