"""heads.py: a step's batched heads against independent float64 cross-entropies per granularity,
on the CPU's fused path and the torch (GPU) path; threads, checkpoints, and whole runs."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import heads
import main
import pretrain
from model import ModelConfig, PretrainModel, head_offsets, offset_targets

# k = 2, widths below and above a SIMD register (8 or 16 floats), and a chunk of rows below a row
COUNTS = [[2, 2, 2], [3, 17, 2], [40, 81, 21], [5, 9, 3]]
ROWS = [1, 7, 33, 2]
HID = 12
PATHS = ["fused", "torch"]


def make_step(counts, rows, seed=0, hid=HID, sigmoid=True, weight_scale=1.0):
    torch.manual_seed(seed)
    model = PretrainModel(ModelConfig(n_genes=5, hid=hid, sigmoid_logits=sigmoid), counts)
    if weight_scale != 1.0:
        with torch.no_grad():
            for h in model.heads:
                h.weight.mul_(weight_scale)
                h.bias.mul_(weight_scale)
    rng = np.random.default_rng(seed)
    labels = [[rng.integers(0, k, b) for k in c] for c, b in zip(counts, rows)]
    targets = [torch.from_numpy(offset_targets(lab, c)) for lab, c in zip(labels, counts)]
    z = torch.rand(sum(rows), hid, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    denominators = torch.tensor([b + 0.5 * i for i, b in enumerate(rows)], dtype=torch.float32)
    return model, labels, targets, z, denominators


def reference(model, labels, z, denominators, ids, sigmoid):
    """The loss and its gradients (head weights, biases, z) in float64, from separate heads and
    F.cross_entropy on sigmoid(logits) (or the logits) per granularity: nothing of heads.py."""
    z64 = z.detach().double().requires_grad_(True)
    ws = [model.heads[d].weight.detach().double().requires_grad_(True) for d in ids]
    bs = [model.heads[d].bias.detach().double().requires_grad_(True) for d in ids]
    total = 0.0
    for z_i, w, b, d, den in zip(torch.split(z64, [len(labels[d][0]) for d in ids]), ws, bs, ids, denominators):
        for lab, o, k in zip(labels[d], head_offsets(model.cluster_counts[d]), model.cluster_counts[d]):
            lg = z_i @ w[o:o + k].t() + b[o:o + k]
            total = total + F.cross_entropy(torch.sigmoid(lg) if sigmoid else lg, torch.from_numpy(lab),
                                            reduction="sum") / float(den)
    grads = torch.autograd.grad(total, [z64, *ws, *bs])
    return total, grads[0], grads[1:1 + len(ids)], grads[1 + len(ids):]


def batched(model, targets, z, denominators, ids, sigmoid, path, scale=1.0):
    loss = model.heads.loss(z, [targets[d] for d in ids], ids, denominators, sigmoid, path=path)
    params = [model.heads[d].weight for d in ids] + [model.heads[d].bias for d in ids]
    grads = torch.autograd.grad(loss * scale, [z, *params])
    return loss, grads[0], grads[1:1 + len(ids)], grads[1 + len(ids):]


def assert_matches(got, want, rtol=2e-5, atol=2e-6):
    loss, gz, gw, gb = got
    r_loss, r_gz, r_gw, r_gb = want
    assert loss.dtype == torch.float32 or loss.dtype == r_loss.dtype
    torch.testing.assert_close(loss.double(), r_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(gz.double(), r_gz, rtol=rtol, atol=atol)
    for a, b in zip(gw, r_gw):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)
    for a, b in zip(gb, r_gb):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sigmoid", [True, False])
def test_batched_heads_equal_separate_float64_cross_entropies(path, sigmoid):
    model, labels, targets, z, den = make_step(COUNTS, ROWS, sigmoid=sigmoid)
    ids = list(range(len(COUNTS)))
    assert_matches(batched(model, targets, z, den, ids, sigmoid, path), reference(model, labels, z, den, ids, sigmoid))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sigmoid", [True, False])
def test_a_subset_of_datasets_in_any_order_and_one_cell_batches(path, sigmoid):
    rows = [1, 0, 1, 1]
    model, labels, targets, z, den = make_step(COUNTS, rows, seed=3, sigmoid=sigmoid)
    ids = [2, 1, 0, 3]  # the step's datasets in any order (pretrain.prepare_step sorts them), one empty
    assert_matches(batched(model, targets, z, den[ids], ids, sigmoid, path),
                   reference(model, labels, z, den[ids], ids, sigmoid))
    ids = [3, 0]
    z = z[:2].detach().requires_grad_(True)
    assert_matches(batched(model, targets, z, den[ids], ids, sigmoid, path),
                   reference(model, labels, z, den[ids], ids, sigmoid))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sigmoid", [True, False])
def test_equal_to_summed_loss_per_dataset_and_any_upstream_gradient(path, sigmoid):
    """The old per-dataset path (float32, PretrainModel.summed_loss) and a loss scaled after it."""
    model, labels, targets, z, den = make_step(COUNTS, ROWS, seed=1, sigmoid=sigmoid)
    ids = list(range(len(COUNTS)))
    old = (torch.stack([model.summed_loss(z_i, d, targets[d]) for z_i, d in zip(torch.split(z, ROWS), ids)])
           / den).sum()
    params = [model.heads[d].weight for d in ids] + [model.heads[d].bias for d in ids]
    g_old = torch.autograd.grad(old * 2.5, [z, *params])
    new = batched(model, targets, z, den, ids, sigmoid, path, scale=2.5)
    torch.testing.assert_close(new[0], old)
    for a, b in zip([new[1], *new[2], *new[3]], g_old):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sigmoid", [True, False])
def test_saturated_logits_stay_finite_and_exact(path, sigmoid):
    """Logits of magnitude ~50-100: sigmoids at 0 or 1, the plain loss needs its max shift."""
    model, labels, targets, z, den = make_step(COUNTS, ROWS, seed=2, sigmoid=sigmoid, weight_scale=60.0)
    ids = list(range(len(COUNTS)))
    got = batched(model, targets, z, den, ids, sigmoid, path)
    assert all(torch.isfinite(t).all() for t in [got[0], got[1], *got[2], *got[3]])
    assert_matches(got, reference(model, labels, z, den, ids, sigmoid), rtol=1e-4, atol=1e-4)


def test_torch_path_runs_in_float64_and_auto_picks_it():
    model, labels, targets, z, den = make_step(COUNTS, ROWS, seed=4)
    model = model.double()
    z64 = z.detach().double().requires_grad_(True)
    ids = list(range(len(COUNTS)))
    got = batched(model, targets, z64, den.double(), ids, True, "auto")  # float64: not the fused path
    assert got[0].dtype == torch.float64
    assert_matches(got, reference(model, labels, z64, den, ids, True), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="float32"):
        model.heads.loss(z64, [targets[d] for d in ids], ids, den, True, path="fused")


def product_jobs(shapes, seed=0):
    """``(a, b, out)`` for ``(m, inner, n)`` shapes, as the heads make them: ``a`` a transposed
    view every other job, ``out`` rows of a larger buffer."""
    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for i, (m, inner, n) in enumerate(shapes):
        a = torch.randn(inner, m, generator=gen).t() if i % 2 else torch.randn(m, inner, generator=gen)
        b = torch.randn(inner, n, generator=gen)
        jobs.append((a, b, torch.full((m + 3, n), float("nan"))[1:m + 1]))
    return jobs


def blas_threads():
    import threadpoolctl
    return [(i["prefix"], i["num_threads"]) for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shapes", [
    [(40, 12, 30)] * 9,  # side by side, one thread each
    [(400, 12, 300), (40, 12, 30), (7, 12, 5)],  # the largest alone on every thread, the rest side by side
    [(60, 12, 50), (50, 12, 40)],  # one left beside the first: on every thread too
    [(1, 3, 1)],
    [],
])
def test_products_are_every_jobs_product_whoever_runs_it(threads, shapes):
    jobs = product_jobs(shapes, seed=len(shapes) + threads)
    before, blas = torch.get_num_threads(), blas_threads()
    torch.set_num_threads(threads)
    try:
        heads._products(jobs)
    finally:
        torch.set_num_threads(before)
    for a, b, out in jobs:
        torch.testing.assert_close(out, (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)
    assert blas_threads() == blas  # the BLAS's own threads as they were


def test_products_raise_a_workers_error():
    jobs = product_jobs([(40, 12, 30)] * 4)
    a, b, out = jobs[2]
    jobs[2] = (a, b, torch.empty(40, 31))  # no room for the product
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError):
            heads._products(jobs)
    finally:
        torch.set_num_threads(before)


def _products_in_child(queue):
    jobs = product_jobs([(40, 12, 30)] * 6)
    torch.set_num_threads(2)
    heads._products(jobs)
    # checked with numpy: torch's own OpenMP threads may not run in a child forked after they ran
    queue.put(max(float(np.abs(out.numpy() - a.numpy().astype(np.float64) @ b.numpy()).max()) for a, b, out in jobs))


def test_products_run_in_a_forked_child():
    """A child forked after the products ran has none of its parent's worker threads: it starts
    its own (the parent's would never take the jobs: a hang)."""
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        heads._products(product_jobs([(40, 12, 30)] * 6))  # the parent's workers exist
    finally:
        torch.set_num_threads(before)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_products_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) < 1e-4


@pytest.mark.parametrize("sigmoid", [True, False])
def test_fused_path_is_the_same_with_one_and_two_threads(sigmoid):
    """The fused pass (loss, d loss / d logits, bias gradient from given logits) is bit for bit the
    same whatever the threads. The logits and the gradients' products are a BLAS's, and which BLAS
    runs a product on how many threads depends on the number of threads (``_products``; here the
    200-cell dataset's run alone on torch's two): the step's loss and gradients are equal to
    rounding across threads, and bit for bit for the same threads."""
    counts = COUNTS + [[300, 600, 151]]  # 1,051 columns: several chunks of rows
    rows = ROWS + [200]
    model, labels, targets, z, den = make_step(counts, rows, seed=5, sigmoid=sigmoid)
    ids = list(range(len(counts)))
    layout = heads._StepLayout(counts, rows)
    logits = torch.cat([(z_i @ model.heads[d].weight.detach().t()).reshape(-1)
                        for z_i, d in zip(torch.split(z.detach(), rows), ids)]).numpy()
    bias = torch.cat([h.bias.detach() for h in model.heads]).numpy()
    t = torch.cat(targets).numpy()
    scale = (1 / den).numpy()
    before = torch.get_num_threads()
    try:
        results, kernel = [], []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(batched(model, targets, z, den, ids, sigmoid, "fused"))
            flat = logits.copy()
            heads.csr_kernels._use_torch_threads()
            loss, partial = heads._fused_loss(flat, bias, t, layout.meta, layout.bounds, layout.chunks, scale,
                                              sigmoid, layout.n_partial)
            kernel.append((flat, loss, partial))
    finally:
        torch.set_num_threads(before)
    for other in kernel[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(kernel[0], other))
    one, two, again = results
    for a, b in zip(two, again):  # the same threads: the same bits
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)
    torch.testing.assert_close(one[0], two[0], rtol=1e-6, atol=0)
    for a, b in zip([one[1], *one[2], *one[3]], [two[1], *two[2], *two[3]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert_matches(one, reference(model, labels, z, den, ids, sigmoid), rtol=1e-4, atol=1e-5)


def test_a_second_backward_says_why_it_cannot_run():
    model, _, targets, z, den = make_step(COUNTS, ROWS)
    loss = model.heads.loss(z, targets, list(range(len(COUNTS))), den, True, path="fused")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_layout_chunks_cover_every_row_once_with_about_equal_work():
    layout = heads._StepLayout([[2, 3, 2], [3000, 6000, 1501], [40, 80, 21]], [5, 300, 0], chunk_logits=1 << 16)
    covered = np.concatenate([np.arange(lo, hi) for _, lo, hi, _ in layout.chunks])
    assert covered.tolist() == list(range(305))
    widths = layout.widths[layout.chunks[:, 0]]
    rows = layout.chunks[:, 2] - layout.chunks[:, 1]
    assert np.all((rows * widths <= 1 << 16) | (rows == 1))
    assert layout.n_partial == widths.sum() and layout.first_chunk.tolist() == [0, 1, 1 + len(range(0, 300, 6)),
                                                                               1 + len(range(0, 300, 6))]
    with pytest.raises(ValueError, match="granularities"):
        heads._StepLayout([[2, 3], [2, 3, 4]], [1, 1])


def test_targets_outside_the_heads_are_refused():
    model, _, targets, z, den = make_step(COUNTS[:2], ROWS[:2])
    bad = [targets[0], targets[1].clone()]
    bad[1][0, 2] = sum(COUNTS[1])
    with pytest.raises(IndexError):
        model.heads.loss(z, bad, [0, 1], den[:2], True, path="fused")
    with pytest.raises(ValueError, match="rows"):
        model.heads.loss(z[:3], targets, [0, 1], den[:2], True)


def test_head_bank_keeps_the_module_lists_names_and_draws():
    torch.manual_seed(7)
    bank = heads.HeadBank(HID, COUNTS)
    torch.manual_seed(7)
    old = nn.ModuleList(nn.Linear(HID, sum(c)) for c in COUNTS)
    assert list(bank.state_dict()) == list(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(bank.state_dict().values(), old.state_dict().values()))
    model = PretrainModel(ModelConfig(n_genes=5, hid=HID), COUNTS)
    assert [k for k in model.state_dict() if k.startswith("heads.")][:2] == ["heads.0.weight", "heads.0.bias"]
    model.heads.load_state_dict(old.state_dict())  # a checkpoint written before HeadBank loads
    assert torch.equal(model.heads[2].weight, old[2].weight)


@pytest.mark.parametrize("heads_path", ["fused", "torch"])
def test_a_step_module_gives_the_per_dataset_gradients(heads_path):
    model, labels, targets, z, den = make_step(COUNTS, ROWS, seed=6)
    x = torch.rand(sum(ROWS), 5)
    grads = []
    for path in ("per_dataset", heads_path):
        model.zero_grad(set_to_none=True)
        loss = pretrain.MultiTaskStep(model, heads_path=path)(x, targets, list(range(len(COUNTS))), den)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def pretrain_args(collection, save, *extra):
    return main.parse_args(["--is_pretrain", "--kmeans", "--datasets", *collection, "--save_model", str(save),
                            "--pt_epoch", "3", "--batch_num", "4", "--avg_cluster_num", "20", "--hid", "16",
                            "--log_level", "WARNING", *extra])


@pytest.mark.parametrize("extra", [[], ["--no_sigmoid_logits"]])
def test_pretraining_gives_the_per_dataset_paths_encoder(collection, tmp_path, monkeypatch, extra):
    monkeypatch.setattr(pretrain, "HEADS_PATH", "per_dataset")
    old = main.main(pretrain_args(collection, tmp_path / "old.pt", "--pt_lr", "1e-2", *extra))
    monkeypatch.setattr(pretrain, "HEADS_PATH", "auto")
    new = main.main(pretrain_args(collection, tmp_path / "new.pt", "--pt_lr", "1e-2", *extra))
    assert not torch.equal(old["model"]["linear.weight"], torch.zeros_like(old["model"]["linear.weight"]))
    for key in ("linear.weight", "linear.bias"):
        torch.testing.assert_close(new["model"][key], old["model"][key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["losses"], old["losses"], rtol=1e-5)
