"""``conv_lora``: LoRA whose low-rank activation passes through a mixture of conv experts.

Zhong et al., "Convolution Meets LoRA: Parameter Efficient Finetuning for Segment Anything
Model" (ICLR 2024). The low-rank activation ``A(x)`` is laid out as the block's 2-D token
grid (one window at a time in windowed blocks). Expert ``i`` interpolates the map by its
scale ``s_i`` (bicubic), applies a 3x3 convolution r -> r and GELU, and interpolates back;
a noisy top-k gate on the globally pooled low-rank features picks the experts per sample,
and the gated mixture is added to the low-rank activation before ``B``.
"""
from __future__ import annotations

import functools
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.tracing import has_forward_hooks, is_exporting
from .base import PeftMethod, split_names, wrap_targets
from .lora import LoRALinear, LoRAOptions, add_low_rank_update, check_rank

_NOISE_EPS = 1e-2
ROUTINGS = ("auto", "sparse", "batched", "compiled")
_COMPILE_FAILED = False  # set when compiling the routing failed under routing="auto"


@dataclass(frozen=True)
class ConvLoRAOptions(LoRAOptions):
    """LoRA's options plus the mixture of experts."""

    num_experts: int = 8
    """Conv-LoRA: number M of convolution experts; expert i works at scale i."""
    top_k: int = 1
    """Conv-LoRA: experts routed to per sample."""
    aux_loss_weight: float = 0.01
    """Conv-LoRA: weight of each layer's load-balancing loss."""
    scales: str | None = None
    """Conv-LoRA: comma-separated scale of each expert; None: 1, 2, ..., M."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("num_experts", 1)
        self.check_int("top_k", 1)
        self.check("top_k", self.top_k <= self.num_experts,
                   f"must be <= num_experts ({self.num_experts})")
        self.check_positive("aux_loss_weight", allow_zero=True)
        if self.scales is not None:
            if not isinstance(self.scales, str):
                object.__setattr__(self, "scales", ",".join(str(s) for s in self.scales))
            try:
                values = [float(s) for s in split_names(self.scales)]
            except ValueError:
                values = []
            self.check("scales", len(values) == self.num_experts
                       and all(0 < v < float("inf") for v in values),
                       f"must hold {self.num_experts} finite positive numbers, one per expert, "
                       "as one string such as '1,2,3' (a list of values would train one "
                       "candidate per value)")

    @property
    def scale_list(self) -> tuple[float, ...] | None:
        return None if self.scales is None else tuple(float(s) for s in split_names(self.scales))


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (0 for a single value)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def _cv_squared_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cv_squared(a) + cv_squared(b)`` for two vectors of one length, as one reduction."""
    if a.numel() <= 1:
        return a.new_zeros(())
    pair = torch.stack([a.float(), b.float()])  # (2, M)
    return (pair.var(dim=1) / (pair.mean(dim=1) ** 2 + 1e-10)).sum()


class ConvLoRALinear(LoRALinear):
    """LoRA with a mixture of multi-scale convolution experts on the low-rank grid.

    Parameters
    ----------
    base_layer : nn.Linear
        The layer adapted (SAM's fused ``qkv``); its input must be a token grid
        (N, H, W, C), as in segment-anything's attention blocks.
    rank : int
        Rank r of the update and channels of the experts.
    alpha : float
        The update is scaled by ``alpha / rank``.
    num_experts : int
        Number M of experts.
    top_k : int
        Experts each sample is routed to.
    scales : sequence of float, optional
        Scale of each expert; default ``1, 2, ..., M``.
    aux_loss_weight : float
        Weight of the load-balancing loss stored in :attr:`aux_loss`.

    Attributes
    ----------
    aux_loss : torch.Tensor or None
        ``aux_loss_weight * (cv^2(importance) + cv^2(load))`` of the last forward.
    expert_counts : list of int
        How many samples (windows or images) each expert received in the last forward.
    routing : {"auto", "sparse", "batched", "compiled"}
        How the routed experts run in training and prediction: ``"sparse"`` groups the
        samples by expert and runs each chosen expert on its group (:meth:`_dispatch`; one
        host synchronisation per forward to size the groups), ``"batched"`` runs every
        routed (sample, expert) pair in one set of kernels (:meth:`_batched_dispatch`; no
        host synchronisation, fixed shapes), ``"compiled"`` runs the gate and the batched
        dispatch as one ``torch.compile`` graph (:func:`compiled_routed_mixture`) in passes
        that record gradients and batched in the others. ``"auto"`` (default): on CUDA
        compiled where :func:`compile_supported` (else batched; batched too, with a
        warning, should compiling fail), sparse elsewhere.
    dense_routing : bool
        Compute the mixture with :meth:`dense_mixture` (static operations, for export);
        False by default. Exporting, tracing and compiling use it whatever this says.

    Notes
    -----
    Gating follows the noisy top-k gate of Shazeer et al. (2017): logits
    ``pooled @ w_gate`` plus, in training mode only, Gaussian noise with scale
    ``softplus(pooled @ w_noise) + eps``; ``w_gate`` and ``w_noise`` start at zero. The
    load is the differentiable normal-CDF estimate when noise is used, else the count of
    routed samples. Only experts that receive samples are computed: in the sparse
    dispatch an expert no sample was routed to does not run and gets no gradient (as in the
    reference implementation, which skips an expert with an empty batch); in the batched
    one it gets a zero gradient, which :func:`drop_unreached_expert_gradients` (called by
    the fit before each optimiser step) turns back into none. Adds
    ``M * (9 r^2 + r) + 2 r M`` parameters per layer to LoRA's (720 for r=3, M=8).
    """

    mergeable = False
    token_wise = False  # the experts convolve the (window's) token grid

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int = 3,
        alpha: float = 32.0,
        num_experts: int = 8,
        top_k: int = 1,
        scales: tuple[float, ...] | None = None,
        aux_loss_weight: float = 0.01,
    ) -> None:
        super().__init__(base_layer, rank=rank, alpha=alpha)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.scales = tuple(float(s) for s in (scales or range(1, num_experts + 1)))
        if len(self.scales) != num_experts:
            raise ValueError(f"need {num_experts} scales, got {self.scales}")
        if not all(0 < s < float("inf") for s in self.scales):
            raise ValueError(f"scales must be finite and > 0, got {self.scales}")
        self.aux_loss_weight = aux_loss_weight
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.experts = nn.ModuleList(
            nn.Conv2d(rank, rank, kernel_size=3, padding=1, **factory) for _ in range(num_experts)
        )
        for expert in self.experts:  # as the authors' code: no constant offset at the start
            nn.init.zeros_(expert.bias)
        self.w_gate = nn.Parameter(torch.zeros(rank, num_experts, **factory))
        self.w_noise = nn.Parameter(torch.zeros(rank, num_experts, **factory))
        self.aux_loss: torch.Tensor | None = None
        self._expert_counts: list[int] | torch.Tensor = [0] * num_experts
        self.routing = "auto"
        self.dense_routing = False
        self._ran_batched = False  # the last forward with gradients ran the batched dispatch

    @property
    def expert_counts(self) -> list[int]:
        """Samples routed to each expert in the last forward (read from the device only
        when asked: the batched dispatch keeps them there)."""
        counts = self._expert_counts
        return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)

    def path(self, device: torch.device) -> str:
        """How the next forward on ``device`` computes the mixture: ``"dense"``,
        ``"sparse"``, ``"batched"`` or ``"compiled"`` (see :attr:`routing`)."""
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(map(repr, ROUTINGS))}, got "
                             f"{self.routing!r}")
        if self.dense_routing or is_exporting():
            return "dense"
        if self.routing == "auto":
            if device.type != "cuda":
                return "sparse"
            compiled = not _COMPILE_FAILED and compile_supported()
            return "compiled" if compiled and torch.is_grad_enabled() else "batched"
        if self.routing == "compiled" and not torch.is_grad_enabled():
            return "batched"
        return self.routing

    def merge(self) -> None:  # noqa: D102
        raise NotImplementedError("Conv-LoRA cannot be merged: its experts are nonlinear")

    def unmerge(self) -> None:  # noqa: D102
        raise NotImplementedError("Conv-LoRA cannot be merged: its experts are nonlinear")

    # ------------------------------------------------------------------ gating
    def gate(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (N, M) and the load-balancing loss, from pooled features (N, r).

        Computed in float32 even under autocast (:func:`noisy_top_k_gate`); noisy in
        training mode when ``top_k < num_experts``.
        """
        noise = self._gate_noise(pooled.shape[0], pooled.device)
        return noisy_top_k_gate(pooled, self.w_gate, self.w_noise, noise, self.top_k,
                                self.aux_loss_weight)

    def _gate_noise(self, samples: int, device: torch.device) -> torch.Tensor | None:
        """Standard normal noise (N, M) for the gate in training mode, else None."""
        if not (self.training and self.top_k < self.num_experts):
            return None
        return torch.randn(samples, self.num_experts, device=device)

    # ------------------------------------------------------------------ experts
    def run_expert(self, index: int, grid: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on low-rank maps (n, r, H, W): resize by s_i, conv, GELU, back.

        On a CPU an expert of scale 4 or more resizes and convolves in one composed linear
        map (:func:`composes`, :func:`resized_conv`), a smaller one resizes
        (:func:`bicubic_resize`) and convolves (:func:`expert_conv`).

        Computed in the experts' own dtype (float32 unless the model was cast), autocast
        off: the maps have r channels and the arithmetic is tiny, while bf16 kernels for
        them are no faster on CPUs. The result has ``grid``'s dtype.
        """
        height, width = int(grid.shape[-2]), int(grid.shape[-1])  # static: the window size
        expert = self.experts[index]
        size = expert_size((height, width), self.scales[index])
        with torch.autocast(grid.device.type, enabled=False):
            x = grid.to(expert.weight.dtype)
            if composes(expert, x, size):
                x = resized_conv(x, expert.weight, expert.bias, size)  # (n, r, sH, sW)
            else:
                x = expert_conv(expert, bicubic_resize(x, size))  # (n, r, sH, sW)
            x = bicubic_resize(F.gelu(x), (height, width))  # (n, r, H, W)
        return x.to(grid.dtype)

    def mixture(self, grid: torch.Tensor) -> torch.Tensor:
        """Gated sum of the experts on (N, r, H, W); sets :attr:`aux_loss`.

        Computed in the experts' dtype (float32 unless the model was cast) with autocast
        off, the grid cast once; returned in ``grid``'s dtype.
        """
        with torch.autocast(device_type=grid.device.type, enabled=False):
            maps = grid.to(self.experts[0].weight.dtype)  # (N, r, H, W)
            path = self.path(maps.device)
            if path == "compiled":
                out = self._compiled_mixture(maps)
            else:
                gates, aux_loss = self.gate(maps.float().mean(dim=(2, 3)))  # (N, M)
                if not is_exporting():  # an exported graph keeps no attributes it assigned
                    self.aux_loss = aux_loss
                if path == "dense":
                    out = self.dense_mixture(maps, gates)
                elif path == "batched":
                    out = self._batched_dispatch(maps, gates)
                else:
                    out = self._dispatch(maps, gates)
            if torch.is_grad_enabled():
                self._ran_batched = path in ("batched", "compiled")
        return out.to(grid.dtype)

    def _compiled_mixture(self, maps: torch.Tensor) -> torch.Tensor:
        """:func:`routed_mixture` compiled; sets :attr:`aux_loss` and the expert counts.

        Should compiling fail under ``routing="auto"``, warns once and runs it uncompiled
        from then on (the batched dispatch's operations); under ``"compiled"`` it raises.
        """
        global _COMPILE_FAILED
        noise = self._gate_noise(maps.shape[0], maps.device)
        inputs = (maps, self.w_gate, self.w_noise, noise, *self._expert_tensors(maps),
                  self.aux_loss_weight)
        try:
            out, self.aux_loss, self._expert_counts = compiled_routed_mixture()(*inputs)
        except _compile_errors() as exc:
            if self.routing != "auto":
                raise
            _COMPILE_FAILED = True
            warnings.warn(f"Conv-LoRA: compiling the routing failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running it "
                          f"uncompiled (batched dispatch). Set env.conv_lora_routing="
                          f"'batched' to skip the attempt.", RuntimeWarning, stacklevel=2)
            out, self.aux_loss, self._expert_counts = routed_mixture(*inputs)
        return out

    def _dispatch(self, maps: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Group the (sample, expert) pairs by expert; run only the routed experts.

        The maps are gathered once in expert order and each expert takes its slice; the
        weighted outputs are summed back into the samples by one ``index_add``, which adds a
        sample's contributions in expert order, as one ``index_add`` per expert did.
        """
        weight, expert = gates.topk(self.top_k, dim=1)  # (N, k)
        sample = torch.arange(maps.shape[0], device=maps.device).repeat_interleave(self.top_k)
        expert, weight = expert.reshape(-1), weight.reshape(-1)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        self._expert_counts = counts
        rows = sample[order]  # (N * k,) sample of each routed pair, in expert order
        routed = maps.index_select(0, rows)  # (N * k, r, H, W)
        weight = weight[order].to(maps.dtype).view(-1, 1, 1, 1)
        outputs, start = [], 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            part = slice(start, start + count)
            start += count
            outputs.append(self.run_expert(index, routed[part]) * weight[part])
        out = torch.zeros_like(maps)  # (N, r, H, W)
        return out.index_add(0, rows, torch.cat(outputs)) if outputs else out

    def _batched_dispatch(self, maps: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every routed (sample, expert) pair at once (:func:`batched_experts`)."""
        out, self._expert_counts = batched_experts(maps, gates, *self._expert_tensors(maps))
        return out

    def _expert_tensors(self, maps: torch.Tensor) -> tuple:
        """The experts' kernels and biases and their padded resize matrices for ``maps``."""
        height, width = int(maps.shape[-2]), int(maps.shape[-1])
        return ([e.weight for e in self.experts], [e.bias for e in self.experts],
                padded_resize_matrices(height, width, self.scales, maps.dtype, maps.device),
                self.top_k)

    def dense_mixture(self, grid: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The mixture with static operations only, for export: every expert on every sample.

        Each expert's output is multiplied by its gate column (zero for the samples not
        routed to it) and the products are summed in expert order, as :meth:`mixture`'s
        dispatch adds them, so the result matches it in eval mode. M times the expert
        arithmetic, but no data-dependent shapes or host synchronisation: used when
        :attr:`dense_routing` is set and while exporting, tracing or compiling.
        """
        grid = grid.contiguous()  # like the dispatch's index_select copies: same conv kernels
        out = torch.zeros_like(grid)  # (N, r, H, W)
        for index in range(self.num_experts):
            y = self.run_expert(index, grid)
            out = out + (y * gates[:, index].to(y.dtype).view(-1, 1, 1, 1)).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token grid (N, H, W, in_features) -> (N, H, W, out_features)."""
        if x.dim() != 4:
            raise ValueError(
                f"Conv-LoRA needs a token grid (N, H, W, C) as input, got shape {tuple(x.shape)}"
            )
        return self.add_delta(self.base_layer(x), self.lora_A(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update added to ``base_layer(x)``: (N, H, W, in) -> (N, H, W, out)."""
        return self.lora_B(self.mixed_low_rank(self.lora_A(x))) * self.scaling

    def add_delta(self, out: torch.Tensor, low_rank: torch.Tensor) -> torch.Tensor:
        """``out`` plus the update, from ``lora_A(x)`` (N, H, W, r): (N, H, W, out).

        ``lora_A`` is token-wise and has no bias, so a zero-padded window of ``x`` gives the
        zero-padded window of ``lora_A(x)``: the encoder blocks run ``lora_A`` on the real
        tokens and cut the r-channel result into windows (``automask.models.blocks``).
        ``lora_B``, its scaling and the addition are one product
        (:func:`~automask.peft.lora.add_low_rank_update`); ``out`` is a temporary, which
        a forward pass without gradients overwrites.
        """
        return add_low_rank_update(out, self.mixed_low_rank(low_rank), self.lora_B.weight,
                                   self.scaling, overwrite=True)

    def mixed_low_rank(self, low_rank: torch.Tensor) -> torch.Tensor:
        """``lora_A(x)`` plus its expert mixture: (N, H, W, r) -> (N, H, W, r)."""
        grid = low_rank.permute(0, 3, 1, 2)  # (N, r, H, W)
        grid = grid + self.mixture(grid)
        return grid.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, scales={self.scales}")


def noisy_top_k_gate(
    pooled: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None,
    top_k: int,
    aux_loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy top-k gate: routing weights (N, M) and the load-balancing loss.

    Parameters
    ----------
    pooled : torch.Tensor
        Pooled low-rank features (N, r).
    w_gate, w_noise : torch.Tensor
        Gate and noise weights (r, M).
    noise : torch.Tensor or None
        Standard normal noise (N, M) (training), or None for the clean gate.
    top_k : int
        Experts kept per sample.
    aux_loss_weight : float
        Weight of ``cv^2(importance) + cv^2(load)``.

    Computed in float32. Logits ``pooled @ w_gate``, plus ``noise`` scaled by
    ``softplus(pooled @ w_noise) + eps``; the kept logits are softmax-normalised. The load
    is the normal-CDF estimate of P(expert in top-k) when noisy, else the routed count.
    """
    pooled = pooled.float()
    num_experts = w_gate.shape[1]
    clean = pooled @ w_gate.float()  # (N, M)
    if noise is not None:
        noise_std = F.softplus(pooled @ w_noise.float()) + _NOISE_EPS
        logits = clean + noise.float() * noise_std
    else:
        logits = clean
    k_plus = min(top_k + 1, num_experts)
    top_values, top_indices = logits.topk(k_plus, dim=1)  # (N, k+1), descending
    weights = torch.softmax(top_values[:, :top_k], dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_indices[:, :top_k], weights)
    importance = gates.sum(0)  # (M,)
    if noise is not None and top_k < num_experts:
        # P(expert in top-k | other noise fixed): normal CDF against the (k+1)-th largest
        # noisy logit for an expert in the top k, the k-th for one out; differentiable in
        # w_gate and w_noise. One CDF of the threshold each expert is held against (the
        # values and gradients of taking both CDFs and keeping one, in fewer kernels).
        threshold_in = top_values[:, top_k : top_k + 1]  # (N, 1)
        threshold_out = top_values[:, top_k - 1 : top_k]  # (N, 1)
        threshold = torch.where(logits > threshold_in, threshold_in, threshold_out)
        load = torch.special.ndtr((clean - threshold) / noise_std).sum(0)  # (M,)
    else:
        load = (gates > 0).sum(0).float()
    return gates, aux_loss_weight * _cv_squared_sum(importance, load)


def batched_experts(
    maps: torch.Tensor,
    gates: torch.Tensor,
    kernels: list[torch.Tensor],
    biases: list[torch.Tensor],
    matrices: tuple[torch.Tensor, ...],
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every routed (sample, expert) pair at once, with fixed shapes and no host sync.

    Parameters
    ----------
    maps : torch.Tensor
        Low-rank maps (N, r, H, W).
    gates : torch.Tensor
        Routing weights (N, M), ``top_k`` nonzero per row (:func:`noisy_top_k_gate`).
    kernels, biases : list of torch.Tensor
        Each expert's 3x3 kernel (r, r, 3, 3) and bias (r,).
    matrices : tuple of torch.Tensor
        :func:`padded_resize_matrices` for (H, W), in ``maps``' dtype and device.
    top_k : int
        Experts per sample.

    Returns
    -------
    out : torch.Tensor
        The gated sum of the routed experts (N, r, H, W); a sample's contributions are
        summed in rank order.
    counts : torch.Tensor
        Pairs routed to each expert (M,), on the device.

    Each pair's map is resized up with its expert's matrices padded with zero rows to the
    largest expert's size (S_h, S_w), so all pairs share one shape; one grouped
    convolution applies each pair's expert (weights gathered by expert); the resize back
    has zero columns beyond the expert's size. A zero row makes the zero border that the
    convolution's padding would add, and a zero column drops what the convolution left
    beyond the expert's map, so this is the sparse dispatch's arithmetic plus exact zeros:
    equal up to float rounding in the products' sums. About 14 kernels for all experts
    instead of about 8 per routed expert, at the price of computing every pair at the
    largest scale: the faster form on GPUs, where many small kernels and a synchronisation
    cost more than the arithmetic.
    """
    n, r, height, width = maps.shape
    weight, expert = gates.topk(top_k, dim=1)  # (N, k)
    expert, weight = expert.reshape(-1), weight.reshape(-1)  # (P,), P = N * k pairs
    counts = torch.zeros(gates.shape[1], dtype=torch.long, device=maps.device).scatter_add_(
        0, expert, torch.ones_like(expert))
    routed = maps if top_k == 1 else maps.repeat_interleave(top_k, dim=0)
    up_h, up_w, down_h, down_w = (m.index_select(0, expert) for m in matrices)
    x = up_h.unsqueeze(1) @ routed @ up_w.transpose(1, 2).unsqueeze(1)  # (P, r, S_h, S_w)
    pairs, size = x.shape[0], x.shape[-2:]
    kernel = torch.stack(kernels).index_select(0, expert)  # (P, r, r, 3, 3)
    bias = torch.stack(biases).index_select(0, expert)  # (P, r)
    x = F.conv2d(x.reshape(1, pairs * r, *size), kernel.reshape(pairs * r, r, 3, 3),
                 bias.reshape(pairs * r), padding=1, groups=pairs)
    x = F.gelu(x).view(pairs, r, *size)
    x = down_h.unsqueeze(1) @ x @ down_w.transpose(1, 2).unsqueeze(1)  # (P, r, H, W)
    x = x * weight.to(x.dtype).view(-1, 1, 1, 1)
    out = x if top_k == 1 else x.view(n, top_k, r, height, width).sum(1)
    return out, counts


def routed_mixture(
    maps: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    noise: torch.Tensor | None,
    kernels: list[torch.Tensor],
    biases: list[torch.Tensor],
    matrices: tuple[torch.Tensor, ...],
    top_k: int,
    aux_loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate on pooled ``maps`` (N, r, H, W) and :func:`batched_experts`, as one function.

    Returns the mixture (N, r, H, W), the load-balancing loss and the counts per expert
    (M,). Pure and free of host synchronisation, so that it can be compiled as one graph
    (:attr:`ConvLoRALinear.routing` ``"compiled"``).
    """
    gates, loss = noisy_top_k_gate(maps.float().mean(dim=(2, 3)), w_gate, w_noise, noise,
                                   top_k, aux_loss_weight)
    out, counts = batched_experts(maps, gates, kernels, biases, matrices, top_k)
    return out, loss, counts


def set_conv_lora_routing(model: nn.Module, routing: str) -> int:
    """Set :attr:`ConvLoRALinear.routing` on every Conv-LoRA layer of ``model``.

    Returns the number of layers set (0 for other methods).
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(map(repr, ROUTINGS))}, got "
                         f"{routing!r}")
    layers = [m for m in model.modules() if isinstance(m, ConvLoRALinear)]
    for layer in layers:
        layer.routing = routing
    return len(layers)


def drop_unreached_expert_gradients(model: nn.Module) -> int:
    """Give the experts that no sample reached in an optimiser step no gradient at all.

    The batched dispatch (:attr:`ConvLoRALinear.routing`) takes every expert's weights into
    the graph, so an expert that no sample was routed to gets a zero gradient where the
    sparse dispatch and the reference implementation give none; AdamW would then still
    move it by its momentum and weight decay. Call this after the backward passes of an
    optimiser step (in a distributed fit after the gradients are averaged, so that every
    process drops the same experts): each expert of a layer whose last forward ran batched
    and whose weight and bias gradients are exactly zero is set to no gradient. Layers
    that ran the sparse dispatch are left as they are. One host synchronisation for all
    layers. A reached expert whose gradient is exactly zero is dropped too: at the first
    step, while LoRA's B is still zero, that is every expert, which then skips that step's
    weight decay (a step the sparse dispatch gives the reached ones).

    Returns
    -------
    int
        How many experts were set to no gradient.
    """
    experts = [expert for layer in model.modules()
               if isinstance(layer, ConvLoRALinear) and layer._ran_batched
               for expert in layer.experts
               if expert.weight.grad is not None and expert.bias.grad is not None]
    if not experts:
        return 0
    grads = [g.detach() for expert in experts for g in (expert.weight.grad, expert.bias.grad)]
    foreach_norm = getattr(torch, "_foreach_norm", None)  # a few kernels for all of them
    peaks = torch.stack([n.float() for n in foreach_norm(grads, float("inf"))] if foreach_norm
                        else [g.abs().amax().float() for g in grads])
    reached = (peaks.view(-1, 2) > 0).any(dim=1).tolist()  # (experts,): the one sync
    dropped = 0
    for expert, any_gradient in zip(experts, reached):
        if not any_gradient:
            expert.weight.grad = expert.bias.grad = None
            dropped += 1
    return dropped


IM2COL_BUDGET = 96 * 1024
"""Largest n * H * W * threads (torch's intra-op threads) of a map whose expert convolution
:func:`expert_conv` runs through ATen's im2col kernel on a CPU: maps of up to 48 k pixels
on two threads, 96 k on one, 6 k on sixteen; larger maps go to ``F.conv2d`` (oneDNN)."""


def expert_conv(expert: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``expert(x)``, the expert's 3x3 convolution: (n, r, H, W) -> (n, r, H, W).

    On a CPU, for a map small enough for :data:`IM2COL_BUDGET`, it runs ATen's
    im2col-and-product convolution (``aten::_slow_conv2d_forward``, whose backward is the
    matching ``_slow_conv2d_backward``) rather than the oneDNN kernel that ``F.conv2d``
    picks for any batch of two or more maps or a map over about 82 x 82. With r = 3
    channels oneDNN spends about 0.1 ms a call before any arithmetic: forward and backward
    in float32 on two threads, three 14 x 14 maps took 169 us against 66 us, three 84 x 84
    maps 731 against 400 us, and from about 48 k pixels on neither was reliably faster; on
    one thread the im2col kernel was faster up to 256 x 256 (0.70x). It divides a batch
    among the threads, oneDNN a map, so the budget shrinks as threads grow (the 2-core
    EPYC, ``python -m benchmarks.bench_ops --only expert-conv [--threads 1]``). The same
    convolution with its sums in another order: equal within float rounding. Elsewhere (a
    GPU, a larger map, an exporter or the compiler, an expert with a forward hook or
    configured otherwise) it is ``expert(x)``.
    """
    if (x.device.type == "cpu" and _IM2COL_CONV is not None and not is_exporting()
            and not has_forward_hooks(expert)
            and x.shape[0] * x.shape[-2] * x.shape[-1] * torch.get_num_threads() <= IM2COL_BUDGET
            and _is_plain_3x3(expert)):
        return _IM2COL_CONV(x, expert.weight, expert.kernel_size, expert.bias, expert.stride,
                            expert.padding)
    return expert(x)


_IM2COL_CONV = getattr(torch.ops.aten, "_slow_conv2d_forward", None)

COMPOSE_FROM = 16
"""Smallest ratio of an expert's map area to its input's (scale squared) from which
:meth:`ConvLoRALinear.run_expert` computes the resize and the convolution as one linear
map (:func:`resized_conv`) on a CPU: scale 4 and up; ``inf`` never."""


def composes(expert: nn.Conv2d, x: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether ``run_expert`` takes :func:`resized_conv` for ``expert`` on maps ``x`` (n, r,
    H, W) resized to ``size``: on a CPU, at :data:`COMPOSE_FROM` times the area or more,
    outside an exporter, tracer or the compiler, for an unhooked 3x3 expert of the default
    configuration."""
    if is_exporting() or x.device.type != "cpu":  # (no shape arithmetic in a traced graph)
        return False
    area = int(x.shape[-2]) * int(x.shape[-1])
    return (size[0] * size[1] >= COMPOSE_FROM * area and not has_forward_hooks(expert)
            and _is_plain_3x3(expert))


def _is_plain_3x3(expert: nn.Conv2d) -> bool:
    return (expert.kernel_size == (3, 3) and expert.padding == (1, 1)
            and expert.padding_mode == "zeros" and expert.stride == (1, 1)
            and expert.dilation == (1, 1) and expert.groups == 1)


def resized_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 size: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(bicubic_resize(x, size), weight, bias, padding=1)`` as matrix products.

    (n, c, H, W) -> (n, o, *size) for a 3x3 kernel ``weight`` (o, c, 3, 3). Resizing and
    convolving are both linear, and a kernel tap that reads the resized map one row or
    column away reads the resize matrix shifted by one row, with a zero row where the
    convolution's padding lies. So the kernel first mixes the channels of the small map,
    one (H, W) map per output channel and tap (o * 9 of them, laid out as an (o, 3H, 3W)
    block matrix), and two products with the three shifted resize matrices side by side,
    (sH, 3H) and (sW, 3W) (:func:`shifted_resize_matrix`), sum the nine taps at the large
    size. No map of the large size is written before the convolution's output, and the
    arithmetic is in a few matrix products in place of an im2col buffer of nine times the
    large map. Forward and backward in float32 on the 2-core EPYC, one to nine maps of 14 x
    14 to 128 x 128: 0.12-0.77 times the time of resizing, then convolving, at scales 6
    and 8, 0.45-0.99 at scale 4, 0.75-1.33 at scale 3 and 1.11-1.45 at scale 2 (three runs
    of ``python -m benchmarks.bench_ops --only resized-conv``; hence :data:`COMPOSE_FROM`).
    The same sums in another order: equal within float rounding.
    """
    n, c, height, width = x.shape
    out = weight.shape[0]
    rows = shifted_resize_matrix(height, size[0], x.dtype, x.device)  # (sH, 3H)
    cols = shifted_resize_matrix(width, size[1], x.dtype, x.device)  # (sW, 3W)
    taps = weight.permute(0, 2, 3, 1).reshape(out * 9, c) @ x.reshape(n, c, -1)  # (n, 9o, HW)
    blocks = taps.view(n, out, 3, 3, height, width).transpose(3, 4).reshape(
        n, out, 3 * height, 3 * width)  # block (a, b): tap (a, b)'s map
    y = rows @ (blocks @ cols.T)  # (n, o, sH, sW)
    return y if bias is None else y + bias.view(1, out, 1, 1)


def _cached_outside_tracing(maxsize: int):
    """``functools.lru_cache(maxsize)``, bypassed while a graph is traced (``torch.export``,
    ``torch.compile``): there the matrices are fake tensors, which cached would be handed
    to later eager forwards (a later ONNX export failed on them, a prediction used them)."""
    def wrap(build):
        cached = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def matrices(*args, **kwargs):
            return build(*args, **kwargs) if is_exporting() else cached(*args, **kwargs)

        matrices.cache_clear = cached.cache_clear
        matrices.cache_info = cached.cache_info
        return matrices
    return wrap


@_cached_outside_tracing(maxsize=256)
def shifted_resize_matrix(size_in: int, size_out: int, dtype: torch.dtype = torch.float64,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """``[S_0 | S_1 | S_2]`` (size_out, 3 * size_in): ``S_a`` is the bicubic
    :func:`resize_matrix` (size_out, size_in) with its rows moved by ``a - 1``, ``S_a[i] =
    R[i + a - 1]``, and zero where that row lies outside (a 3x3 convolution's zero
    padding). Built in float64, then cast; cached, outside inference mode, as
    :func:`resize_matrix`."""
    with torch.inference_mode(False):
        padded = torch.zeros(size_out + 2, size_in, dtype=torch.float64)
        padded[1:-1] = resize_matrix(size_in, size_out)  # padded[k] = R[k - 1]
        shifted = torch.cat([padded[a:a + size_out] for a in range(3)], dim=1)
        return shifted.to(device=device, dtype=dtype).contiguous()


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` as two matrix products.

    (n, c, H, W) -> (n, c, *size). Bicubic resizing is linear and separable: along each
    axis it is a fixed (out, in) matrix, which :func:`resize_matrix` takes from
    ``F.interpolate`` itself. For the experts' small maps the products are the faster
    form on CPUs (a 14 x 14 map up by 8 and back, forward and backward: 0.22 ms against
    0.73 ms in float32, ``benchmarks/bench_ops.py``), and equal to ``F.interpolate`` within
    float rounding.
    """
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if (height, width) == tuple(size):
        return x
    rows = resize_matrix(height, size[0], x.dtype, x.device)  # (sH, H)
    cols = resize_matrix(width, size[1], x.dtype, x.device)  # (sW, W)
    return rows @ x @ cols.T


@_cached_outside_tracing(maxsize=256)
def resize_matrix(size_in: int, size_out: int, dtype: torch.dtype = torch.float64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The (size_out, size_in) matrix of bicubic resizing along one axis
    (``align_corners=False``): ``F.interpolate`` applied to the identity in float64, then
    cast. Cached: the experts ask for the same few sizes in every forward. Built as a
    normal tensor even under ``torch.inference_mode`` (a prediction or a validation pass),
    so that a later training step can save it for its backward pass."""
    with torch.inference_mode(False):
        eye = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, 1, size_in)
        columns = F.interpolate(eye, size=(1, size_out), mode="bicubic", align_corners=False)
        return columns.view(size_in, size_out).T.to(device=device, dtype=dtype).contiguous()


def expert_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The (height, width) an expert of ``scale`` resizes a ``size`` map to."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@_cached_outside_tracing(maxsize=64)
def padded_resize_matrices(height: int, width: int, scales: tuple[float, ...],
                           dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Each expert's resize matrices for an (height, width) map, padded to the largest.

    Returns ``up_h`` (M, S_h, H), ``up_w`` (M, S_w, W), ``down_h`` (M, H, S_h) and
    ``down_w`` (M, W, S_w): expert i's :func:`resize_matrix` in the top-left corner, zeros
    elsewhere (S: the largest expert size); the identity for a scale that keeps the size.
    Cached: the blocks ask for the same few map sizes in every forward; built outside
    inference mode, as :func:`resize_matrix`.
    """
    with torch.inference_mode(False):
        sizes = [expert_size((height, width), s) for s in scales]
        s_h, s_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        count, f64 = len(scales), torch.float64  # built in float64, cast once (as resize_matrix)
        up_h, up_w = torch.zeros(count, s_h, height, dtype=f64), torch.zeros(count, s_w, width,
                                                                            dtype=f64)
        down_h, down_w = torch.zeros(count, height, s_h, dtype=f64), torch.zeros(count, width, s_w,
                                                                                dtype=f64)
        for i, (h, w) in enumerate(sizes):
            up_h[i, :h] = resize_matrix(height, h)
            up_w[i, :w] = resize_matrix(width, w)
            down_h[i, :, :h] = resize_matrix(h, height)
            down_w[i, :, :w] = resize_matrix(w, width)
        return tuple(m.to(device=device, dtype=dtype) for m in (up_h, up_w, down_h, down_w))


@functools.cache
def compiled_routed_mixture(backend: str = "inductor"):
    """:func:`routed_mixture` under ``torch.compile`` (static shapes), made once.

    Compiled on the first call with each set of shapes (in a fit: a windowed and a global
    block, a full and a last smaller batch; 13-22 s for the first step of a vit_b fit on
    an H200): the gate's and the dispatch's small operations become a few fused kernels
    forward and backward, which on a GPU saves the host most of its kernel launches. The
    function traces as one graph (tested); ``fullgraph`` stays off so that shapes beyond
    dynamo's recompile limit (many candidates in one process) run uncompiled instead of
    failing.
    """
    return torch.compile(routed_mixture, backend=backend, dynamic=False)


@functools.cache
def compile_supported() -> bool:
    """Whether ``torch.compile`` can build GPU kernels here: Triton importable for the
    CUDA device and a C compiler on the ``PATH`` (Triton builds its launcher with one)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # a torch without Triton support
        return False
    compilers = (os.environ.get("CC"), "cc", "gcc", "clang")
    return bool(has_triton()) and any(shutil.which(c) for c in compilers if c)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed ``torch.compile`` raises (compiler and backend failures)."""
    from torch._dynamo import exc

    found = [getattr(exc, name, None) for name in ("BackendCompilerFailed", "TorchRuntimeError",
                                                   "InternalTorchDynamoError")]
    try:
        from torch._inductor.exc import InductorError
        found.append(InductorError)
    except ImportError:  # older torch
        pass
    return tuple(e for e in found if isinstance(e, type))


def apply(model: nn.Module, options: ConvLoRAOptions) -> None:
    """Wrap every image-encoder Linear matching ``options.targets`` in :class:`ConvLoRALinear`."""
    def make(layer: nn.Module) -> ConvLoRALinear:
        check_rank(options.rank, layer)
        return ConvLoRALinear(
            layer,
            rank=options.rank,
            alpha=options.alpha,
            num_experts=options.num_experts,
            top_k=options.top_k,
            scales=options.scale_list,
            aux_loss_weight=options.aux_loss_weight,
        )

    wrap_targets(model, options.target_list, make)


METHOD = PeftMethod("conv_lora", "Conv-LoRA", ConvLoRAOptions, apply, unused_parameters=True,
                    source="Zhong et al. 2024 (ICLR), 'Convolution Meets LoRA': r=3, M=8 "
                           "experts at scales 1..8, top-1 noisy gating")
