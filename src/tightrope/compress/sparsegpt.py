"""SparseGPT (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML, arXiv 2301.00774), Algorithm 1, in the paper's notation.

Why by hand: for the same reason as :mod:`tightrope.compress.gptq` (whose Hessian and Cholesky steps this
shares): the maintained implementation, ``llmcompressor``'s ``SparseGPTModifier``, pins transformers <= 5.17
and the project runs 5.23; IST-DASLab/sparsegpt is a research script, not a package. This module is the
algorithm, following IST-DASLab/sparsegpt's ``fasterprune``.

For one linear layer ``W`` (d_row x d_col) and calibration inputs ``X``, with ``H = 2 X X^T`` (accumulated
as for GPTQ, padding tokens left out):

1. dampening ``lambda = percdamp * mean(diag H)`` on the diagonal; dead inputs (``H_jj = 0``) get
   ``H_jj = 1`` and ``W_:,j = 0``;
2. ``U``, the upper Cholesky factor of ``H^{-1}`` (so ``U_qq^2`` plays the part of ``[H_F^{-1}]_qq``, Sec. 3.3);
3. columns in blocks of ``B_s = blocksize``: the mask of a block is chosen once, when the algorithm reaches
   it, on the error-updated weights, by the OBS saliency ``w_ij^2 / U_jj^2`` (Eq. 3; "adaptive mask
   selection", Sec. 3.3): the ``sparsity`` share of the block's weights with the lowest saliency are removed,
   over the whole block, so rows may lose different shares;
4. column by column, a removed weight is set to zero and the error ``(w - 0) / U_qq`` is spread over the
   block's later columns, ``W_{:,q:} -= E U_{q,q:}`` (the OBS update, Eq. 2, in its row-parallel form);
   kept weights are *changed* by these updates; after the block, its error is applied to all later columns
   at once ("lazy batch" updates).

N:M (Sec. 3.4, "semi-structured"): in every run of ``m`` columns, each row removes its ``m - n`` weights of
lowest saliency, chosen when the run's first column is reached.

Unlike magnitude and Wanda pruning, SparseGPT changes the weights it keeps, so it has no per-weight box
for :mod:`tightrope.qattack.pruning`; tightrope offers it as a compression method.
"""

from __future__ import annotations

import torch


def upper_cholesky_inverse(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """``U`` with ``U^T U = (H + lambda I)^{-1}`` (upper triangular), ``lambda = percdamp * mean(diag H)``;
    ``H`` must already have its dead inputs set to 1 on the diagonal."""
    damp = percdamp * torch.mean(torch.diag(H))
    H = H + damp * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (rows x cols) against ``H`` (cols x cols), Algorithm 1 (module docstring).

    ``n``, ``m`` > 0: N:M sparsity, ``n`` of every ``m`` consecutive inputs kept per row (``sparsity`` ignored);
    else the unstructured ``sparsity`` share of each block of ``blocksize`` columns is removed.
    Returns ``(pruned W in W's dtype, loss per row)``, the loss being the OBS estimate
    ``sum_q (w_q - w_hat_q)^2 / (2 U_qq^2)`` of the increase in ``||W X - W_hat X||^2``.
    """
    if n or m:
        if not (0 < n < m) or W.shape[1] % m:
            raise ValueError(f"N:M needs 0 < n < m and m dividing {W.shape[1]}, got n={n}, m={m}")
        blocksize = max(m, blocksize - blocksize % m)  # a run of m never straddles two blocks
    elif not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    dtype = W.dtype
    W = W.detach().double().clone()
    rows, cols = W.shape
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = upper_cholesky_inverse(H, percdamp)
    losses = torch.zeros(rows, dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (count,)
        if m:
            removed = torch.zeros_like(W1, dtype=torch.bool)
        else:
            saliency = W1.pow(2) / d.pow(2).unsqueeze(0)  # Eq. 3 over the whole block
            k = int(saliency.numel() * sparsity)
            removed = torch.zeros(saliency.numel(), dtype=torch.bool)
            if k:
                removed[torch.topk(saliency.flatten(), k, largest=False).indices] = True
            removed = removed.reshape(saliency.shape)
        for i in range(i2 - i1):
            if m and i % m == 0:
                saliency = W1[:, i:i + m].pow(2) / d[i:i + m].pow(2).unsqueeze(0)
                removed.scatter_(1, i + torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(removed[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            losses += (w - q).pow(2) / Hinv1[i, i].pow(2) / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zeros where removed (the update above leaves rounding residue)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns
    return W.to(dtype), losses
