"""ONNX Runtime session for a bundle: CUDA execution provider when configured and available, CPU otherwise.

The provider really in use is read back from the session (ONNX Runtime silently falls back to CPU when the CUDA
libraries cannot be loaded), logged, and exported as `aegis_model_info{provider}`. A service configured for CUDA that
only got the CPU provider refuses to start (`on_missing_cuda="fail"`) or warns and serves on CPU (`"warn"`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """A batch callable: float32 N x C x H x W in [0, 1] -> (logits N x K, shield_logits N x K)."""

    session: object
    input_name: str
    output_names: tuple[str, str]
    provider: str

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, shield = self.session.run(list(self.output_names), {self.input_name: batch})
        return np.asarray(logits, dtype=np.float32), np.asarray(shield, dtype=np.float32)


def create_runner(bundle: Bundle, device: str = "cpu", on_missing_cuda: str = "fail",
                  intra_op_threads: int = 0) -> OnnxRunner:
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [CPU]
    if device == "cuda":
        if CUDA in available:
            providers = [CUDA, CPU]
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
    return OnnxRunner(session, spec.input, tuple(spec.outputs), provider)


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
