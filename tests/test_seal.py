"""A plain .onnx / .tflite file's own CRC-32, recorded in its metadata at export
(edgesqueeze.format.seal): every exported file carries it, the runtime checks it before
running, and a damaged byte anywhere is refused instead of run."""

from __future__ import annotations

import zlib
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesqueeze.errors import FormatError
from edgesqueeze.format.seal import KEY, PLACEHOLDER, check_seal, seal

sys.path.insert(0, str(Path(__file__).parent))
from test_packed_export import exported, shared_ckpt, trained  # noqa: E402,F401 - the shared digits model, exported

MARK = f'"{KEY}":"'.encode()
SAMPLE = b"\x00weights\x01\x02" * 50 + b'{"a":1,' + MARK + PLACEHOLDER.encode() + b'","z":2}' + b"\xff" * 40


def test_seal_fills_in_the_crc_of_the_file_with_zeros_in_its_place():
    sealed = seal(SAMPLE)
    assert len(sealed) == len(SAMPLE)
    at = sealed.index(MARK) + len(MARK)
    recorded = sealed[at:at + 8].decode()
    assert recorded == f"{zlib.crc32(SAMPLE):08x}"  # the spec: zeros in place, CRC-32, write
    assert sealed[:at] == SAMPLE[:at] and sealed[at + 8:] == SAMPLE[at + 8:]
    assert check_seal(sealed, "f") == recorded
    assert seal(sealed) == sealed  # sealing again over the same bytes changes nothing
    assert seal(b"no marker here") == b"no marker here" and check_seal(b"no marker", "f") is None
    assert check_seal(SAMPLE, "f") is None  # zeros never filled in: no record


def test_damage_to_the_record_itself_is_refused():
    sealed = bytearray(seal(SAMPLE))
    at = bytes(sealed).index(MARK) + len(MARK)
    sealed[at + 5] = ord("G")  # not a hex digit
    with pytest.raises(FormatError, match=r"^f: its recorded checksum \(file_crc32 in its metadata\) is damaged"):
        check_seal(bytes(sealed), "f")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused_or_unrecorded_never_passed(data):
    sealed = seal(SAMPLE)
    i = data.draw(st.integers(0, len(sealed) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(sealed)
    bad[i] ^= 1 << bit
    try:
        got = check_seal(bytes(bad), "f")
    except FormatError:
        return
    mark_at = sealed.index(MARK)
    assert got is None and mark_at <= i < mark_at + len(MARK)  # only a hit on the marker hides the record


@pytest.mark.slow
def test_every_exported_file_records_its_own_crc_and_a_flip_is_refused(exported, tmp_path):
    """The digits SqueezeNet (shared like an .esq) exported to all four formats: each file
    records its CRC-32 and checks, its packed form decodes to the same bytes, and one flipped byte in the middle of
    each plain file is refused by the runtime and by `run` (exit 2, one line)."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli
    from edgesqueeze.runtime import load
    from edgesqueeze.runtime._base import unpack_file

    _, written, _ = exported
    plain = [p for p in written if p.suffix in (".onnx", ".tflite")]
    assert len(plain) == 4
    for p in plain:
        data = p.read_bytes()
        assert check_seal(data, str(p)) is not None, p
        assert unpack_file(p.with_name(p.name + ".esq"))[0] == data  # the packed file decodes to these bytes
        load(p)
        bad = tmp_path / f"bad{p.suffix}"
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(FormatError, match="its bytes are not the ones exported"):
            load(bad)
        res = CliRunner().invoke(cli, ["run", str(bad), str(tmp_path / "x.png")])
        assert res.exit_code == 2 and "its bytes are not the ones exported" in res.output, res.output
        for f, says, code in ((p, "checksum recorded at export: matches", 0),
                              (bad, "checksum recorded at export: DOES NOT MATCH", 2)):
            res = CliRunner().invoke(cli, ["inspect", str(f)])  # describes, and says so; a damaged file exits 2
            assert res.exit_code == code and says in res.output.splitlines()[0], res.output
            if code:  # it was exit 0, as if the file were fine, while run and verify refuse it
                assert res.output.splitlines()[-1].startswith(f"error: {bad}: its bytes are not the ones exported")


def test_reseal_records_the_checksum_of_a_file_changed_on_purpose(exported, tmp_path):
    import torch
    from click.testing import CliRunner

    from edgesqueeze.cli import cli
    from edgesqueeze.format.container import MAGIC

    _, written, _ = exported
    f = tmp_path / "m.tflite"
    edited = bytearray(next(p for p in written if p.name.endswith(".tflite") and ".int8" not in p.name).read_bytes())
    edited[len(edited) // 2] ^= 0x01  # an edit after export, inside the float weights
    f.write_bytes(bytes(edited))
    with pytest.raises(FormatError, match="edgesqueeze reseal FILE"):
        check_seal(f.read_bytes(), str(f))
    res = CliRunner().invoke(cli, ["reseal", str(f)])
    assert res.exit_code == 0 and "file_crc32 recorded again" in res.output, res.output
    after = f.read_bytes()
    assert check_seal(after, str(f)) is not None
    assert sum(a != b for a, b in zip(after, edited)) <= 8 and len(after) == len(edited)  # only the record
    res = CliRunner().invoke(cli, ["reseal", str(f)])
    assert res.exit_code == 0 and "already matches" in res.output
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), str(tmp_path / "plain.onnx"), dynamo=False)
    (tmp_path / "p.tflite.esq").write_bytes(MAGIC + b"\0" * 40)
    # not a model, but a record in it: a cut copy, or any file holding the key (audit: both got a valid checksum)
    (tmp_path / "cut.tflite").write_bytes(after[: len(after) - 5000])
    (tmp_path / "notes.json").write_text('{"file_crc32":"12345678"}')
    for name, says in (("plain.onnx", "records no file_crc32"), ("p.tflite.esq", "checks itself"),
                       ("missing.onnx", "no such file"), ("cut.tflite", "not a model the runtime opens"),
                       ("notes.json", "not a model the runtime opens")):
        before = (tmp_path / name).read_bytes() if (tmp_path / name).exists() else None
        res = CliRunner().invoke(cli, ["reseal", str(tmp_path / name)])
        assert res.exit_code == 2 and says in res.output, res.output
        if before is not None:
            assert (tmp_path / name).read_bytes() == before


def test_seal_never_writes_over_a_record_that_is_not_8_digits():
    """A record edited to "" made seal write 8 digits over the JSON after it (reseal then
    broke the file's metadata and exited 2)."""
    data = b'{"file_crc32":"","format":"edgesqueeze.artifact"}'
    with pytest.raises(FormatError, match="not 8 hex digits"):
        seal(data)


def test_reseal_and_inspect_take_several_files_and_name_the_damaged_one(exported, tmp_path):
    """`reseal export/*.onnx` was "Got unexpected extra arguments"; `inspect` of several files
    describes each, then exits 2 naming the damaged one."""
    import json
    import shutil

    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    _, written, _ = exported
    plain = [p for p in written if p.suffix in (".onnx", ".tflite")][:2]
    copies = [tmp_path / f"copy{i}{p.suffix}" for i, p in enumerate(plain)]
    for p, copy in zip(plain, copies):
        shutil.copy(p, copy)
    res = CliRunner().invoke(cli, ["reseal", *map(str, copies)])
    assert res.exit_code == 0 and res.output.count("already matches") == 2, res.output
    damaged = bytearray(copies[1].read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    copies[1].write_bytes(bytes(damaged))
    res = CliRunner().invoke(cli, ["inspect", str(copies[1]), str(copies[0])])
    assert res.exit_code == 2 and str(copies[0]) in res.stdout, res.output
    assert res.stderr.startswith(f"error: {copies[1]}: its bytes are not the ones exported"), res.stderr
    # a packed file first stopped the run: the damaged file after it was never resealed
    packed = next(p for p in written if p.name.endswith(".esq"))
    res = CliRunner().invoke(cli, ["reseal", str(packed), str(copies[1]), str(copies[0])])
    assert res.exit_code == 2 and "a packed or checkpoint archive checks itself" in res.stderr, res.output
    assert "recorded again" in res.stdout and "already matches" in res.stdout, res.output
    # an unreadable file among them: --json printed nothing at all
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    res = CliRunner().invoke(cli, ["inspect", "--json", str(copies[0]), str(junk)])
    assert res.exit_code == 2 and [d["path"] for d in json.loads(res.stdout)] == [str(copies[0])], res.output
