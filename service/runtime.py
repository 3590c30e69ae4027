"""ONNX Runtime session for a bundle: CUDA execution provider when configured and available, CPU otherwise.

The provider really in use is read back from the session (ONNX Runtime silently falls back to CPU when the CUDA
libraries cannot be loaded), logged, and exported as `aegis_model_info{provider}`. A service configured for CUDA that
only got the CPU provider refuses to start (`on_missing_cuda="fail"`) or warns and serves on CPU (`"warn"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import structlog

from models.bundle import Bundle

log = structlog.get_logger("aegis.runtime")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class RuntimeUnavailable(RuntimeError):
    """The configured execution provider cannot be used (and the settings say to refuse)."""


class BundleMismatch(RuntimeError):
    """The ONNX graph does not match the bundle manifest (input name/shape, outputs, class count)."""


@dataclass
class OnnxRunner:
    """A batch callable: float32 N x C x H x W in [0, 1] -> (logits N x K, shield_logits N x K).

    With `buckets`, a batch is padded (zero rows) up to the smallest bucket that holds it, so the session only
    ever sees those few shapes, all warmed up before the service reports ready (`warmup_sizes`). On CUDA this
    matters: cuDNN plans its convolutions per input shape. On an H100 (ONNX Runtime 1.31.1, EXHAUSTIVE search) a
    service whose micro-batches changed size from call to call spent ~0.5 s in every batch, even with every
    power-of-two bucket warmed up, while a fixed shape ran in ~1 ms (docs/gpu.md). One shape (`max`) rules any
    per-shape cost out by construction; the padded rows cost GPU time that would otherwise sit idle.
    """

    session: object
    input_name: str
    output_names: tuple[str, str]
    provider: str
    buckets: tuple[int, ...] = ()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        size = next((b for b in self.buckets if b >= n), n)
        if size > n:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)])
        logits, shield = self.session.run(list(self.output_names), {self.input_name: batch})
        return np.asarray(logits[:n], dtype=np.float32), np.asarray(shield[:n], dtype=np.float32)

    def warmup_sizes(self, max_batch_size: int) -> list[int]:
        return list(self.buckets) if self.buckets else sorted({1, max_batch_size})


BatchShapes = Literal["auto", "exact", "buckets", "max"]


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, and `max_batch_size` itself: 1, 2, 4, ..., max."""
    sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def create_runner(bundle: Bundle, device: str = "cpu", on_missing_cuda: str = "fail",
                  intra_op_threads: int = 0, max_batch_size: int = 32, batch_shapes: BatchShapes = "auto",
                  cudnn_conv_algo_search: str = "HEURISTIC") -> OnnxRunner:
    """`batch_shapes`: the batch sizes the session sees: `exact` (no padding), `buckets` (powers of two), `max`
    (always `max_batch_size`); `auto` = `max` where the session runs on CUDA, `exact` on CPU (where padded rows
    would cost real compute and new shapes cost nothing). `cudnn_conv_algo_search`: the CUDA provider's option
    (HEURISTIC plans a shape in milliseconds; EXHAUSTIVE benchmarks every algorithm, ~0.3-1 s per shape)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [CPU]
    if device == "cuda":
        if CUDA in available:
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip wheels (nvidia-*) are not on the loader's path
                ort.preload_dlls()
            providers = [(CUDA, {"cudnn_conv_algo_search": cudnn_conv_algo_search}), CPU]
        else:
            _missing_cuda(on_missing_cuda, f"device=cuda but ONNX Runtime offers only {available} "
                                           "(install the gpu extra: onnxruntime-gpu)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # no busy-waiting between batches: the spinning pool would take the cores that decode, Cushion and HTTP need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(bundle.onnx_path), sess_options=options, providers=providers)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        _missing_cuda(on_missing_cuda, f"device=cuda but the session runs on {provider} "
                                       "(the CUDA provider failed to load: check CUDA/cuDNN libraries)")
    spec = bundle.manifest.onnx
    _check_graph(session, bundle)
    log.info("onnx_session_ready", provider=provider, providers=session.get_providers(), device=device,
             onnx=bundle.manifest.onnx.file)
    shapes = ("max" if provider == CUDA else "exact") if batch_shapes == "auto" else batch_shapes
    buckets = {"exact": (), "buckets": batch_buckets(max_batch_size), "max": (max_batch_size,)}[shapes]
    return OnnxRunner(session, spec.input, tuple(spec.outputs), provider, buckets)

def _missing_cuda(on_missing_cuda: str, message: str) -> None:
    if on_missing_cuda == "fail":
        raise RuntimeUnavailable(message + "; set AEGIS_ON_MISSING_CUDA=warn to serve on CPU instead")
    log.warning("cuda_unavailable_serving_on_cpu", reason=message)


def _check_graph(session, bundle: Bundle) -> None:
    m = bundle.manifest
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if m.onnx.input not in inputs:
        raise BundleMismatch(f"the ONNX graph has no input {m.onnx.input!r} (inputs: {sorted(inputs)})")
    shape = list(inputs[m.onnx.input].shape)
    expected = [m.input.channels, m.input.height, m.input.width]
    if len(shape) != 4 or [d for d in shape[1:]] != expected:
        raise BundleMismatch(f"the ONNX input shape {shape} does not match the manifest's N x {expected}")
    for name in m.onnx.outputs:
        if name not in outputs:
            raise BundleMismatch(f"the ONNX graph has no output {name!r} (outputs: {sorted(outputs)})")
        width = outputs[name].shape[-1]
        if isinstance(width, int) and width != len(m.classes):
            raise BundleMismatch(f"ONNX output {name!r} has {width} columns but the manifest names "
                                 f"{len(m.classes)} classes")
