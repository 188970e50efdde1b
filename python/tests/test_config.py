"""tensorstream.Config: the guide's fields, defaults, environment variables, and errors that name the field."""

from __future__ import annotations

import pytest

import tensorstream as ts
from tensorstream.config import BackendType, Config, PrefetchStrategy, create_default_config


def test_guide_examples_construct(tmp_path):
    high = Config(storage_path=str(tmp_path), vram_budget_gb=16.0, backend=BackendType.GPUDIRECT,
                  prefetch_strategy=PrefetchStrategy.ADAPTIVE, compression_enabled=True, compression_level=6,
                  num_io_threads=8, memory_pressure_mode="aggressive", verify_checksums=True, debug_mode=False)
    assert high.budget_bytes == 16_000_000_000 and high.store_compression_level == 6
    low = Config(storage_path=str(tmp_path), vram_budget_gb=6.0, backend=BackendType.CUDA,
                 prefetch_strategy=PrefetchStrategy.NONE, compression_enabled=True, compression_level=9,
                 num_io_threads=4, memory_pressure_mode="conservative", min_layer_size=4 * 1024 * 1024)
    assert low.min_layer_size == 4 * 1024 * 1024
    config = create_default_config(tmp_path)
    config.backend = BackendType.MMAP  # the guide assigns fields after construction
    config.prefetch_strategy = "next_layer"
    assert config.validate().prefetch_strategy is PrefetchStrategy.NEXT_LAYER
    assert config.store_compression_level == 0  # compression is off unless enabled


@pytest.mark.parametrize("field, value", [
    ("vram_budget_gb", 0), ("vram_budget_gb", -1.0), ("vram_budget_gb", float("nan")), ("vram_budget_gb", "12"),
    ("backend", "gpudirect2"), ("prefetch_strategy", "sometimes"), ("compression_level", 0),
    ("compression_level", 10), ("compression_level", 5.0), ("num_io_threads", 0), ("num_io_threads", 65),
    ("memory_pressure_mode", "relaxed"), ("verify_checksums", "yes"), ("debug_mode", 1), ("min_layer_size", -1),
    ("compression_enabled", None),
])
def test_bad_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ts.ConfigError) as caught:
        Config(storage_path=str(tmp_path), **{field: value})
    assert caught.value.field == field
    assert field in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_assignment_is_checked_on_validate(tmp_path):
    config = Config(storage_path=str(tmp_path))
    config.num_io_threads = 1000
    with pytest.raises(ts.ConfigError) as caught:
        config.validate()
    assert caught.value.field == "num_io_threads"


def test_environment_fills_path_and_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_STORAGE_PATH", str(tmp_path))
    monkeypatch.setenv("TENSORSTREAM_VRAM_BUDGET", "12.0")
    config = Config()
    assert config.storage_path == str(tmp_path) and config.vram_budget_gb == 12.0
    assert Config(vram_budget_gb=2.0).vram_budget_gb == 2.0  # explicit values win
    monkeypatch.setenv("TENSORSTREAM_VRAM_BUDGET", "twelve")
    with pytest.raises(ts.ConfigError) as caught:
        Config()
    assert caught.value.field == "TENSORSTREAM_VRAM_BUDGET"


def test_storage_path_is_required(monkeypatch):
    monkeypatch.delenv("TENSORSTREAM_STORAGE_PATH", raising=False)
    with pytest.raises(ts.ConfigError) as caught:
        Config()
    assert caught.value.field == "storage_path" and "TENSORSTREAM_STORAGE_PATH" in str(caught.value)


def test_to_dict_round_trips(tmp_path):
    config = Config(storage_path=str(tmp_path), backend="mmap")
    assert Config(**config.to_dict()) == config


# ---- trace_path / TENSORSTREAM_TRACE -----------------------------------------------------------------------------


def test_trace_path_defaults_to_off_and_takes_a_file_path(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORSTREAM_TRACE", raising=False)
    assert Config(storage_path=str(tmp_path)).trace_path is None
    config = Config(storage_path=str(tmp_path), trace_path=tmp_path / "trace.json")  # a PathLike becomes a str
    assert config.trace_path == str(tmp_path / "trace.json")
    assert Config(**config.to_dict()) == config


@pytest.mark.parametrize("value", [5, b"/tmp/t.json", "", "DIR", "DIR/", "DIR/missing/trace.json", "a\0b"])
def test_bad_trace_path_names_the_field(tmp_path, value):
    if isinstance(value, str):
        value = value.replace("DIR", str(tmp_path))
    with pytest.raises(ts.ConfigError) as caught:
        Config(storage_path=str(tmp_path), trace_path=value)
    assert caught.value.field == "trace_path" and "trace_path" in str(caught.value)
    config = Config(storage_path=str(tmp_path))
    config.trace_path = value  # assigned afterwards: checked on validate (offload validates too)
    with pytest.raises(ts.ConfigError):
        config.validate()


def test_trace_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_TRACE", str(tmp_path / "env.json"))
    assert Config(storage_path=str(tmp_path)).trace_path == str(tmp_path / "env.json")
    explicit = str(tmp_path / "explicit.json")
    assert Config(storage_path=str(tmp_path), trace_path=explicit).trace_path == explicit  # explicit values win
    monkeypatch.setenv("TENSORSTREAM_TRACE", "")
    assert Config(storage_path=str(tmp_path)).trace_path is None
    for bad in (str(tmp_path), str(tmp_path / "no" / "such" / "dir.json")):
        monkeypatch.setenv("TENSORSTREAM_TRACE", bad)
        with pytest.raises(ts.ConfigError) as caught:
            Config(storage_path=str(tmp_path))
        assert caught.value.field == "TENSORSTREAM_TRACE" and "TENSORSTREAM_TRACE" in str(caught.value)


def test_direct_io_and_queue_depth_are_fields(tmp_path):
    config = Config(storage_path=str(tmp_path), direct_io="off", queue_depth=7)
    assert config.direct_io == "off" and config.queue_depth == 7
    assert Config(storage_path=str(tmp_path)).direct_io == "auto"
    assert Config(storage_path=str(tmp_path)).queue_depth == 32
    for field, value in [("direct_io", "yes"), ("queue_depth", 0), ("queue_depth", 5000), ("queue_depth", True)]:
        with pytest.raises(ts.ConfigError) as caught:
            Config(storage_path=str(tmp_path), **{field: value})
        assert caught.value.field == field


# Each engine-level variable, a value other than its default, and the Config field it fills.
ENGINE_VARIABLES = [
    ("TENSORSTREAM_BACKEND", "pread", "backend", BackendType.PREAD),
    ("TENSORSTREAM_DIRECT_IO", "off", "direct_io", "off"),
    ("TENSORSTREAM_IO_THREADS", "3", "num_io_threads", 3),
    ("TENSORSTREAM_QUEUE_DEPTH", "9", "queue_depth", 9),
    ("TENSORSTREAM_PREFETCH", "next_layer", "prefetch_strategy", PrefetchStrategy.NEXT_LAYER),
    ("TENSORSTREAM_MEMORY_PRESSURE", "aggressive", "memory_pressure_mode", "aggressive"),
    ("TENSORSTREAM_VERIFY_CHECKSUMS", "off", "verify_checksums", False),
]


@pytest.mark.parametrize("variable, text, field, value", ENGINE_VARIABLES)
def test_engine_variables_fill_fields_that_were_not_given(tmp_path, monkeypatch, variable, text, field, value):
    monkeypatch.setenv(variable, text)
    assert getattr(Config(storage_path=str(tmp_path)), field) == value
    default = getattr(Config.__dataclass_fields__[field], "default")
    assert default is None  # "not given": the only way the environment can tell an explicit default apart
    explicit = {"backend": BackendType.AUTO, "direct_io": "auto", "num_io_threads": 4, "queue_depth": 32,
                "prefetch_strategy": PrefetchStrategy.ADAPTIVE, "memory_pressure_mode": "balanced",
                "verify_checksums": True}[field]
    assert getattr(Config(storage_path=str(tmp_path), **{field: explicit}), field) == explicit  # given wins


@pytest.mark.parametrize("variable", [v[0] for v in ENGINE_VARIABLES])
def test_malformed_engine_variable_is_a_config_error_naming_it(tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(ts.ConfigError) as caught:
        Config(storage_path=str(tmp_path))
    assert caught.value.field == variable


def test_backend_type_is_the_engines_backend_table():
    from tensorstream import _core
    table = {entry["name"]: entry for entry in _core.backend_table()}
    assert set(table) == {member.value for member in BackendType}
    assert {name for name, entry in table.items() if entry["device_slots"]} == {"cuda", "gpudirect"}
