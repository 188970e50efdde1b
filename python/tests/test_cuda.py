"""tensorstream.cuda_available(): loads CUDA with dlopen, answers with a reason, never raises."""

from __future__ import annotations

import tensorstream as ts
from tensorstream import cuda as ts_cuda


def test_cuda_available_answers_without_raising():
    status = ts.cuda_available()
    assert isinstance(status, ts.CudaStatus)
    assert bool(status) == status.available
    if status.available:
        assert status.reason == "" and status.device_count > 0 and status.driver_version > 0
    else:
        assert status.reason, "an unavailable driver must say why"
        assert not status.cufile
    assert ts.cuda_available() == status  # loaded once per process: the same answer


def test_without_a_driver_the_reason_names_the_library():
    status = ts.cuda_available()
    if status.available:
        import pytest
        pytest.skip("this machine has a CUDA driver")
    assert "libcuda.so.1" in status.reason


def test_cufile_is_looked_for_in_the_nvidia_wheel(tmp_path, monkeypatch):
    package = tmp_path / "nvidia"
    (package / "cufile" / "lib").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    importlib.invalidate_caches()
    candidates = ts_cuda._cufile_wheel_candidates()
    assert str(package / "cufile" / "lib" / "libcufile.so.0") in candidates
