"""Pinned fla kernel configurations: narrowing at import and dumping the choices, against a stand-in triton
(the CPU build of torch has none); the real kernels run in the GPU tests."""

import json
import sys
import types
import weakref
from pathlib import Path

import pytest

from training_harness import kernel_pins, run_description
from training_harness.registry import get_family

ROOT = Path(__file__).resolve().parents[1]


class Config:
    def __init__(self, kwargs, num_warps=4, num_stages=2, num_ctas=1, maxnreg=None):
        self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages
        self.num_ctas, self.maxnreg = num_ctas, maxnreg


class Autotuner:
    """What dump() reads of triton's autotuner: the wrapped function and the configuration chosen per key."""

    def __init__(self, fn, arg_names, configs, key, **kwargs):
        self.base_fn, self.configs, self.cache = fn, configs, {}

    def tune(self, key, index: int = 0):
        self.cache[key] = self.configs[index]


@pytest.fixture
def fake_triton(monkeypatch):
    triton = types.ModuleType("triton")
    triton.__version__ = "fake"
    triton.Config = Config
    triton.autotune = lambda configs, key, **kwargs: (lambda fn: Autotuner(fn, [], configs, key, **kwargs))
    autotuner = types.ModuleType("triton.runtime.autotuner")
    autotuner.Autotuner = Autotuner
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.runtime", types.ModuleType("triton.runtime"))
    monkeypatch.setitem(sys.modules, "triton.runtime.autotuner", autotuner)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "fake GPU")
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda: (9, 0))
    return triton


def kernel(name: str, module: str = "fla.ops.fake"):
    def fn():
        pass
    fn.__module__, fn.__qualname__ = module, name
    return fn


def decorated(triton, name: str, sizes=(16, 32, 64)):
    return triton.autotune([Config({"BT": size}) for size in sizes], key=["T"])(kernel(name))


def entry(size: int) -> dict:
    return {"kwargs": {"BT": size}, "num_warps": 4, "num_stages": 2, "num_ctas": 1, "maxnreg": None}


def test_pinned_kernel_sees_only_its_configurations(fake_triton):
    with kernel_pins._pinned_autotune({"fla.ops.fake.chunk_fwd": [entry(32)]}):
        pinned = decorated(fake_triton, "chunk_fwd")
        free = decorated(fake_triton, "token_shift")
    assert [c.kwargs for c in pinned.configs] == [{"BT": 32}]
    assert [c.kwargs for c in free.configs] == [{"BT": 16}, {"BT": 32}, {"BT": 64}]
    assert [c.kwargs["BT"] for c in decorated(fake_triton, "chunk_fwd").configs] == [16, 32, 64]  # restored


def test_a_library_autotuner_subclass_is_pinned_too(fake_triton):
    """fla makes most of its autotuners with its own decorator, an Autotuner subclass that never calls
    triton.autotune; those kernels must be pinned as well."""
    class LibraryAutotuner(Autotuner):
        def __init__(self, fn, arg_names, configs, key, **kwargs):
            super().__init__(fn, arg_names, configs, key, **kwargs)

    library_autotune = lambda configs, key: (lambda fn: LibraryAutotuner(fn, [], configs, key))  # noqa: E731
    with kernel_pins._pinned_autotune({"fla.ops.fake.l2norm_fwd": [entry(64)]}):
        pinned = library_autotune([Config({"BT": size}) for size in (16, 32, 64)], ["D"])(kernel("l2norm_fwd"))
    assert [c.kwargs for c in pinned.configs] == [{"BT": 64}]


def test_pinning_keeps_the_library_configuration_with_its_pre_hook(fake_triton):
    """mamba-ssm zeroes atomically accumulated gradients in a configuration's pre-hook; a rebuilt
    configuration without it gave NaN losses."""
    configs = [Config({"BT": size}) for size in (16, 32)]
    for config in configs:
        config.pre_hook = f"zero before BT={config.kwargs['BT']}"
    with kernel_pins._pinned_autotune({"fla.ops.fake.chunk_bwd": [entry(32)]}):
        pinned = fake_triton.autotune(configs, key=["T"])(kernel("chunk_bwd"))
    assert pinned.configs == [configs[1]] and pinned.configs[0].pre_hook == "zero before BT=32"


def test_a_table_matching_no_configuration_warns_and_autotunes(fake_triton):
    with kernel_pins._pinned_autotune({"fla.ops.fake.chunk_fwd": [entry(128)]}):
        with pytest.warns(UserWarning, match="names none of its configurations"):
            tuned = decorated(fake_triton, "chunk_fwd")
    assert [c.kwargs["BT"] for c in tuned.configs] == [16, 32, 64]


def test_dump_records_chosen_configurations_and_extends_a_table(fake_triton, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"kernels": {"fla.ops.fake.chunk_fwd": [entry(32)],
                                            "fla.ops.fake.token_shift": [entry(16)]}}))
    shift = decorated(fake_triton, "token_shift")
    shift.tune(key=(8192,), index=2)
    shift.tune(key=(4096,), index=2)  # the same choice at two keys is recorded once
    never_ran = decorated(fake_triton, "group_norm")
    dead_proxy = weakref.proxy(Config({}))  # gc lists it; isinstance() on it raises ReferenceError
    out = tmp_path / "table.json"
    assert kernel_pins.dump(out, "fla", extend=base) == 2
    table = json.loads(out.read_text())
    assert table["capability"] == [9, 0]
    assert table["kernels"] == {"fla.ops.fake.chunk_fwd": [entry(32)], "fla.ops.fake.token_shift": [entry(64)]}
    assert not never_ran.cache  # alive during dump(), but nothing chosen, so nothing written
    with pytest.raises(ReferenceError):  # the hazard dump() had to survive is really there
        isinstance(dead_proxy, Config)
    assert kernel_pins.dump(out, "fla") == 1  # without a base, only what was tuned here


def test_each_family_keeps_its_own_tables_per_library():
    rwkv = kernel_pins.config_file("rwkv", get_family("rwkv").pinned_kernels, (9, 0))
    assert rwkv == ROOT / "rwkv" / "kernel_configs" / "fla_sm90.json"
    assert rwkv.exists()  # Hopper's table ships with the package
    mamba2 = kernel_pins.config_file("mamba2", get_family("mamba2").pinned_kernels, (8, 0))
    assert mamba2 == ROOT / "mamba2" / "kernel_configs" / "mamba_ssm_sm80.json"
    assert get_family("qwen").pinned_kernels is None  # nothing autotuned to pin


def test_dump_keeps_only_the_library_asked_for(fake_triton, tmp_path):
    ours = decorated(fake_triton, "chunk_fwd")
    ours.tune(key=(8192,), index=1)
    other = fake_triton.autotune([Config({"BT": 8})], key=["T"])(kernel("ssd_scan", module="mamba_ssm.ops.fake"))
    other.tune(key=(8192,))
    out = tmp_path / "table.json"
    assert kernel_pins.dump(out, "mamba_ssm") == 1
    assert list(json.loads(out.read_text())["kernels"]) == ["mamba_ssm.ops.fake.ssd_scan"]


def test_a_library_imported_before_pinning_is_left_as_it_was(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    assert kernel_pins.import_with_pinned_configs("rwkv", "fla.ops.rwkv7") == \
        "autotuned (fla was imported before pinning)"
    with pytest.raises(ValueError, match="names no pinned_kernels"):
        kernel_pins.kernel_choice("qwen")


def test_a_run_records_library_versions_without_importing_them(tmp_path, monkeypatch):
    """A run records each kernel library's version; importing fla for it would come before RWKV-7's pinning in
    a later run of the same process (the GPU tests run several families in one), which then autotunes."""
    (tmp_path / "probe_kernels").mkdir()
    (tmp_path / "probe_kernels" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    metadata = tmp_path / "probe_kernels-1.2.3.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-kernels\nVersion: 1.2.3\n")
    (metadata / "top_level.txt").write_text("probe_kernels\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(run_description, "KERNEL_LIBRARIES", ("probe_kernels", "not_installed_kernels"))
    found = run_description.versions()
    assert found["probe_kernels"] == "1.2.3" and found["not_installed_kernels"] is None
    assert "probe_kernels" not in sys.modules
