"""Differentiable pieces the engine plugs into its one loop (`PGDConfig.transform`, `.gradient_filter`, the BPDA
surrogate): input diversity (DIM), translation-invariant gradient smoothing (TIM), random translations (EOT) and a
differentiable JPEG (BPDA backward pass). All work on N x C x H x W batches in [0, 1] with C = 1 or 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DiverseInput:
    """DIM input diversity (Xie et al., CVPR 2019), in the torchattacks / HFC-code variant (`attacks-reference.md`
    §1.6): with probability `p`, shrink the image to a random side in [resize_rate * W, W) (bilinear) and zero-pad it
    back to W x H at a random offset; otherwise return it unchanged. The gradient flows through resize and pad."""

    p: float = 0.5
    resize_rate: float = 0.9

    def __call__(self, x: Tensor) -> Tensor:
        if torch.rand(()) >= self.p:
            return x
        height, width = x.shape[-2:]
        side = int(torch.randint(int(self.resize_rate * width), width, ()))
        rows = round(side * height / width)
        small = F.interpolate(x, size=(rows, side), mode="bilinear", align_corners=False)
        left, top = int(torch.randint(0, width - side + 1, ())), int(torch.randint(0, height - rows + 1, ()))
        return F.pad(small, (left, width - side - left, top, height - rows - top), value=0.0)


def gaussian_kernel(size: int = 7, nsig: float = 3.0) -> Tensor:
    """TIM kernel: outer product of the standard normal pdf on linspace(-nsig, nsig, size), normalised to sum 1."""
    pdf = torch.distributions.Normal(0.0, 1.0).log_prob(torch.linspace(-nsig, nsig, size)).exp()
    kernel = pdf[:, None] * pdf[None, :]
    return kernel / kernel.sum()


@dataclass(frozen=True)
class GaussianSmoothing:
    """TIM (Dong et al., CVPR 2019): smooth the gradient with a depthwise Gaussian kernel before the sign step.
    Size 7, nsig 3 as in the HFC code for medical images (ImageNet work uses 15); "same" padding."""

    size: int = 7
    nsig: float = 3.0

    def __call__(self, grad: Tensor) -> Tensor:
        channels = grad.shape[1]
        kernel = gaussian_kernel(self.size, self.nsig).to(grad)[None, None].expand(channels, 1, -1, -1)
        return F.conv2d(grad, kernel, padding=self.size // 2, groups=channels)


@dataclass(frozen=True)
class RandomTranslate:
    """EOT over small translations (edge pixels replicated): they move the 8 x 8 JPEG grid under the image and
    smooth the BPDA gradient (`attacks-reference.md` §3.1)."""

    max_shift: int = 2

    def __call__(self, x: Tensor) -> Tensor:
        s = self.max_shift
        dx, dy = (int(v) for v in torch.randint(-s, s + 1, (2,)))
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        return padded[..., s + dy:s + dy + x.shape[-2], s + dx:s + dx + x.shape[-1]]


@dataclass(frozen=True)
class DiffJpeg:
    """Differentiable JPEG surrogate for the BPDA backward pass (Reich et al., WACV 2024; kornia's
    `jpeg_codec_differentiable`). The forward value never reaches the attack: `through_cushion` keeps the exact
    Pillow Cushion's value and takes only this function's gradient.

    `quality` is one value (the Cushion's) or a (low, high) range sampled per image and call, which makes the
    surrogate stochastic for EOT over unknown qualities. Grayscale: kornia codes RGB, so the channel is replicated
    (R = G = B gives constant chroma, which JPEG codes without loss: the luma path is Pillow's "L" JPEG) and the
    three decoded channels are averaged back. `max_grid_shift` > 0: the block grid is offset by a random 0..max
    pixels per axis and call, like `models.cushion.RandomisedJpegCushion` (kornia needs sides divisible by 16, so the
    far sides are padded up to the next multiple and cropped).
    """

    quality: float | tuple[float, float] = 80.0
    max_grid_shift: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        if not self.max_grid_shift:
            return self._code(x)
        dy, dx = (int(v) for v in torch.randint(0, self.max_grid_shift + 1, (2,)))
        h, w = x.shape[-2:]
        pad_h, pad_w = -(h + dy) % 16, -(w + dx) % 16
        padded = F.pad(x, (dx, pad_w, dy, pad_h), mode="replicate")
        return self._code(padded)[..., dy:dy + h, dx:dx + w]

    def _code(self, x: Tensor) -> Tensor:
        from kornia.enhance import jpeg_codec_differentiable  # lazy: only the surrogate attacks need kornia

        if isinstance(self.quality, tuple):
            low, high = self.quality
            quality = torch.empty(x.shape[0], device=x.device).uniform_(low, high)
        else:
            quality = torch.full((x.shape[0],), float(self.quality), device=x.device)
        gray = x.shape[1] == 1
        coded = jpeg_codec_differentiable(x.expand(-1, 3, -1, -1) if gray else x, quality)
        return coded.mean(1, keepdim=True) if gray else coded
