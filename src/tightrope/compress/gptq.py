"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv 2210.17323), Algorithm 1, in the paper's notation.

Why by hand: no maintained GPTQ library runs here. ``gptqmodel`` 7.7 requires torch 2.14 with the
CUDA stack (it would replace the pinned torch 2.13 CPU build) and ``llmcompressor`` 0.14 pins
transformers <= 5.17 (the project uses 5.23); ``auto-gptq`` is unmaintained. So this module is the
algorithm itself, ~100 lines, following IST-DASLab/gptq's ``fasterquant``.

For one linear layer ``W`` (d_row x d_col) and calibration inputs ``X`` (d_col x N):

1. ``H = 2 X X^T`` (the Hessian of ``||W X - Q X||_2^2``), accumulated with hooks as a running mean;
2. dampening ``lambda = 0.01 * mean(diag H)`` added to the diagonal (Sec. 4 "Step 3"), dead inputs
   (``H_jj = 0``) get ``H_jj = 1`` and ``W_:,j = 0``;
3. ``H^{-1}`` through a Cholesky factorisation, and its upper Cholesky factor ``U`` (Sec. 4 "Step 3:
   Cholesky Reformulation"), so row ``q`` of ``U`` holds ``[H_F^{-1}]_{q,q:} / sqrt([H_F^{-1}]_{qq})``;
4. columns are quantized in order; the error ``E = (w_q - quant(w_q)) / U_qq`` is spread over the
   not-yet-quantized columns of the block, ``W_{:,q:} -= E U_{q,q:}``, and "lazy batch" updates apply
   the block's accumulated error to all later columns once per block of ``B = 128`` columns.

The grid is the seed's affine min-max grid (:mod:`tightrope.compress.primitives`): per output row,
or per group of ``group_size`` inputs whose scale and minimum are fitted when the algorithm reaches
the group's first column (on the error-updated weights, as the reference does).
"""

from __future__ import annotations

import torch

from tightrope.compress.primitives import (
    AffineQuant,
    affine_params,
    affine_round,
    check_bits,
    quantize_affine,
)


class HessianAccumulator:
    """Running ``H = 2/N sum_n x_n x_n^T`` over the inputs of one linear layer (a forward hook)."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, d_col)
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        t = x.shape[0]
        if t == 0:
            return
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = 128,
                  blocksize: int = 128, percdamp: float = 0.01) -> AffineQuant:
    """Quantize ``W`` (rows x cols) column by column against Hessian ``H`` (cols x cols), Algorithm 1.

    Returns the codes on the affine grid (``w_hat = q * scale + minimum``), per group of
    ``group_size`` columns (``None``: one group per row).
    """
    check_bits(bits)
    W = W.detach().double().clone()
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    if cols % gs:
        raise ValueError(f"group size {gs} must divide {cols}")
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # U: upper factor of H^-1

    Q = torch.zeros(rows, cols, dtype=torch.uint8)
    scale = torch.zeros(rows, cols // gs, dtype=torch.float64)
    minimum = torch.zeros_like(scale)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # fit the group's grid on the current (error-updated) weights
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                s, m = affine_params(ahead, bits)
                scale[:, col // gs], minimum[:, col // gs] = s, m
            s, m = scale[:, col // gs], minimum[:, col // gs]
            w = W1[:, i]
            q = affine_round(w, s, m, bits)
            Q[:, col] = q.to(torch.uint8)
            err = (w - (q * s + m)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns
    return AffineQuant(q=Q, scale=scale.float(), minimum=minimum.float(), bits=bits, group=gs)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int | None = 128) -> AffineQuant:
    """Round-to-nearest on the same grid as :func:`gptq_quantize` (the paper's RTN baseline)."""

    if group_size is None:
        return quantize_affine(W, bits, "channel")
    return quantize_affine(W, bits, "group", group_size)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||W X - W_hat X||_F^2 / N = tr(D H D^T) / 2`` with ``D = W - W_hat`` and ``H = 2 X X^T / N``."""
    D = (W.double() - W_hat.double())
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D) / 2)
