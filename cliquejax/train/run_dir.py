"""The run directory: its config.json is the run's identity.

Training resumes only with a config that computes the same run: a change to the model,
data, optimizer, schedule, seed, batch size, epochs or precision is refused (with the
fields and the two ways out); the fields in `ALLOWED_CHANGES`, which cannot change the
parameters a run ends with, may change and each change is recorded in `changes.jsonl`.
Evaluation and export read config.json, so they need only `--workdir`. A lock file
(`run.lock`, holding the pid) keeps a second process off a workdir that is training.

The data is part of the run: `data.json` (`dataset_for_run`) holds the data set's shapes,
classes and normalisation as measured at the start, and a fingerprint of what was read.
Evaluation, predict and export normalise with the recorded statistics (`normalization`); a
resume or evaluation whose data no longer matches the fingerprint is refused, naming the
change. A run without a checkpoint (a start that failed) binds nothing: the next command
starts it anew. `--overwrite` moves aside a run, never a directory that holds no run.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import shutil
import socket
import time

import jax
import ml_collections

from cliquejax import cli, kernels, platform, report
from cliquejax.train import optim

# Fields that may differ between a run and the config resuming or evaluating it: how often
# to log, evaluate and checkpoint, how many checkpoints to keep, where to stop
# (`max_steps` stops on the same trajectory: the schedule is set by epochs), how to batch
# the evaluation, how many loader processes and where the TFDS files, the npz file or the
# image folder lie (the data is identified by its content: data.json's fingerprint, checked).
ALLOWED_CHANGES = ("train.log_every_steps", "train.eval_every_epochs",
                   "train.checkpoint_every_epochs", "train.keep_checkpoints",
                   "train.max_steps", "train.eval_batch_size", "data.worker_count",
                   "data.data_dir", "data.path", "train.peak_flops",
                   "train.checkpoint_every_steps", "train.profile_steps")
# Schedules whose rate at a step does not depend on train.epochs (constant; SGDR's cycles are
# set by schedule.first_period_epochs): a run resumed with more (or fewer) epochs trains
# the steps it trained with the same rates, so changing train.epochs on resume is allowed.
EPOCH_FREE_SCHEDULES = ("constant", "sgdr")
# Fingerprint entries that say where the data was read, not what it is.
LOCATION_KEYS = ("file", "folder")
# Groups whose every field shapes the result: a field present on one side only (a config
# written before the field existed) counts as a difference there, and not elsewhere.
RESULT_GROUPS = ("model", "data", "optimizer", "schedule", "seed", "train.batch_size",
                 "train.epochs", "train.compute_dtype", "train.remat",
                 "train.bn_statistics")
# A field that a config.json written before the field existed lacks had the value in force
# then: for a model field, its module's default (a field is added with the default that
# reproduces the network before it, so it needs no entry here); for other fields, or a model
# field whose old value is not its default, this table. Resume, evaluation and `reproduce`
# read absent fields through `absent_value`, so an old run is the run it was.
BEFORE_THE_FIELD = {
    "data.augment": "cifar",  # flip + pad-and-crop, the only augmentation then
    "schedule.sgdr_restarts": "summed",
    "optimizer.kwargs": "",
    "optimizer.clip_latent": False,
    "train.bn_statistics": "global",  # one BatchNorm over the global batch, as 8 devices = 1
}
ABSENT = "<unset>"  # a field neither side has, nor a default for
CHANGES_FILE = "changes.jsonl"
LOCK_FILE = "run.lock"
DATA_FILE = "data.json"  # what the run read: shapes, classes, normalisation, fingerprint
# What a run directory holds (`holds_run`): a directory with none of these is not a run.
RUN_ENTRIES = ("config.json", "checkpoints", DATA_FILE, "metrics.jsonl", "results.json")


class ConfigMismatchError(ValueError):
    pass


class DataChangedError(ValueError):
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
            return ml_collections.ConfigDict(config_tree(path, json.load(handle)))
    except FileNotFoundError:
        raise ConfigMismatchError(f"{path} not found: {workdir!r} holds no run; allowed: a run "
                                  "directory written by launch.py") from None
    except (OSError, ValueError) as error:
        raise ConfigMismatchError(f"{path} cannot be read ({error}); allowed: the "
                                  "config.json that launch.py wrote") from None


CONFIG_GROUPS = ("model", "data", "train")  # in every config.json launch.py wrote


def config_tree(path: str, tree):
    """`tree` (config.json's JSON) if it is a config, else a one-line error: valid JSON of
    another kind used to fail later with an error naming no file, or a traceback."""
    if not isinstance(tree, dict) or not all(isinstance(tree.get(group), dict)
                                             for group in CONFIG_GROUPS):
        kind = "an object" if isinstance(tree, dict) else f"a JSON {type(tree).__name__}"
        raise ConfigMismatchError(
            f"{path} is not a run's config ({kind} without the groups "
            f"{', '.join(CONFIG_GROUPS)}); allowed: the config.json that launch.py wrote")
    return tree


class WorkdirLockedError(ValueError):
    pass


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"model.k": 36, ...}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _in(name: str, groups) -> bool:
    return any(name == group or name.startswith(group + ".") for group in groups)


def _comparable(tree: dict) -> dict:
    """`tree` with `optimizer.kwargs` as the arguments it gives, so that a config's string
    (`"b1=0.9"`, `""`) equals the dict an older run's config.json holds (`{"b1": 0.9}`, `{}`),
    and `train.remat=auto` / `train.compute_dtype=auto` as what they resolve to on this
    backend, so that a run written before `auto` existed (`layer` on a CPU) or recorded
    what ran (`resolve_auto`) is the run today's config file makes."""
    train = tree.get("train")
    if isinstance(train, dict) and train.get("remat") == "auto":
        tree = {**tree, "train": {**train, "remat": kernels.remat("auto")}}
    train = tree.get("train")
    if isinstance(train, dict) and train.get("compute_dtype") == "auto":
        tree = {**tree, "train": {**train, "compute_dtype": kernels.compute_dtype("auto")}}
    optimizer = tree.get("optimizer")
    if not isinstance(optimizer, dict) or "kwargs" not in optimizer:
        return tree
    try:  # through JSON, as config.json holds them: tuples become lists
        kwargs = json.loads(json.dumps(optim.parse_kwargs(optimizer["kwargs"],
                                                          optimizer.get("name"))))
    except (TypeError, ValueError):
        return tree  # compared as written; building the optimizer refuses it
    return {**tree, "optimizer": {**optimizer, "kwargs": kwargs}}


def absent_value(flat_config: dict, field: str):
    """The value of `field` in a run whose flattened config.json (`flat_config`) lacks it:
    `BEFORE_THE_FIELD`, else for a model field its module's default, else `ABSENT`."""
    if field in BEFORE_THE_FIELD:
        return BEFORE_THE_FIELD[field]
    name = flat_config.get("model.name")
    if not field.startswith("model.") or not isinstance(name, str):
        return ABSENT
    from cliquejax import models  # imported here: `reproduce` starts without flax

    try:
        module = models.get_model(name)
    except ValueError:
        return ABSENT
    default = {f.name: f.default for f in dataclasses.fields(module)}.get(
        field.removeprefix("model."), dataclasses.MISSING)
    if default is dataclasses.MISSING:
        return ABSENT
    return list(default) if isinstance(default, tuple) else default  # as JSON holds it


def config_differences(old: dict, new: dict) -> tuple[list[str], dict]:
    """(refused, allowed) between two config dicts: `refused` lists the fields that change
    the run as `name: old -> new`; `allowed` maps the other changed fields to [old, new]. A
    field the old config lacks (written before it existed) has its `absent_value`."""
    flat_old, flat_new = flatten(_comparable(old)), flatten(_comparable(new))
    refused, allowed = [], {}
    for key in sorted(set(flat_old) | set(flat_new)):
        before = flat_old[key] if key in flat_old else absent_value(flat_old, key)
        after = flat_new.get(key, ABSENT)
        if before == after:
            continue
        one_sided = before == ABSENT or after == ABSENT
        if _in(key, ALLOWED_CHANGES) or (one_sided and not _in(key, RESULT_GROUPS)):
            allowed[key] = [before, after]
        elif key == "train.epochs" and not one_sided:
            schedule = flat_new.get("schedule.name")
            if schedule in EPOCH_FREE_SCHEDULES:
                allowed[key] = [before, after]
            else:
                refused.append(f"{key}: {before!r} -> {after!r} (schedule.name={schedule!r} "
                               "spreads over train.epochs: the steps trained had other rates; "
                               f"{' and '.join(EPOCH_FREE_SCHEDULES)} schedules may change it)")
        else:
            refused.append(f"{key}: {before!r} -> {after!r}")
    return refused, allowed


def read_config_json(workdir: str) -> dict | None:
    """The run's config.json as a dict, None if there is none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return config_tree(path, json.load(handle))
    except ConfigMismatchError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigMismatchError(f"{path} cannot be read ({error}); allowed: the "
                                  "config.json that launch.py wrote (or --overwrite to move "
                                  "the run aside)") from None


def config_for_run(given, workdir: str, what: str = "--mode=eval"):
    """The config to evaluate or export `workdir` with: its config.json, or `given` if it
    agrees with it field by field (fields in ALLOWED_CHANGES may differ)."""
    stored = load_config(workdir)
    if given is None:
        return stored
    refused, _ = config_differences(_config_dict(stored), _config_dict(given))
    if refused:
        raise ConfigMismatchError(
            f"--config differs from the run in {workdir} ({'; '.join(refused)}); {what} "
            "reads the run's config.json: drop --config, or give the config it was trained "
            "with")
    return given


def check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--workdir={workdir!r} cannot be written ({error.strerror}); "
                         "allowed: a directory this user can create and write") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class WorkdirLock:
    """`workdir/run.lock` holding "pid host" while a process trains in `workdir` (taken by
    process 0 only). A lock whose pid no longer runs on this host is stale and replaced."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        if jax.process_index() != 0:
            return
        mine = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    pid, host = holder
                    raise WorkdirLockedError(  # noqa: B904 - not a failure of the open
                        f"{os.path.dirname(self.path)} is in use by process {pid} on {host} "
                        f"(lock file {self.path}); wait for it to end, or use another "
                        "--workdir (delete the lock file only if no such process runs)")
                try:
                    os.remove(self.path)  # stale: its process has ended
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(handle, "w") as lock_file:
                lock_file.write(mine)
            self.held = True
            return
        raise WorkdirLockedError(f"cannot take the lock file {self.path}; allowed: a workdir "
                                 "no other process is starting in")

    def _holder(self):
        """(pid, host) of a live holder, None when the lock is stale."""
        try:
            with open(self.path) as lock_file:
                fields = lock_file.read().split()
            pid, host = int(fields[0]), fields[1]
        except (OSError, ValueError, IndexError):
            # Being written this very moment, or garbage: garbage older than a minute is stale.
            try:
                young = time.time() - os.path.getmtime(self.path) < 60
            except OSError:
                return None
            return ("?", "this host") if young else None
        if host != socket.gethostname():
            return pid, host  # cannot be checked from here: assume it runs
        return (pid, host) if _pid_alive(pid) and pid != os.getpid() else None

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def holds_checkpoint(workdir: str) -> bool:
    """Whether `workdir/checkpoints` holds a checkpoint (a step directory)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def holds_run(workdir: str) -> bool:
    return any(os.path.exists(os.path.join(workdir, name)) for name in RUN_ENTRIES)


def check_overwrite(workdir: str) -> None:
    """`--overwrite` moves aside a run, and nothing else: a directory that holds other files
    (a home directory, a data folder) is refused, naming some of them."""
    if not os.path.isdir(workdir) or holds_run(workdir):
        return
    others = [name for name in sorted(os.listdir(workdir))
              if not name.startswith("previous-") and name != LOCK_FILE
              and not name.startswith(".write-test-")]
    if others:
        raise ConfigMismatchError(
            f"--overwrite: {workdir} holds no run (no config.json or checkpoints/) but other "
            f"files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); allowed: "
            "--overwrite on a run directory; choose a new or empty --workdir")


def check_resume(config, workdir: str, overwrite: bool) -> dict:
    """Refuses to resume `workdir` with a config that changes the run (unless `overwrite`);
    returns the allowed changes ({field: [old, new]}) to record. A run without a checkpoint
    (a start that failed) has trained nothing: its config.json does not bind the next."""
    if overwrite:
        check_overwrite(workdir)
        return {}
    if not holds_checkpoint(workdir):
        return {}
    old = read_config_json(workdir)
    if old is None:
        return {}
    refused, allowed = config_differences(old, _config_dict(config))
    if refused:
        raise ConfigMismatchError(
            f"{workdir} holds a run made with another config ({'; '.join(refused)}); "
            "resuming would mix two runs: use another --workdir, or --overwrite to move the "
            "old run aside and start anew")
    return allowed


def move_aside(workdir: str) -> str | None:
    """Moves everything of the old run in `workdir` into `workdir/previous-<time>/` (never
    deletes); returns that directory, None when there was nothing to move."""
    names = [name for name in os.listdir(workdir)
             if not name.startswith("previous-") and name != LOCK_FILE]
    if not names or jax.process_index() != 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = os.path.join(workdir, f"previous-{stamp}"), 1
    while os.path.exists(aside):
        aside, suffix = os.path.join(workdir, f"previous-{stamp}-{suffix}"), suffix + 1
    os.makedirs(aside)
    for name in names:
        shutil.move(os.path.join(workdir, name), aside)
    return aside


def resolve_auto(config):
    """`config` with `train.compute_dtype=auto` as this backend resolves it (a copy where
    it changes): config.json records the precision that ran, which a resume elsewhere (a
    CPU resuming a GPU run) must keep."""
    if config.train.get("compute_dtype") != "auto":
        return config
    config = copy.deepcopy(config)
    config.train.compute_dtype = kernels.compute_dtype("auto")
    return config


def write_config(config, workdir: str, changes: dict | None = None, step: int = 0) -> None:
    """config.json, once the config has been validated (the model and data built); allowed
    changes against the previous config.json are appended to changes.jsonl."""
    if jax.process_index() != 0:
        return
    if changes:
        record = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "step": int(step), "changes": changes}
        with open(os.path.join(workdir, CHANGES_FILE), "a") as handle:
            handle.write(json.dumps(report.to_builtin(record), sort_keys=True) + "\n")
    path = os.path.join(workdir, "config.json")
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(_config_dict(config), handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


def read_data_record(workdir: str) -> dict | None:
    """The run's data.json (`data_record`), None for a run written before it existed."""
    path = os.path.join(workdir, DATA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            record = json.load(handle)
        dataset = record["dataset"]
        dataset["image_shape"] = tuple(dataset["image_shape"])
        dataset["mean"], dataset["std"] = tuple(dataset["mean"]), tuple(dataset["std"])
        from cliquejax.data.info import DatasetInfo

        DatasetInfo(**dataset)  # every field, and no other
        record["fingerprint"]  # noqa: B018 - present, or the file is not ours
        return record
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataChangedError(f"{path} cannot be read ({cli.first_line(error, 200)}); "
                               "allowed: the data.json that launch.py wrote") from None


def normalization(workdir: str):
    """(mean, std) per channel, 0..255 scale, that the run in `workdir` was trained with (its
    data.json); None for a run written before data.json. Evaluation, predict and export
    normalise with these, whatever the data set's files hold now."""
    record = read_data_record(workdir)
    if record is None:
        return None
    return record["dataset"]["mean"], record["dataset"]["std"]


def _flat_fingerprint(fingerprint: dict) -> dict:
    return flatten(json.loads(json.dumps(fingerprint)))


def data_differences(old: dict, new: dict) -> list[str]:
    """What differs between two data fingerprints, one entry per field; where the data
    lies is not a difference (the same bytes moved are the same data)."""
    flat_old, flat_new = ({key: value for key, value in _flat_fingerprint(tree).items()
                           if key.rsplit(".", 1)[-1] not in LOCATION_KEYS}
                          for tree in (old, new))
    for split in ("train", "test"):  # an image folder recorded before content hashing
        if isinstance(old.get(split), dict) and "classes" in old[split] \
                and "content" in (new.get(split) or {}):  # its names, sizes, times: the
            for tree in (flat_old, flat_new):  # file and byte counts are what compares
                for key in [k for k in tree if k.startswith((f"{split}.classes.",
                                                             f"{split}.content."))]:
                    del tree[key]
    shown = lambda value: (value[:12] + "...") if isinstance(value, str) and len(value) > 16 \
        else value  # noqa: E731
    out = []
    for key in sorted(set(flat_old) | set(flat_new)):
        if key not in flat_old:
            out.append(f"{key} added")
        elif key not in flat_new:
            out.append(f"{key} removed")
        elif flat_old[key] != flat_new[key]:
            out.append(f"{key}: {shown(flat_old[key])!r} -> {shown(flat_new[key])!r}")
    return out


def dataset_for_run(data_config, workdir: str, *, fresh: bool, read_data: bool = True,
                    accept_change: bool = False, what: str = "resuming"):
    """(DatasetInfo, data record to write or None (with `read_data=False`: the run's
    record), accepted differences) of the run in `workdir`. `fresh`: a new run, measured
    from the data now. Otherwise the recorded normalisation stands, and the data read now
    must match the recorded fingerprint (unless `accept_change`, which returns the
    differences to record); `read_data=False` (predict, export) describes the run from its
    record alone."""
    from cliquejax.data import info as data_info
    from cliquejax.data import sources

    record = None if fresh else read_data_record(workdir)
    if record is not None and not read_data:
        return data_info.DatasetInfo(**record["dataset"]), record, []
    train = sources.load_source(data_config, "train")
    test = sources.load_source(data_config, "test")
    stats = None if record is None else (record["dataset"]["mean"], record["dataset"]["std"])
    info = data_info.info_from_sources(data_config, train, test, stats)
    fingerprint = data_info.fingerprint(train, test)
    new_record = {"dataset": dataclasses.asdict(info), "fingerprint": fingerprint,
                  "class_names": data_info.label_names(train)}
    if record is None:
        return info, new_record, []
    differences = data_differences(record["fingerprint"], fingerprint)
    recorded = data_info.DatasetInfo(**record["dataset"])
    shape_change = [f"{field}: {getattr(recorded, field)!r} -> {getattr(info, field)!r}"
                    for field in ("image_shape", "num_classes")
                    if getattr(recorded, field) != getattr(info, field)]
    if shape_change or (differences and not accept_change):
        changed = shape_change or differences
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        way_out = "restore the data the run was trained on" + (
            "" if shape_change else ", or add --accept_data_change to use it as it is now "
            "(normalised as the run was; the change is recorded)")
        raise DataChangedError(
            f"the data of the run in {workdir} changed since it was recorded in {DATA_FILE} "
            f"({changed[0]}{more}); {what} would use other data than the run's: {way_out}")
    return info, (new_record if differences else None), differences


def write_data_record(workdir: str, record: dict | None) -> None:
    """data.json, written with config.json at the start of a run (atomically)."""
    if record is None or jax.process_index() != 0:
        return
    path = os.path.join(workdir, DATA_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(report.to_builtin(record), handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


def previous_results(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, "results.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def results(trainer, resumed: bool, start_step: int, wall_seconds: float) -> dict:
    """The run's results. Time and throughput cover every session of the run (the seconds
    up to each checkpoint travel in its meta); a re-run that trains no step keeps the
    figures results.json already holds."""
    final = trainer.meta.get("final", {})
    steps = int(trainer.state["step"])
    train_seconds = trainer.meta.get("train_seconds", 0.0)
    timed = trainer.meta.get("timed_steps", steps)  # each session's first step compiles
    trained_now = steps - start_step
    measured = {
        "wall_seconds": wall_seconds,
        "images_per_second": trainer.global_batch * timed / train_seconds
        if timed and train_seconds > 0 else None,
    }
    fingerprint = trainer.fingerprint()
    if not trained_now:
        previous = previous_results(trainer.workdir)
        if previous.get("steps") == steps and previous.get("params_fingerprint") == fingerprint:
            return previous  # nothing trained: the run's results stand as measured
    return {
        "final_test_accuracy": final.get("accuracy"), "final_test_loss": final.get("loss"),
        "best_test_accuracy": trainer.meta.get("best_accuracy"),
        "best_test_loss": trainer.meta.get("best_loss"),
        "best_epoch": trainer.meta.get("best_epoch"),
        "epochs": steps / trainer.steps_per_epoch, "steps": steps,
        "resumed": resumed, **measured,
        "params_fingerprint": fingerprint,
        **platform.runtime(),  # backend, device_kind, devices, processes, versions
    }


def finish(workdir: str, results_dict: dict) -> None:
    report.write_results(os.path.join(workdir, "results.json"), results_dict)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        report.plot_curves(metrics, os.path.join(workdir, "curves.png"),
                           title=os.path.basename(os.path.abspath(workdir)))
