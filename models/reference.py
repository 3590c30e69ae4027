"""The bundle's decision rule computed the plain way, with no service code: `models` + ONNX Runtime, one image at a
time (batch 1). The independent reference that the service's answers are checked against (tests, `service.soak`).

    u = cushion(prepare_image(image, manifest.input));  logits, s = aegis.onnx(u / 255);  k = argmax(logits)
    accept iff s[k] >= thresholds[classes[k]]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.bundle import load_bundle
from models.imaging import prepare_image


class OfflineReference:
    def __init__(self, bundle_dir: str | Path | None):
        import onnxruntime as ort  # local import: the serving extras' runtime; `models` itself does not need it

        self.bundle = load_bundle(bundle_dir)
        self.manifest = self.bundle.manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.bundle.onnx_path), options, providers=["CPUExecutionProvider"])

    def model_input(self, image: Image.Image) -> np.ndarray:
        u = self.bundle.cushion(prepare_image(image, self.manifest.input))
        return u.transpose(2, 0, 1)[None].astype(np.float32) / 255

    def answer(self, image: Image.Image) -> dict:
        x = self.model_input(image)
        logits, shield = self.session.run(["logits", "shield_logits"], {"image": x})
        k = int(np.argmax(logits[0]))
        name = self.manifest.classes[k]
        threshold = self.manifest.thresholds[name]
        return {"diagnosis": name, "shield_logit": float(shield[0, k]), "threshold": threshold,
                "decision": "accept" if shield[0, k] >= threshold else "reject", "logits": logits[0],
                "shield_logits": shield[0], "x": x}
