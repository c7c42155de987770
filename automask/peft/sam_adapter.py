"""``sam_adapter``: SAM-Adapter's prompt generator (Chen et al., 2023).

"SAM Fails to Segment Anything? SAM-Adapter" computes task-specific prompts from two
features of the input and adds one to the tokens before every encoder block:

- the patch embeddings, projected to ``h = dim / scale_factor`` channels (embedding tune);
- the image's high-frequency components (the FFT with a centred square of low
  frequencies covering ``freq_ratio`` of the spectrum removed), embedded by a conv with
  the patch size as kernel and stride (handcrafted tune);
- their sum passes a per-block ``Linear(h, h) + GELU`` and a shared ``Linear(h, dim)``,
  giving block i's prompt (B, H, W, dim).

Their code uses ``freq_ratio=0.25`` and trunc-normal (std 0.02) Linear weights, so a fresh
model is not the frozen one. Zhong et al. (2024) do not state ``scale_factor``; 16 gives
their 3.98M (0.62%) on vit_h: ``h = 80``, 475,040 parameters beside the decoder.
The embedding tune reads the patch embeddings after the position embeddings are added
(automask's hook point), where SAM-Adapter reads them just before.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import TARGET_ROOT, EncoderHook, MethodOptions, PeftMethod


@dataclass(frozen=True)
class SAMAdapterOptions(MethodOptions):
    """Prompt-generator width and the high-pass filter."""

    scale_factor: int = 16
    """SAM-Adapter: prompt-generator width is the encoder width divided by this."""
    freq_ratio: float = 0.25
    """SAM-Adapter: share of the spectrum (low frequencies) removed by the high-pass."""

    def __post_init__(self) -> None:
        self.check_int("scale_factor", 1)
        self.check("freq_ratio", isinstance(self.freq_ratio, (int, float))
                   and 0 <= self.freq_ratio < 1, "must be in [0, 1)")


def high_pass(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """Images (B, C, H, W) without the centred low frequencies covering ``ratio`` of the area.

    Computed in float32; returns the magnitude of the filtered image, as SAM-Adapter does.
    While an ONNX export traces the model (TorchScript-based exporter, which has no FFT),
    the same filter runs as matrix products (:func:`high_pass_matmul`).
    """
    if torch.onnx.is_in_onnx_export():
        return high_pass_matmul(images, ratio)
    x = images.float()
    height, width = x.shape[-2:]
    half = int((height * width * ratio) ** 0.5 // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
    keep = torch.ones(height, width, device=x.device)
    cy, cx = height // 2, width // 2
    keep[cy - half:cy + half, cx - half:cx + half] = 0
    spectrum = spectrum * keep
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="forward")
    return filtered.real.abs()


def high_pass_matmul(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """:func:`high_pass` as four real matrix products (equal up to float32 rounding).

    The removed square is a product of a row band and a column band, so the low-pass
    part is separable: ``low = L_H x L_W^T`` with ``L_N = IDFT_N diag(band_N) DFT_N``, a
    complex (N, N) matrix; the filtered image's real part is
    ``x - (Re L_H x Re L_W^T - Im L_H x Im L_W^T)``. The matrices are computed with numpy,
    so a tracing exporter stores them as constants (2 x (H^2 + W^2) floats). Quadratic in
    the side where the FFT is not: for export, not for training.
    """
    x = images.float()
    height, width = x.shape[-2:]
    half = int((height * width * ratio) ** 0.5 // 2)
    (rows_re, rows_im), (cols_re, cols_im) = (
        (torch.from_numpy(part).to(x.device) for part in _low_pass_matrix(n, half))
        for n in (height, width))
    low = rows_re @ x @ cols_re.T - rows_im @ x @ cols_im.T  # (B, C, H, W)
    return (x - low).abs()


def _low_pass_matrix(n: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Real and imaginary parts (float32, (n, n)) of the operator that keeps, along one axis
    of length ``n``, the frequencies :func:`high_pass` removes: shifted indices
    ``[n // 2 - half, n // 2 + half)`` (Python's slice rules, as there)."""
    band = np.zeros(n)
    band[n // 2 - half:n // 2 + half] = 1.0  # in fftshift order, as high_pass's mask
    band = np.fft.ifftshift(band)  # in the FFT's own order
    matrix = np.fft.ifft(band[:, None] * np.fft.fft(np.eye(n), axis=0), axis=0)  # (n, n)
    return matrix.real.astype(np.float32), matrix.imag.astype(np.float32)


class PromptGenerator(EncoderHook):
    """Hook that adds a generated prompt to the tokens before every block.

    Parameters
    ----------
    dim, depth, patch_size : int
        Encoder width, number of blocks and patch side.
    options : SAMAdapterOptions
    like : torch.Tensor
        A tensor whose device and dtype the parameters take.
    """

    def __init__(self, dim: int, depth: int, patch_size: int, options: SAMAdapterOptions,
                 like: torch.Tensor) -> None:
        super().__init__()
        hidden = max(1, dim // options.scale_factor)
        factory = {"device": like.device, "dtype": like.dtype}
        self.freq_ratio = options.freq_ratio
        self.embedding_generator = nn.Linear(dim, hidden, **factory)
        self.handcrafted_generator = nn.Conv2d(3, hidden, kernel_size=patch_size,
                                               stride=patch_size, **factory)
        self.lightweight_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden, **factory), nn.GELU()) for _ in range(depth)
        )
        self.shared_mlp = nn.Linear(hidden, dim, **factory)
        if like.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """SAM-Adapter's init: Linear trunc-normal (std 0.02), zero bias; conv He-normal."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
                nn.init.zeros_(module.bias)

    def on_embed(self, x: torch.Tensor, images: torch.Tensor, ctx: dict) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            details = high_pass(images, self.freq_ratio)  # (B, 3, S, S) float32
        details = details.to(self.handcrafted_generator.weight.dtype)
        handcrafted = self.handcrafted_generator(details).permute(0, 2, 3, 1)  # (B, h, w, hid)
        ctx["sam_adapter"] = handcrafted + self.embedding_generator(x)  # (B, h, w, hid)
        return x

    def before_block(self, index: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        prompt = self.shared_mlp(self.lightweight_mlps[index](ctx["sam_adapter"]))
        return x + prompt  # (B, h, w, E)


def apply(model: nn.Module, options: SAMAdapterOptions) -> None:
    """Attach a :class:`PromptGenerator` to the encoder."""
    encoder = getattr(model, TARGET_ROOT)
    proj = encoder.patch_embed.proj
    model.set_encoder_hook(PromptGenerator(proj.out_channels, len(encoder.blocks),
                                           proj.kernel_size[0], options, proj.weight))


METHOD = PeftMethod("sam_adapter", "SAM-Adapter", SAMAdapterOptions, apply,
                    source="Chen et al. 2023, 'SAM Fails to Segment Anything? SAM-Adapter'; "
                           "scale_factor 16 reproduces 3.98M")
