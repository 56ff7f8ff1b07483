"""The side-by-side pre-training heads compute exactly the per-granularity cross-entropies; damaged checkpoints."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.nn import functional as F

import checkpoints
import pretrain
import sparse
from checkpoints import Feeding, encoder_checkpoint
from errors import CheckpointError
from model import Encoder, ModelConfig, PretrainModel, offset_targets
from sparse import DeviceCSR, HostCSR

COUNTS = [[5, 9, 2], [3, 4, 1]]


def per_head_loss(model, z, dataset, labels, sigmoid):
    return sum(F.cross_entropy(torch.sigmoid(lg) if sigmoid else lg, torch.from_numpy(lab), reduction="sum")
               for lg, lab in zip(model.logits(z, dataset), labels))


@pytest.mark.parametrize("sigmoid", [True, False])
@pytest.mark.parametrize("dataset", [0, 1])
def test_summed_loss_equals_separate_heads(sigmoid, dataset):
    torch.manual_seed(0)
    model = PretrainModel(ModelConfig(n_genes=30, hid=8, sigmoid_logits=sigmoid), COUNTS)
    rng = np.random.default_rng(dataset)
    labels = [rng.integers(0, k, 13) for k in COUNTS[dataset]]
    z = model.encoder(torch.rand(13, 30))
    fast = model.summed_loss(z, dataset, torch.from_numpy(offset_targets(labels, COUNTS[dataset])))
    slow = per_head_loss(model, z, dataset, labels, sigmoid)
    torch.testing.assert_close(fast, slow)
    g_fast = torch.autograd.grad(fast, model.heads[dataset].weight, retain_graph=True)[0]
    g_slow = torch.autograd.grad(slow, model.heads[dataset].weight)[0]
    torch.testing.assert_close(g_fast, g_slow)


def test_heads_have_the_granularities_widths():
    model = PretrainModel(ModelConfig(n_genes=10, hid=4), COUNTS)
    z = torch.rand(3, 4)
    assert [lg.shape[1] for lg in model.logits(z, 0)] == COUNTS[0]
    assert model.heads[1].weight.shape == (sum(COUNTS[1]), 4)
    bound = 1 / np.sqrt(4)  # as a separate Linear(hid, k) would draw
    assert float(model.heads[0].weight.detach().abs().max()) <= bound


def test_offset_targets_point_into_each_heads_columns():
    cols = offset_targets([np.array([4, 0]), np.array([0, 8]), np.array([1, 1])], COUNTS[0])
    assert cols.tolist() == [[4, 5, 15], [0, 13, 15]]


def test_stack_csr_stacks_frees_and_row_block_shares():
    mats = [sp.random(n, 7, density=0.4, format="csr", dtype=np.float64, random_state=i) for i, n in enumerate([5, 0, 9, 3])]
    want = sp.vstack(mats).toarray().astype(np.float32)
    parts = list(mats)
    X, offsets = sparse.stack_csr(parts)
    assert parts == [] and offsets.tolist() == [0, 5, 5, 14, 17]
    assert X.dtype == np.float32 and X.shape == (17, 7)
    np.testing.assert_array_equal(X.toarray(), want)
    view = sparse.row_block(X, 5, 14)
    np.testing.assert_array_equal(view.toarray(), want[5:14])
    assert np.shares_memory(view.data, X.data) and np.shares_memory(view.indices, X.indices)
    with pytest.raises(ValueError, match="columns"):
        sparse.stack_csr([sp.csr_matrix((2, 3)), sp.csr_matrix((2, 4))])
    small = sparse.CSRStack(7, capacity=3)  # too small a capacity: grown by copying, the same result
    for m in mats:
        small.append(m)
    grown, grown_offsets = small.finish()
    np.testing.assert_array_equal(grown.toarray(), want)
    assert grown_offsets.tolist() == offsets.tolist()


def test_device_csr_gathers_rows_as_scipy_does():
    X = sp.random(60, 25, density=0.2, format="csr", dtype=np.float32, random_state=3)
    store = DeviceCSR(X, torch.device("cpu"))
    rows = np.array([59, 0, 7, 7, 31])  # any order, repeats allowed
    want = X[rows].toarray()
    np.testing.assert_array_equal(store.dense(rows).numpy(), want)
    batch = store.sparse(rows)
    np.testing.assert_array_equal(batch.x.to_dense().numpy(), want)
    np.testing.assert_array_equal(batch.x_t.to_dense().numpy(), want.T)
    assert store.sparse(rows, transposed=False).x_t is None
    part = store.take(rows)
    assert part.shape == (5, 25)
    np.testing.assert_array_equal(part.dense(np.array([4, 1])).numpy(), want[[4, 1]])
    empty = store.dense(np.array([], dtype=np.int64))
    assert empty.shape == (0, 25)


def test_a_step_gathers_each_datasets_rows_in_order():
    rng = np.random.default_rng(0)
    mats = [sp.random(n, 7, density=0.4, format="csr", dtype=np.float32, random_state=i) for i, n in enumerate([5, 9, 3])]
    want_all = [m.toarray() for m in mats]
    coll = pretrain.Collection.of_stacked(["a", "b", "c"], ["d1", "d2", "d3"], *sparse.stack_csr(list(mats)), [None] * 3,
                                          [f"G{i}" for i in range(7)])
    for d, m in enumerate(want_all):
        np.testing.assert_array_equal(coll.features[d].toarray(), m)
    rows = [rng.permutation(5)[:3], np.array([], dtype=np.int64), rng.permutation(3)]
    targets = [np.arange(n * 3).reshape(n, 3) for n in (5, 9, 3)]
    host = pretrain.prepare_step(coll, targets, rows, sparse=True, device=torch.device("cpu"))
    assert host.used == [0, 2]
    want = np.vstack([want_all[0][rows[0]], want_all[2][rows[2]]])
    assert isinstance(host.X, HostCSR)
    np.testing.assert_array_equal(host.X.csr().toarray(), want)
    np.testing.assert_array_equal(host.targets[1], targets[2][rows[2]])
    assert coll.row_blocks is coll.row_blocks and coll.row_blocks.shape == (17, 1)  # built once, for every step
    unsorted = coll.stacked.copy()
    unsorted.indices[unsorted.indptr[1]:unsorted.indptr[2]] = unsorted.indices[unsorted.indptr[1]:unsorted.indptr[2]][::-1]
    coll = pretrain.Collection.of_stacked(["a", "b", "c"], ["d1", "d2", "d3"], unsorted, coll.offsets, [None] * 3,
                                          coll.gene_universe)
    host = pretrain.prepare_step(coll, targets, rows, sparse=True, device=torch.device("cpu"))
    assert coll.row_blocks is None  # no table for an unsorted collection: its steps sort their own rows
    np.testing.assert_array_equal(host.X.csr().toarray(), want)


def test_sparse_batch_gives_the_dense_encoder_output_and_gradients():
    torch.manual_seed(0)
    X = sp.random(6, 40, density=0.2, format="csr", dtype=np.float32, random_state=1)
    encoder = PretrainModel(ModelConfig(n_genes=40, hid=5), COUNTS).encoder
    outs, grads = [], []
    for as_csr in (False, True):
        encoder.zero_grad()
        coll = pretrain.Collection.of_stacked(["toy"], ["d"], *sparse.stack_csr([X]), [None], [f"G{i}" for i in range(40)])
        host = pretrain.prepare_step(coll, [np.zeros((6, 3), np.int64)], [np.arange(6)], as_csr,
                                     torch.device("cpu"))
        x = pretrain.step_inputs(host, torch.device("cpu"))[0]
        assert isinstance(x, HostCSR) == as_csr
        out = encoder(x)
        (out * torch.arange(5.0)).sum().backward()
        outs.append(out.detach())
        grads.append((encoder.linear.weight_t.grad.clone(), encoder.linear.bias.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])



def test_gene_major_encoder_is_an_nn_linear_to_the_outside():
    torch.manual_seed(3)
    encoder = Encoder(30, 4)
    torch.manual_seed(3)
    reference = torch.nn.Linear(30, 4)
    assert torch.equal(encoder.linear.weight, reference.weight)  # the same initial draws
    state = encoder.state_dict()
    assert list(state) == ["linear.weight", "linear.bias"] and state["linear.weight"].shape == (4, 30)
    x = torch.rand(5, 30)
    torch.testing.assert_close(encoder(x), torch.sigmoid(reference(x)))
    other = Encoder(30, 4)
    other.load_state_dict(state)
    assert torch.equal(other.linear.weight_t, encoder.linear.weight_t)
    with pytest.raises(RuntimeError):
        other.load_state_dict({"linear.weight": torch.zeros(4, 30)})  # strict: the bias is missing


def damaged_checkpoints():
    """name: (edit of a good encoder checkpoint, the message expected after its source)."""
    def drop(key):
        return lambda c: c["model"].pop(key)

    def set_args(**kw):
        return lambda c: c["model_args"].update(kw)

    return {
        "weight missing": (drop("linear.weight"), "missing ['linear.weight']"),
        "bias missing": (drop("linear.bias"), "missing ['linear.bias']"),
        "unexpected key": (lambda c: c["model"].__setitem__("extra", torch.zeros(1)), "unexpected ['extra']"),
        "n_genes disagrees": (set_args(n_genes=31), "its gene list has 30 genes but its weights 31"),
        "weights wider than their model_args": (lambda c: c["model"].__setitem__("linear.weight", torch.zeros(8, 31)),
                                                "'linear.weight' has shape (8, 31), its model_args need (8, 30)"),
        "ten genes too few": (lambda c: c.__setitem__("gene_universe", c["gene_universe"][:20]),
                              "its gene list has 20 genes but its weights 30"),
        "repeated gene": (lambda c: c["gene_universe"].__setitem__(5, "G4"), "its gene list repeats genes"),
        "NaN weights": (lambda c: c["model"]["linear.weight"].__setitem__((0, 0), float("nan")),
                        "hold NaN or infinite values"),
        "unknown normalize": (lambda c: c.__setitem__("normalize", "tpm"), "'normalize' is 'tpm'"),
        "unknown values": (lambda c: c.__setitem__("values", "scaled"), "'values' is 'scaled'"),
        "hid not a number": (set_args(hid="8"), "model_args['hid'] must be a whole number"),
        "hid disagrees": (set_args(hid=9), "'linear.bias' has shape (8,)"),
        "unknown model_args": (set_args(width=3), "'model_args' missing or not valid (TypeError"),
        "model_args missing": (lambda c: c.pop("model_args"), "lacks ['model_args']"),
        "model missing": (lambda c: c.pop("model"), "lacks ['model']"),
        "gene list missing": (lambda c: c.pop("gene_universe"), "lacks ['gene_universe']"),
    }


@pytest.mark.parametrize("defect", list(damaged_checkpoints()))
def test_damaged_checkpoint_is_one_checkpoint_error(tmp_path, defect):
    edit, expected = damaged_checkpoints()[defect]
    cfg = ModelConfig(n_genes=30, hid=8)
    ckpt = encoder_checkpoint(Encoder(30, 8), cfg, [f"G{i}" for i in range(30)], fed=Feeding(), phase=1, epoch=1,
                              losses=[0.0], datasets=["toy"], config={})
    edit(ckpt)
    path = tmp_path / "damaged.pt"
    checkpoints.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_encoder(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


def test_good_checkpoint_round_trip():
    torch.manual_seed(1)
    encoder, cfg = Encoder(30, 8), ModelConfig(n_genes=30, hid=8)
    ckpt = encoder_checkpoint(encoder, cfg, [f"G{i}" for i in range(30)], fed=Feeding(), phase=1, epoch=1,
                              losses=[0.0], datasets=["toy"], config={})
    loaded, loaded_cfg = checkpoints.encoder_from(ckpt)
    assert loaded_cfg == cfg
    torch.testing.assert_close(loaded.linear.weight, encoder.linear.weight)


def test_background_writer_writes_while_the_caller_goes_on_and_raises_its_errors(tmp_path, monkeypatch, caplog):
    import threading

    from errors import OutputError

    real_save, started, release, order = checkpoints.save, threading.Event(), threading.Event(), []

    def slow_save(ckpt, path):
        started.set()
        release.wait(30)
        order.append(("written", path.name))
        if ckpt.get("fail"):
            raise OutputError(f"{path}: writing failed (no space left on device)")
        return real_save(ckpt, path)

    monkeypatch.setattr(checkpoints, "save", slow_save)
    writer = checkpoints.BackgroundWriter()
    writer.submit({"epoch": 1, "w": torch.ones(3)}, tmp_path / "a.pt")
    assert started.wait(30)
    order.append(("caller", "goes on"))  # while the write waits
    release.set()
    writer.finish()
    assert order == [("caller", "goes on"), ("written", "a.pt")]
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], torch.ones(3))
    writer.submit({"fail": True}, tmp_path / "b.pt")
    with pytest.raises(OutputError, match="no space"):  # the failed write's error, at the next submit
        writer.submit({"epoch": 3}, tmp_path / "c.pt")
    writer.finish()  # the error was raised once; nothing pending
    writer.submit({"fail": True}, tmp_path / "d.pt")
    with caplog.at_level("ERROR", logger="scpretrain.checkpoints"):
        writer.finish(quiet=True)  # a run already stopping: logged, not raised
    assert "no space" in caplog.text
    writer.finish()
