"""Suite-wide: the long test files first.

`make test` hands whole files to one worker per core (pytest-xdist ``--dist loadfile
--no-loadscope-reorder``), the next file to whichever worker frees up first. A long file
handed out last keeps one worker busy while the other has nothing left: on a 2-core AMD EPYC
(Zen 3) the suite's files sum to 1,260 s of test time, and one of 154 s started last adds
most of that to the wall time. So the files measured longest there start first, in this order;
every other file keeps its place after them (benchmarks/notes.md, session 40).
"""

from __future__ import annotations

# test time per file on that machine, longest first (junit report of `make test`, session 40)
LONG_FIRST = (
    "test_export_tflite.py",  # 154 s
    "test_export_onnx.py",  # 139 s
    "test_gate.py",  # 94 s
    "test_packed_export.py",  # 81 s
    "test_distributed.py",  # 77 s
    "test_pipeline.py",  # 68 s
    "test_train.py",  # 67 s
    "test_micro.py",  # 61 s
    "test_ptq.py",  # 57 s
    "test_export_options.py",  # 49 s
    "test_cli.py",  # 48 s
    "test_any_model_c.py",  # 45 s
    "test_distributed_compress.py",  # 40 s
    "test_stream.py",  # 36 s
    "test_any_model_a.py",  # 30 s
    "test_seal.py",  # 22 s
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept
