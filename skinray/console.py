"""What a person sees: skinray's own lines, warnings and errors; Ray's INFO logs go to its log files.

By default every process skinray runs in (the driver, Ray Train workers, scoring actors) lowers
the console level of Ray Train, Ray Data, Ray core and TensorFlow to WARNING. Nothing is lost:
Ray writes the same records to the session's log folder (`ray_log_folder()`, printed once per
command). `skinray --verbose ...` or SKINRAY_VERBOSE=1 shows everything, as Ray prints it.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

VERBOSE_ENV = "SKINRAY_VERBOSE"

log = logging.getLogger("skinray")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def say(message: str, tag: str = "skinray") -> None:
    """Progress lines of skinray's, on stdout: `[skinray] message` (or another tag, such as the
    pipeline's), each line of the message tagged."""
    print(tagged(message, tag), flush=True)


def tagged(message: str, tag: str = "skinray") -> str:
    """`[tag] line` for each line of the message: the form of every skinray console line (a Train
    worker logs it through Ray Train's logger, which its driver prints once)."""
    return "\n".join(f"[{tag}] {line}" for line in message.split("\n"))


def warn(message: str) -> None:
    """One warning, on stderr (stdout stays the command's output): `[skinray] warning: message`."""
    print(f"[skinray] warning: {message}", file=sys.stderr, flush=True)


def set_verbose(on: bool) -> None:
    """Chosen once, by the command line; inherited by the local cluster's workers."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


class Redacting:
    """A text stream that writes everything through `redact` (`storage.redact`): no credential a URI
    carried reaches the console, whichever line (skinray's, Ray's, a traceback) holds it."""

    def __init__(self, stream, redact):
        self.stream, self.redact = stream, redact

    def write(self, text: str) -> int:
        self.stream.write(self.redact(text) if "://" in text else text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def setup_driver(redact) -> None:
    """The command line's process: its console passed through `redact`; skinray's warnings on
    stderr; Ray and TensorFlow quiet. (The console module imports nothing of skinray's: every
    module may write through it.)"""
    if not isinstance(sys.stdout, Redacting):
        sys.stdout, sys.stderr = Redacting(sys.stdout, redact), Redacting(sys.stderr, redact)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_SkinrayFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    quiet_process()


def quiet_process() -> None:
    """Lowers Ray's and TensorFlow's console output in this process, unless verbose.

    Called before TensorFlow is imported where possible (its C++ level is read at import), and
    again after Ray Data or Ray Train configure their loggers (they install console handlers).
    """
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING; errors still show
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data's console handler is its own; Ray Train's is shared with the root logger (which
    # carries skinray's worker lines) and is lowered by `train_logging_config` instead.
    for handler in logging.getLogger("ray.data").handlers:
        if not _writes_a_file(handler):
            handler.setLevel(max(handler.level, logging.WARNING))
    # Some Ray modules name their logger by file path (Ray Train's per-report "Reporting training
    # result ..."): the level filter above misses them; the root console handler drops their INFO.
    for handler in logging.getLogger().handlers:
        if not _writes_a_file(handler) and not any(isinstance(f, _RayPathInfo) for f in handler.filters):
            handler.addFilter(_RayPathInfo())


def load_tensorflow(expect_gpu: bool) -> None:
    """Imports TensorFlow and finds its devices; on a CPU-only run, without its CUDA chatter.

    TensorFlow's C++ logs lines about missing CUDA drivers before its log level applies, at
    import and when it first looks for devices. When the run asked for no GPU they are noise, so
    stderr is closed meanwhile; when it did ask for one they are the diagnosis, and stay. (Where
    Ray imports TensorFlow first, as Ray Train's TensorFlow backend does, its import lines show.)
    """
    if verbose() or expect_gpu:
        import tensorflow as tf

        tf.config.list_physical_devices()
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# TensorFlow's C++ start-up lines, written before any log level applies (TF_CPP_MIN_LOG_LEVEL
# included): the absl notice, oneDNN, missing CUDA drivers on a CPU node, the CPU's instructions.
STARTUP_NOISE = re.compile(
    rb"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} \S+ +\d+ (?:port|cudart_stub|cpu_feature_guard)\.cc:\d+\] .*"
    rb"|To enable the following instructions: .*)\r?\n?$"
)


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook` for the workers of skinray's commands: each worker's stderr
    passes through a filter that drops TensorFlow's start-up lines (every other line, errors and
    tracebacks included, goes through). Not in the driver, whose progress bars rewrite one line."""
    if verbose() or getattr(setup_worker, "installed", False):
        return
    setup_worker.installed = True
    sys.stderr.flush()
    read, write = os.pipe()
    target = os.dup(2)
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not STARTUP_NOISE.match(line):
                    os.write(target, line)

    thread = threading.Thread(target=pump, name="skinray-stderr", daemon=True)
    thread.start()

    def drain() -> None:  # at exit, everything written so far reaches the real stderr
        sys.stderr.flush()
        os.dup2(target, 2)  # closes the pipe's last writer: the pump reads to its end
        thread.join(timeout=2)

    atexit.register(drain)


def ray_init_options() -> dict:
    """ray.init's own console level (it prints the dashboard address and the like at INFO), and for
    the local cluster skinray starts, its workers' stderr filter (`setup_worker`)."""
    if verbose():
        return {}
    return {"logging_level": logging.WARNING}


def worker_options() -> dict:
    """This driver's workers run `setup_worker` first (Ray's `worker_process_setup_hook`): on a local
    cluster, or a cluster this process joins as a new driver. Not inside a submitted Ray job, whose
    runtime environment the submitter chose (add the hook there: docs/training.md)."""
    if verbose() or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    return {"runtime_env": {"worker_process_setup_hook": "skinray.console.setup_worker"}}


def train_logging_config():
    """Ray Train's console level: its per-report lines (`TrainingReport(...)`) are INFO."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def ray_log_folder() -> str:
    """Where this Ray session writes its logs (Ray Data's in ray-data/, Ray Train's in train/)."""
    try:
        import ray

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # a remote cluster: the head node's folder
        return "/tmp/ray/session_latest/logs (on the head node)"


def announce_log_folder() -> None:
    if not verbose():
        # On stderr: stdout stays the command's result (`data check --json` prints JSON there).
        print(
            f"[skinray] Ray's own logs: {ray_log_folder()} (skinray --verbose shows them here)",
            file=sys.stderr,
            flush=True,
        )


def _writes_a_file(handler: logging.Handler) -> bool:
    """Ray's session file handlers create their FileHandler lazily; they are named *FileHandler."""
    return "FileHandler" in type(handler).__name__


class _RayPathInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/ray/" not in record.name


class _SkinrayFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"[skinray] {level}{record.getMessage()}"
