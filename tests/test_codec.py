"""The model codec: every tensor back bit-exact, the smallest encoding chosen, bad sections refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesqueeze.checkpoint import esq_dumps as dumps_model
from edgesqueeze.checkpoint import esq_loads as loads_model
from edgesqueeze.errors import FormatError
from edgesqueeze.format import codec, container
from edgesqueeze.format.codec import MAX_CODEBOOK, RAW_SECTION, gaps_from_positions, positions_from_gaps

# The codec speaks numpy; these tests build tensors with torch (handier) and go through the
# checkpoint's torch side (esq_dumps / esq_loads), except where they test the arrays directly.


def encode_shared(name, t, **kwargs):
    return codec.encode_shared(name, t.numpy(), **kwargs)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_tensor(shape, k, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, generator=g)
    labels = torch.randint(0, k, shape, generator=g)
    mask = torch.rand(shape, generator=g) < density
    return torch.where(mask, codebook[labels], torch.zeros(()))


def golden_state_dict() -> dict[str, torch.Tensor]:
    """The tensors of ``tests/data/v1-small.esq``, from integer arithmetic (no RNG), so the
    test can rebuild them on any machine. Every encoding a version-1 writer chose is in it:
    a sparse layer with multi-chunk streams, a dense layer, per-slice codebooks, a float32
    bias stored as float16, raw float32 and int64 tensors."""
    i = torch.arange(40 * 30 * 3 * 3)
    cb = (torch.arange(16) - 8) / 32
    sparse = torch.where((i * 7919) % 10 < 3, cb[(i * 31) % 16], torch.zeros(())).reshape(40, 30, 3, 3)
    j = torch.arange(240)
    dense = ((j * 13) % 5 + 1).float().div(8).reshape(20, 12)
    per_slice = torch.stack([(torch.arange(300) % 150 + 150 * s + 1).float() / 1024 for s in range(2)])
    return {"a.weight": sparse, "a.bias": torch.arange(40).float() / 4 - 5, "b.weight": dense,
            "c.weight": per_slice, "d.weight": torch.tensor([0.1, 0.2, 0.3]),
            "bn.num_batches_tracked": torch.tensor(7)}


def assert_bitwise(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8) if a[k].dtype != torch.bool else a[k],
                           b[k].view(-1).view(torch.uint8) if b[k].dtype != torch.bool else b[k]), k


def test_docstring_example_gaps():
    pos = np.array([2, 4, 5])
    assert gaps_from_positions(pos, 1).tolist() == [1, 1, 0, 1, 0, 0]
    assert gaps_from_positions(pos, 2).tolist() == [2, 1, 0]
    assert positions_from_gaps(gaps_from_positions(pos, 1), 1).tolist() == [2, 4, 5]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), unique=True, max_size=300), st.integers(1, 8))
def test_gaps_round_trip(positions, width):
    pos = np.array(sorted(positions), dtype=np.int64)
    gaps = gaps_from_positions(pos, width)
    assert gaps.max(initial=0) < 2 ** width
    assert positions_from_gaps(gaps, width).tolist() == pos.tolist()


@pytest.mark.parametrize("shape, k, density", [
    ((17, 3, 3, 3), 7, 0.3),       # awkward sizes, sparse
    ((127, 17, 1, 1), 16, 0.95),   # nearly dense: the dense mode should win
    ((10, 127), 256, 0.5),         # a full 8-bit codebook
    ((5, 7), 1, 0.2),              # one value
    ((8, 8), 3, 1.0),              # fully dense
])
def test_round_trip_bitwise(shape, k, density):
    sd = {"w": shared_tensor(shape, k, density), "b": torch.randn(shape[0])}
    data, stats = dumps_model(sd, {"arch": "x"})
    out, meta = loads_model(data)
    assert meta == {"arch": "x"}
    assert_bitwise(sd, out)
    assert {s.name: s.kind for s in stats} == {"w": "shared", "b": "raw"}


@settings(max_examples=60, deadline=None)
@given(st.tuples(st.integers(1, 40), st.integers(1, 40)), st.integers(1, 300), st.floats(0.0, 1.0),
       st.sampled_from([codec.CHUNK, codec.LARGE_CHUNK, 7]), st.booleans(), st.booleans(), st.integers(0, 99))
def test_every_candidate_is_sized_as_it_codes_and_the_smallest_is_kept(shape, k, density, chunk, use_huffman,
                                                                       rescale, seed):
    """Candidates are sized, not coded, and only the smallest is coded: each size must be that
    candidate's own coded length (else the choice, and the bytes, change), whatever wins."""
    t = shared_tensor(shape, k, density, seed=seed)
    if rescale:  # per-row codebooks when one cannot hold them
        t = t * (1 + torch.arange(shape[0]).float().view(-1, 1) / 7)
    flat, dims = t.numpy().reshape(-1), list(shape)
    plans = [codec._plan(flat, dims, axis, dense, np.float32, chunk, use_huffman) for dense in (False, True)
             # per-slice codebooks only when one codebook cannot hold the values (encode_shared's rule)
             for axis in ([None] if codec._fits(flat, dims, None, with_zero=dense) else [0, 1])
             if codec._fits(flat, dims, axis, with_zero=dense)]
    if not plans:
        return
    for plan in plans:
        assert len(codec._coded(plan)[0]) == plan.size
    blob, _, stats = encode_shared("w", t, chunk=chunk, use_huffman=use_huffman)
    assert len(blob) == stats.bytes == min(p.size for p in plans)
    assert codec.shared_size("w", t.numpy(), chunk=chunk, use_huffman=use_huffman) == len(blob)


def test_dense_mode_wins_for_nearly_dense_layers():
    t = shared_tensor((127, 64), 16, 0.99)
    _, info, _ = encode_shared("w", t)
    assert info["w"] == 0  # zero in the codebook, no gap stream
    t = shared_tensor((127, 64), 16, 0.2)
    _, info, _ = encode_shared("w", t)
    assert info["w"] > 0


def test_per_channel_codebooks_when_one_is_not_enough():
    # like the released SqueezeNet's conv1: one codebook per input channel, rescaled
    base = shared_tensor((96, 3, 7, 7), 200, 0.98, seed=1)
    scale = torch.tensor([1.0, 1.37, 0.71]).view(1, 3, 1, 1)
    t = base * scale
    assert torch.unique(t[t != 0]).numel() > MAX_CODEBOOK
    blob, info, stats = encode_shared("conv1", t)
    assert info["axis"] == 1
    out, _ = loads_model(container.dumps({}, [("conv1", blob, info)]))
    assert torch.equal(out["conv1"], t)


def test_too_many_values_is_raw_or_refused():
    t = torch.randn(40, 40)  # fits per-row codebooks of 40 unique values: no gain, so raw
    data, stats = dumps_model({"w": t}, {})
    assert stats[0].kind == "raw"
    assert torch.equal(loads_model(data)[0]["w"], t)
    t = torch.randn(300, 300)  # no axis gives codebooks of at most 256
    assert dumps_model({"w": t}, {})[1][0].kind == "raw"
    with pytest.raises(FormatError, match="layer w: more than 256 distinct values"):
        dumps_model({"w": t}, {}, shared=["w"])  # 300x300 of unique values
    with pytest.raises(FormatError, match="layer nope: not in the model"):
        dumps_model({"w": t}, {}, shared=["nope"])


def test_numpy_in_numpy_out():
    """The format layer's own API: arrays in, arrays of the same dtypes and bits out."""
    sd = {"w": shared_tensor((17, 3, 3, 3), 7, 0.3).numpy(), "b": np.arange(17, dtype=np.float32) / 8,
          "steps": np.array(7, dtype=np.int64), "flags": np.array([True, False])}
    data, _ = codec.dumps_model(sd, {"arch": "x"})
    out, meta = codec.loads_model(data)
    assert meta == {"arch": "x"} and set(out) == set(sd)
    for k in sd:
        assert isinstance(out[k], np.ndarray) and out[k].dtype == sd[k].dtype and out[k].shape == sd[k].shape, k
        assert out[k].tobytes() == sd[k].tobytes(), k
    assert data == dumps_model({k: torch.from_numpy(v) for k, v in sd.items()}, {"arch": "x"})[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.complex64, torch.int16])
def test_unstorable_dtypes_are_refused_by_name(dtype):
    with pytest.raises(FormatError, match=f"tensor t: dtype {str(dtype).removeprefix('torch.')} cannot be stored"):
        dumps_model({"t": torch.zeros(3, dtype=dtype)}, {})


def test_raw_dtypes_and_all_zero_layer():
    sd = {"zero": torch.zeros(3, 4), "steps": torch.tensor(7, dtype=torch.int64),
          "half": torch.randn(5).half(), "flags": torch.tensor([True, False])}
    out, _ = loads_model(dumps_model(sd, {})[0])
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k


def test_float32_exact_in_float16_is_stored_in_two_bytes():
    """A float32 tensor whose values are all float16 numbers (rounded biases, zeros) is stored
    as float16 and decodes to the same float32 bits; anything else keeps its 4 bytes."""
    exact = torch.randn(1000).half().float()
    exact[:3] = torch.tensor([0.0, -0.0, float("inf")])
    inexact = exact.clone()
    inexact[7] += 1e-6
    big = torch.tensor([70000.0])  # beyond float16's range
    nan = torch.tensor([float("nan"), 1.0])
    sd = {"exact": exact, "inexact": inexact, "big": big, "nan": nan, "empty": torch.zeros(0)}
    data, stats = dumps_model(sd, {})
    assert {s.name: s.bytes for s in stats} == {"exact": 2000, "inexact": 4000, "big": 4, "nan": 8, "empty": 0}
    out, _ = loads_model(data)
    plain = ("exact", "inexact", "big")
    assert_bitwise({k: sd[k] for k in plain}, {k: out[k] for k in plain})
    assert out["empty"].dtype == torch.float32 and out["empty"].shape == (0,)
    assert out["nan"].dtype == torch.float32 and torch.isnan(out["nan"][0]) and out["nan"][1] == 1
    table = container.loads(data).sections[RAW_SECTION][1]["tensors"]
    assert [e[3] if len(e) == 4 else None for e in table] == ["float16", None, None, None, None]


@pytest.mark.parametrize("entry, match", [
    (["t", "int64", [2], "float16"], "a int64 tensor cannot be stored as 'float16'"),
    (["t", "float32", [2], "int8"], "a float32 tensor cannot be stored as 'int8'"),
    (["t", "float32", [2], "float16", "extra"], "bad tensor entry"),
])
def test_raw_stored_dtype_is_checked(entry, match):
    data = container.dumps({}, [(RAW_SECTION, bytes(16), {"enc": "raw", "tensors": [entry]})])
    with pytest.raises(FormatError, match=match):
        loads_model(data)


def test_bool_bytes_other_than_0_and_1_are_refused():
    entry = ["flags", "bool", [3]]
    ok = container.dumps({}, [(RAW_SECTION, bytes([1, 0, 1]), {"enc": "raw", "tensors": [entry]})])
    assert loads_model(ok)[0]["flags"].tolist() == [True, False, True]
    bad = container.dumps({}, [(RAW_SECTION, bytes([1, 2, 1]), {"enc": "raw", "tensors": [entry]})])
    with pytest.raises(FormatError, match="tensor flags is bool but holds bytes other than 0 and 1"):
        loads_model(bad)


def test_a_tensor_in_two_places_is_refused():
    entry = ["t", "int8", [2]]
    twice = container.dumps({}, [(RAW_SECTION, bytes(4), {"enc": "raw", "tensors": [entry, entry]})])
    with pytest.raises(FormatError, match="tensor t is listed twice"):
        loads_model(twice)
    data, _ = dumps_model({"w": shared_tensor((16, 16), 8, 0.5), "b": torch.ones(3)}, {})
    arc = container.loads(data)
    blob, info = arc.sections[RAW_SECTION]
    both = container.dumps({}, [("w", *arc.sections["w"]),
                                (RAW_SECTION, blob + bytes(1024), {**info, "tensors": info["tensors"] + [["w", "float32", [16, 16]]]})])
    with pytest.raises(FormatError, match="tensor w is in another section too"):
        loads_model(both)


def test_float16_codebook_only_when_exact():
    exact = shared_tensor((32, 32), 16, 0.5).half().float()
    _, info, _ = encode_shared("w", exact, codebook_dtype="float16")
    assert info["cb"] == "f16"
    inexact = shared_tensor((32, 32), 16, 0.5)
    _, info, _ = encode_shared("w", inexact, codebook_dtype="float16")
    assert info["cb"] == "f32"


GOLDEN_V1 = Path(__file__).parent / "data" / "v1-small.esq"


def test_version_1_archives_still_decode():
    """A file written by the version-1 writer (u16 chunk index), committed as it was."""
    data = GOLDEN_V1.read_bytes()
    assert container.loads(data).version == 1
    state, meta = loads_model(data)
    assert meta["note"] == "version-1 golden file"
    assert_bitwise(state, golden_state_dict())
    # The same tensors written today: version 3, the same bits, smaller streams (the
    # packed chunk index of a multi-chunk stream is cheaper than a u16 per chunk).
    now, _ = dumps_model(golden_state_dict(), meta)
    assert container.loads(now).version == container.VERSION == 3
    assert len(now) < len(data)
    assert_bitwise(loads_model(now)[0], state)


GOLDEN_V2 = Path(__file__).parent / "data" / "v2-small.esq"


def test_version_2_archives_still_decode():
    """A file written by the version-2 writer (chunked Huffman streams only), committed as
    it was; today's writer codes the long streams of the same tensors as DEFLATE (v3)."""
    data = GOLDEN_V2.read_bytes()
    arc = container.loads(data)
    assert arc.version == 2 and not any("z" in info for _, info in arc.sections.values())
    state, meta = loads_model(data)
    assert meta["note"] == "version-2 golden file"
    assert_bitwise(state, golden_state_dict())
    now, _ = dumps_model(golden_state_dict(), meta)
    assert any("z" in info for _, info in container.loads(now).sections.values())
    assert len(now) <= len(data)
    assert_bitwise(loads_model(now)[0], state)


def test_newer_streams_under_an_older_label_are_refused(monkeypatch):
    data, _ = dumps_model(golden_state_dict(), {})
    arc = container.loads(data)
    for version, match in ((1, r"section [abc]\.weight"), (2, r"section [abc]\.weight: bad stream coding")):
        monkeypatch.setattr(container, "VERSION", version)  # a file mislabelled as older
        relabelled = container.dumps(arc.meta, [(n, b, i) for n, (b, i) in arc.sections.items()])
        assert container.loads(relabelled).version == version
        with pytest.raises(FormatError, match=match):
            loads_model(relabelled)


def test_large_models_use_shorter_chunks():
    """At LARGE_MODEL non-zero weights the writer halves the chunk (the decoder takes half the
    steps) and records it in the section's info; smaller models keep the default, no field."""
    big = {"w": shared_tensor((1 << 19,), 16, 0.6).reshape(512, 1024)}  # ~315k non-zeros
    small = {"w": shared_tensor((64, 64), 16, 0.6)}
    for sd, chunk in ((big, codec.LARGE_CHUNK), (small, None)):
        data, _ = dumps_model(sd, {})
        info = container.loads(data).sections["w"][1]
        assert info.get("c") == chunk
        assert_bitwise(loads_model(data)[0], sd)
    forced, _ = dumps_model(small, {}, chunk=7)  # any size the writer is given is honoured
    assert container.loads(forced).sections["w"][1]["c"] == 7
    assert_bitwise(loads_model(forced)[0], small)


def test_deterministic():
    sd = {"w": shared_tensor((33, 17), 8, 0.4), "b": torch.randn(33)}
    assert dumps_model(sd, {"a": 1})[0] == dumps_model(sd, {"a": 1})[0]


def _rebuild(data: bytes, edit) -> bytes:
    """Re-pack an archive after editing a section's info (checksums stay valid)."""
    arc = container.loads(data)
    sections = [(n, b, dict(i)) for n, (b, i) in arc.sections.items()]
    edit(sections)
    return container.dumps(arc.meta, sections)


def _ks_without_axis(sections) -> None:
    """Two bytes of per-slice codebook sizes in a section without an axis (sizes add up)."""
    name, blob, info = sections[0]
    sections[0] = (name, b"\0\0" + blob, {**info, "sizes": [2, *info["sizes"][1:]]})


@pytest.mark.parametrize("edit, message", [
    (_ks_without_axis, "2 bytes of codebook sizes without an axis"),  # read by no one: a C reader refused it
    (lambda s: s[0][2].update(enc="magic"), "unknown encoding"),
    (lambda s: s[0][2].update(k=10**9), "field 'k'"),
    (lambda s: s[0][2].update(shape=[-1, 3]), "bad shape"),
    (lambda s: s[0][2].update(shape=[2**30, 2**30]), "absurdly large"),
    (lambda s: s[0][2].update(sizes=[0, 1, 2, 3, 4]), "do not add up"),
    (lambda s: s[0][2].update(axis=7), "bad axis"),
    (lambda s: s[0][2].update(n=s[0][2]["n"] + 1), "section w( \\(cluster indices\\))?: |field 'ng'"),
    (lambda s: s[-1][2].update(tensors=[["b", "float32", [1000]]]), "needs 4000 bytes"),
    (lambda s: s[-1][2].update(tensors=[["b", "complex64", [33]]]), "unknown dtype"),
    (lambda s: s[0][2].update(c=0), "field 'c'"),
    (lambda s: s[0][2].update(c=5000), "field 'c'"),
    (lambda s: s[0][2].update(c=64), "section w \\(cluster indices\\): "),  # the wrong chunk size
])
def test_bad_section_info_is_refused(edit, message):
    sd = {"w": shared_tensor((33, 17), 8, 0.4), "b": torch.randn(33)}
    data = _rebuild(dumps_model(sd, {})[0], edit)
    with pytest.raises(FormatError, match=message):
        loads_model(data)


def _linspace_tensor(shape, k, sparsity, seed=0):
    """Values drawn evenly from ``k`` levels (uniform: the Huffman code's best case), a
    ``sparsity`` share of them zeroed."""
    g = np.random.default_rng(seed)
    v = g.choice(np.linspace(-1, 1, k).astype(np.float32), size=shape)
    v[g.random(shape) < sparsity] = 0
    return torch.from_numpy(v)


def test_stream_codings_round_trip():
    """Version 3 codes each stream as Huffman, DEFLATE or one bit per symbol, the smallest
    (the archive keeps its Huffman streams here: dropping them would cost more than
    1/HUFFMAN_SHARE of it); every mix decodes bitwise."""
    sd = {"uniform16": _linspace_tensor((128, 256), 16, 0.7),  # 4.0 bits: Huffman's exact case
          "dense101": _linspace_tensor((40, 30), 101, 0.2),    # skewed by the zeros: DEFLATE
          "binary": _linspace_tensor((64, 64), 2, 0.5),         # two symbols in both streams
          "dense2": _linspace_tensor((40, 50), 2, 0.0),
          "skewed3": _linspace_tensor((60, 50), 3, 0.95)}
    data, _ = dumps_model(sd, {})
    info = {n: i for n, (_, i) in container.loads(data).sections.items()}
    z = {n: (i.get("z", 0) & 3, i.get("z", 0) >> codec.Z_SHIFT) for n, i in info.items() if n != RAW_SECTION}
    assert z["uniform16"][0] == codec.Z_HUFFMAN
    assert z["dense101"][0] == codec.Z_DEFLATE and info["dense101"]["w"] == 0
    assert z["binary"] == (codec.Z_BITS, codec.Z_BITS) and info["binary"]["w"] == 1
    assert z["dense2"][0] == codec.Z_BITS
    assert {c for pair in z.values() for c in pair} == {codec.Z_HUFFMAN, codec.Z_DEFLATE, codec.Z_BITS}
    assert_bitwise(loads_model(data)[0], sd)


def test_an_archive_drops_its_last_huffman_streams_when_that_is_cheap():
    """One short uniform stream codes 7 B smaller as Huffman, but would cost a large
    archive numpy's whole lockstep pass: beside a large layer it is written as DEFLATE (the
    archive grows by far less than 1/HUFFMAN_SHARE); alone it stays Huffman."""
    g = np.random.default_rng(0)
    big = (g.geometric(0.3, (256, 400)).clip(1, 40) / 64).astype(np.float32)
    big[g.random(big.shape) < 0.5] = 0
    small = g.choice(np.linspace(-1, 1, 16).astype(np.float32), (16, 16))
    alone, _ = codec.encode_state_dict({"small": small})
    assert codec.has_huffman(alone[0][2])
    both, _ = codec.encode_state_dict({"big": big, "small": small})
    assert not any(codec.has_huffman(info) for _, _, info in both)
    smallest, _ = codec._encode_sections({"big": big, "small": small}, "auto", "float32", codec.CHUNK)
    size, kept = (sum(len(b) for _, b, _ in x) for x in (smallest, both))
    assert size < kept <= size + size // codec.HUFFMAN_SHARE
    out = codec.decode_sections(container.Archive(meta={}, sections={n: (b, i) for n, b, i in both}))
    assert np.array_equal(out["small"], small) and np.array_equal(out["big"], big)


def _edit_stream(name: str, which: int, change):
    """An edit for _rebuild: ``change(bytes) -> bytes`` on stream ``which`` (3 idx, 4 gap) of
    section ``name``, sizes updated."""
    def edit(sections):
        for i, (n, blob, info) in enumerate(sections):
            if n == name:
                off = np.cumsum([0, *info["sizes"]])
                new = change(blob[off[which]:off[which + 1]])
                sizes = list(info["sizes"])
                sizes[which] = len(new)
                sections[i] = (n, blob[:off[which]] + new + blob[off[which + 1]:], {**info, "sizes": sizes})
    return edit


@pytest.mark.parametrize("name, edit, message", [
    ("dense101", lambda s: [s[i][2].update(z=3) for i in range(len(s)) if s[i][0] == "dense101"],
     "dense101: bad stream coding z=3"),
    ("dense101", lambda s: [s[i][2].update(z=2) for i in range(len(s)) if s[i][0] == "dense101"],
     "dense101: bad stream coding z=2"),  # one bit per symbol for 101 symbols
    ("dense101", lambda s: [s[i][2].update(z=1 | 4) for i in range(len(s)) if s[i][0] == "dense101"],
     "dense101: bad stream coding"),  # a gap coding in a dense section
    ("dense101", lambda s: [s[i][2].update(z="1") for i in range(len(s)) if s[i][0] == "dense101"],
     "dense101: bad stream coding"),
    ("dense101", _edit_stream("dense101", 3, lambda b: b[:-3]), "dense101 \\(cluster indices\\): DEFLATE"),
    ("dense101", _edit_stream("dense101", 3, lambda b: b + b"\x00"), "bytes after its end"),
    ("dense101", _edit_stream("dense101", 3, lambda b: __import__("edgesqueeze.format.deflate", fromlist=["x"]).encode(
        np.full(1200, 200))), "symbol 200 is outside its alphabet of 101"),
    ("binary", _edit_stream("binary", 4, lambda b: b[:-1] + bytes([b[-1] | 1])), "padding bits"),
    ("binary", _edit_stream("binary", 4, lambda b: b + b"\x00"), "cannot hold exactly"),
])
def test_bad_stream_codings_are_refused(name, edit, message):
    sd = {"dense101": _linspace_tensor((40, 30), 101, 0.2), "binary": _linspace_tensor((63, 65), 2, 0.5)}
    data = _rebuild(dumps_model(sd, {})[0], edit)
    with pytest.raises(FormatError, match=message):
        loads_model(data)


def test_one_bit_symbols_outside_a_one_value_codebook_are_refused():
    """A one-value codebook codes its indices as bits that must all be 0: a 1 would index
    past the codebook (the decoder no longer re-checks indices after their streams)."""
    blob, info, _ = codec.encode_shared("one", np.full(1000, 3.0, np.float32))
    assert info["k"] == 1 and info["z"] & 3 == codec.Z_BITS
    arch = container.Archive(meta={}, sections={"one": (blob, info)})
    assert np.array_equal(codec.decode_sections(arch)["one"], np.full(1000, 3.0, np.float32))
    bad = bytearray(blob)
    bad[sum(info["sizes"][:3])] |= 0x80  # the first index becomes 1
    with pytest.raises(FormatError, match="symbol 1 is outside its alphabet of 1"):
        codec.decode_sections(container.Archive(meta={}, sections={"one": (bytes(bad), info)}))


_MUTATION_SD = {"w": shared_tensor((20, 9), 6, 0.35),
                "b": torch.randn(20, generator=torch.Generator().manual_seed(1))}
_MUTATION_GOOD = dumps_model(_MUTATION_SD, {"m": 1})[0]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_model_archives_never_crash(data):
    sd = _MUTATION_SD
    good = _MUTATION_GOOD
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out, _ = loads_model(bytes(buf))
    except FormatError:
        return
    assert_bitwise(sd, out)


@pytest.mark.shared
def test_released_squeezenet_lossless_under_560kb():
    path = SHARED / "models" / "squeezenet1_0-imagenet.pt"
    if not path.exists():
        pytest.skip("../shared not present")
    sd = torch.load(path, weights_only=True)
    data, stats = dumps_model(sd, {"arch": "squeezenet1_0"})
    out, _ = loads_model(data)
    assert_bitwise(sd, out)
    # the released 8-bit file is 675,763 bytes; xz -9e of it gives 559,656
    assert len(data) < 560_000
    coded = sum(s.idx_bytes + s.gap_bytes for s in stats if s.kind == "shared")
    entropy = sum(s.idx_entropy_bits + s.gap_entropy_bits for s in stats if s.kind == "shared") / 8
    assert coded <= 1.03 * entropy
    assert RAW_SECTION in container.loads(data).sections


def test_an_all_zero_layer_after_a_shared_one_decodes():
    """Each section's indices are checked against its own codebook size: a shared layer
    followed by an all-zero one (codebook of 0 values, no indices) decoded in one batch was
    refused as "cluster index beyond its codebook" (the check read the last section's size;
    found packing a TFLite file whose last coded tensor was all zeros)."""
    rng = np.random.default_rng(0)
    book = rng.normal(size=16).astype(np.float32)
    shared = book[rng.integers(0, 16, (64, 32))] * (rng.random((64, 32)) < 0.4)
    sections = [codec.encode_shared("shared", shared)[:2], codec.encode_shared("zero", np.zeros((8, 8), np.float32))[:2]]
    assert sections[1][1]["k"] == 0 and sections[0][1]["n"] > 0
    archive = container.loads(container.dumps({}, [(n, b, i) for n, (b, i) in zip(("shared", "zero"), sections)]))
    out = codec.decode_coded(archive)
    assert out["zero"].ix.size == 0 and out["shared"].ix.size == int(np.count_nonzero(shared))


_RICH_SD = {"sparse": shared_tensor((40, 30), 12, 0.3), "dense": shared_tensor((16, 16), 5, 0.97, seed=2),
            "steps": torch.tensor(7, dtype=torch.int64), "flags": torch.tensor([True, False]),
            "bias": torch.randn(20, generator=torch.Generator().manual_seed(3))}
_RICH_SD["slices"] = shared_tensor((8, 300), 200, 0.5, seed=4) * torch.arange(1, 301).float()  # per-slice codebooks
_RICH_GOOD = dumps_model(_RICH_SD, {"m": 1})[0]
_JUNK = st.one_of(st.integers(-2 ** 40, 2 ** 40), st.sampled_from([0, 1, -1, 2 ** 63, 2 ** 64, 10 ** 400, 1e300]),
                  st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(), st.text(max_size=3),
                  st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=3)), max_size=5))


@settings(max_examples=int(os.environ.get("ES_FUZZ", 300)), deadline=None)
@given(st.data())
def test_any_header_value_of_a_checkpoint_is_refused_or_read(data):
    """Any value of any header field of any section, checksums made valid again (a buggy or
    hostile writer): one FormatError or a decoded state dict, never another exception. (A
    checkpoint has no digest of its decoded values: a header that says another valid shape
    is read as that shape.)"""
    arc = container.loads(_RICH_GOOD)
    name = data.draw(st.sampled_from(sorted(arc.sections)))
    info = json.loads(json.dumps(arc.sections[name][1]))
    key = data.draw(st.sampled_from(sorted(info)))
    target = info
    if isinstance(info[key], list) and info[key] and data.draw(st.booleans()):
        target, key = info[key], data.draw(st.integers(0, len(info[key]) - 1))
        if isinstance(target[key], list) and target[key] and data.draw(st.booleans()):
            target, key = target[key], data.draw(st.integers(0, len(target[key]) - 1))
    target[key] = data.draw(_JUNK)
    bad = container.dumps(arc.meta, [(k, d, info if k == name else i) for k, (d, i) in arc.sections.items()])
    try:
        out, _ = loads_model(bad)
    except FormatError:
        return
    assert isinstance(out, dict)


def test_an_archive_of_tensors_that_is_no_model_says_what_its_meta_lacks():
    """unpack of the golden archive (meta {"arch": "fixture", ...}, no format) said "no 'arch'"."""
    from edgesqueeze.checkpoint import stored_weights

    with pytest.raises(FormatError, match=r"not an edgesqueeze model archive \(its meta has format None, not "
                                          r"'edgesqueeze.esq-model'\)"):
        stored_weights(GOLDEN_V1)
