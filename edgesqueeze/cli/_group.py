"""The ``edgesqueeze`` group, the error handling every command shares, and small option helpers.

Every :class:`~edgesqueeze.errors.EdgesqueezeError` becomes one ``error: ...`` line on
stderr and its exit code (1 for a broken budget, 2 for bad usage or input).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgesqueeze import __version__
from edgesqueeze.errors import EdgesqueezeError, Note


def _show_note(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, Note):
        click.echo(f"note: {message}", err=True)
    else:
        _show_other(message, category, filename, lineno, file, line)


_show_other = warnings.showwarning

# commands whose product is their files, not what they print: a reader that stops reading
# (`edgesqueeze train ... | head -1`) must not stop them (train exited 0 with no model.pt)
_WRITERS = {"train", "compress", "export", "verify", "check", "sensitivity", "bench", "unpack", "reseal"}


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``obj`` as strict JSON: a non-finite float (a diverged model's NaN loss,
    recorded in its metadata) is ``null``, not the ``NaN`` no parser but Python's reads."""
    import json
    import math

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _to_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null, so that Python's flush at exit does not
    raise BrokenPipeError again once the reader has gone."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


class _KeepWriting:
    """stdout that, once its reader has gone, sends the rest to /dev/null instead of raising."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        import os

        _to_devnull(self._stream)
        self._stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def one_line(text: str) -> str:
    """An error message as the one line it must be: a file name holding a line break (Linux
    allows it) split the `error:` line in two, the second looking like other output."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _usage_error(exc: click.UsageError, where: str) -> None:
    """A missing or bad option, an unknown command: one ``error:`` line, as every other error,
    where click prints "Usage: ...", "Try ...", a blank line and "Error: ...".
    ``where``: the command path whose --help to point at, when click's error has no context."""
    if type(exc).__name__ == "NoArgsIsHelpError" or (exc.ctx is not None and exc.format_message() ==
                                                       exc.ctx.get_help()):
        # `edgesqueeze` alone (click 8.2+): its "error" is the whole help, which came out as an
        # `error: Usage: ...` line and 33 more, the last cut off; the help as it is, then
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
        return
    if exc.ctx is not None:
        where = exc.ctx.command_path
    msg = one_line(exc.format_message())
    see = f"see '{where} --help'"
    click.secho(f"error: {msg} ({see})" if msg.endswith("?") else f"error: {msg.rstrip('.')}; {see}",
                fg="red", err=True)


# ctx.meta key a command sets when an interrupted run of it can go on with --resume (compress: when it retrains)
RESUMABLE = "edgesqueeze.resumable"
TRAIN_STATE = "edgesqueeze.train_state"  # train's OUT/last.pt: an interrupt before it exists has nothing to resume


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI runner cancelling the job, ``kill``), raised in the main thread as an
    interrupt is, so that the same cleanups run: an atomic write removes its temporary file."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - the signal handler's signature
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops the cleanup, as it used to
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """For the command's duration, SIGTERM raises :class:`Terminated` in the main thread, where
    it ended the process with no word and left the hidden temporary files of atomic writes
    behind. Only over the default handler: a command run inside another program (or under
    torchrun, whose handler :mod:`edgesqueeze.distributed` installs) keeps what is there."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Group(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the group's own options (`edgesqueeze --bogus`); a command's are parsed in invoke
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            _usage_error(exc, info_name or "edgesqueeze")
            raise click.exceptions.Exit(exc.exit_code) from None

    def invoke(self, ctx: click.Context):
        # the subcommand's name: click < 9 keeps it apart from the other arguments
        name = next(iter(getattr(ctx, "_protected_args", None) or ctx.args or []), None)
        args = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]  # click empties both before the command runs
        if name in _WRITERS and not isinstance(sys.stdout, _KeepWriting):
            sys.stdout = _KeepWriting(sys.stdout)
        try:
            from edgesqueeze._io import output_locks

            with _sigterm_raises(), warnings.catch_warnings(), output_locks():
                warnings.simplefilter("always", Note)
                # torch's own deepcopy of a pytree spec, which every copy of a lifted TorchScript /
                # .pt2 model makes (fold, prune, ptq, export): not the user's to act on
                warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                        category=FutureWarning)
                warnings.showwarning = _show_note
                return super().invoke(ctx)
        except EdgesqueezeError as exc:
            click.secho(f"error: {one_line(str(exc))}", fg="red", err=True)
            exc.said = True  # a signal handler that would say it again (distributed.explain_termination) need not
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            _usage_error(exc, f"{ctx.command_path} {name}" if name in self.commands else ctx.command_path)
            ctx.exit(exc.exit_code)
        except ModuleNotFoundError as exc:  # a device install (numpy, click, the runtimes) lacks the stack
            top = (exc.name or "").split(".")[0]
            if not top or top == "edgesqueeze":
                raise
            extra = {"torch": "train", "sklearn": "train", "yaml": "runtime", "matplotlib": "train", "tqdm": "train",
                     "onnx": "export", "litert_torch": "export", "onnxscript": "export",
                     "onnxruntime": "runtime", "ai_edge_litert": "runtime", "PIL": "runtime",
                     "tflite_micro": "micro"}.get(top)
            if name == "export" and extra == "train":  # export needs both: one round trip, not two
                extra = "train,export"
            how = (f"pip install 'edgesqueeze[{extra}]', or '.[{extra}]' in a checkout" if extra
                   else f"install {top}")
            if top == "yaml":  # recipes and --arch-kwargs only: a small package, no reason to pull torch in
                how = f"pip install PyYAML, or {how}"
            elif top == "torch":  # PyPI's default torch on Linux x86-64 is the CUDA build (gigabytes)
                how += ", after torch itself as README 'Install' says"
            click.secho(f"error: this needs the Python package '{top}', which is not installed here ({how}; a "
                        "device install has only what run, bench, inspect, unpack of packed files and check of a "
                        "verify report need; measuring a model file is the toolchain's)",
                        fg="red", err=True)
            ctx.exit(2)
        except BrokenPipeError:  # the reader stopped reading (`edgesqueeze run ... | head -1`): it has
            # what it wanted, so no error line and exit 0
            _to_devnull(sys.stdout)
            ctx.exit(0)
        except OSError as exc:  # a path the command reads or writes that the system refuses
            import errno

            where = f"{exc.filename}: " if exc.filename else ""
            # files are written through atomic_path, which names them: without a name, the output
            # that failed is standard output (`info model.pt > /dev/full`)
            stdout = not exc.filename and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)
            long = exc.errno == errno.ENAMETOOLONG  # a name over 255 bytes, or a path over 4,096
            click.secho(f"error: {one_line(where)}{exc.strerror or exc}" + (" (writing to standard output)" if stdout else "")
                        + ("; a file name holds at most 255 bytes and a path 4,096: choose a shorter one" if long else ""),
                        fg="red", err=True)
            ctx.exit(2)
        except MemoryError:  # a batch, a --runs or a file larger than this machine's memory
            click.secho("error: out of memory: the command asked for more memory than this machine has "
                        "(a smaller batch size, fewer images or a smaller model fits)", fg="red", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            # only where there are epochs to go on from: train, and a compress that retrains (it
            # says so in ctx.meta once its recipe is read); a ptq or lossless run starts over
            # `--overwrite` and `--resume` refuse each other: a run that wrote over an earlier one
            # (make demo's gate.sh does) goes on with --resume in its place
            instead = " in place of --overwrite" if "--overwrite" in args else ""
            again = (f" (the same command with --resume{instead} goes on from the last finished epoch)"
                     if name == "train" or ctx.meta.get(RESUMABLE) else "")
            state = ctx.meta.get(TRAIN_STATE)
            if name == "train" and (state is None or not Path(state).exists()):  # None: stopped before training
                # began (torchrun's SIGTERM after another rank's usage error): nothing to resume either
                again = " before its first epoch finished (nothing to resume: the same command starts it again)"
            terminated = isinstance(exc, Terminated)
            click.echo(f"{'terminated' if terminated else 'interrupted'}{again}", err=True)
            ctx.exit(143 if terminated else 130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgesqueeze")
def cli() -> None:
    """Make trained PyTorch CNNs small enough for the edge, and prove it.

    \b
    Start here (what `make demo` runs; R=recipes/squeezenet-digits.yaml, A=artifacts/squeezenet-digits):
      edgesqueeze models                                    list architectures
      edgesqueeze train -r $R --out $A                      train a SqueezeNet
      edgesqueeze compress $A/model.pt -r $R --out $A/compressed
                                                            prune, share, Huffman: model.esq
      edgesqueeze export $A/compressed/model.esq -r $R --out $A/export
                                                            ONNX and TFLite, fp32 and INT8, packed
      edgesqueeze verify $A/model.pt $A/compressed/model.esq $A/export/* --out verify.json
                                                            size and accuracy through each runtime
      edgesqueeze check verify.json -r $R                   the CI gate: exit 1 if a budget breaks
    """


def names_a_folder(path: Path, given: str | None) -> bool:
    """An output option that stands for a folder (the file goes in it, under its default name):
    ``path`` is an existing folder, or ``given`` (as typed) ends with a slash, which
    ``pathlib`` drops (``--out results/`` for a folder not made yet)."""
    return path.is_dir() or str(given or "").endswith(("/", os.sep))


class PathType(click.Path):
    """``click.Path`` that refuses an empty string. ``Path("")`` is ``.``, so ``--out "$DIR"``
    with ``DIR`` unset wrote into the current folder, and ``verify --out ''`` over the
    default report beside the first artifact."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; name a file or folder (is a shell variable unset?)", param, ctx)
        if value == "-" and not self.allow_dash and not os.path.exists(value):  # said "-: no such file"
            self.fail("'-' (standard input or output) is not taken here; name a file", param, ctx)
        if isinstance(value, (str, os.PathLike)) and os.path.islink(value):
            from edgesqueeze._io import link_loop

            if link_loop(value):  # click said "Directory 'loop' is a file" of a link to itself
                self.fail(f"{os.fsdecode(value)!r} is a symbolic link that leads back to itself; remove the "
                          "link or give another path", param, ctx)
        return super().convert(value, param, ctx)


class FiniteRange(click.FloatRange):
    """``click.FloatRange`` without nan (which every comparison lets through: sensitivity
    --max-drop nan chose a sparsity that lost 47 points)."""

    def convert(self, value, param, ctx):
        out = super().convert(value, param, ctx)
        if out != out:
            self.fail(f"{value!r} is not a number", param, ctx)
        return out


def recipe_option(ctx, param, value):
    """``-r``'s callback: a file, or the name of a recipe edgesqueeze ships (``-r
    squeezenet-digits``, which an installed package finds without the checkout's recipes/)."""
    if value is None:
        return value
    from edgesqueeze.recipe import find_recipe

    return find_recipe(value)


def check_dataset_option(ctx, param, value):
    """``--data``'s callback: a name the loaders cannot read is a usage error before any work
    (``verify --data nosuch`` reported every file as not evaluated; ``--data ''`` fell back to
    the default). The names are checked without PyTorch (a device install has none)."""
    if value is None:
        return value
    from edgesqueeze._datasets import check_dataset_name

    try:
        check_dataset_name(value)
    except EdgesqueezeError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def threads_option(help_text: str = ("Runtime threads [default: each runtime's own: onnxruntime one per physical core, "
                                      "LiteRT 1].")):
    """``--threads N``: 1 up to :func:`edgesqueeze.runtime._base.max_threads`."""
    from edgesqueeze._limits import max_threads  # not edgesqueeze.runtime: numpy and more, 44 ms of every --help

    return click.option("--threads", type=click.IntRange(min=1, max=max_threads()), help=help_text)


def _arch_kwargs(num_classes: int | None) -> dict:
    return {"num_classes": num_classes} if num_classes else {}


@dataclass(frozen=True)
class ModelOptions:
    """How to read a model file, the same for every command that reads one: the architecture
    of a file that does not record it, permission to unpickle, the description of its inputs
    (for files without edgesqueeze metadata), and the recipe (``--recipe`` with ``--set``, or
    ``--set`` alone) whose sections the command uses."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    input_meta: dict[str, Any] = field(default_factory=dict)
    recipe: Any = None  # edgesqueeze.recipe.Recipe; None without --recipe and --set
    recipe_path: Path | None = None
    given: frozenset[str] = frozenset()  # top-level sections the recipe file and --set actually set
    classes_file: Path | None = None  # --classes @FILE: read, so never an output
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, as given
    deferred_error: Exception | None = None  # a bad recipe or --set, raised when the command asks

    def raise_deferred(self) -> None:
        """Raise the recipe's (or ``--set``'s) error, for a command that first clears what an
        earlier run left (``check``: an earlier verdict must not outlive a run stopped on bad input)."""
        if self.deferred_error is not None:
            raise self.deferred_error

    def torch_only_options(self) -> list[str]:
        """The options given that describe a PyTorch model file only (how to rebuild it): an
        exported .onnx / .tflite records its graph, so they say nothing about one."""
        return [name for name, given in (("--arch", self.arch), ("--arch-kwargs/--num-classes", self.arch_kwargs),
                                         ("--trust-pickle", self.trust_pickle), ("--recipe", self.recipe_path),
                                         ("--set", self.overrides)) if given]

    def note_unused_sets(self, used: tuple[str, ...], command: str) -> None:
        """A note (standard error) for each ``--set`` key ``command`` does not read, by the
        dotted prefixes in ``used``: ``eval --set data.image_size=64`` changed nothing, with
        exit 0 and no word (``eval --image-size 64`` is the option)."""
        for item in self.overrides:
            key = item.split("=", 1)[0].strip()
            if not any(key == u or key.startswith(u.rstrip(".") + ".") for u in used):
                click.echo(f"note: --set {item}: {command} does not read {key}; it changes nothing here", err=True)

    def note_dataset_recorded(self, recorded: str | None, command: str) -> None:
        """A note when the recipe or ``--set`` names a dataset but the model file records
        another, which wins: a recipe's data.dataset stands in only for a file that records none."""
        data = self.section("data")
        if data is None or not recorded or str(data.dataset).lower() == str(recorded).lower():
            return
        from edgesqueeze.recipe import given_fields

        if "dataset" in given_fields(self.recipe_path, self.overrides, "data"):  # not the default, digits
            click.echo(f"note: the recipe's data.dataset '{data.dataset}' is not used: the model records its "
                       f"dataset '{recorded}' (a recipe's stands in only for a file that records none); "
                       f"{command} --data {data.dataset} measures on it", err=True)

    @property
    def input_files(self) -> list[tuple[str, Path | None]]:
        """The files these options read beside the model (the recipe, a --classes @FILE), as
        ``(what, path)`` pairs for :func:`edgesqueeze._io.outputs_clear_of_inputs`."""
        return [("--recipe", self.recipe_path), ("--classes", self.classes_file)]

    def section(self, name: str) -> Any:
        """The recipe's section ``name`` if the recipe file or ``--set`` sets it, else None:
        a section left out holds defaults meant for training (``data: digits``), which must
        not stand in for what a model file does not say about itself."""
        return getattr(self.recipe, name) if self.recipe is not None and name in self.given else None

    @property
    def data_dir(self) -> str | None:
        return self.recipe.data.data_dir if self.recipe is not None else None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`edgesqueeze.checkpoint.load_model` and the stages. The
        recipe's ``model`` section is ``--arch``/``--arch-kwargs`` (the options win where both
        are given); its ``data.dataset`` is the dataset of a file that records none."""
        arch, kwargs = self.arch, dict(self.arch_kwargs)
        model = self.section("model")
        if model is not None and arch in (None, model.arch):
            arch, kwargs = model.arch, {**model.kwargs, **kwargs}
        data = self.section("data")
        return {"arch": arch, "arch_kwargs": kwargs, "trust_pickle": self.trust_pickle,
                "input_meta": dict(self.input_meta), "default_dataset": data.dataset if data else None}


def _floats(value: str, what: str, positive: bool = False) -> list[float]:
    try:
        out = [float(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406",
                                 param_hint=what) from None
    import math

    # nan and inf were taken (eval scored 10% with a nan loss, export wrote mean [nan]); and 1e39,
    # finite here but infinite in the runtime's float32 (run printed "probability": NaN, exit 0)
    if (not out or not all(math.isfinite(x) and abs(x) <= 1e6 for x in out)
            or (positive and any(x < 1e-6 for x in out))):
        raise click.BadParameter(f"{value!r}: give one finite {'positive ' if positive else ''}number per channel"
                                 + (" between 1e-6 and 1e6" if positive else " of at most 1e6 in size")
                                 + " (pixels are scaled to 0..1)", param_hint=what)
    return out


def _shape(value: str) -> list[int]:
    parts = value.lower().replace("x", ",").replace(" ", "").split(",")
    try:
        shape = [int(p) for p in parts if p]
    except ValueError:
        shape = []
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise click.BadParameter(f"{value!r}: expected C,H,W, e.g. 3,32,32", param_hint="--input-shape")
    return shape


def _classes(value: str) -> list[str]:
    if value.startswith("@"):  # a file, one class name per line
        path = Path(value[1:])
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"{path}: cannot read class names ({exc})", param_hint="--classes") from None
    else:
        names = [x.strip() for x in value.split(",") if x.strip()]
    if not names:
        raise click.BadParameter(f"{value!r} names no class", param_hint="--classes")
    return names


def _mapping(value: str) -> dict[str, Any]:
    import yaml

    from edgesqueeze.recipe import load_yaml

    try:
        out = load_yaml(value)
    except yaml.YAMLError:
        out = None
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise click.BadParameter(f"{value!r} is not a mapping, e.g. '{{width: 0.5, num_classes: 10}}'",
                                 param_hint="--arch-kwargs")
    glued = [k for k, v in out.items() if v is None and ":" in k]
    if glued:  # YAML reads {width:24} as the key 'width:24' without a value
        raise click.BadParameter(f"{value!r}: {glued[0]!r} reads as a key without a value; put a space after the "
                                 "colon, e.g. '{width: 24}'", param_hint="--arch-kwargs")
    return out


_MODEL_OPTIONS = [
    click.option("--arch", help="Architecture of a model file that does not record one (a plain state_dict; a "
                 "pickle, to rebuild it): a name from `edgesqueeze models`, or your own class or builder as "
                 "package.module:Class or path/to/file.py:Class."),
    click.option("--arch-kwargs", metavar="MAPPING", help="Keyword arguments for --arch (or, for a pickle, "
                 "for its own class), YAML or JSON, e.g. '{width: 0.5, num_classes: 10}'."),
    click.option("--num-classes", type=click.IntRange(min=1), help="Class count for --arch (same as "
                 "--arch-kwargs '{num_classes: N}')."),
    click.option("--trust-pickle", is_flag=True, help="Trust the model file: allow a fully pickled nn.Module or a "
                 ".pt2 holding pickled objects (unpickling runs code from the file), and import the code a "
                 "checkpoint names as its architecture (module:Class, file.py:Class; --arch SPEC does that "
                 "too). Only for files you trust."),
    click.option("--mean", metavar="LIST", help="Per-channel input mean the model was trained with, on pixels "
                 "scaled to 0..1, e.g. 0.4914,0.4822,0.4465, for a file that does not record it [default: "
                 "where a command reads a dataset, measured on its training images, and said so; info and "
                 "inspect read none, and show none]."),
    click.option("--std", metavar="LIST", help="Per-channel input std, as --mean."),
    click.option("--input-shape", metavar="C,H,W", help="Input shape of one image, e.g. 3,32,32, for a file "
                 "that does not record it; the model must run on it [default: the dataset's, where the "
                 "command reads one]."),
    click.option("--classes", metavar="LIST|@FILE", help="Class names, comma-separated or @file with one per "
                 "line, for a file that does not record them; one per logit [default: the dataset's, where "
                 "the command reads one]."),
]


def _recipe_options(recipe_help: str, set_example: str) -> list:
    return [
        click.option("--recipe", "-r", "recipe_path", type=PathType(dir_okay=False, path_type=Path),
                     callback=recipe_option, help=recipe_help),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help=f"Override a recipe field, e.g. --set {set_example} (repeatable; works without "
                          "--recipe: --set model.import=net.py:Net is --arch net.py:Net)."),
    ]


_RECIPE_HELP = ("Recipe YAML (see recipes/) whose 'model' section stands for --arch and 'data' section for the "
                "dataset of a file that records none.")


def _command_recipe(recipe_path: Path | None, overrides: tuple[str, ...]):
    """``(recipe, given sections)`` from ``--recipe`` and ``--set``: the file with its
    overrides, or a recipe built from ``--set`` alone; ``(None, {})`` without either."""
    if not recipe_path and not overrides:
        return None, frozenset()
    from edgesqueeze.recipe import apply_overrides, given_sections, load_recipe, recipe_from_dict, replaced_by_overrides

    if recipe_path:
        recipe = load_recipe(recipe_path, overrides)
        for note in replaced_by_overrides(recipe_path, overrides):
            click.echo(note, err=True)
        unwritten = recipe.budget_formats_not_written()
        if unwritten:
            packed = [f for f in unwritten if f.endswith(".esq")]
            how = ("its export writes packed files only with `pack: true` (or `export --pack`)" if packed
                   and not recipe.export.pack else "add them to export.formats, or drop their size limits")
            click.echo(f"note: {recipe_path}: budget.max_size_per_format limits {', '.join(unwritten)}, which the "
                       f"recipe's export does not write: {how}", err=True)
        return recipe, frozenset(given_sections(recipe_path, overrides))
    raw = apply_overrides({"version": 1}, overrides)
    return recipe_from_dict(raw, source="--set"), frozenset(raw)


def model_options(fn=None, *, recipe_help: str = _RECIPE_HELP, set_example: str = "data.dataset=cifar10",
                  defer_recipe_errors: bool = False):
    """Add the model-reading options, with ``--recipe`` and ``--set``, to a command; it
    receives one ``model_opts`` (:class:`ModelOptions`) instead of the separate values.
    ``recipe_help`` and ``set_example`` say what the command itself takes from a recipe.
    ``defer_recipe_errors``: a bad recipe or ``--set`` is raised by ``model_opts.raise_deferred()``."""
    if fn is None:
        return functools.partial(model_options, recipe_help=recipe_help, set_example=set_example,
                                 defer_recipe_errors=defer_recipe_errors)

    @functools.wraps(fn)
    def wrapper(*args, arch, arch_kwargs, num_classes, trust_pickle, mean, std, input_shape, classes,
                recipe_path, overrides, **kwargs):
        kw = _mapping(arch_kwargs) if arch_kwargs else {}
        if num_classes:
            kw["num_classes"] = num_classes
        if num_classes and not arch:
            raise click.UsageError("--num-classes builds the architecture --arch names; give --arch too")
        given = {"mean": _floats(mean, "--mean") if mean else None,
                 "std": _floats(std, "--std", positive=True) if std else None,
                 "input_shape": _shape(input_shape) if input_shape else None,
                 "classes": _classes(classes) if classes else None}
        deferred = None
        try:
            recipe, sections = _command_recipe(recipe_path, tuple(overrides))
        except EdgesqueezeError as exc:
            if not defer_recipe_errors:
                raise
            recipe, sections, deferred = None, frozenset(), exc
        opts = ModelOptions(arch, kw, trust_pickle, {k: v for k, v in given.items() if v is not None},
                            recipe, recipe_path, sections,
                            Path(classes[1:]) if classes and classes.startswith("@") else None, tuple(overrides),
                            deferred)
        return fn(*args, model_opts=opts, **kwargs)

    for option in reversed(_MODEL_OPTIONS + _recipe_options(recipe_help, set_example)):
        wrapper = option(wrapper)
    return wrapper


def device_option(fn=None, *, what: str = ""):
    """``--device``, the same on every command that runs PyTorch on data (resolved by
    ``edgesqueeze.device`` when the command runs: importing the CLI must not import torch,
    which a device install does not have). ``what``: which passes it moves, when not all."""
    def not_empty(ctx, param, value):
        if value is not None and not value.strip():  # was the default, silently
            raise click.BadParameter("an empty device; give auto, cpu, cuda, cuda:N or mps", ctx=ctx, param=param)
        return value

    def decorate(f):
        return click.option("--device", metavar="DEVICE", callback=not_empty,
                            help="Where PyTorch computes" + (f" {what}" if what else "")
                            + ": auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps [default: the "
                            "recipe's, else auto].")(f)
    return decorate(fn) if fn is not None else decorate


def _progress_default() -> bool:
    return sys.stderr.isatty()


# --progress/--no-progress of the commands that evaluate test images (verify, check, eval)
progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="A bar per file over its test images, on standard error [default: on a terminal].")


def progress_bars(show: bool | None):
    """The factory :mod:`edgesqueeze._progress` describes, drawing click bars on standard
    error, or None when ``show`` is False (None: when standard error is a terminal)."""
    if not (_progress_default() if show is None else show):
        return None

    @contextlib.contextmanager
    def factory(label: str, total: int):
        with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
            yield bar.update

    return factory
