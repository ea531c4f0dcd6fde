"""Which ONNX Runtime execution providers start on this machine, and where the build's checks
run their ONNX models.

onnxruntime-gpu lists CUDAExecutionProvider and TensorrtExecutionProvider wherever it is
installed, GPU or not. A session that asks for one on a machine without a GPU, a driver or the
CUDA libraries falls back to the CPU without raising and writes C++ errors to the terminal. So
the one true test is to open one: a one-node model, with that output captured and its cause kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlbuild.artifacts import OnnxArtifact

# y = Relu(x) on float[1], opset 13, serialized (onnx.helper made it): a device has no onnx
# package to build one, and the probe must not depend on any artifact.
PROBE_MODEL = (
    b'\x08\x08:7\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01'
    b"\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)

# Short names a user passes, and the ONNX Runtime provider each one means.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# What ONNX Runtime's own log says when a provider does not start, most telling first.
_CAUSES = (
    re.compile(r"with error: (.*)"),  # a library that would not load
    re.compile(r"EP Error \S+ (.*)"),
    re.compile(r"(Failed to create \w+ExecutionProvider)"),
)


def cuda_options(device_id: int = 0) -> dict[str, str]:
    """The CUDA provider's options for one GPU. TF32 off: with it, matrix products round to a
    10-bit mantissa and FP32 checks on the GPU would differ from the CPU by more than rounding.
    The arena grows by what is asked, not by doubling: the checks hold several models' sessions
    at once on a GPU that training has just used."""
    return {
        "device_id": str(device_id),
        "use_tf32": "0",
        "arena_extend_strategy": "kSameAsRequested",
    }


def session_providers(
    provider: str, device_id: int = 0, tensorrt: dict[str, str] | None = None
) -> list[Any]:
    """An InferenceSession's `providers` for `provider` (cpu, cuda, tensorrt) on GPU `device_id`,
    each GPU one backed by the next: TensorRT by CUDA (the nodes it does not take stay on the
    GPU), CUDA by the CPU. `tensorrt`: the TensorRT provider's own options."""
    chain: list[Any] = [ORT_PROVIDERS["cpu"]]
    if provider == "cpu":
        return chain
    chain.insert(0, (ORT_PROVIDERS["cuda"], cuda_options(device_id)))
    if provider == "tensorrt":
        trt = {**(tensorrt or {}), "device_id": str(device_id)}
        chain.insert(0, (ORT_PROVIDERS["tensorrt"], trt))
    return chain


@dataclass(frozen=True)
class Placement:
    """Where a check runs ONNX models: ONNX Runtime's CPU, or its CUDA provider on one GPU."""

    provider: str = "cpu"  # cpu or cuda
    device_id: int = 0
    why_cpu: str = ""  # why not the GPU, where the recipe or training wanted one

    @property
    def label(self) -> str:
        """How the manifest says it: 'onnxruntime CPU' or 'onnxruntime CUDA (GPU 0)'."""
        if self.provider == "cpu":
            return "onnxruntime CPU"
        return f"onnxruntime CUDA (GPU {self.device_id})"

    def for_artifact(self, artifact: OnnxArtifact) -> Placement:
        """Here, or the CPU for an artifact checked by the CPU's own kernels (int8_cpu)."""
        return replace(self, provider="cpu", device_id=0) if artifact.cpu_kernels else self

    def ort_providers(self) -> list[Any]:
        """The `providers` argument of an InferenceSession that runs here."""
        return session_providers(self.provider, self.device_id)


CPU = Placement()


def _cuda_runtime_note() -> str:
    """What this onnxruntime needs, and PyTorch's CUDA where they differ (their libraries are
    shared in one process: a CUDA 12 PyTorch cannot start a CUDA 13 onnxruntime)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return ""
    ort_cuda = getattr(info, "cuda_version", "") or ""
    if not ort_cuda:
        return ""
    note = f"onnxruntime-gpu {info.__version__} needs CUDA {ort_cuda.split('.')[0]} and cuDNN 9"
    torch = sys.modules.get("torch")
    torch_cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch else None
    if torch_cuda and torch_cuda.split(".")[0] != ort_cuda.split(".")[0]:
        pin = "'onnxruntime-gpu>=1.21,<1.27'" if torch_cuda.startswith("12") else "a newer one"
        note += f"; PyTorch here is built for CUDA {torch_cuda}: install {pin}"
    return note


@contextlib.contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """Everything written to stdout and stderr, by Python or by C++, kept instead of shown."""
    kept = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = []
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:  # no such descriptor (an embedded interpreter): nothing to hide
                pass
        try:
            with contextlib.redirect_stdout(kept), contextlib.redirect_stderr(kept):
                yield kept
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            kept.write(sink.read().decode(errors="replace"))


def start_session(
    model: str | bytes, options: Any, providers: list[Any], quiet: bool = False
) -> tuple[Any, str]:
    """An InferenceSession on `providers` (first wanted, the rest fallbacks) and, when the
    first did not start, why in one line ('' when it did).

    `quiet` (the one-node probe only) keeps ONNX Runtime's own output off the terminal for
    those milliseconds: the redirect is process-wide, so it is never held around a real
    model's session, whose build can take minutes while other threads print."""
    import onnxruntime as ort

    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if first == ORT_PROVIDERS["cpu"]:  # nothing to fall back from
        return ort.InferenceSession(model, options, providers=providers), ""
    with _captured_output() if quiet else contextlib.nullcontext(io.StringIO()) as log:
        # CUDA and cuDNN from the nvidia-* wheels, where no PyTorch has loaded them already
        # (onnxruntime's advice: importing a matching torch first does the same).
        if "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception:
            if quiet:  # what ONNX Runtime said is the explanation: not lost with the error
                sys.stderr.write(log.getvalue())
            raise
    if session.get_providers()[0] == first:
        return session, ""
    text = log.getvalue()
    found = (m.group(1).strip() for c in _CAUSES if (m := c.search(text)))
    cause = next(
        found, "it fell back to the CPU" + ("" if quiet else "; ONNX Runtime said why above")
    )
    if cause.startswith("libcuda.so"):
        cause = f"no NVIDIA driver: {cause}"
    note = _cuda_runtime_note()
    if first == ORT_PROVIDERS["tensorrt"]:
        note = "its TensorRT provider also needs TensorRT's own libraries (libnvinfer)"
    return session, f"{first} did not start ({cause})" + (f"; {note}" if note else "")


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def provider_problem(provider: str, device_id: int = 0) -> str | None:
    """Why ONNX Runtime's `provider` (cpu, cuda, tensorrt) cannot open a session here on GPU
    `device_id`, in one line; None when it can."""
    import onnxruntime as ort

    if provider == "cpu":
        return None
    wanted = ORT_PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
            return (
                f"this onnxruntime has no {wanted}: onnxruntime and onnxruntime-gpu are both "
                "installed and share one folder, the CPU build's files over the GPU build's; "
                "run `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`"
            )
        return (
            f"this onnxruntime has no {wanted} (it is the CPU build); install onnxruntime-gpu "
            "(Linux x86-64 and Windows; NVIDIA's Jetson wheel on a Jetson)"
        )
    providers = session_providers(provider, device_id)
    try:
        return start_session(PROBE_MODEL, None, providers, quiet=True)[1] or None
    except Exception as e:  # a provider that raises instead of falling back
        return f"{wanted} did not start ({type(e).__name__}: {e})"


def providers_that_start() -> list[str]:
    """ONNX Runtime's providers that open a session here (each GPU one is opened to know)."""
    import onnxruntime as ort

    short = {v: k for k, v in ORT_PROVIDERS.items()}
    return [
        p
        for p in ort.get_available_providers()
        if p not in short or provider_problem(short[p]) is None
    ]


def placement_for(device: str) -> Placement:
    """Where the stages after training run ONNX models for `train.device` (auto, cpu, cuda[:N]):
    the CUDA provider on that GPU where it starts here, else the CPU with the reason."""
    if device == "cpu":
        return CPU
    device_id = int(device.split(":")[1]) if ":" in device else 0
    problem = provider_problem("cuda", device_id)
    if problem is None:
        return Placement("cuda", device_id)
    # On a machine with no GPU at all, "auto" meaning the CPU needs no explanation.
    return Placement(why_cpu=problem if device != "auto" or _torch_sees_gpu() else "")


def _torch_sees_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
