"""The `.esq` format: numpy and the standard library only (never torch).

``container``: the checked, versioned `.esq` archive (specification: docs/FORMAT.md).
``huffman``: canonical, length-limited Huffman coding with a vectorised batched decoder.
``codec``: a state_dict of numpy arrays to `.esq` sections and back, bit-exactly.
``seal``: a plain .onnx / .tflite file's own CRC-32 in its metadata (written at export, checked on load).

Compression writes through this layer; the runtime and :mod:`edgesqueeze.checkpoint` read
through it (the latter converts between numpy arrays and torch tensors).
"""

__all__ = ["codec", "container", "huffman", "seal"]
