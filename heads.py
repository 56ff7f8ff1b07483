"""Every dataset's pre-training heads and their losses in one call per step.

A step trains one side-by-side head per dataset (``Linear(hid, k1 + k2 + k3)``, three K-means
granularities) on that dataset's share of the step, and its loss is, per cell and granularity,
the cross-entropy of the granularity's logits, or with ``sigmoid`` (scPretrain's default) of
their sigmoids: ``log(sum_{j in g} exp(s_j)) - s_target`` with ``s = sigmoid(o)``; summed over
cells and granularities, divided by the dataset's batch (its *denominator*) and summed over the
datasets. The heads' products grow with cells squared (a dataset's k grows with its size, and so
does its share of a step); at the whole collection's scale they are ~60 GFLOP a step over ~50 M
logits, and done per dataset by autograd the losses' sigmoid, exp, segment sums and their
gradients passed over those logits many times, each pass a stored tensor.

``HeadBank`` holds the heads as ``nn.ModuleList`` held them (``heads.{d}.weight``,
``heads.{d}.bias``: state dicts, checkpoints and optimiser states are unchanged) and computes a
step's loss over all its datasets in one call, by one of two paths:

- ``fused`` (the CPU; float32): one autograd function over the whole step. The forward writes
  each dataset's logits ``z_d W_d^T`` (one BLAS product per dataset, ``_products``) into one
  flat buffer; one parallel numba pass (``_fused_loss``) then takes each cell's row of logits
  through all its granularities while it is in the core's cache: adds the bias, computes the loss (the sigmoid
  variant needs no max shift: ``s`` lies in (0, 1); the plain one shifts by each granularity's
  maximum) and overwrites the logits with ``d loss / d logits`` (already divided by the
  denominator), while summing the bias gradient per chunk of rows. Nothing else of the size of
  the logits is stored. The backward is the two products per dataset, ``D_d^T z_d`` and
  ``D_d W_d``. The products run side by side, each on one thread of numpy's BLAS, where the
  step has enough of them for the threads (a product of more than a thread's share runs alone
  on torch's threads). ``exp`` is a polynomial the compiler vectorises (this numba has no vector
  math library): Cephes' ``expf`` for the logits, and for ``exp(sigmoid)``, whose argument lies
  in [0, 1], a Taylor polynomial with no range reduction; both within ~1 ulp.
- ``torch`` (GPUs, and any device or dtype): plain torch with few kernels: one ``F.linear`` per
  dataset, the logits concatenated, and one loss over the flat buffer with ``segment_reduce``
  over each cell's granularities, its gradient computed in the forward (``_FlatLoss``), so the
  backward is one multiply before the products' own backward.

Both give ``sum_d PretrainModel.summed_loss(z_d, d, t_d) / denominator_d`` to float rounding
(tests/test_heads.py). In the fused pass every row is computed by one thread and every sum is
in a fixed order (the bias gradient's chunks depend on the shapes only), so from given logits
the loss, their gradient and the bias gradient do not depend on the number of threads. The
products are a BLAS's, and which one runs a product on how many threads depends on the number of
threads: results are equal to rounding across thread counts and bit for bit for the same count.
Importing compiles nothing and starts no thread.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import threadpoolctl
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import nn
from torch.nn import functional as F

import csr_kernels

PATHS = ("auto", "fused", "torch")
CHUNK_LOGITS = 1 << 16  # logits per chunk of rows of the fused kernel: its unit of work and of bias sums

# --------------------------------------------------------------------------- the CPU's fused kernel

_F = np.float32
_ONE, _ZERO = _F(1.0), _F(0.0)
_EXP_HI, _EXP_LO = _F(88.0), _F(-87.33654)  # exp(88) < FLT_MAX; below -87.34 the result is under FLT_MIN: 0
_LOG2E, _LN2_HI, _LN2_LO, _HALF = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4), _F(0.5)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)


@intrinsic
def _float_from_bits(typingctx, bits):  # pragma: no cover - compiled
    """The float32 whose IEEE bits are the low 32 bits of the integer ``bits`` (a bitcast:
    vectorises)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@njit(fastmath={"contract"}, error_model="numpy", cache=True, inline="always")
def _exp(x):  # pragma: no cover - compiled
    """``exp`` of a float32 (Cephes' expf: 2^n e^r, |r| <= ln2 / 2, a degree-7 polynomial; within
    ~1 ulp of libm); NaN stays NaN, large arguments give exp(88), very small ones 0."""
    under = x < _EXP_LO
    if x > _EXP_HI:
        x = _EXP_HI
    if x < _EXP_LO:
        x = _EXP_LO
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    y = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
    y = y * _float_from_bits((np.int64(n) + 127) << 23)
    return _ZERO if under else y


_SQRT_E = 1.6487212707001282  # e^0.5: exp(s) = e^0.5 exp(s - 0.5)
_Q = tuple(_F(_SQRT_E / math.factorial(n)) for n in range(9))


@njit(fastmath={"contract"}, error_model="numpy", cache=True, inline="always")
def _exp_unit(s):  # pragma: no cover - compiled
    """``exp(s)`` for ``s`` in [0, 1] (a sigmoid's output): e^0.5 times the degree-8 Taylor
    polynomial of exp(s - 0.5), whose remainder is under 6e-9 relative (a tenth of float32's
    epsilon); no range reduction."""
    u = s - _HALF
    q0, q1, q2, q3, q4, q5, q6, q7, q8 = _Q
    return (((((((q8 * u + q7) * u + q6) * u + q5) * u + q4) * u + q3) * u + q2) * u + q1) * u + q0


@njit(fastmath={"contract", "reassoc"}, cache=True)
def _sum(a):  # pragma: no cover - compiled
    """``a.sum()`` in float32, reassociated so that it vectorises (a fixed order per build)."""
    s = _ZERO
    for j in range(a.size):
        s += a[j]
    return s


@njit(fastmath={"contract", "reassoc", "nsz"}, cache=True)
def _max(a):  # pragma: no cover - compiled
    m = a[0]
    for j in range(a.size):
        v = a[j]
        m = v if v > m else m
    return m


# Loops below run over slices from index 0 (``range(n)``): numba then knows the indices are not
# negative, skips its wrap-around of negative indices, and the loops vectorise.
@njit(parallel=True, fastmath={"contract"}, error_model="numpy", cache=True)
def _fused_loss(flat, bias, targets, meta, bounds, chunks, scale, sigmoid, n_partial):  # pragma: no cover
    """Per dataset ``i`` of the step (``meta[i]``: first logit in ``flat``, first row, width ``K``,
    first bias; ``bounds[i]``: the granularities' first columns and ``K``), each row's loss, with
    its logits overwritten by ``scale[i] * d loss / d logits``; per chunk of rows (``chunks``:
    dataset, first and last row, first partial) the sum of those gradients over its rows (the
    bias gradient, in parts). Returns (loss per row, partial sums)."""
    n_rows = targets.shape[0]
    n_gran = targets.shape[1]
    row_loss = np.zeros(n_rows, dtype=np.float64)
    partial = np.zeros(n_partial, dtype=np.float32)
    for c in prange(chunks.shape[0]):
        i, lo, hi, p0 = chunks[c, 0], chunks[c, 1], chunks[c, 2], chunks[c, 3]
        f0, r0, k, b0 = meta[i, 0], meta[i, 1], meta[i, 2], meta[i, 3]
        sc = scale[i]
        part = partial[p0:p0 + k]
        b = bias[b0:b0 + k]
        s_row = np.empty(k, dtype=np.float32)  # the row's sigmoids
        norm = np.empty(n_gran, dtype=np.float32)
        for r in range(lo, hi):
            row = flat[f0 + (r - r0) * k:f0 + (r - r0 + 1) * k]
            loss = 0.0
            if sigmoid:
                for j in range(k):
                    s = _ONE / (_ONE + _exp(-(row[j] + b[j])))
                    s_row[j] = s
                    row[j] = _exp_unit(s)
                for g in range(n_gran):
                    norm[g] = _sum(row[bounds[i, g]:bounds[i, g + 1]])
                    loss += np.log(np.float64(norm[g])) - s_row[targets[r, g]]
                for g in range(n_gran):
                    w = sc / norm[g]
                    seg = row[bounds[i, g]:bounds[i, g + 1]]
                    s_seg = s_row[bounds[i, g]:bounds[i, g + 1]]
                    p_seg = part[bounds[i, g]:bounds[i, g + 1]]
                    for j in range(seg.size):
                        s = s_seg[j]
                        d = seg[j] * w * (s - s * s)
                        seg[j] = d
                        p_seg[j] += d
                for g in range(n_gran):
                    t = targets[r, g]
                    s = s_row[t]
                    d = sc * (s - s * s)
                    row[t] -= d
                    part[t] -= d
            else:
                for j in range(k):
                    row[j] += b[j]
                for g in range(n_gran):
                    t = targets[r, g]
                    seg = row[bounds[i, g]:bounds[i, g + 1]]
                    p_seg = part[bounds[i, g]:bounds[i, g + 1]]
                    m = _max(seg)
                    loss += np.float64(m) - row[t]
                    for j in range(seg.size):
                        seg[j] = _exp(seg[j] - m)
                    norm[g] = _sum(seg)
                    loss += np.log(np.float64(norm[g]))
                    w = sc / norm[g]
                    for j in range(seg.size):
                        d = seg[j] * w
                        seg[j] = d
                        p_seg[j] += d
                    row[t] -= sc
                    part[t] -= sc
            row_loss[r] = loss
    return row_loss, partial


@njit(parallel=True, cache=True)
def _bias_grads(partial, first_chunk, meta, chunks, n_bias):  # pragma: no cover - compiled
    """Each dataset's bias gradient: its chunks' partial sums, added in chunk order."""
    out = np.zeros(n_bias, dtype=np.float32)
    for i in prange(meta.shape[0]):
        k, b0 = meta[i, 2], meta[i, 3]
        for c in range(first_chunk[i], first_chunk[i + 1]):
            p0 = chunks[c, 3]
            for j in range(k):
                out[b0 + j] += partial[p0 + j]
    return out


class _StepLayout:
    """Where each dataset of a step lies: its rows of ``z``, its logits in the flat buffer, its
    biases, its granularities' columns, and the chunks of rows of the fused kernel (numpy, no
    loop over the datasets)."""

    def __init__(self, counts: Sequence[Sequence[int]], rows: Sequence[int], chunk_logits: int = CHUNK_LOGITS):
        n_gran = {len(c) for c in counts}
        if len(n_gran) != 1:
            raise ValueError(f"the datasets of a step have different numbers of granularities: {sorted(n_gran)}")
        counts = np.asarray(counts, dtype=np.int64)
        widths = counts.sum(1)
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        self.rows, self.widths = rows, widths
        self.row_start = np.concatenate([[0], np.cumsum(rows)])
        self.flat_start = np.concatenate([[0], np.cumsum(rows * widths)])
        self.bias_start = np.concatenate([[0], np.cumsum(widths)])
        self.bounds = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(counts, 1)], 1)
        self.meta = np.stack([self.flat_start[:-1], self.row_start[:-1], widths, self.bias_start[:-1]], 1)
        per = np.maximum(1, chunk_logits // widths)  # rows per chunk: chunks of about equal work, so
        n_chunks = -(-rows // per)  # that the kernel's static schedule balances its threads
        self.first_chunk = np.concatenate([[0], np.cumsum(n_chunks)])
        of = np.repeat(np.arange(n), n_chunks)
        lo = (np.arange(len(of)) - self.first_chunk[of]) * per[of] + self.row_start[of]
        hi = np.minimum(lo + per[of], self.row_start[of + 1])
        self.chunks = np.stack([of, lo, hi, np.concatenate([[0], np.cumsum(widths[of])[:-1]])], 1).astype(np.int64)
        self.n_partial = int(widths[of].sum())
        # Python ints for the per-dataset products
        self.spans = list(zip(self.row_start[:-1].tolist(), self.row_start[1:].tolist(),
                              self.flat_start[:-1].tolist(), widths.tolist(),
                              self.bias_start[:-1].tolist(), self.bias_start[1:].tolist()))


# --------------------------------------------------------------------------- the fused path's products

_WORKERS = {"pid": None, "pool": None, "size": 0}  # the threads the products are spread over
_BLAS = {"controller": None}


def _flops(job) -> int:
    a, b, _ = job
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _product(job) -> None:
    a, b, out = job
    np.dot(a.numpy(), b.numpy(), out=out.numpy())


def _workers(size: int) -> ThreadPoolExecutor:
    if _WORKERS["pid"] != os.getpid() or _WORKERS["size"] != size:  # a forked child has none of its parent's threads
        if _WORKERS["pid"] == os.getpid():
            _WORKERS["pool"].shutdown(wait=False)
        _WORKERS.update(pid=os.getpid(), pool=ThreadPoolExecutor(size, thread_name_prefix="heads"), size=size)
    return _WORKERS["pool"]


def _single_threaded_blas():
    if _BLAS["controller"] is None:
        _BLAS["controller"] = threadpoolctl.ThreadpoolController()
    return _BLAS["controller"].limit(limits=1, user_api="blas")


def _products(jobs) -> None:
    """``out = a @ b`` for every ``(a, b, out)`` (float32 CPU tensors, ``out`` C-contiguous).

    A product of more than one thread's share of the flops runs alone on all of torch's threads
    (torch's product); the others each by numpy's BLAS on one thread, side by side over torch's
    number of threads, the largest first. The heads' products are thin (an inner dimension of
    ``hid`` = 200 in the forward), and on an AVX2 EPYC MKL (torch's) ran them at 57 GFLOPS on two
    threads where OpenBLAS (numpy's) reached 105; one-threaded products side by side also keep a
    BLAS's own threads from spinning on the cores the next kernel needs (the heads of a step of the
    whole collection's 60 datasets, forward and backward: 1,056-1,070 -> 796-801 ms; bench/README.md).
    Which product runs where depends on the shapes and the number of threads only; a value is one
    BLAS dot product either way."""
    threads = torch.get_num_threads()
    jobs = sorted(jobs, key=_flops, reverse=True)
    share = sum(map(_flops, jobs)) / threads
    alone = sum(1 for job in jobs if threads > 1 and _flops(job) > share)  # the first ones: sorted
    if threads > 1 and len(jobs) - alone == 1:  # the last one would have nothing beside it
        alone += 1
    for a, b, out in jobs[:alone]:
        torch.mm(a, b, out=out)
    rest = jobs[alone:]
    if not rest:
        return
    with _single_threaded_blas():
        if threads == 1:
            for job in rest:
                _product(job)
        else:
            for _ in _workers(threads).map(_product, rest):
                pass


class _FusedHeads(torch.autograd.Function):
    """The step's summed loss over every dataset's heads (float32, CPU); see the module."""

    @staticmethod
    def forward(ctx, z, layout: _StepLayout, targets: np.ndarray, scale: np.ndarray, weights_over: np.ndarray,
                sigmoid: bool, *params):
        weights, biases = params[0::2], params[1::2]
        flat = torch.empty(int(layout.flat_start[-1]), dtype=torch.float32)
        _products([(z[r0:r1].detach(), w.detach().t(), flat[f0:f0 + (r1 - r0) * k].view(r1 - r0, k))
                   for w, (r0, r1, f0, k, _, _) in zip(weights, layout.spans) if r1 > r0])
        bias = torch.cat([b.detach() for b in biases]).numpy()
        csr_kernels._use_torch_threads()
        row_loss, partial = _fused_loss(flat.numpy(), bias, targets, layout.meta, layout.bounds, layout.chunks,
                                        scale, bool(sigmoid), layout.n_partial)
        bias_grad = _bias_grads(partial, layout.first_chunk, layout.meta, layout.chunks, bias.size)
        # each dataset's summed loss (float64, in row order) over its denominator, summed
        per_dataset = np.bincount(np.repeat(np.arange(len(layout.rows)), layout.rows), weights=row_loss,
                                  minlength=len(layout.rows))
        ctx.layout, ctx.flat, ctx.bias_grad = layout, flat, torch.from_numpy(bias_grad)
        ctx.save_for_backward(z, *weights)
        return torch.tensor(float((per_dataset * weights_over).sum()), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        z, *weights = ctx.saved_tensors
        layout, flat = ctx.layout, ctx.flat
        if flat is None:
            raise RuntimeError("the fused heads' backward runs once per forward (their gradient buffer is "
                               "released): retain_graph is not supported")
        g = float(grad)
        need_z = ctx.needs_input_grad[0]
        grad_z = torch.empty_like(z) if need_z else None
        grad_ws, jobs = [], []
        for i, (w, (r0, r1, f0, k, _, _)) in enumerate(zip(weights, layout.spans)):
            d = flat[f0:f0 + (r1 - r0) * k].view(r1 - r0, k)
            grad_w = None
            if ctx.needs_input_grad[6 + 2 * i]:
                # a dataset with no cells in the step: a zero gradient, as autograd's product gave
                grad_w = torch.empty(w.shape) if r1 > r0 else torch.zeros(w.shape)
            grad_ws.append(grad_w)
            if grad_w is not None and r1 > r0:
                jobs.append((d.t(), z[r0:r1].detach(), grad_w))
            if need_z and r1 > r0:
                jobs.append((d, w.detach(), grad_z[r0:r1]))
        _products(jobs)
        grads = []
        for i, (grad_w, (_, _, _, _, b0, b1)) in enumerate(zip(grad_ws, layout.spans)):
            grad_b = ctx.bias_grad[b0:b1]
            if g != 1.0:
                grad_w = None if grad_w is None else grad_w.mul_(g)
                grad_b = grad_b * g
            grads += [grad_w, grad_b if ctx.needs_input_grad[7 + 2 * i] else None]
        if need_z and g != 1.0:
            grad_z.mul_(g)
        ctx.flat = ctx.bias_grad = None
        return (grad_z, None, None, None, None, None, *grads)


# --------------------------------------------------------------------------- the torch path (GPUs)


class _FlatLoss(torch.autograd.Function):
    """The summed losses of every row and granularity of the flat logits (segments of ``lengths``
    logits; the targets at flat positions ``target_index``, one per segment; segment weights
    ``weight``); the gradient is computed here, the backward is one multiply."""

    @staticmethod
    def forward(ctx, logits, lengths, target_index, weight, sigmoid: bool):
        n = logits.numel()
        if sigmoid:
            s = torch.sigmoid(logits)
            e = torch.exp(s)
            norm = torch.segment_reduce(e, "sum", lengths=lengths)
            loss = (norm.log() * weight).sum() - (s[target_index] * weight).sum()
            d = e.mul_((weight / norm).repeat_interleave(lengths, output_size=n))
            d.index_add_(0, target_index, weight, alpha=-1)
            d.mul_(s.sub_(s * s))
        else:
            top = torch.segment_reduce(logits, "max", lengths=lengths)
            d = torch.exp(logits - top.repeat_interleave(lengths, output_size=n))
            norm = torch.segment_reduce(d, "sum", lengths=lengths)
            loss = ((norm.log() + top) * weight).sum() - (logits[target_index] * weight).sum()
            d.mul_((weight / norm).repeat_interleave(lengths, output_size=n))
            d.index_add_(0, target_index, weight, alpha=-1)
        ctx.save_for_backward(d)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return d * grad, None, None, None, None


def _on(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --------------------------------------------------------------------------- the heads


class HeadBank(nn.ModuleList):
    """Per dataset one side-by-side head ``Linear(hid, sum(counts))`` (the same modules, names and
    draws as a ``ModuleList`` of them), and the step's loss over all of them in one call."""

    def __init__(self, hid: int, cluster_counts: Sequence[Sequence[int]], modules: Sequence[nn.Linear] | None = None):
        """``modules``: the heads, already drawn (a rank's share of a collection's); else drawn here."""
        if modules is None:
            modules = [nn.Linear(hid, int(sum(counts))) for counts in cluster_counts]
        if [m.out_features for m in modules] != [int(sum(c)) for c in cluster_counts]:
            raise ValueError("the heads' widths do not match their granularities")
        super().__init__(modules)
        self.cluster_counts = [[int(k) for k in counts] for counts in cluster_counts]

    def loss(self, z: torch.Tensor, targets: Sequence[torch.Tensor], dataset_ids: Sequence[int],
             denominators: torch.Tensor, sigmoid: bool, path: str = "auto") -> torch.Tensor:
        """``sum_i summed_loss(z_i, dataset_ids[i], targets[i]) / denominators[i]``: ``z`` holds the
        datasets' cells one after the other (``targets[i]``: dataset ``i``'s ``cells x
        granularities`` head columns, ``model.offset_targets``). ``path``: ``fused`` (CPU,
        float32), ``torch`` (any device), ``auto``: fused where it can run, else torch."""
        if path not in PATHS:
            raise ValueError(f"heads path {path!r} is not one of {PATHS}")
        ids = [int(d) for d in dataset_ids]
        if path == "auto":
            path = "fused" if self._fused_runs(z, ids) else "torch"
        elif path == "fused" and not self._fused_runs(z, ids):
            raise TypeError("the fused heads need float32 heads and z on the CPU")
        rows = [int(t.shape[0]) for t in targets]
        if sum(rows) != z.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows, the targets {sum(rows)}")
        if path == "fused":
            return self._fused(z, targets, ids, denominators, sigmoid, rows)
        return self._torch(z, targets, ids, denominators, sigmoid, rows)

    def _fused_runs(self, z: torch.Tensor, ids) -> bool:
        return z.device.type == "cpu" and z.dtype == torch.float32 and all(
            self[d].weight.device.type == "cpu" and self[d].weight.dtype == torch.float32 for d in ids)

    def _fused(self, z, targets, ids, denominators, sigmoid, rows):
        layout = _StepLayout([self.cluster_counts[d] for d in ids], rows)
        t = torch.cat(list(targets)).to(torch.int64).numpy() if targets else np.zeros((0, 1), np.int64)
        if t.size and (t.min() < 0 or np.any(t >= layout.widths.repeat(layout.rows)[:, None])):
            raise IndexError("a target column lies outside its dataset's heads")
        over = 1.0 / denominators.detach().to(torch.float64).cpu().numpy()
        params = [p for d in ids for p in (self[d].weight, self[d].bias)]
        return _FusedHeads.apply(z.contiguous(), layout, np.ascontiguousarray(t), over.astype(np.float32), over,
                                 bool(sigmoid), *params)

    def _torch(self, z, targets, ids, denominators, sigmoid, rows):
        device = z.device
        counts = [self.cluster_counts[d] for d in ids]
        n_gran = len(counts[0]) if counts else 0
        logits = torch.cat([F.linear(z_i, self[d].weight, self[d].bias).reshape(-1)
                            for z_i, d in zip(torch.split(z, rows), ids)])
        widths = np.array([sum(c) for c in counts], dtype=np.int64)
        flat_start = np.concatenate([[0], np.cumsum(np.asarray(rows) * widths)[:-1]])
        row_start = np.concatenate([f + np.arange(b, dtype=np.int64) * k for f, b, k in zip(flat_start, rows, widths)])
        lengths = np.concatenate([np.tile(np.asarray(c, dtype=np.int64), b) for c, b in zip(counts, rows)])
        target_index = (torch.cat(list(targets)).to(torch.int64) + _on(row_start, device)[:, None]).reshape(-1)
        weight = (1.0 / denominators.to(logits.dtype)).repeat_interleave(
            _on(np.asarray(rows, dtype=np.int64) * n_gran, device), output_size=len(lengths))
        return _FlatLoss.apply(logits, _on(lengths, device), target_index, weight, bool(sigmoid))
