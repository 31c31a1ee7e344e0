"""How ``device="auto"`` and ``device="cuda"`` decide, on a stand-in for CuPy.

CuPy 14's wheels load the CUDA libraries (NVRTC, cuBLAS) from the toolkit or from its
``[ctk]`` extra; the driver alone only gives a device count. Each test puts a fake
``cupy`` in ``sys.modules`` that sees one GPU but fails at one step the engine needs,
and checks that "auto" falls back to the CPU with exactly one warning naming that step,
that "cuda" raises naming it, and that a machine without CuPy, driver or GPU -- the
normal CPU install -- stays silent.
"""

import importlib.abc
import sys
import types
import warnings

import numpy as np
import pytest

from gpu_mlp import device

CUBLAS_MISSING = "Failure finding \"libcublasLt.so.13\": No such file: libcublasLt.so.13"


class CudaRuntimeError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class _RefuseImport(importlib.abc.MetaPathFinder):
    """Makes ``import <name>`` fail as CuPy's does when a CUDA library is missing."""

    def __init__(self, name, message):
        self.name, self.message = name, message

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError(self.message)
        return None


def _raise(error):
    def fail(*args):
        raise error
    return fail


@pytest.fixture(autouse=True)
def fresh_probe():
    """Each test probes anew, and leaves no trace of its fake CuPy behind."""
    clear = getattr(device, "_clear_cache", None) or device.gpu_available.cache_clear
    clear()
    yield
    clear()


@pytest.fixture
def fake_cupy(monkeypatch):
    """``fake_cupy(**failures)``: install a fake ``cupy`` that sees one GPU, then fails
    where told: ``count`` devices (an int, or an exception to raise), ``driver`` (the
    driver's CUDA version, 0 for none), ``nvrtc``, ``cublas_import``, ``cublas_handle``
    (an exception to raise there). Returns the module and a record of the calls."""
    def install(count=1, driver=13000, nvrtc=None, cublas_import=None, cublas_handle=None):
        calls = []

        def device_count():
            calls.append("getDeviceCount")
            if isinstance(count, Exception):
                raise count
            return count

        cupy = types.ModuleType("cupy")
        cupy.__path__ = []  # a package, so that "import cupy.cublas" looks inside it
        cupy.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=device_count,
                                          driverGetVersion=lambda: driver,
                                          runtimeGetVersion=lambda: 13020),
            nvrtc=types.SimpleNamespace(getVersion=_raise(nvrtc) if nvrtc else lambda: (13, 0)),
            device=types.SimpleNamespace(
                get_cublas_handle=_raise(cublas_handle) if cublas_handle else lambda: 1))
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        if cublas_import:
            monkeypatch.delitem(sys.modules, "cupy.cublas", raising=False)
            monkeypatch.setattr(sys, "meta_path",
                                [_RefuseImport("cupy.cublas", cublas_import), *sys.meta_path])
        else:
            monkeypatch.setitem(sys.modules, "cupy.cublas", types.ModuleType("cupy.cublas"))
        return cupy, calls

    return install


def resolve_recording(name):
    """``device.resolve(name)`` and the warnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = device.resolve(name)
    return result, [str(w.message) for w in caught]


BROKEN = [  # (failures, what the message must name)
    pytest.param(dict(nvrtc=RuntimeError("libnvrtc.so.13: cannot open shared object file")),
                 ["NVRTC", "libnvrtc.so.13"], id="nvrtc"),
    pytest.param(dict(cublas_import=CUBLAS_MISSING), ["cuBLAS", "libcublasLt.so.13"],
                 id="cublas-import"),
    pytest.param(dict(cublas_handle=RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED")),
                 ["cuBLAS", "CUBLAS_STATUS_NOT_INITIALIZED"], id="cublas-handle"),
]


@pytest.mark.parametrize("failures, names", BROKEN)
def test_auto_falls_back_to_cpu_with_one_warning_naming_the_library(fake_cupy, failures,
                                                                   names):
    fake_cupy(**failures)
    (name, xp), messages = resolve_recording("auto")
    assert (name, xp) == ("cpu", np)
    assert len(messages) == 1, messages
    [message] = messages
    assert "\n" not in message
    for word in names + ['pip install "gpu_mlp[cuda13]"', "CUDA 13 toolkit"]:
        assert word in message
    # once per process: a second network says nothing more
    assert resolve_recording("auto") == (("cpu", np), [])


@pytest.mark.parametrize("failures, names", BROKEN)
def test_cuda_raises_naming_the_library(fake_cupy, failures, names):
    fake_cupy(**failures)
    with pytest.raises(RuntimeError, match="needs CuPy and a CUDA GPU") as raised:
        device.resolve("cuda")
    for word in names + ['pip install "gpu_mlp[cuda13]"']:
        assert word in str(raised.value)


@pytest.mark.parametrize("failures, names", BROKEN)
def test_gpu_status_gives_the_reason(fake_cupy, failures, names):
    fake_cupy(**failures)
    ok, reason = device.gpu_status()
    assert not ok and not device.gpu_available()
    assert all(word in reason for word in names)


def test_without_cupy_auto_is_the_cpu_silently(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # "import cupy" raises ModuleNotFoundError
    assert resolve_recording("auto") == (("cpu", np), [])
    assert device.gpu_status() == (False, "CuPy is not installed")
    with pytest.raises(RuntimeError, match=r"needs CuPy and a CUDA GPU; install gpu_mlp\[cuda"):
        device.resolve("cuda")


@pytest.mark.parametrize("failures", [
    pytest.param(dict(count=0), id="no-device"),
    pytest.param(dict(count=CudaRuntimeError(35, "cudaErrorInsufficientDriver"), driver=0),
                 id="no-driver"),
    pytest.param(dict(count=CudaRuntimeError(100, "cudaErrorNoDevice"), driver=12040),
                 id="driver-without-device"),
])
def test_no_gpu_is_the_cpu_silently(fake_cupy, failures):
    fake_cupy(**failures)
    assert resolve_recording("auto") == (("cpu", np), [])
    with pytest.raises(RuntimeError, match="needs CuPy and a CUDA GPU"):
        device.resolve("cuda")


def test_a_driver_too_old_for_the_wheel_warns(fake_cupy):
    fake_cupy(count=CudaRuntimeError(35, "cudaErrorInsufficientDriver"), driver=12040)
    (name, _), [message] = resolve_recording("auto")
    assert name == "cpu"
    for word in ("CUDA 12.4", "CUDA 13", "cudaErrorInsufficientDriver", "gpu_mlp[cuda12]"):
        assert word in message


def test_a_working_gpu_is_chosen_and_probed_once(fake_cupy):
    cupy, calls = fake_cupy()
    assert resolve_recording("auto") == (("cuda", cupy), [])
    assert device.resolve("cuda") == ("cuda", cupy)
    assert device.gpu_available() and device.gpu_status() == (True, "")
    assert calls == ["getDeviceCount"]


def test_the_warning_points_at_the_callers_code(fake_cupy):
    import gpu_mlp

    fake_cupy(cublas_import=CUBLAS_MISSING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = gpu_mlp.MLP([3, 2], device="auto")
    assert net.device == "cpu"
    [warning] = caught
    assert warning.filename == __file__


def test_an_array_on_another_gpu_is_refused_by_name():
    """CuPy's from_dlpack gives an array on the producer's GPU, and a CuPy array stays
    where it is: the engine's RawKernels, which check no device, would read another
    GPU's memory. Refused, naming the array and both GPUs (a stand-in CuPy: the same
    attributes, ``ndarray.device.id`` and ``cuda.runtime.getDevice``)."""
    import types

    from gpu_mlp import device as device_module

    class FakeArray:
        dtype = np.dtype(np.float32)

        def __init__(self, gpu):
            self.device = types.SimpleNamespace(id=gpu)

    xp = types.SimpleNamespace(ndarray=FakeArray, cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0)))
    here = FakeArray(0)
    assert device_module.to_device(here, xp, "X") is here
    with pytest.raises(ValueError, match=r"X is on GPU 1, but this computes on GPU 0: move "
                                         r"it there first \(with cupy.cuda.Device\(0\)"):
        device_module.to_device(FakeArray(1), xp, "X")
