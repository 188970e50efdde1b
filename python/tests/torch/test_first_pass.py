"""tensorstream.torch.first_pass: from_pretrained of a checkpoint the store does not hold serves forward passes
straight from the checkpoint while a thread writes the store, then binds the store at the first forward after the
write: outputs equal transformers' model before and after the switch, weights are placeholders between blocks, a
write that fails is raised (and no store is left), and statistics / cleanup wait for the write."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import tensorstream as ts  # noqa: E402
import tensorstream.torch.first_pass as first_pass  # noqa: E402
from tensorstream.torch.offload import STATE_ATTR, OffloadState  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import build_llama

    path = tmp_path_factory.mktemp("first-pass") / "tiny-llama"
    build_llama().save_pretrained(str(path))
    return path


@pytest.fixture
def held_writer(monkeypatch):
    """The store write (started when the first forward pass ends) waits for `release`, so a test can run forwards
    while it 'writes'."""
    release = threading.Event()
    real = first_pass.store_model

    def store_model(model, plan, checkpoint_plan=None):
        assert release.wait(60)
        return real(model, plan, checkpoint_plan)

    monkeypatch.setattr(first_pass, "store_model", store_model)
    return release


def config(tmp_path):
    return ts.Config(storage_path=str(tmp_path / "store"), min_layer_size=0, num_io_threads=2, vram_budget_gb=0.0003)


def test_forwards_come_from_the_checkpoint_until_the_store_is_bound(ts_models, tmp_path, checkpoint, held_writer):
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    model = ts.from_pretrained(checkpoint, config(tmp_path))
    pending = model.__dict__[STATE_ATTR]
    assert isinstance(pending, first_pass.CheckpointPass)
    assert pending._writer.ident is None  # the write starts when the first forward pass ends
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(model(ids).logits, plain(ids).logits, "from the checkpoint")
        # Between blocks the streamed weights are placeholders: no block stays loaded.
        layer = model.model.layers[1].mlp.up_proj.weight
        assert torch.isnan(layer).all()
        ts_models.assert_equal(model(ids).logits, plain(ids).logits, "again from the checkpoint")
    assert model.__dict__[STATE_ATTR] is pending  # the store is still being "written"
    assert not (tmp_path / "store" / "models").exists() or not list((tmp_path / "store" / "models").iterdir())

    held_writer.set()
    pending._done.wait(60)
    with torch.no_grad():
        ts_models.assert_equal(model(ids).logits, plain(ids).logits, "from the store")
    state = model.__dict__[STATE_ATTR]
    assert isinstance(state, OffloadState) and state.write_outcome == "published"
    assert ts.get_model_statistics(model)["bytes_read"] > 0  # streamed from the store now
    ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids), "generate")
    ts_models.track(model)


def test_statistics_and_cleanup_wait_for_the_write(ts_models, tmp_path, checkpoint, held_writer):
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    model = ts.from_pretrained(checkpoint, config(tmp_path))
    threading.Timer(0.2, held_writer.set).start()
    stats = ts.get_model_statistics(model)  # waits for the write, binds, then reports
    assert stats["model_id"].startswith("tiny-llama-") and stats["streamed_blocks"] > 0
    model.cleanup_tensorstream()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_failed_write_is_raised_and_leaves_no_store(tmp_path, checkpoint, monkeypatch):
    def store_model(model, plan, checkpoint_plan=None):
        raise ts.IoError(28, "write of the data file /nowhere/data (injected: disk full)", "/nowhere/data")

    monkeypatch.setattr(first_pass, "store_model", store_model)
    model = ts.from_pretrained(checkpoint, config(tmp_path))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # from the checkpoint; the write starts as it ends, and fails
    assert model.__dict__[STATE_ATTR]._done.wait(60)
    with pytest.raises(ts.IoError, match="injected: disk full"):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ts.IoError, match="injected: disk full"):
        ts.get_model_statistics(model)
    assert not (tmp_path / "store" / "models").exists() or not list((tmp_path / "store" / "models").iterdir())


def test_a_stored_model_is_bound_at_once(ts_models, tmp_path, checkpoint):
    first = ts.from_pretrained(checkpoint, config(tmp_path))
    ts.get_model_statistics(first)  # written and bound
    again = ts_models.track(ts.from_pretrained(checkpoint, config(tmp_path)))
    assert isinstance(again.__dict__[STATE_ATTR], OffloadState)  # no checkpoint pass: the store was there
    assert again.__dict__[STATE_ATTR].write_outcome == "already_existed"
    ts_models.track(first)
