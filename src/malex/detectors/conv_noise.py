"""What fuzzing a convolution's weights adds to its output, sampled per input without running the convolution.

A mutant fuzzes the weights W' = W + N, the entries of N independent N(mu, sigma^2). A convolution is linear in its
weights, so at input x the mutant's output is the model's own plus

    dy[o, p] = mu * s[p] + sigma * <P[p], z_o>,   z_o ~ N(0, I_K) independent per output channel o,

where P (npos x K) holds x's patches (K = input channels per group x kernel size), s their sums. For one input, each
channel's noise dy[o] is therefore Gaussian with mean mu * s and covariance sigma^2 * P P^T, an npos x npos matrix;
with its Cholesky factor L, dy[o] = mu * s + sigma * L u_o, u_o ~ N(0, I_npos), draws from exactly that law at
npos instead of K multiply-adds per output value (the last convolution of a 32x32 ResNet: 64 against 1,152).

So the label-change rate of an input, its distribution over the mutants and the sequential test on it are those of
fuzzing the weights. What differs is only the joint law across inputs (two inputs under one weight mutant have
correlated noise; here u is drawn per mutant and shared, through each input's own L), which the test, input by
input, never uses. A mutant is the same in every call: u comes from a generator seeded by the mutant's number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: relative jitter added to the diagonal of P P^T before its Cholesky factorisation (patches that are all zero,
#: e.g. after a ReLU, make it singular); an input whose matrix still fails is factorised by eigendecomposition
JITTER = 1e-6


class ConvOutputNoise:
    """Per-input factors and samples of the output noise of Gaussian-fuzzed weights of `conv` (see the module)."""

    def __init__(self, conv: nn.Conv2d, seed: int) -> None:
        if not self.supports(conv):
            raise ValueError(f"{conv} is not a zero-padded nn.Conv2d with numeric padding")
        self.conv = conv
        self.seed = seed

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """A 2-D convolution with zero padding given as numbers (not 'same'/'valid')."""
        return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        conv = self.conv
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return ho, wo

    def worthwhile(self, x: torch.Tensor) -> bool:
        """Fewer multiply-adds than the convolution itself: more values per patch than output positions."""
        ho, wo = self.output_size(x)
        kh, kw = self.conv.kernel_size
        return self.conv.in_channels // self.conv.groups * kh * kw > ho * wo

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For inputs `x` (N, C, H, W) of the convolution: the transposed Cholesky factors L^T of P P^T,
        (N, groups, npos, npos), and the patch sums s, (N, groups, npos)."""
        conv = self.conv
        groups, n = conv.groups, x.shape[0]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        ho, wo = self.output_size(x)
        padded = F.pad(x, (pw, pw, ph, ph))
        npos = ho * wo
        gram = x.new_zeros(n * groups, npos, npos)
        for i in range(kh):
            for j in range(kw):
                patch = padded[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                patch = patch.reshape(n * groups, -1, npos)  # (N * groups, channels per group, npos)
                gram.baddbmm_(patch.transpose(1, 2), patch)
        per_group = x.reshape(n * groups, -1, *x.shape[2:]).sum(1, keepdim=True)  # the patch sums: a box filter
        sums = F.conv2d(per_group, x.new_ones(1, 1, kh, kw), None, conv.stride, conv.padding, conv.dilation)
        sums = sums.reshape(n * groups, npos)
        scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(x.dtype).tiny)
        eye = torch.eye(npos, dtype=x.dtype, device=x.device)
        chol, info = torch.linalg.cholesky_ex(gram + (JITTER * scale)[:, None, None] * eye)
        failed = info != 0
        if failed.any():
            values, vectors = torch.linalg.eigh(gram[failed])
            chol[failed] = vectors * values.clamp_min(0).sqrt()[:, None, :]
        return chol.transpose(1, 2).reshape(n, groups, npos, npos), sums.reshape(n, groups, npos)

    def mean_shift(self, sums: torch.Tensor, mean: float) -> torch.Tensor:
        """mu * s for every output channel: (N, out_channels, npos) from the patch sums of `factors`."""
        n, groups, npos = sums.shape
        per_group = self.conv.out_channels // groups
        return (mean * sums)[:, :, None, :].expand(n, groups, per_group, npos).reshape(n, -1, npos)

    def draw(self, ids: range, rank: int) -> torch.Tensor:
        """(len(ids), groups, out channels per group, rank): the standard normal draws u of mutants `ids`, each from
        a generator seeded by its number (`rank`: the factors' last but one size, from `factors`)."""
        groups = self.conv.groups
        return torch.stack([torch.randn((groups, self.conv.out_channels // groups, rank),
                                        generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i)) for i in ids])

    def sample(self, lt: torch.Tensor, u: torch.Tensor, std: float) -> torch.Tensor:
        """(M, N, out_channels, npos): the zero-mean output noise sigma * L u of the mutants whose draws `u` are
        (from `draw`) on the inputs whose factors `lt` are (from `factors`); a strided view of one matrix product per
        group."""
        n, groups, rank, npos = lt.shape
        m, per_group = u.shape[0], u.shape[2]
        u = (std * u.to(lt.device, lt.dtype)).transpose(0, 1).reshape(groups, m * per_group, rank)
        noise = torch.bmm(u, lt.permute(1, 2, 0, 3).reshape(groups, rank, n * npos))  # (groups, M * per group, N * npos)
        return noise.view(groups, m, per_group, n, npos).permute(1, 3, 0, 2, 4).reshape(m, n, -1, npos) \
            if groups > 1 else noise.view(m, per_group, n, npos).transpose(1, 2)
