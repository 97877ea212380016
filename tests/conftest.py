"""Run the heaviest test files first, so that `make test`'s two workers finish together.

`make test` hands whole files to pytest-xdist workers (``--dist loadfile``), each worker taking
the next file when it is nearly done with its own. xdist's default queue puts the files with the
most tests first, which left two-test files of 23 s (two-process training) for the end: one
worker ran them while the other sat idle for about 30 s of a 330 s suite. Longest files first
(the classic longest-processing-time rule) leaves each worker at most one short file behind the
other. The Makefile turns xdist's own reordering off (``--no-loadscope-reorder``) so this order
holds; without xdist, or with other options, the order changes nothing but the order.

The list is the files ``make test-timeline`` measured as longest (its "test files with the
most wall time" table), heaviest first; any file not named runs after them in collection order.
A stale list costs only balance, never a test: ``tests/test_suite_timeline.py`` checks that each
name is a test file that still exists.
"""

from __future__ import annotations

HEAVIEST_FIRST = (
    # 2026-12-07, make test-timeline on a 2-vCPU AMD EPYC (Zen 5): seconds of wall time per file
    "test_export_tflite.py",  # 58
    "test_export_onnx.py",  # 56
    "test_distributed.py",  # 45
    "test_train.py",  # 40
    "test_packed_export.py",  # 35
    "test_pipeline.py",  # 35
    "test_export_options.py",  # 35
    "test_gate.py",  # 34
    "test_cli.py",  # 28
    "test_micro.py",  # 26
    "test_any_model_c.py",  # 25
    "test_any_model_a.py",  # 24
    "test_distributed_compress.py",  # 23
    "test_ptq.py",  # 19
    "test_cli_notes.py",  # 12
    "test_device_check.py",  # 11
    "test_data.py",  # 10
    "test_any_model_b.py",  # 9
    "test_outputs_clear.py",  # 9
)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    # a stable sort: the tests of one file keep their order, unnamed files theirs
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
