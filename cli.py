"""How the scripts behave as command-line programs: parsing (no abbreviations; a mistyped flag is one
line naming the nearest valid one), one-line errors instead of tracebacks, Ctrl-C and SIGTERM handled
from the first moment (a flag polled at safe points once work starts), and the allocator settings.

It imports nothing heavy (no torch), so a script can install its signal handling before importing torch:
    if __name__ == "__main__":
        cli.exit_quietly_on_stop_signals()
"""

import argparse
import difflib
import multiprocessing
import os
import signal
import sys
import traceback


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit status 2, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows defaults (except empty ones and those the help text already states) and keeps the
    description's and the examples' line breaks."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """No prefix matching (--n_epoch is an error, not --n_epochs), and errors as one line without the usage
    dump: 'error: unrecognized argument --n_epoch; did you mean --n_epochs?'."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def long_flags(self):
        """Every --flag of this parser and of its sub-commands."""
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += sub.long_flags()
        return flags

    def error(self, message):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [t for t in message[len(prefix) :].split() if t.startswith("-")] or message[len(prefix) :].split()
            known = self.long_flags()
            parts = []
            for flag in flags:
                close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
                parts.append(f"{flag}" + (f"; did you mean {close[0]}?" if close else ""))
            message = f"unrecognized argument{'s' if len(parts) > 1 else ''} " + ", ".join(parts)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def describe_error(e, limit=None):
    """An exception as one line: its type and the first line of its message (cut at `limit` characters)."""
    text = str(e).strip().splitlines()[0][:limit] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def flag_adder(parser):
    """add(name, ...) for a parser: every --snake_case flag is also accepted as --dashed-case."""

    def add(name, *more, **kw):
        names = list(dict.fromkeys(v for n in (name, *more) for v in (n, n.replace("_", "-"))))
        return parser.add_argument(*names, **kw)

    return add


def run_cli(entry):
    """Run a CLI entry point (no arguments); its loader workers are ended on every way out. A CLIError is one line
    and exit status 2. Any other error
    (a bug, CUDA out of memory) is one line and status 1, and ends the loader workers too: they ignore
    SIGTERM, so otherwise the interpreter's exit would wait for them forever (TRACEBACK=1 prints the
    traceback as well). When stdout is closed early (`| head`), stop quietly with status 1, as other
    command-line tools do; files are written atomically, so none is left half-written."""
    tune_allocator()
    before = set(multiprocessing.active_children())  # a host process's own children (tests run us in-process)
    try:
        result = entry()
    except SystemExit:  # the script's own status (130 after Ctrl-C): its workers must not hold up the exit
        end_child_processes(keep=before)
        raise
    except CLIError as e:
        message, status = f"error: {e}", 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        message, status = None, 1
    except Exception as e:  # noqa: BLE001 - anything unexpected: one line, and nothing left hanging
        if os.environ.get("TRACEBACK"):
            traceback.print_exc()
        message, status = f"error: {describe_error(e, 300)}", 1
    else:
        # Persistent DataLoader workers end when their loader is freed. One still referenced here gets,
        # at the interpreter's exit, a SIGTERM it ignores and a wait that never ends: end them now.
        end_child_processes(keep=before, restore=True)
        return result
    end_child_processes(keep=before)
    if message:
        print(message, file=sys.stderr)
    sys.exit(status)


def end_child_processes(keep=(), restore=False):
    """Kill this process's multiprocessing children (DataLoader workers), which ignore SIGINT/SIGTERM,
    except those in `keep`. `restore`: put the SIGCHLD handler back afterwards (the process goes on)."""
    children = [c for c in multiprocessing.active_children() if c not in keep]
    if not children:
        return
    has_sigchld = hasattr(signal, "SIGCHLD")
    previous = signal.getsignal(signal.SIGCHLD) if has_sigchld else None
    if has_sigchld:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)
    if restore and previous is not None:
        signal.signal(signal.SIGCHLD, previous)


# ----------------------------------------------------------------------------- the installation


def check_installation(modules=("torch", "torchvision")):
    """Import torch and torchvision (the heavy imports every script makes next); when they fail, one line saying
    how to mend the installation and status 1, instead of a 20-line traceback from inside torchvision. The usual
    cause: a torchvision built for another torch (pip upgraded one of them), which fails at import with
    'operator torchvision::nms does not exist'."""
    import importlib
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            print(
                f"error: {describe_error(e, 200)}: install the requirements: pip install -r requirements.txt",
                file=sys.stderr,
            )
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - a broken install fails in its own ways (RuntimeError, OSError)
            print(
                f"error: {name} does not load ({describe_error(e, 200)}); torch {version('torch')} and torchvision "
                f"{version('torchvision')} must be a matching pair: reinstall both from requirements.txt (pip "
                "install --force-reinstall torch torchvision -r requirements.txt)",
                file=sys.stderr,
            )
            sys.exit(1)


# ----------------------------------------------------------------------------- stop signals


def exit_quietly_on_stop_signals():
    """Outside the stretches a StopFlag guards (the imports, start-up checks, the final figures): Ctrl-C or
    SIGTERM ends the process at once with one line and status 130 (143), instead of a KeyboardInterrupt
    traceback from wherever it landed. Every file is written whole or not at all (utils.atomic_open), so
    nothing already written is lost."""

    def handler(signum, frame):
        os.write(2, f"interrupted ({signal.Signals(signum).name})\n".encode())
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loops look at it at safe points (between batches).
    Installed explicitly so a background job that inherited an ignored SIGINT still stops on Ctrl-C."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handler(self, signum, frame):
        self.signum = signum

    def exit_status(self):
        """The status a stopped script exits with: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM); 130 when
        the stop came some other way (a stop found by a lower layer, no signal recorded)."""
        return 128 + (self.signum or signal.SIGINT)

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(_worker_id=None):
    """DataLoader worker_init_fn: workers ignore Ctrl-C and SIGTERM sent to the whole process group; the
    main process decides when to stop and shuts them down (they also exit if the main process dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------- allocator


ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_CONF", "TCMALLOC_")


def tune_allocator():
    """Keep freed activation buffers in the heap instead of giving them back to the kernel after every
    layer. glibc's defaults unmap blocks over its mmap threshold and trim the heap top, so each batch
    faults its activations in again (tens of thousands of page faults per ResNet batch; predict.py's
    loop ran 9-20% faster tuned, see bench/README.md). Linux glibc only; skipped when the user already tunes
    malloc or preloads another allocator. True when applied."""
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("LD_PRELOAD")
        or any(k.startswith(ALLOCATOR_ENV) for k in os.environ)
    ):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(
        mallopt(option, value) == 1
        for option, value in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 512 << 20), (M_TOP_PAD, 64 << 20))
    )
