"""A store's data file truncated or replaced under a live model (issue #16 item 8): a typed error, never a crash,
and the model usable again once the file is repaired, under every backend, cold and cached, between and during
forward passes.

Mapped blocks (backend MMAP, and AUTO's views of cached blocks) are where a crash would come from: a page past the
new end of the file raises SIGBUS when touched. The engine checks a mapped block's file before handing it out again
(engine.cpp) and io/mapping_guard.hpp turns a fault during use into zeros plus an IoError at release. If this test
crashes the interpreter ("Bus error"), that guard has a hole.
"""

from __future__ import annotations

import os
import shutil

import pytest

torch = pytest.importorskip("torch")

import tensorstream as ts  # noqa: E402

BACKENDS = ["auto", "mmap", "pread", "io_uring"]


def _data_file(storage) -> str:
    return max((os.path.join(d, f) for d, _, files in os.walk(storage) for f in files), key=os.path.getsize)


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _run(ts_models, tmp_path, backend: str, cached: bool):
    plain, model = ts_models.offload("llama", tmp_path, budget=0.5, backend=backend)
    ids = ts_models.input_ids()
    with torch.no_grad():
        expected = ts_models.forward("llama", plain, ids)
        assert torch.equal(ts_models.forward("llama", model, ids), expected)  # blocks held, mapped or read
    data = _data_file(tmp_path)
    if not cached:
        _evict(data)
    return model, ids, expected, data


def _repaired_and_equal(ts_models, model, ids, expected, data, original: bytes) -> None:
    with open(data, "r+b") as f:
        f.write(original)
    with torch.no_grad():
        assert torch.equal(ts_models.forward("llama", model, ids), expected)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "cold"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_between_passes_is_an_io_error_and_the_model_recovers(ts_models, tmp_path, backend, cached):
    model, ids, expected, data = _run(ts_models, tmp_path, backend, cached)
    original = open(data, "rb").read()
    with open(data, "r+b") as f:
        f.truncate(len(original) // 3)
    with torch.no_grad(), pytest.raises(ts.IoError) as caught:
        ts_models.forward("llama", model, ids)
    assert "ENODATA" in str(caught.value) and "block '" in str(caught.value)
    _repaired_and_equal(ts_models, model, ids, expected, data, original)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "cold"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_while_a_block_computes_is_an_io_error_and_the_model_recovers(ts_models, tmp_path, backend,
                                                                                 cached):
    model, ids, expected, data = _run(ts_models, tmp_path, backend, cached)
    original = open(data, "rb").read()
    cut = {"done": False}

    def truncate_inside_the_block(module, args):  # layer 1's attention is bound and about to compute
        if not cut["done"]:
            cut["done"] = True
            with open(data, "r+b") as f:
                f.truncate(0)

    hook = model.model.layers[1].mlp.register_forward_pre_hook(truncate_inside_the_block)
    with torch.no_grad(), pytest.raises(ts.IoError) as caught:
        ts_models.forward("llama", model, ids)
    hook.remove()
    assert cut["done"] and "ENODATA" in str(caught.value)
    _repaired_and_equal(ts_models, model, ids, expected, data, original)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_data_file_replaced_by_rename_keeps_serving_the_file_the_store_opened(ts_models, tmp_path, backend):
    """The store holds its data file open: a file renamed over it (a rewrite by another tool) is not what this
    model reads, and nothing breaks: views and reads keep the inode the store opened."""
    model, ids, expected, data = _run(ts_models, tmp_path, backend, cached=True)
    replacement = data + ".new"
    shutil.copyfile(data, replacement)
    with open(replacement, "r+b") as f:
        f.truncate(4096)  # a short, different file under the same name
    os.replace(replacement, data)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(ts_models.forward("llama", model, ids), expected)
