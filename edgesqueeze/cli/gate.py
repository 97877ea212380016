"""``edgesqueeze verify`` and ``check``: measure every artifact through its runtime, and the CI gate."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import click

from edgesqueeze.cli._group import (PathType, check_dataset_option, cli, model_options, names_a_folder, progress_bars,
                                    progress_option, threads_option)


def _is_report(path: Path) -> bool:
    """A report to read rather than an artifact to run: a ``.json`` name, or a file whose
    content is a JSON object (``verify --out runs/v`` writes one without the suffix; no model
    file starts with ``{``)."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


# a compress report's one .esq row: where each of its fields comes from
_COMPRESS_FIELDS = {"path": "esq", "bytes": "totals.esq_bytes", "n": "test.after.n",
                    "accuracy": "test.after.accuracy", "agreement": "test.agreement",
                    "reference_accuracy": "test.before.accuracy", "sha256": "totals.esq_sha256"}


def _same_dataset(path: Path, raw: Any, wanted: str, recipe: Path | None) -> None:
    """Refuse a verify report (``raw``, read from ``path``) measured on another dataset than the
    recipe's: a digits report passed the ImageNet deploy recipe's gate (its budgets judged
    numbers of other files). Only named datasets are compared (an image folder's path may be
    spelt differently)."""
    from edgesqueeze.errors import DataError

    measured = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(measured, list) or not measured or not all(isinstance(d, str) for d in measured):
        return
    if ":" in wanted or any(":" in d for d in measured):
        return
    if wanted.lower() not in {d.lower() for d in measured}:
        raise DataError(f"{path}: was measured on {', '.join(measured)}, but the recipe "
                        f"{recipe or '(--set)'} describes {wanted} (data.dataset): its budget is for other files; "
                        "check a report of that recipe's files, or give the budget as options (--max-size, ...) "
                        "instead of -r")


def _report_rows(path: Path, dataset: str | None = None, recipe: Path | None = None,
                 notes: list[str] | None = None) -> list[dict]:
    """The artifact rows of the report ``path``, checked up front (``budget.validate_rows``):
    a report that has no artifacts, or one whose fields are missing, mistyped or out of range,
    is bad input (exit 2, the file, row and field named), never a pass nor a traceback.
    ``dataset``: the recipe's (``recipe``), which the report must have been measured on.
    ``notes`` gets a line for files the report measured that are not here (judged by its
    numbers alone) and for files it records no SHA-256 of (checked by their size only): the
    verdict outputs carry them beside the table."""
    notes = [] if notes is None else notes
    from edgesqueeze.budget import changed_files, rows_from_report, validate_rows  # numpy-free: check imports no numpy
    from edgesqueeze.errors import FormatError

    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raw = None  # rows_from_report says what is wrong with it
    compress = (isinstance(raw, dict) and not isinstance(raw.get("artifacts"), list)
                and "totals" in raw and "test" in raw)
    if compress:  # the sections rows_from_report reads its row from
        test = raw["test"]
        for where, value in (("totals", raw["totals"]), ("test", test),
                             ("test.before", test.get("before") if isinstance(test, dict) else None),
                             ("test.after", test.get("after") if isinstance(test, dict) else None)):
            if not isinstance(value, dict):
                raise FormatError(f"{path}: {where}: expected an object, got {value!r}; write the report again "
                                  "with `edgesqueeze compress`")
        if not isinstance(raw.get("esq", ""), str):
            raise FormatError(f"{path}: esq: expected the .esq file's path (a string), got {raw['esq']!r}")
    if dataset is not None:
        _same_dataset(path, raw, dataset, recipe)
    rows = rows_from_report(path)
    if compress:
        validate_rows(rows, path, names=_COMPRESS_FIELDS, writer="compress")
    else:
        validate_rows(rows, path)
    # a file re-exported since the report: ERROR, not its old numbers
    unhashed: list[str] = []
    rows, absent = changed_files(rows, path, raw.get("written_from") if isinstance(raw, dict) else None, unhashed,
                                 raw.get("written_to") if isinstance(raw, dict) else None)
    if unhashed:
        notes.append(f"note: {path} records no SHA-256 for {len(unhashed)} file(s) here ({unhashed[0]}"
                     f"{', ...' if len(unhashed) > 1 else ''}; an older verify wrote it, or it was edited): they are "
                     "checked by their size only; run `edgesqueeze verify` again to check their bytes")
    if absent:
        notes.append(f"note: {len(absent)} file(s) {path} measured are not here ({absent[0]}"
                     f"{', ...' if len(absent) > 1 else ''}): judged by the report's numbers alone")
    return rows


def _files_reports_name(paths) -> list[tuple[str, Path]]:
    """``("a file r.json measured", path)`` for each file the reports among ``paths`` name and
    that is here: an output over one of them (`check r.json --junit model.int8.onnx`) wrote
    the verdicts into the model. A report that does not read is left to the checks after."""
    from edgesqueeze.budget import report_file

    out = []
    for p in paths:
        if not (Path(p).is_file() and _is_report(Path(p))):
            continue
        try:
            raw = json.loads(Path(p).read_text())
            rows = raw.get("artifacts") if isinstance(raw, dict) else None
            where = raw.get("written_from") if isinstance(raw, dict) else None
            to = raw.get("written_to") if isinstance(raw, dict) else None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        for row in rows if isinstance(rows, list) else []:
            name = row.get("path") if isinstance(row, dict) else None
            if isinstance(name, str) and name:
                out.append((f"a file {p} measured", report_file(name, p, where, to)))
    return out


def _is_step_summary(path: Path) -> bool:
    """``--markdown "$GITHUB_STEP_SUMMARY"``: the job summary file, which GitHub Actions names
    ``.../step_summary_<id>`` and others in the same step write to too: appended to, never
    replaced."""
    env = os.environ.get("GITHUB_STEP_SUMMARY")
    if str(path).endswith("GITHUB_STEP_SUMMARY"):
        return True
    if not env:
        return False
    try:
        return Path(env).resolve() == path.resolve()
    except OSError:
        return False


def _not_a_directory(path: Path) -> None:
    """``check DIR``: say it is a folder, and name the report in it to give instead."""
    from edgesqueeze.errors import FormatError

    if not path.is_dir():
        return
    found = [path / name for name in ("verify.json", "report.json") if (path / name).is_file()]
    hint = (f"give {found[0]}" if found else
            f"give the verify.json `edgesqueeze verify` wrote, or the artifact files in it ({path / '*'})")
    raise FormatError(f"{path}: is a directory, not a report or an artifact file; {hint}")


def _budget_from_options(recipe, max_size, max_size_for, min_accuracy, max_drop, min_agreement):
    import dataclasses

    from edgesqueeze.config.budget import Budget, BudgetSpecError, parse_fraction, parse_size

    budget = recipe.budget_spec() if recipe is not None else Budget()
    try:
        per = dict(budget.max_size_per_format)
        if max_size is not None:  # before the note below: a bad size said "replaces ..." first
            parse_size(max_size, what="--max-size")
        if max_size is not None and per:
            # the command line's limit for every file: the recipe's per-format entries won over it,
            # so with a recipe that limits each format (the digits recipe) --max-size judged nothing
            click.echo(f"note: --max-size {max_size} replaces the recipe's size limits per format "
                       f"({', '.join(per)}); --max-size-for FORMAT=SIZE sets one format's", err=True)
            per = {}
        for item in max_size_for:
            fmt, sep, size = item.partition("=")
            if not sep:
                raise BudgetSpecError(f"--max-size-for: expected FORMAT=SIZE, got {item!r}")
            from edgesqueeze.config.budget import ARTIFACT_FORMATS

            if fmt not in ARTIFACT_FORMATS:
                from edgesqueeze.config.budget import format_hint

                raise BudgetSpecError(f"--max-size-for: unknown format {fmt!r}{format_hint(fmt)}; use "
                                      f"{', '.join(ARTIFACT_FORMATS)}")
            per[fmt] = parse_size(size, what=f"--max-size-for {fmt}")
        changes = {"max_size_per_format": per}
        if max_size is not None:
            changes["max_size"] = parse_size(max_size, what="--max-size")
        if min_accuracy is not None:
            changes["min_accuracy"] = parse_fraction(_number_or_pct(min_accuracy), "--min-accuracy")
        if min_agreement is not None:
            changes["min_agreement"] = parse_fraction(_number_or_pct(min_agreement), "--min-agreement")
        if max_drop is not None:
            if not math.isfinite(max_drop):  # FloatRange(min=0) lets nan and inf through
                raise BudgetSpecError(f"--max-drop: expected accuracy points in [0, 100] (0.5), got {max_drop}")
            changes["max_drop"] = max_drop
    except BudgetSpecError as exc:
        raise click.BadParameter(str(exc)) from None
    return dataclasses.replace(budget, **changes)


def _number_or_pct(text: str):
    text = text.strip()
    if text.endswith("%"):
        return text
    try:
        return float(text)
    except ValueError:
        return text


_BUDGET_OPTIONS = [
    click.option("--max-size", metavar="SIZE", help="Largest file allowed, e.g. 500KB, 0.5MB, 64KiB; replaces the "
                 "recipe's size limits, its per-format ones too (--max-size-for sets one format's)."),
    click.option("--max-size-for", multiple=True, metavar="FORMAT=SIZE",
                 help="Per-format size limit, e.g. tflite-int8=100KB (repeatable)."),
    click.option("--min-accuracy", metavar="ACC", help="Lowest test accuracy, 0.99 or 99%."),
    click.option("--max-drop", type=click.FloatRange(min=0, max=100), metavar="POINTS",
                 help="Most accuracy points lost against the float model."),
    click.option("--min-agreement", metavar="FRAC", help="Lowest top-1 agreement with the float model, 0.95 or 95%."),
]


def _with_budget_options(fn):
    for option in reversed(_BUDGET_OPTIONS):
        fn = option(fn)
    return fn


def _sniff_kind(path: Path) -> str:
    from edgesqueeze.errors import EdgesqueezeError
    from edgesqueeze.verify import sniff

    try:
        return sniff(path)
    except EdgesqueezeError:
        return "unknown"  # measured (and refused) as before


_NOT_MODELS = (".json", ".md", ".png", ".xml", ".csv", ".txt", ".log", ".yaml", ".yml", ".html")


def _without_earlier_reports(paths) -> tuple[Path, ...]:
    """``paths`` less the files that are not models (reports, plots, logs: by their suffix),
    with a note: `verify out/*` a second time took the first run's verify.json as an input
    (refused, it is also the output) and its .md and plots, or a compress folder's report.json,
    or check's verdict files, as models that could not be measured (exit 2)."""
    kept = tuple(p for p in paths if Path(p).suffix.lower() not in _NOT_MODELS)
    left = [str(p) for p in paths if Path(p).suffix.lower() in _NOT_MODELS]
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        click.echo(f"note: left out {shown}: not model files (reports, plots, logs); verify measures .pt, .esq, "
                   ".onnx, .tflite and packed files", err=True)
    if not kept:
        raise click.UsageError("none of the files given is a model (.pt, .esq, .onnx, .tflite, or a packed "
                               ".onnx.esq / .tflite.esq); give the model files to verify")
    return kept


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=PathType(path_type=Path))
@click.option("--data", "dataset", callback=check_dataset_option,
              help="Dataset whose test split to use [default: the one each file records].")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--reference", type=PathType(dir_okay=False, path_type=Path),
              help="Float model (.pt) for top-1 agreement and accuracy drop [default: the first .pt given].")
@click.option("--limit", type=click.IntRange(min=1),
              help="Use a seeded subset of at most N test images, each class in proportion (eval's --limit).")
@threads_option()
@click.option("--latency", is_flag=True, help="Also measure batch-1 latency (p50).")
@progress_option
@model_options(recipe_help="Recipe whose 'budget' section to check against (options override it); its 'model' "
                           "section stands for --arch.", set_example="budget.max_size=500KB")
@_with_budget_options
@click.option("--out", "out_path", type=PathType(),
              help="Write the verification report here (JSON; the markdown and plots go beside it); "
                   "a folder (existing, or given with a trailing /) gets verify.json in it "
                   "[default: verify.json beside the first file].")
@click.pass_context
def verify(ctx, paths, dataset, data_dir, reference, limit, threads, latency, progress, model_opts, max_size,
           max_size_for, min_accuracy, max_drop, min_agreement, out_path):
    """Evaluate artifacts on the test split through their own runtimes.

    .onnx runs in onnxruntime, .tflite in LiteRT (a TensorFlow Lite Micro compressed
    .tflite in TFLite Micro's interpreter, which also reports its arena bytes), a packed
    .onnx.esq / .tflite.esq as a device runs it (decoded in memory, its SHA-256 checked,
    then the same runtime; its size is the packed file's, the one that ships), a model .esq
    through its decoder (its weights checked against the hash recorded at compress time),
    .pt in PyTorch as the float reference. Reports file size, gzip size, accuracy and top-1
    agreement; with a budget (options or the recipe's), exits 1 when one is broken. Writes verify.json, verify.md
    (the table, the verdicts, the machine) and two plots: size_by_format.png and
    accuracy_vs_size.png.

    \b
    The report names this CPU and the ISA features that select int8 kernels (AVX2, AVX-512,
    VNNI; ARM dot product), and warns when a file's numbers here are known not to be what
    another CPU computes (an onnx-int8 file exported with --onnx-int8-target vnni-or-arm).

    \b
    Example:
      edgesqueeze verify artifacts/squeezenet-digits/model.pt artifacts/squeezenet-digits/export/*
      edgesqueeze verify squeezenet1_0.pt export/* --arch squeezenet1_0 --data imagenet-sample
    """
    from edgesqueeze._io import check_writable, write_text_atomic
    from edgesqueeze.budget import artifacts_markdown, check, exit_code, noise_notes, verdicts_table
    from edgesqueeze.verify import evaluate_artifacts
    from edgesqueeze.verify_report import machine_info, write_report

    if out_path == "-":
        raise click.BadParameter("verify writes a JSON report with its markdown and plots beside it, so it "
                                 "needs a file name, not standard output; give e.g. --out verify.json and "
                                 "read it with `edgesqueeze check verify.json ...`", param_hint="--out")
    paths = _without_earlier_reports(paths)
    out = Path(out_path) if out_path else Path(paths[0]).parent / "verify.json"
    if names_a_folder(out, out_path):  # --out results/, as compress's --out
        out = out / "verify.json"
    if out.suffix.lower() == ".md":
        raise click.BadParameter(f"{out}: names the JSON report, and the markdown is written beside it; "
                                 f"give {out.with_suffix('.json')} to get {out}", param_hint="--out")
    from edgesqueeze._io import outputs_clear_of_inputs
    from edgesqueeze.verify_report import plot_paths

    outputs_clear_of_inputs([("--out", out), ("the markdown report (beside --out)", out.with_suffix(".md")),
                             *((f"the plot {p.name} (beside --out)", p) for p in plot_paths(out).values())],
                            [*(("an artifact", p) for p in paths), ("--reference", reference),
                             *model_opts.input_files])
    outputs = (out, out.with_suffix(".md"), *plot_paths(out).values())
    for path in outputs:
        check_writable(path)  # before the evaluation, not after it
    model_opts.note_unused_sets(("model", "data.dataset", "data.data_dir", "budget"), "verify")
    budget = _budget_from_options(model_opts.recipe, max_size, max_size_for, min_accuracy, max_drop, min_agreement)
    from edgesqueeze._io import lock_output_folder, remove_earlier_outputs, remove_stale_temps

    import edgesqueeze.data  # noqa: F401 - it reads datasets: a device install (no torch) stops here, not after
    # removing the earlier report below (verify.json, verify.md and the plots were lost, then "needs torch")

    lock_output_folder(out.parent, "edgesqueeze verify", report=out.name)  # another run's are not this one's to remove
    # an earlier run's report, markdown and plots, none of them an input (checked above): a run
    # interrupted (or stopped by a full disk) after its JSON left them beside it, as this run's
    remove_earlier_outputs(out.parent, [p.name for p in outputs])
    # a killed run's (SIGKILL) half-written files, of these names only: another run may write beside them
    remove_stale_temps(out.parent, lambda m: click.echo(m), names={p.name for p in outputs})
    report = evaluate_artifacts(list(paths), dataset=dataset, data_dir=data_dir or model_opts.data_dir,
                                reference=reference, limit=limit, threads=threads, latency=latency, log=lambda m: click.echo(m),
                                progress=progress_bars(progress), **model_opts.load_kwargs())
    report["machine"] = machine_info(threads)
    report["written_from"] = os.getcwd()  # the artifacts' relative paths start here (check finds them)
    # and the report's own folder: check finds a file beside a copied report where it lay beside this one
    report["written_to"] = os.path.realpath(out.parent)
    verdicts = None if budget.is_empty() else check(report["artifacts"], budget)
    notes = [] if verdicts is None else noise_notes(report["artifacts"], budget)
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    if dataset is None and len(report.get("datasets") or []) == 1:  # each file measured on its own dataset
        model_opts.note_dataset_recorded(report["datasets"][0], "verify")
    written = write_report(out, report, verdicts=verdicts, machine=report["machine"], notes=notes)
    click.echo(artifacts_markdown(report["artifacts"]))
    plots = ", ".join(p.name for p in written["plots"]) or "no plots"
    click.echo(f"report: {out}, {written['markdown']}, plots ({plots})"
               + (f"; {written['note']}" if written["note"] else ""))
    if verdicts is not None:
        click.echo(verdicts_table(verdicts))
        for line in notes:  # a verdict that another sample of as many test images could turn around
            click.echo(line)
        ctx.exit(exit_code(verdicts))
    if any(r["error"] for r in report["artifacts"]):
        ctx.exit(2)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=PathType(path_type=Path))
@_with_budget_options
@click.option("--data", "dataset", callback=check_dataset_option,
              help="Dataset to evaluate artifact files on [default: the one each file records].")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--reference", type=PathType(dir_okay=False, path_type=Path),
              help="Float model (.pt) for agreement and drop [default: the first .pt given].")
@click.option("--limit", type=click.IntRange(min=1),
              help="Use a seeded subset of at most N test images, each class in proportion (eval's --limit).")
@progress_option
@click.option("--json", "json_path", type=PathType(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write verdicts as JSON ('-': standard output, and the table goes to standard error).")
@click.option("--junit", "junit_path", type=PathType(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write JUnit XML (one test case per artifact and budget; '-': standard output).")
@click.option("--markdown", "md_path", type=PathType(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write Markdown: a file is replaced, the job summary $GITHUB_STEP_SUMMARY appended to; '-': "
                   "standard output.")
@model_options(recipe_help="Take the budget from this recipe's 'budget' section (options override it); its "
                           "'model' section stands for --arch.", set_example="budget.max_size=500KB",
               defer_recipe_errors=True)
@click.pass_context
def check(ctx, paths, max_size, max_size_for, min_accuracy, max_drop, min_agreement, dataset, data_dir, reference,
          limit, progress, json_path, junit_path, md_path, model_opts):
    """The CI gate: exit 0 when every budget holds, 1 when one is broken, 2 on bad input.

    PATHS are report.json files (from `verify` or `compress`: nothing is re-run) or
    artifact files (.pt, .esq, .onnx, .tflite: evaluated now on the test split through
    their own runtimes). An artifact that cannot be evaluated is never a pass, nor is a
    file that has changed since its report measured it (SHA-256); a report with no
    artifacts, or with a field missing or out of range, is bad input. Size
    budgets (--max-size) judge the files that ship; the float reference .pt is judged
    only by a size limit of its own (--max-size-for pt=SIZE). An accuracy, agreement or
    drop whose limit lies inside the 95% interval of its measurement on the test images
    (a FAIL at 94% of 100 images against 95%) gets a note under the table: PASS or FAIL,
    more test images decide it.

    \b
    Example:
      edgesqueeze check artifacts/squeezenet-digits/verify.json --max-size 100KB --min-accuracy 0.95
      edgesqueeze check model.int8.tflite --data mnist --max-size 100KB --min-accuracy 99.4% \\
          --junit gate.xml --markdown "$GITHUB_STEP_SUMMARY"
    """
    from edgesqueeze._io import check_writable, is_stdout, remove_output, write_text_output
    from edgesqueeze.budget import (check as run_check, exit_code, noise_notes, unmatched_formats, verdicts_json,
                                    verdicts_junit, verdicts_markdown, verdicts_table)

    to_stdout = [opt for opt, path in (("--json", json_path), ("--junit", junit_path), ("--markdown", md_path))
                 if is_stdout(path)]
    if len(to_stdout) > 1:
        raise click.UsageError(f"{' and '.join(to_stdout)} both name standard output ('-'); give one of them a file")
    appends = (md_path is not None and not is_stdout(md_path)
               and (_is_step_summary(md_path) or md_path.exists() and not md_path.is_file()))
    from edgesqueeze._io import outputs_clear_of_inputs

    outputs_clear_of_inputs([("--json", json_path), ("--junit", junit_path), ("--markdown", md_path)],
                            [*(("a file checked", p) for p in paths), ("--reference", reference),
                             *model_opts.input_files, *_files_reports_name(paths)])
    for path in (json_path, junit_path, md_path):
        if path is not None and not is_stdout(path):
            check_writable(path, appends=appends and path is md_path)  # before the evaluation, not after it
    for path in (json_path, junit_path, None if appends else md_path):  # none of them an input (checked above)
        if path is not None and not is_stdout(path) and path.is_file() and not path.is_symlink():
            # an earlier run's verdicts must not outlive this run if it stops on bad input: the
            # outputs are this run's or none (CI uploads them beside the exit status)
            remove_output(path)  # its permission bits come back with this run's file
    from edgesqueeze._io import remove_stale_temps

    for path in (json_path, junit_path, md_path):  # a killed check's half-written files, of these names only
        if path is not None and not is_stdout(path):
            remove_stale_temps(path.parent, lambda m: click.echo(m, err=True), names={path.name})
    # after the earlier verdicts are gone: a bad recipe, --set or budget option left them in place
    model_opts.raise_deferred()
    model_opts.note_unused_sets(("model", "data.dataset", "data.data_dir", "budget"), "check")
    budget = _budget_from_options(model_opts.recipe, max_size, max_size_for, min_accuracy, max_drop, min_agreement)
    if budget.is_empty():
        raise click.UsageError("no budget: give --max-size, --max-size-for, --min-accuracy, --max-drop, "
                               "--min-agreement or a --recipe with a 'budget' section")
    rows, files, file_notes = [], [], []
    data = model_opts.section("data")
    from edgesqueeze._io import once_each

    paths, repeats = once_each(paths)  # a report given twice listed its rows, and its verdicts, twice
    if repeats:
        click.echo(f"note: given more than once, checked once: {', '.join(repeats)}", err=True)
    paths = [Path(p) for p in paths]
    for p in paths:
        _not_a_directory(p)
        if _is_report(p):
            rows.extend(_report_rows(p, data.dataset if data is not None else None, model_opts.recipe_path,
                                     file_notes))
        else:
            files.append(p)
    unused = [opt for opt, value in (("--reference", reference), ("--data", dataset), ("--limit", limit))
              if value is not None]
    if unused and not files:  # they were dropped without a word: a report's rows are its own numbers
        click.echo(f"note: {', '.join(unused)} apply to artifact files measured now; a report is judged by the "
                   "numbers it holds (run `edgesqueeze verify` with them to measure again)", err=True)
    sizes_only = (budget.min_accuracy is None and budget.max_drop is None and budget.min_agreement is None
                  and not unused)
    if files and sizes_only and not any(_sniff_kind(p) in ("pt", "esq") for p in files):  # a damaged file: an
        # error row of its own, not the whole gate evaluated on test images (which needs torch)
        from edgesqueeze.verify import measure_sizes  # no dataset, no torch: a size gate on a device

        rows.extend(measure_sizes(files, log=lambda m: click.echo(m, err=True)))
    elif files:
        from edgesqueeze.verify import evaluate_artifacts  # numpy and the runtimes: only for files to measure

        report = evaluate_artifacts(files, dataset=dataset, data_dir=data_dir or model_opts.data_dir,
                                    reference=reference, limit=limit, log=lambda m: click.echo(m, err=True),
                                    progress=progress_bars(progress), **model_opts.load_kwargs())
        rows.extend(report["artifacts"])
    verdicts = run_check(rows, budget)
    from edgesqueeze._io import names_standard_output

    # stdout is the machine-readable output then (--json -, or --json /dev/stdout, which mixed the table in)
    to_stdout = to_stdout or [p for p in (json_path, junit_path, md_path) if names_standard_output(p)]
    click.echo(verdicts_table(verdicts), err=bool(to_stdout))
    notes = noise_notes(rows, budget)
    for line in notes:  # a verdict that another sample of as many test images could turn around
        click.echo(line, err=bool(to_stdout))
    missing = unmatched_formats(rows, budget)
    if missing and any(v.check == "size" for v in verdicts if v.artifact != "-"):
        file_notes.append(f"note: the budget limits the size of {', '.join(missing)}, which no artifact here has "
                          "(not checked)")
    for line in file_notes:  # what the verdicts rest on: the job summary and the JSON say it too, not stderr alone
        click.echo(line, err=True)
    notes = [*notes, *file_notes]
    if json_path:
        write_text_output(json_path, verdicts_json(verdicts, rows, budget, notes))
    if junit_path:
        write_text_output(junit_path, verdicts_junit(verdicts))
    if md_path:
        md = verdicts_markdown(verdicts, rows, notes)
        if appends:
            try:
                with open(md_path, "a") as fh:
                    fh.write(md)
            except OSError as exc:
                from edgesqueeze.errors import OutputError

                raise OutputError(f"{md_path}: cannot append the verdicts ({exc.strerror or exc})") from None
        else:
            write_text_output(md_path, md)
    ctx.exit(exit_code(verdicts))
