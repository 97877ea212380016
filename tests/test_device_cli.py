"""The device user's commands (run, bench, inspect, unpack) on bad input: one `error:` line and
exit 2, nothing on stdout that is not the answer, and no device node or link replaced."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
from test_runtime import onnx_models  # noqa: E402,F401 - a tiny ONNX model with edgesqueeze metadata

from edgesqueeze.cli import cli  # noqa: E402
from edgesqueeze.errors import FormatError  # noqa: E402
from edgesqueeze.runtime import load  # noqa: E402


def _cli(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart always
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args])


def _one_error(r, *needles, progress=False):
    """Exit 2 and one `error:` line (after bench's `timing ...` progress lines with ``progress``)."""
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    if progress:
        lines = [ln for ln in lines if not ln.startswith("timing ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == "", r.stdout


@pytest.fixture(scope="module")
def packed(onnx_models, tmp_path_factory):
    from edgesqueeze.export.packed import pack_file

    out, _ = pack_file(onnx_models["fp32"], tmp_path_factory.mktemp("packed") / "tiny.onnx.esq", fmt="onnx")
    return out


def test_unpack_to_a_link_to_a_device_writes_through_it(packed, tmp_path):
    # as root, `unpack x.onnx.esq -o /dev/null --force` renamed a regular file over /dev/null
    # (and -o /dev/stdout over that link); through a link here, so a regression harms nothing
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    r = _cli("unpack", packed, "-o", link, "--force")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert "SHA-256 checked" in r.stderr and r.stdout == ""  # the model's bytes may be on stdout


def test_unpack_to_a_full_device_is_one_line(packed, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    link = tmp_path / "full"
    link.symlink_to("/dev/full")
    _one_error(_cli("unpack", packed, "-o", link, "--force"), "full: cannot write")
    assert link.is_symlink()


def test_an_esq_damaged_by_a_text_mode_transfer_says_so(packed, tmp_path):
    data = packed.read_bytes()
    bad = tmp_path / "tiny.onnx.esq"
    bad.write_bytes(data[:4] + b"\n" + data[6:])  # \r\n -> \n, as a text-mode copy does
    for cmd in (["run", bad, tmp_path / "x.png"], ["inspect", bad], ["unpack", bad, "-o", tmp_path / "o.onnx"]):
        _one_error(_cli(*cmd), str(bad), "text-mode transfer")
    assert not (tmp_path / "o.onnx").exists()


def test_an_onnx_file_with_a_damaged_name_is_damage_and_prints_no_banner(onnx_models, tmp_path):
    data = onnx_models["fp32"].read_bytes()
    bad = bytearray(data)
    bad[data.index(b"input")] = 0xFF  # a name that is no longer UTF-8
    path = tmp_path / "bad.onnx"
    path.write_bytes(bytes(bad))
    # onnxruntime printed "*** EP Error ***" and three more lines to stdout and retried; the
    # error then said "upgrade onnxruntime"
    r = _cli("run", path, tmp_path / "x.png", "--json")
    _one_error(r, str(path), "damaged")
    assert "upgrade" not in r.stderr


@pytest.mark.parametrize("command", ["run", "bench", "inspect"])
def test_onnx_metadata_that_is_not_utf8_is_one_line(onnx_models, tmp_path, command):
    """Another tool's binary metadata value (or a damaged one): onnxruntime raised
    UnicodeDecodeError when asked for the map, a traceback and exit 1 in run, bench and inspect."""
    import onnx

    model = onnx.load(str(onnx_models["fp32"]))
    model.metadata_props.add(key="author", value="XQQQ-binary")
    data = model.SerializeToString()
    path = tmp_path / "binmeta.onnx"
    path.write_bytes(data.replace(b"XQQQ-binary", b"\xffQQQ-binary"))
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    args = {"run": ("run", path, tmp_path / "x.png"), "bench": ("bench", path, "--runs", 1, "--warmup", 0),
            "inspect": ("inspect", path)}[command]
    if command == "inspect":  # with the onnx package, inspect reads the protobuf itself: it works
        r = _cli(*args)
        assert r.exit_code == 0 and str(path) in r.stdout, (r.exit_code, r.stdout, r.stderr)
        r = _cli_without(["onnx"], *args)  # without it: through onnxruntime's map
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert r.stderr.startswith(f"error: {path}: its ONNX metadata is not UTF-8"), r.stderr
        return
    _one_error(_cli(*args), str(path), "metadata is not UTF-8", progress=command == "bench")


def test_run_on_a_model_with_dynamic_image_size_and_no_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    model = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(model), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    # was a TypeError traceback from int(None)
    _one_error(_cli("run", model, img), str(model), "dynamic dimensions")

    from edgesqueeze.errors import DataError
    from edgesqueeze.runtime import load_image

    with pytest.raises(DataError, match="dynamic dimensions"):
        load_image(img, (3, None, None))

    # an --input-shape the model cannot run on (a 3x3 conv on 2x2): the user's size, not a damaged
    # file as it said, and without onnxruntime's own coloured log line on standard error before it
    for args in (["run", model, img], ["bench", model, "--runs", "1", "--warmup", "0", "-b", "1"]):
        r = subprocess.run([sys.executable, "-m", "edgesqueeze", *map(str, args), "--input-shape", "3,2,2"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (r.stdout, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if not ln.startswith(("timing ", "note: "))]
        assert len(errors) == 1 and "cannot run the model on images of shape [3, 2, 2]" in errors[0], r.stderr
        assert "give the --input-shape C,H,W it was made for" in errors[0] and "damaged" not in errors[0]


def test_bench_a_batch_larger_than_memory_is_one_line(onnx_models):
    if sys.maxsize < 2**40:
        pytest.skip("a 32-bit address space refuses the size before numpy sees it")
    # was a numpy _ArrayMemoryError traceback
    _one_error(_cli("bench", onnx_models["fp32"], "-b", 10**12, "--runs", 1, "--warmup", 0),
               str(onnx_models["fp32"]), "does not fit in memory", progress=True)


def test_missing_yaml_names_the_small_package():
    import subprocess

    code = ("import sys; sys.modules['yaml'] = None\n"
            "from edgesqueeze.cli import main\n"
            "sys.argv = ['edgesqueeze', 'bench', 'x.onnx', '--arch-kwargs', '{a: 1}']\n"
            "main()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install PyYAML" in lines[0] and "'.[runtime]'" in lines[0], r.stderr


def test_very_large_images_are_one_line_each(onnx_models, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"  # over Pillow's 89 M pixel limit, under twice it: read, with a note
    Image.new("RGB", (9500, 9500)).save(big)
    r = _cli("run", onnx_models["fp32"], big, "-k", 1)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"note: {big}: 9,500 x 9,500")
    bomb = tmp_path / "bomb.png"  # over twice it: refused, and not called damaged
    Image.new("L", (14000, 14000)).save(bomb)
    r = _cli("run", onnx_models["fp32"], bomb)
    _one_error(r, str(bomb), "too large")
    assert "damaged" not in r.stderr


def _cli_without(modules: list[str], *args: str):
    """Run the CLI in a fresh Python where ``modules`` cannot be imported (a device install)."""
    import subprocess

    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
            + "from edgesqueeze.cli import main\n"
            + f"sys.argv = ['edgesqueeze', *{list(map(str, args))!r}]\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_unpacking_a_checkpoint_archive_without_torch_is_one_line_naming_the_extra(tmp_path):
    from edgesqueeze.format import container

    esq = tmp_path / "model.esq"  # a checkpoint archive as far as unpack can tell: not a packed file
    esq.write_bytes(container.dumps({"arch": "x"}, [("w", b"\0" * 4, {"shape": [1]})]))
    r = _cli_without(["torch"], "unpack", esq, "-o", tmp_path / "m.pt")
    # was click's three-line usage error ("Usage: ...", "Try ...", "Error: ...") naming no extra
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {esq}") and "'.[train]'" in lines[0], r.stderr
    assert not (tmp_path / "m.pt").exists()


def test_inspect_of_a_packed_file_names_it_not_a_temporary_file(packed, tmp_path):
    r = _cli_without(["onnxruntime", "onnx"], "inspect", packed)
    # was "error: /tmp/edgesqueeze-inspect-XXXX/tiny.onnx: is an ONNX model but onnxruntime ..."
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {packed}: is an ONNX model"), r.stderr
    assert "edgesqueeze-inspect-" not in r.stderr


def test_run_takes_folders_each_file_once_in_batches(onnx_models, tmp_path):
    """A folder is its image files (recursive, sorted, hidden ones and other files skipped);
    a file named twice is classified once with a note; batching does not change a score."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "b").mkdir(parents=True)
    (tmp_path / "imgs" / ".cache").mkdir()
    names = ["imgs/z.png", "imgs/a.jpg", "imgs/b/c.PNG", "imgs/b/d.bmp", "imgs/.cache/h.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / n)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    folder, again = tmp_path / "imgs", tmp_path / "imgs" / "z.png"
    r = _cli("run", onnx_models["fp32"], folder, again, "-k", 2, "--json", "-b", 1)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith(f"note: 1 image file(s) given more than once, each classified once: {again} (2 times)")
    # one file named three times more was "3 image path(s) given more than once ...: z.png, z.png, z.png"
    r4 = _cli("run", onnx_models["fp32"], again, again, folder, again, "-k", 1, "--json")
    assert r4.stderr.startswith(f"note: 1 image file(s) given more than once, each classified once: {again} (4 times)")
    by_one = json.loads(r.stdout)
    assert list(by_one) == [str(tmp_path / n) for n in ("imgs/a.jpg", "imgs/b/c.PNG", "imgs/b/d.bmp", "imgs/z.png")]
    r = _cli("run", onnx_models["fp32"], folder, "-k", 2, "--json", "-b", 3)
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout) == by_one
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _one_error(_cli("run", onnx_models["fp32"], tmp_path / "empty"), str(tmp_path / "empty"), "no image files")


def test_run_stops_at_a_bad_image_in_a_later_batch_with_no_partial_output(onnx_models, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (9, 9), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"\x89PNG damaged")
    _one_error(_cli("run", onnx_models["fp32"], tmp_path, "-b", 2), str(tmp_path / "3.png"), "cannot read")


def test_bench_json_to_a_path_that_cannot_be_written_fails_before_timing(onnx_models, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r = _cli("bench", onnx_models["fp32"], "--runs", 1, "--warmup", 0, "--json", tmp_path / "a-file" / "rows.json")
    _one_error(r, "a-file is a file, not a folder")  # and no `timing ...` line: nothing was timed


def test_bench_json_dash_is_standard_output(onnx_models, tmp_path, monkeypatch):
    """`bench --json -` wrote a file named '-'; now the rows are stdout alone (the table stderr)."""
    import json

    monkeypatch.chdir(tmp_path)
    r = _cli("bench", onnx_models["fp32"], "-b", 1, "--runs", 1, "--warmup", 0, "--json", "-")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["batch_size"] for row in rows] == [1] and "p50 ms" in r.stderr
    # each row says how it was timed and where, not only the CPU's features
    assert {k: rows[0][k] for k in ("runs", "warmup")} == {"runs": 1, "warmup": 0}
    assert rows[0]["date"].endswith("UTC") and rows[0]["cpu"]["cores"] >= 1 and rows[0]["edgesqueeze_version"]
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_a_reader_that_stops_reading_is_not_an_error(onnx_models, tmp_path, command):
    """`edgesqueeze run ... | head -1`: the reader closes the pipe while the command writes.
    That printed "error: Broken pipe" and exited 2; now no line, exit 0."""
    import subprocess

    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    args = ["run", str(onnx_models["fp32"]), str(tmp_path / "x.png")] if command == "run" \
        else ["inspect", str(onnx_models["fp32"])]
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before the first write: every write fails with EPIPE
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "edgesqueeze", *args], stdout=w_fd, stderr=subprocess.PIPE,
                       text=True, env=env, timeout=120)
    os.close(w_fd)
    assert p.returncode == 0 and p.stderr == "", (p.returncode, p.stderr)


def test_unpack_of_something_that_is_not_an_archive_says_what_it_is(onnx_models, tmp_path):
    """One line naming the file and what it is, exit 2 (was click's four-line usage error,
    calling a truncated archive or a text file "onnx")."""
    one = tmp_path / "t.esq"
    one.write_bytes(b"E")
    text = tmp_path / "fake.jpg"
    text.write_text("hello, not an image\n")
    for path, says in ((one, "only 1 bytes: truncated?"), (text, "an ONNX model or another file"),
                       (onnx_models["fp32"], "no .esq header")):
        _one_error(_cli("unpack", path, "-o", tmp_path / "out.bin"), str(path), "not an .esq archive", says)
    assert not (tmp_path / "out.bin").exists()


def test_run_of_a_file_without_metadata_says_what_it_assumed_or_takes_mean_and_std(onnx_models, tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 100, 50)).save(tmp_path / "a.png")
    plain = _cli("run", onnx_models["raw"], tmp_path / "a.png", "--json")
    assert plain.exit_code == 0 and "has no edgesqueeze metadata" in plain.stderr, plain.stderr
    given = _cli("run", onnx_models["raw"], tmp_path / "a.png", "--json", "--mean", "0.5,0.5,0.5",
                 "--std", "0.1,0.1,0.1")
    assert given.exit_code == 0 and given.stderr == "", given.stderr
    assert given.stdout != plain.stdout  # the normalization reached the model
    own = _cli("run", onnx_models["fp32"], tmp_path / "a.png", "--mean", "0.5", "--std", "0.1")
    _one_error(own, "records its own input description")
    # finite in Python, infinite in the runtime's float32: printed "probability": NaN with exit 0
    for option, value in (("--mean", "1e39,0,0"), ("--std", "1,1,1e39")):
        args = {"--mean": "0.5,0.5,0.5", "--std": "0.1,0.1,0.1", option: value}
        _one_error(_cli("run", onnx_models["raw"], tmp_path / "a.png", "--json", *(a for kv in args.items() for a in kv)),
                   option, "at most 1e6" if option == "--mean" else "between 1e-6 and 1e6")


def test_a_reader_that_stops_reading_does_not_stop_a_command_that_writes_files(onnx_models, tmp_path):
    """`edgesqueeze train ... | head -1` exited 0 with no model.pt; a writer now carries on and
    writes its files with its output going nowhere (here: export of an .onnx unpacked to a
    file, and bench's JSON, with stdout a pipe nobody reads)."""
    import json
    import subprocess

    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = tmp_path / "rows.json"
    p = subprocess.run([sys.executable, "-m", "edgesqueeze", "bench", str(onnx_models["fp32"]), "-b", "1",
                        "--runs", "2", "--warmup", "0", "--json", str(rows)], stdout=w_fd, stderr=subprocess.PIPE,
                       text=True, env=env, timeout=120)
    os.close(w_fd)
    assert p.returncode == 0, p.stderr
    assert json.loads(rows.read_text())[0]["batch_size"] == 1  # written after the table was printed
    helped = subprocess.run([sys.executable, "-m", "edgesqueeze", "bench", "--help"], capture_output=True, text=True,
                            env={**env, "COLUMNS": "400"}, timeout=120).stdout
    assert not [k for k in json.loads(rows.read_text())[0] if k not in helped]  # every key is documented


def test_unpack_to_standard_output_and_to_a_name_of_another_format(packed, onnx_models, tmp_path):
    """Audit: `-o -` wrote a file named '-'; `-o x.tflite` wrote ONNX bytes under a .tflite name."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "edgesqueeze", "unpack", str(packed), "-o", "-"], capture_output=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and p.stdout == Path(onnx_models["fp32"]).read_bytes(), p.stderr
    assert not (tmp_path / "-").exists() and p.stderr.decode().startswith("-: ")
    # a reader gone after 100 bytes (`| head -c 100`): exit 0 and "-: N bytes" said it was delivered
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    p = subprocess.run([sys.executable, "-m", "edgesqueeze", "unpack", str(packed), "-o", "-"], stdout=w_fd,
                       stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=120)
    os.close(w_fd)
    assert p.returncode == 2 and p.stderr.decode().startswith("error: -o -: the reader of standard output stopped"), \
        p.stderr
    # to a terminal, the model's bytes scrolled by (exit 0); gzip -c and xz -c refuse, so does unpack
    leader, follower = os.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "edgesqueeze", "unpack", str(packed), "-o", "-"], stdout=follower,
                           stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=120)
    finally:
        os.close(follower)
        os.close(leader)
    assert p.returncode == 2, p.stderr
    assert p.stderr.decode().startswith("error: -o -: standard output is a terminal, and the file is binary"), p.stderr
    r = _cli("unpack", packed, "-o", tmp_path / "x.tflite")
    assert r.exit_code == 2 and "holds an ONNX model; name the output .onnx" in r.stderr, r.stderr
    assert not (tmp_path / "x.tflite").exists()
    # --out, as train, compress, export and verify spell it, is -o too (it was "No such option")
    r = _cli("unpack", packed, "--out", tmp_path / "x.onnx")
    assert r.exit_code == 0 and (tmp_path / "x.onnx").read_bytes() == Path(onnx_models["fp32"]).read_bytes(), r.stderr
    # a folder, new with a trailing / or existing, gets the recorded name in it (`--out u/` wrote a file named u)
    plain = Path(onnx_models["fp32"])
    for folder, arg in ((tmp_path / "new", f"{tmp_path / 'new'}/"), (tmp_path, str(tmp_path))):
        r = _cli("unpack", packed, "--out", arg)
        assert r.exit_code == 0 and (folder / plain.name).read_bytes() == plain.read_bytes(), r.stderr
    assert not (tmp_path / "new").is_file()
    (tmp_path / "afile").write_bytes(b"mine")  # a folder named with /, where a file is: "afile: File exists"
    r = _cli("unpack", packed, "--out", f"{tmp_path / 'afile'}/")
    assert r.exit_code == 2 and f"{tmp_path / 'afile'}/: names a folder, but {tmp_path / 'afile'} is a file" in r.stderr
    assert (tmp_path / "afile").read_bytes() == b"mine"


def test_a_file_named_as_packed_must_be_packed_and_of_its_named_kind(packed, onnx_models, tmp_path):
    """A plain ONNX renamed .onnx.esq ran (run, bench) while unpack refused it; a packed ONNX
    named .tflite.esq was unpacked while run refused it. Every command now reads a file's name
    the same way: a packed name on a plain file, or the other kind, is one line naming both."""
    import shutil

    plain = tmp_path / "plain.onnx.esq"
    shutil.copyfile(onnx_models["fp32"], plain)
    other = tmp_path / "other.tflite.esq"
    shutil.copyfile(packed, other)
    cases = {plain: "is named as a packed file (.esq) but holds a plain ONNX model, with no .esq header; rename it to "
                    "plain.onnx if that is what it is",
             other: "is named as a packed TFLite file but holds a packed ONNX model; rename it to other.onnx.esq"}
    for path, says in cases.items():
        with pytest.raises(FormatError, match=re.escape(f"{path}: {says}")):
            load(path)
        for command in (["bench", path, "--runs", "1"], ["run", path, "--json", tmp_path / "nothing.png"]):
            r = _cli(*command)
            assert r.exit_code == 2 and f"{path}: {says}" in r.stderr, (command, r.stderr)
    r = _cli("unpack", other, "-o", tmp_path / "u.onnx")
    assert r.exit_code == 2 and f"{other}: {cases[other]}" in r.stderr and not (tmp_path / "u.onnx").exists(), r.stderr
    r = _cli("unpack", plain, "-o", tmp_path / "u.onnx")
    assert r.exit_code == 2 and "not an .esq archive" in r.stderr, r.stderr


def test_bench_and_run_take_input_shape_for_a_file_with_free_image_dimensions(onnx_models, tmp_path):
    """An ONNX file another tool exported with free H and W could not be timed ("cannot
    benchmark it", with no way out) nor run, and bench ignored --input-shape, whose help offers
    it for such files; a shape the file's own fixed dimensions contradict was ignored too."""
    import warnings

    import torch

    from test_runtime import rand

    free = tmp_path / "free.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(onnx_models["net"], (torch.from_numpy(rand(1)),), str(free), input_names=["input"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}})
    r = _cli("bench", free, "-b", "1", "--runs", "2")
    assert r.exit_code == 2 and "has dynamic dimensions" in r.stderr and "--input-shape C,H,W" in r.stderr, r.stderr
    r = _cli("bench", free, "-b", "1", "--runs", "2", "--input-shape", "3,16,16", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "b.json").read_text())[0]["p50_ms"] > 0
    r = _cli("bench", onnx_models["static"], "-b", "1", "--runs", "2", "--input-shape", "1,99,99")
    assert r.exit_code == 2 and "takes images of shape [3, 16, 16], but --input-shape gives [1, 99, 99]" in r.stderr
    # run: the size to resize images to, for such a file (it could not classify any image)
    from PIL import Image

    Image.new("RGB", (30, 20), (100, 50, 20)).save(tmp_path / "a.png")
    r = _cli("run", free, tmp_path / "a.png", "--json")
    assert r.exit_code == 2 and "--input-shape C,H,W" in r.stderr, r.stderr
    r = _cli("run", free, tmp_path / "a.png", "--json", "--input-shape", "3,16,16")
    assert r.exit_code == 0 and len(json.loads(r.stdout)[str(tmp_path / "a.png")]) == 5, r.stderr
    r = _cli("run", onnx_models["static"], tmp_path / "a.png", "--input-shape", "3,20,20")
    assert r.exit_code == 2 and "takes images of shape [3, 16, 16], but --input-shape gives [3, 20, 20]" in r.stderr



def test_file_names_that_are_not_utf8_go_through_verify_check_run_and_bench(onnx_models, tmp_path):
    """A Linux file name is bytes: ``m\\xff.onnx`` reached Python as ``m\\udcff.onnx``, and
    verify (its markdown), compress (its report) and check's outputs failed with a traceback
    after the work was done, bench and run read the name as "onnxruntime cannot load this
    model", and check refused the report verify wrote as damaged. The real command, since
    what a name that is not text does to the output depends on the real standard streams."""
    from PIL import Image

    from test_runtime import CLASSES, META, set_onnx_meta

    def es(*args):
        return subprocess.run([sys.executable, "-m", "edgesqueeze", *map(str, args)], capture_output=True,
                              cwd=tmp_path, timeout=120)

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / os.fsdecode(b"im\xfa%d.png" % i))
    name = os.fsdecode(b"tiny\xff.onnx")
    model = tmp_path / name
    set_onnx_meta(onnx_models["raw"], model, {**META, "classes": sorted(CLASSES)})  # an image folder's order
    report = tmp_path / os.fsdecode(b"r\xfd.json")

    r = es("verify", model, "--data", f"imagefolder:{tmp_path / 'data'}", "--out", report)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(report.read_text())["artifacts"][0]["path"].endswith(name)  # JSON escapes it; reads back
    assert json.loads(report.read_text())["written_to"] == os.path.realpath(tmp_path)  # where check looks beside it
    assert "tiny\\xff.onnx" in report.with_suffix(".md").read_bytes().decode("utf-8")  # as `ls -b` shows it

    outs = {k: tmp_path / os.fsdecode(b"c\xfc." + k.encode()) for k in ("json", "md", "xml")}
    r = es("check", report, "--max-size", "1MB", "--json", outs["json"], "--markdown", outs["md"], "--junit", outs["xml"])
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert 'tiny\\xff.onnx" name="size"' in outs["xml"].read_bytes().decode("utf-8")
    assert "tiny\\xff.onnx" in outs["md"].read_bytes().decode("utf-8")
    assert json.loads(outs["json"].read_text())["verdicts"][0]["artifact"].endswith(name)

    image = tmp_path / "data" / "test" / CLASSES[0] / os.fsdecode(b"im\xfa0.png")
    r = es("run", model, image, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert list(json.loads(r.stdout)) == [str(image)]
    r = es("bench", model, "--runs", "2", "--warmup", "0", "-b", "1")
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_options_that_describe_a_pytorch_file_are_said_unused_for_an_exported_one(onnx_models):
    """inspect model.onnx --arch nosuch --classes a,b exited 0 without a word; bench said it of
    --classes only."""
    r = _cli("inspect", onnx_models["fp32"], "--arch", "nosuch", "--classes", "a,b")
    assert r.exit_code == 0, r.output
    assert "note: --arch, --classes describe a PyTorch model file" in r.stderr and "not used" in r.stderr
    r = _cli("bench", onnx_models["fp32"], "--runs", "1", "--warmup", "0", "-b", "1", "--arch", "nosuch")
    assert r.exit_code == 0, r.output
    assert "note: --arch describes a PyTorch model file; none of the files timed is one" in r.stderr
    r = _cli("inspect", onnx_models["fp32"])
    assert "note" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["info", "-"], ["inspect", "-"], ["reseal", "-"], ["eval", "-"]])
def test_a_dash_where_no_stream_is_taken_says_so(args):
    """`info -` said "-: no such file", as if a file named '-' were missing."""
    r = _cli(*args)
    assert r.exit_code == 2 and "'-' (standard input or output) is not taken here; name a file" in r.stderr, r.stderr


def test_check_and_unpack_remove_their_own_outputs_stale_temporary_files(packed, tmp_path):
    """A SIGKILL inside a write leaves `.NAME.XXXXXXXX.tmp`; train, compress, export and verify
    removed their own on the next run, check and unpack never did (CI folders collected them).
    Another name's temporary file beside them is not theirs to remove."""
    for name in ("gate.json", "plain.onnx", "other.json"):
        (tmp_path / f".{name}.k1ll3d9x.tmp").write_bytes(b"half")
    r = _cli("unpack", packed, "-o", tmp_path / "plain.onnx")
    assert r.exit_code == 0 and "removed .plain.onnx.k1ll3d9x.tmp, left by an interrupted write" in r.stderr, r.output
    r = _cli("check", tmp_path / "plain.onnx", "--max-size", "1MB", "--json", tmp_path / "gate.json")
    assert "removed .gate.json.k1ll3d9x.tmp, left by an interrupted write" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.k1ll3d9x.tmp", "gate.json", "plain.onnx"]


def test_a_file_name_with_a_line_break_keeps_the_error_on_one_line(tmp_path):
    """Linux allows a line break in a name; the `error:` line came out as two."""
    bad = tmp_path / "bad\nname.onnx"
    bad.write_bytes(b"x")
    for args in (["inspect", bad], ["bench", bad], ["check", tmp_path / "no\nreport.json", "--max-size", "1MB"]):
        r = _cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("timing ")]
        assert r.exit_code == 2 and len(lines) == 1 and "\\n" in lines[0], (args, r.stderr)


def test_inspect_and_unpack_take_several_files(packed, onnx_models, tmp_path):
    """`inspect export/*` and `unpack export/*.esq` were "Got unexpected extra arguments": a
    device given a folder of packed files needed a shell loop (reseal: test_seal)."""
    import shutil

    a, b = tmp_path / "a.onnx.esq", tmp_path / "b.onnx.esq"
    shutil.copy(packed, a)
    shutil.copy(packed, b)
    r = _cli("inspect", a, b, onnx_models["fp32"])
    assert r.exit_code == 0 and r.stdout.count("\n\n") >= 2 and str(b) in r.stdout, r.output
    r = _cli("inspect", a, b, "--json")
    assert r.exit_code == 0 and [d["path"] for d in json.loads(r.stdout)] == [str(a), str(b)], r.output
    r = _cli("unpack", a, b, "-o", tmp_path / "one.onnx")
    assert r.exit_code == 2 and "2 archives to unpack, one output file" in r.stderr, r.output
    from edgesqueeze.export.packed import pack_file

    c, _ = pack_file(onnx_models["int8"], tmp_path / "c.int8.onnx.esq", fmt="onnx-int8")
    r = _cli("unpack", a, c, "-o", f"{tmp_path / 'plain'}/")
    assert r.exit_code == 0, r.output
    for source in ("fp32", "int8"):
        plain = Path(onnx_models[source])
        assert (tmp_path / "plain" / plain.name).read_bytes() == plain.read_bytes()
    r = _cli("unpack", b, "-o", f"{tmp_path / 'plain'}/")  # the same recorded name as a's: refused, as one file is
    assert r.exit_code == 2 and "exists; pass --force" in r.stderr, r.output
    # two archives to one name in one run: refused before either is written (--force replaced the first)
    r = _cli("unpack", a, b, "-o", f"{tmp_path / 'both'}/", "--force")
    assert r.exit_code == 2 and "would both unpack to" in r.stderr and not (tmp_path / "both").exists(), r.output


def test_unpack_to_standard_output_writes_every_byte_or_says_it_did_not():
    """`unpack -o - | head -c 100`: an unbuffered stdout wrote the 64 KiB a pipe takes, returned
    that count, and the rest was never written: exit 0, and "-: N bytes" said it was delivered.
    A real pipe: a reader that takes everything gets everything, one that stops gets an error."""
    import threading

    from edgesqueeze.cli.compress import _write_stdout_whole
    from edgesqueeze.errors import OutputError

    data = bytes(range(256)) * 4096  # 1 MiB, sixteen times what a pipe holds
    for stop_after in (None, 100):
        r_fd, w_fd = os.pipe()
        got = bytearray()

        def reader():
            with open(r_fd, "rb", buffering=0) as fh:
                while chunk := fh.read(65536 if stop_after is None else stop_after):
                    got.extend(chunk)
                    if stop_after is not None:
                        return

        t = threading.Thread(target=reader)
        t.start()
        with open(w_fd, "wb", buffering=0) as stream:
            if stop_after is None:
                _write_stdout_whole(data, Path("m.onnx.esq"), stream)
            else:
                with pytest.raises(OutputError, match="stopped before the 1,048,576 bytes"):
                    _write_stdout_whole(data, Path("m.onnx.esq"), stream)  # the reader goes after 100 bytes
        t.join()
        if stop_after is None:
            assert bytes(got) == data
