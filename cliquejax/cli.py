"""Command-line front ends (launch.py, cliquejax.summary): mistakes a user can make become
one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import sys
import traceback

USAGE_EXIT = 2


def one_line(error: BaseException) -> str:
    """`error` as a single line, without absl's and Python's decorations."""
    if isinstance(error, SyntaxError):
        where = f"{error.filename}, line {error.lineno}" if error.filename else "?"
        return f"{error.msg} ({where})"
    if isinstance(error, OSError) and error.strerror:
        name = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{name}"
    text = " ".join(str(error).replace("\\n", " ").replace("\\", "").split())
    return text[1:-1] if text[:1] in "'\"" and text[-1:] == text[:1] else text


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def first_line(error: BaseException, limit: int = 300, typed: bool = False) -> str:
    """The first line (at most `limit` characters) of the error at the root of `error`'s
    causes, after `Type: ` where `typed`; the type alone for an error without a message."""
    root = _root_cause(error)
    lines = str(root).strip().splitlines()
    if not typed:
        return lines[0][:limit] if lines else type(root).__name__
    return f"{type(root).__name__}: {lines[0][:limit] if lines else ''}"


# The configs that ship with the package, given by name (`--config=mbclique_cifar10`).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list[str]:
    return sorted(name[:-3] for name in os.listdir(CONFIGS_DIR)
                  if name.endswith(".py") and not name.startswith("_"))


def config_file(value: str) -> str:
    """`--config`'s value with a shipped config's name (`mbclique_cifar10`, with or without
    `.py`, plus any `:argument`) made its file's path; a path that exists, or anything else,
    unchanged (a file of the user's wins over a shipped name)."""
    name, colon, argument = value.partition(":")
    stem = name[:-3] if name.endswith(".py") else name
    if os.path.exists(name) or os.sep in name or stem not in shipped_configs():
        return value
    return os.path.join(CONFIGS_DIR, f"{stem}.py") + colon + argument


def config_file_error(path: str, error: BaseException) -> str:
    file_name = path.split(":", 1)[0]
    reason = "no such file" if not os.path.isfile(file_name) else one_line(_root_cause(error))
    return (f"error: --config={path} cannot be loaded ({reason}); allowed: a Python file "
            f"with get_config(), or a shipped config's name ({', '.join(shipped_configs())})")


def _config_argument() -> str:
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "?")


def load_config_flag(flag_values, name: str = "config"):
    """The value of a config-file flag, loaded now (ml_collections defers a missing file's
    error to the first access); None when the flag was not given."""
    path = flag_values[name].config_filename if flag_values[name].present else None
    if path is None:
        return None
    try:
        config = flag_values[name].value
        config.to_json_best_effort()  # touches every field: a deferred error surfaces here
        unused = _ignored_config_argument(path)
    except Exception as error:  # noqa: BLE001 - a user's file can raise anything
        fail(config_file_error(path, error))
    for field in _repeated_overrides():
        value = config
        for key in field[len("--config."):].split("."):
            value = value.get(key) if hasattr(value, "get") else None
        if isinstance(value, (tuple, list)):
            fail(f"error: {field} is given more than once; allowed: each list field once "
                 f"(repeated, the lists are joined: {field}={','.join(map(str, value))})")
    if unused:
        fail(f"error: --config={path}: {os.path.basename(path.split(':', 1)[0])} takes no "
             f"argument ({unused!r} changes nothing); allowed: --config="
             f"{path.split(':', 1)[0]} without ':{unused}'")
    return config


def _ignored_config_argument(path: str) -> str | None:
    """The `:argument` of `--config=file.py:argument` when the file's get_config ignores it
    (its config equals the one without the argument), else None."""
    import importlib.util
    import inspect

    file_name, _, argument = path.partition(":")
    if not argument:
        return None
    spec = importlib.util.spec_from_file_location("_cliquejax_config_check", file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parameters = list(inspect.signature(module.get_config).parameters.values())
    if parameters and parameters[0].default == argument:
        return None  # the default, given explicitly
    plain = module.get_config().to_json_best_effort()
    return argument if module.get_config(argument).to_json_best_effort() == plain else None


def workdir_path(workdir) -> str:
    """`--workdir` as the absolute path written to: `~` expanded as a shell would (a flag's
    `--workdir=~/x` reaches the program unexpanded), so what is printed is where it is."""
    if not isinstance(workdir, str) or not workdir.strip():
        fail(f"error: --workdir={workdir!r} is empty; allowed: a directory path")
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"error: --workdir={workdir} is a file; allowed: a directory (new or a run)")
    return path


def refuse_arguments(argv) -> None:
    """Words of the command line that are no flag (absl leaves them in `argv` after the
    program's name): a `config.x=y` without its `--`, the rest of an unquoted path with a
    space. Ignored, they would run something else than what was asked."""
    if len(argv) <= 1:
        return
    extra = argv[1]
    if extra.startswith("config."):
        fail(f"error: {extra!r} is not a flag; allowed: --{extra}")
    given = sys.argv[1:]
    after = given[given.index(extra) - 1] if extra in given and given.index(extra) else None
    where = f" (it follows {after}: a value with spaces must be quoted)" if after else ""
    fail(f"error: {extra!r} is not a flag{where}; allowed: flags only, each --name=value "
         "(quoted where the value has spaces)")


INTERRUPTED = "error: interrupted (Ctrl-C)"


def _exit_interrupted(signum, frame) -> None:
    del signum, frame
    os.write(2, f"{INTERRUPTED}; nothing was changed\n".encode())
    os._exit(130)


def exit_on_interrupt() -> None:
    """Ctrl-C ends the program at once with one line and exit code 130, instead of a
    KeyboardInterrupt traceback from wherever it lands (an import, a compilation). For
    commands whose only writes are atomic replacements (export, predict) or none."""
    import signal

    signal.signal(signal.SIGINT, _exit_interrupted)


def config_overrides() -> list[str]:
    """The `--config.x=y` arguments, in the order given."""
    return [argument for argument in sys.argv[1:] if argument.startswith("--config.")]


def _repeated_overrides() -> list[str]:
    """`--config.x` fields given more than once. A repeated scalar takes its last value, as
    absl documents; a repeated list is appended to (widths=16,16,32 then widths=32 gives
    16,16,32,32): `load_config_flag` refuses that."""
    seen, repeated = set(), []
    for argument in sys.argv[1:]:
        if argument.startswith("--config."):
            field = argument.split("=", 1)[0]
            if field in seen and field not in repeated:
                repeated.append(field)
            seen.add(field)
    return repeated


def quiet_logging() -> None:
    """Only the command's own lines: the libraries' INFO logging (Orbax, TFDS, JAX's
    backend probing) off."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax", "absl", "orbax", "tensorflow_datasets", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(message: str, code: int = USAGE_EXIT):
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _find_config_package() -> None:
    """Config files import their siblings as `configs.<name>` (as big_vision's do): the
    directory holding the config file's `configs/` goes first on sys.path, so a config given
    by any path loads from any working directory, a fork's copy importing its own siblings."""
    path = _config_argument().split(":", 1)[0]
    configs_dir = os.path.dirname(os.path.abspath(path))
    if path != "?" and os.path.basename(configs_dir) == "configs":
        sys.path.insert(0, os.path.dirname(configs_dir))


def _raised_in_config_file(error: BaseException) -> bool:
    config_file = os.path.abspath(_config_argument().split(":", 1)[0])
    return any(os.path.abspath(frame.filename) == config_file
               for frame in traceback.extract_tb(error.__traceback__))


def run_app(main) -> None:
    """absl's app.run(main), with mistakes raised while the flags and the config file are
    parsed (a bad override, a config file with a syntax error or a failing import) as
    one-line errors."""
    from absl import app, flags

    # absl's --help/--helpshort usage is the main module's docstring: an installed console
    # script (cliquejax-train) is a generated module without one, so it gets main's module's
    entry = sys.modules["__main__"]
    if not getattr(entry, "__doc__", None):
        entry.__doc__ = sys.modules[main.__module__].__doc__
    sys.argv[1:] = [f"--config={config_file(a.split('=', 1)[1])}" if a.startswith("--config=")
                    else a for a in sys.argv[1:]]
    _find_config_package()
    overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
    if overrides and not any(a.startswith("--config=") for a in sys.argv[1:]):
        fail(f"error: {overrides[0]} needs --config=FILE (overrides change a config file's "
             "values; a run resumed with --workdir alone keeps its own config.json); "
             "allowed: --config=<name or file> with the overrides")
    try:
        # absl's own parser prints two lines (FATAL ..., Pass --helpshort ...) and exits 1
        app.run(main, flags_parser=lambda argv: flags.FLAGS(argv))
    except SyntaxError as error:
        fail(config_file_error(_config_argument(), error))
    except ImportError as error:
        if not _raised_in_config_file(error):
            raise  # a broken installation, not the user's config: keep the whole story
        fail(config_file_error(_config_argument(), error))
    except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as error:
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        text = one_line(error)
        if isinstance(error, flags.Error) and "--config" not in text:
            fail(f"error: {text.rstrip('.')}; allowed: the flags --helpshort lists")
        if "Error whilst parsing config file" in text or not overrides:
            fail(config_file_error(_config_argument(), error))
        # the override the error is about (absl names it, or its last key quoted), else all
        field = lambda override: override.split("=", 1)[0]  # noqa: E731
        named = ([o for o in overrides if field(o) + "=" in text]
                 or [o for o in overrides if repr(field(o).rsplit(".", 1)[-1]) in text]
                 or overrides)
        fail(f"error: bad config override {' '.join(named)}: {text}")
