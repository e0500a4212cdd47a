"""The run directory: config.json (and the check that a resumed run is the same model),
results.json and curves.png."""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections

from cliquejax import report

MODEL_FIELDS = ("model", "data.name", "data.image_size")


class ConfigMismatchError(ValueError):
    pass


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was made with: `workdir/config.json`, the run's identity. Evaluation,
    export and prediction read it, so they need only `--workdir`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise ConfigMismatchError(f"--workdir={workdir!r} does not exist; allowed: a run "
                                  "directory written by launch.py (it holds config.json)")
    try:
        with open(path) as handle:
            return ml_collections.ConfigDict(json.load(handle))
    except FileNotFoundError:
        raise ConfigMismatchError(f"{path} not found: {workdir!r} holds no run; allowed: a run "
                                  "directory written by launch.py") from None
    except (OSError, ValueError) as error:
        raise ConfigMismatchError(f"{path} cannot be read ({error}); allowed: the "
                                  "config.json that launch.py wrote") from None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def model_differences(old: dict, new: dict) -> list[str]:
    """Fields that change the network between two config dicts (model.*, data set, size)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    relevant = [k for k in keys if any(k == f or k.startswith(f + ".") for f in MODEL_FIELDS)]
    return [f"{k}: {flat_old.get(k, '<unset>')!r} -> {flat_new.get(k, '<unset>')!r}"
            for k in relevant if flat_old.get(k) != flat_new.get(k)]


def _check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--workdir={workdir!r} cannot be written ({error.strerror}); "
                         "allowed: a directory this user can create and write") from None


def prepare(config, workdir: str, overwrite: bool) -> None:
    """Refuses a workdir whose config.json describes another model (unless `overwrite`,
    which moves the old run aside, never deletes it)."""
    _check_writable(workdir)
    path = os.path.join(workdir, "config.json")
    new = _config_dict(config)
    if os.path.exists(path):
        with open(path) as handle:
            old = json.load(handle)
        differences = model_differences(old, new)
        if differences and not overwrite:
            raise ConfigMismatchError(
                f"{workdir} holds a run of another model ({'; '.join(differences)}); use "
                "another --workdir, or --overwrite to move the old run aside")
        if differences and jax.process_index() == 0:
            aside = os.path.join(workdir, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(aside)
            for name in os.listdir(workdir):
                if not name.startswith("previous-"):
                    shutil.move(os.path.join(workdir, name), aside)


def write_config(config, workdir: str) -> None:
    """config.json, once the config has been validated (the model and data built)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as handle:
            json.dump(_config_dict(config), handle, indent=2, sort_keys=True)


def results(trainer, resumed: bool, start_step: int, wall_seconds: float) -> dict:
    final = trainer.meta.get("final", {})
    steps = int(trainer.state["step"])
    train_seconds = trainer.meta.get("train_seconds", 0.0)
    trained_now = steps - start_step
    return {
        "final_test_accuracy": final.get("accuracy"), "final_test_loss": final.get("loss"),
        "best_test_accuracy": trainer.meta.get("best_accuracy"),
        "best_test_loss": trainer.meta.get("best_loss"),
        "best_epoch": trainer.meta.get("best_epoch"),
        "epochs": steps / trainer.steps_per_epoch, "steps": steps,
        "wall_seconds": wall_seconds, "resumed": resumed,
        "images_per_second": trainer.global_batch * trained_now / max(train_seconds, 1e-9)
        if trained_now else None,
        "params_fingerprint": trainer.fingerprint(),
        "devices": jax.device_count(), "processes": jax.process_count(),
    }


def finish(workdir: str, results_dict: dict) -> None:
    report.write_results(os.path.join(workdir, "results.json"), results_dict)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        report.plot_curves(metrics, os.path.join(workdir, "curves.png"),
                           title=os.path.basename(os.path.abspath(workdir)))
