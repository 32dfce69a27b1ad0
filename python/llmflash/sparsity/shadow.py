"""Shadow predictors: a 4-bit copy of each layer's gate and up rows, the second predictor kind.

    score_i(x) = |silu(x . gate~_i) * (x . up~_i)|     gated (SwiGLU) FFNs
               = x . up~_i + bias_i                     ReLU FFNs (the pre-activation)

where gate~, up~ are the rows quantized to 4 bits in groups of GROUP columns (symmetric: code
c in 1..15 stands for (c - 8) * scale, one float16 scale per group). A neuron is predicted when
its score is over the layer's threshold, chosen like the low-rank predictors' (llmflash.sparsity.quantiles:
held-out quantiles of the scores of active and inactive pairs, any target recall).

Why a second kind: |silu(g) u| needs |u|, which a low-rank view of the FFN input does not carry
well on small SwiGLU models (their FFN input spreads its variance over many directions), while 4
bits per weight keep the neurons' ranking almost intact: on SmolLM2-135M, restricting each
token's FFN to the top half of neurons by this score costs about as little perplexity as by the
exact |act|, far less than low-rank predictors of rank 128 or 256. The cost is memory: gate and
up at 4 bits are 1/6 of the FFN's float16 bytes, counted inside `--memory`. For wide models with
a small active share (OPT) the low-rank predictors are far smaller; shadows suit small SwiGLU
models with dense magnitude sparsity.

Decode runs the product with torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, bfloat16
activations), a little faster than the float16 product of the same rows; without that kernel,
the rows are dequantized once at load.

File layout (inside predictors.safetensors, metadata kind = "shadow"):
    layers.{i}.shadow.codes   (rows, D/2)      uint8: 4-bit codes, low nibble = even column
    layers.{i}.shadow.scales  (rows, D/GROUP)  float16
    layers.{i}.shadow.bias    (n,)             float32, ReLU FFNs with an fc1 bias only
rows = 2n (gate rows then up rows) for gated FFNs, n (up rows) otherwise; original neuron order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP = 32
_INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def quantize4(w: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, D) float -> (codes (rows, D/2) uint8, scales (rows, D/GROUP) float16)."""
    rows, D = w.shape
    if D % GROUP:
        raise ValueError(f"shadow predictors need a model width divisible by {GROUP} (got {D})")
    g = w.float().view(rows, D // GROUP, GROUP)
    scales = (g.abs().amax(-1) / 7).half().float()  # what the file will hold
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    c = (torch.round(g / scales[..., None]).clamp(-7, 7) + 8).to(torch.uint8).view(rows, D)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(), scales.half()


def unpack4(codes: Tensor) -> Tensor:
    """(rows, D/2) uint8 -> (rows, D) int32 codes 0..15."""
    lo, hi = codes & 0xF, codes >> 4
    return torch.stack([lo, hi], dim=-1).view(codes.shape[0], -1).to(torch.int32)


def dequantize4(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 rows a shadow stands for."""
    c = unpack4(codes).float() - 8
    rows, D = c.shape
    return (c.view(rows, D // GROUP, GROUP) * scales.float()[..., None]).view(rows, D)


@dataclass
class ShadowLayer:
    codes: Tensor  # (rows, D/2) uint8
    scales: Tensor  # (rows, D/GROUP) float16
    gated: bool
    up_bias: Tensor | None = None  # (n,) float32, ReLU FFNs
    _packed: Tensor | None = field(default=None, repr=False)
    _sz: Tensor | None = field(default=None, repr=False)
    _dense: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        rows = self.rows = self.codes.shape[0]
        self.dim = self.codes.shape[1] * 2
        self.n = rows // 2 if self.gated else rows
        self.bias = torch.zeros(self.n)  # the Predictors interface: logits = scores + bias
        if _INT4_CPU:
            try:
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack4(self.codes), 1)
                s = self.scales.t().to(torch.bfloat16)  # (D/GROUP, rows)
                self._sz = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
                return
            except RuntimeError:  # a torch build without the CPU kernel
                self._packed = None
        self._dense = dequantize4(self.codes, self.scales)

    @classmethod
    def from_weights(cls, w1: Tensor, gated: bool, up_bias: Tensor | None = None) -> "ShadowLayer":
        """From DenseFFN rows: w1 (2n, D) gate then up rows, or (n, D) up rows."""
        codes, scales = quantize4(w1)
        return cls(codes, scales, gated, None if up_bias is None else up_bias.float())

    def _product(self, x: Tensor) -> Tensor:
        if self._packed is not None:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16).contiguous(), self._packed, GROUP, self._sz
            ).float()
        return F.linear(x.float(), self._dense)

    def scores(self, x: Tensor) -> Tensor:
        """x (T, D) -> (T, n) float32 scores (higher: more likely needed)."""
        h = self._product(x)
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            return (F.silu(g) * u).abs()
        return h + self.up_bias if self.up_bias is not None else h

    def logits(self, x: Tensor) -> Tensor:
        return self.scores(x)

    @property
    def rank(self) -> int:
        return 0

    def macs(self) -> int:
        return self.rows * self.dim

    def release_codes(self) -> "ShadowLayer":
        """Drop the file form (codes, scales) once the kernel's packed form exists: at run time
        only that is needed, and it is what the memory budget counts."""
        if self._packed is not None or self._dense is not None:
            self.codes = self.scales = None  # type: ignore[assignment]
        return self

    def nbytes(self) -> int:
        """DRAM held now: the kernel's form, plus the file form until released."""
        ts = [self._packed, self._sz, self._dense, self.codes, self.scales, self.up_bias]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)
