"""The cell-type classifier: built from a pretrained encoder or at random, trained with early
stopping on validation accuracy, and scored. The sweep (finetune.py) and annotate.py both train
it here, so that a classifier made for annotation is exactly the one the sweep evaluates.
Importing does nothing.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import NamedTuple
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from model import Classifier, GeneLinear, apply_in_batches, init_encoder_from_pretrained, make_adam
from settings import CHOSEN, EARLY_STOP, LINEAR_BASES, ClassifierSettings
from sparse import HostCSR, SparseBatch, dense_batch, sparse_products, training_rows
from splits import iter_batches

DENSE_TRAIN_BYTES = 1 << 30  # training cells up to this size are densified once, larger sets per batch
LINEAR_C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried for --ft_linear_base
LINEAR_MAX_ITER = 3000
# L-BFGS stops when the mean objective's largest gradient entry is below this: scikit-learn's
# default ``tol`` for lbfgs, on the same objective. Not a shortcut: fitted further, the regression
# fits its own study (baron -> the 4-study pancreas set at C=0.3: 0.817 at 1e-4 as scikit-learn's
# default, 0.600 at 1e-5 and at convergence; bench/README.md "The linear base's stopping rule")
LINEAR_TOL = 1e-4

log = logging.getLogger("scpretrain.classifier")


BLEND_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the regression's share in --ft_linear_base blend


class LinearBase(NamedTuple):
    """A logistic regression of the classes on the features: logits ``x @ weight.T + bias``."""

    weight: np.ndarray  # classes x features
    bias: np.ndarray  # classes
    C: float
    val_accuracy: float


def fit_linear_base(features, codes: np.ndarray, split, n_classes: int, device="cpu", solver: str = "torch",
                    c_grid=LINEAR_C_GRID) -> LinearBase | None:
    """Multinomial logistic regression (L2) on the training cells for each C of ``c_grid``; the one
    with the best validation accuracy (ties: the smaller C, the stronger penalty). ``solver``:
    ``torch`` (full-batch L-BFGS on the sparse features, on the device: the default) or ``sklearn`` (scikit-learn's lbfgs, for comparison). Classes with no
    training cell get logit -30 below the others' lowest bias. None, with a warning, when the
    training cells hold one class only (there is nothing to fit)."""
    train_idx, val_idx = split[0], split[1]
    y_train = codes[train_idx]
    if len(np.unique(y_train)) < 2:
        log.warning("linear base skipped: the training cells hold one class only")
        return None
    t0 = time.perf_counter()
    fits = (_torch_logistic_fits if solver == "torch" else _sklearn_logistic_fits)(features, codes, split, n_classes,
                                                                                  device, c_grid)
    best = None
    for C, weight, bias in fits:
        logits = apply_in_batches(lambda x: linear_logits(x, weight, bias), features, val_idx, device)
        accuracy = float(np.mean(logits.argmax(1) == codes[val_idx])) if len(val_idx) else 0.0
        if best is None or accuracy > best[0]:
            best = (accuracy, C, weight, bias)
    accuracy, C, weight, bias = best
    seen = np.unique(y_train)
    unseen = np.setdiff1d(np.arange(n_classes), seen)
    bias = bias.copy()
    bias[unseen] = bias[seen].min() - 30.0
    log.info("linear base: logistic regression on %d cells, C=%g, validation accuracy %.4f (%d fits, %s, %.1fs)",
             len(train_idx), C, accuracy, len(c_grid), solver, time.perf_counter() - t0)
    return LinearBase(weight, bias, float(C), accuracy)


def linear_logits(x, weight: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    """``x @ weight.T + bias`` for a network input ``x`` (dense, ``HostCSR`` or ``SparseBatch``)."""
    layer = GeneLinear.of(torch.from_numpy(np.ascontiguousarray(weight.T)), torch.from_numpy(bias))
    device = x.x.device if isinstance(x, SparseBatch) else getattr(x, "device", torch.device("cpu"))
    return layer.to(device)(x)


def _sklearn_logistic_fits(features, codes, split, n_classes: int, device, c_grid):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    X_train, y_train = features[split[0]], codes[split[0]]
    for C in c_grid:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            fit = LogisticRegression(C=C, max_iter=LINEAR_MAX_ITER).fit(X_train, y_train)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.info("linear base: C=%g did not converge in %d iterations", C, LINEAR_MAX_ITER)
        weight = np.zeros((n_classes, features.shape[1]), dtype=np.float32)
        bias = np.zeros(n_classes, dtype=np.float32)
        seen = fit.classes_
        if len(seen) == 2:  # scikit-learn's binary model: one logit, of the second class against the first
            weight[seen[1]], bias[seen[1]] = fit.coef_[0], fit.intercept_[0]
        else:
            weight[seen], bias[seen] = fit.coef_, fit.intercept_
        yield C, weight, bias


def _torch_logistic_fits(features, codes, split, n_classes: int, device, c_grid):
    """Multinomial logistic regression by full-batch L-BFGS over the classes the training cells
    hold: the mean cross-entropy plus ``|W|^2 / (2 C n)`` (scikit-learn's objective, divided by n;
    for two classes its binary model's), the bias not penalised and centred as scikit-learn's; the
    training cells are one sparse batch (``TrainingRows``); stopped by scikit-learn's rule
    (``LINEAR_TOL``)."""
    device = torch.device(device)
    train_idx = split[0]
    seen, y = np.unique(codes[train_idx], return_inverse=True)
    rows = TrainingRows(features, train_idx, device, sparse=sp.issparse(features) and sparse_products("auto", device))
    x = rows.whole.inference() if rows.sparse else None
    y = torch.as_tensor(y, device=device)
    n = len(train_idx)
    # two classes: scikit-learn fits one vector d (logit gap) under |d|^2 / 2; two vectors -d/2, d/2
    # under the same penalty per vector carry half of it, hence twice the weight
    penalty = (1.0 if len(seen) == 2 else 0.5) / n
    for C in sorted(c_grid):
        # each C from zeros, as scikit-learn fits it (under LINEAR_TOL where it stops depends on the
        # start), drawing nothing: the network's own draws (init, batches, dropout) stay as without a base
        layer = GeneLinear.of(torch.zeros(features.shape[1], len(seen), device=device),
                              torch.zeros(len(seen), device=device))
        optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=LINEAR_MAX_ITER, history_size=20,
                                      tolerance_grad=LINEAR_TOL, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad(set_to_none=True)
            logits = layer(x) if x is not None else rows.logits(layer)
            loss = torch.nn.functional.cross_entropy(logits, y) + penalty * (layer.weight_t ** 2).sum() / C
            loss.backward()
            return loss

        optimizer.step(objective)
        if optimizer.state[optimizer._params[0]].get("n_iter", 0) >= LINEAR_MAX_ITER:
            log.info("linear base: C=%g did not converge in %d iterations", C, LINEAR_MAX_ITER)
        weight = np.zeros((n_classes, features.shape[1]), dtype=np.float32)
        bias = np.zeros(n_classes, dtype=np.float32)
        weight[seen] = layer.weight_t.detach().t().cpu().numpy()
        fitted = layer.bias.detach().cpu().numpy()
        bias[seen] = fitted - fitted.mean()  # the softmax is the same; scikit-learn's intercepts sum to 0
        yield C, weight, bias


def attach_linear_base(clf: Classifier, base: LinearBase, mode: str, share: float = 1.0) -> Classifier:
    """Give ``clf`` this fixed linear base, combined as ``mode``; ``residual`` also zeroes the output
    layer, so that the classifier starts as the regression and its network learns a correction."""
    if base.weight.shape[0] != clf.out.out_features:
        raise ValueError("the linear base does not match the classifier's classes")
    layer = GeneLinear.of(torch.from_numpy(base.weight.T.copy()), torch.from_numpy(base.bias))
    clf.set_base(layer.to(clf.out.weight.device), mode, share)
    clf.base_c = base.C
    if mode == "residual":
        with torch.no_grad():
            clf.out.weight.zero_()
            clf.out.bias.zero_()
    return clf


def improves(score: tuple[float, float], best: tuple[float, float] | None, criterion: str) -> bool:
    """Whether the validation (accuracy, loss) ``score`` beats ``best`` under ``criterion``."""
    if best is None:
        return True
    (acc, loss), (best_acc, best_loss) = score, best
    if criterion == "accuracy":  # scPretrain: early stopping on validation accuracy
        return acc > best_acc
    if criterion == "loss":
        return loss < best_loss
    return acc > best_acc or (acc == best_acc and loss < best_loss)


def choose_blend_share(clf: Classifier, val_rows: "TrainingRows", y_val: np.ndarray,
                       criterion: str, shares=BLEND_SHARES) -> tuple[float, float]:
    """The regression's share in a blend (one of ``shares``, in order: a later one must score better
    on the validation cells under ``criterion``); sets it on ``clf`` and returns (share, accuracy)."""
    clf.eval()
    with torch.no_grad():  # the two parts' logits once; only the mixture changes with the share
        network, base = val_rows.logits(clf.network), val_rows.logits(clf.base_logits)
    targets = torch.as_tensor(y_val, device=network.device)
    best, best_share = None, shares[0]
    for share in shares:
        clf.base_share.fill_(share)
        score = logit_scores(clf.combine(network, base), targets)
        if improves(score, best, criterion):
            best, best_share = score, share
    clf.base_share.fill_(best_share)
    log.info("linear base blended: the regression's share %.2f, validation accuracy %.4f", best_share, best[0])
    return best_share, best[0]


class PretrainedStart(NamedTuple):
    """Where a classifier's encoder starts: a pretrained encoder's weights, and where each of the
    dataset's genes sits in its gene universe (``genes.gene_lookup``)."""

    state: dict
    lookup: object


def build_classifier(n_classes: int, n_genes: int, settings: ClassifierSettings, seed: int,
                     pretrained: PretrainedStart | None = None, pca=None) -> Classifier:
    """Same random init for both methods; scPretrain then copies pretrained columns by gene name."""
    torch.manual_seed(seed)
    clf = Classifier(n_genes, n_classes, settings.hid, dropout=settings.ft_dropout or 0.0)
    if pretrained is not None:
        init_encoder_from_pretrained(clf.encoder, pretrained.state, pretrained.lookup)
    if pca is not None:  # the gene-space encoder on PCA inputs: W x + b = (W C^T) x_pca + (W mean + b)
        components, mean = (torch.from_numpy(a) for a in pca)
        with torch.no_grad():
            weight, bias = clf.encoder.linear.weight.clone(), clf.encoder.linear.bias.clone()
            clf.encoder.linear = torch.nn.Linear(components.shape[0], settings.hid)
            clf.encoder.linear.weight.copy_(weight @ components.T)
            clf.encoder.linear.bias.copy_(bias + weight @ mean)
    return clf


def predict_proba(clf: Classifier, features, rows: np.ndarray, device, batch_size: int = 4096) -> np.ndarray:
    clf.eval()
    return apply_in_batches(lambda x: torch.softmax(clf(x), 1), features, rows, device, batch_size)


def make_optimizer(params, settings: ClassifierSettings):
    """Adam (scPretrain), or AdamW when --ft_weight_decay > 0."""
    if not settings.ft_weight_decay:
        return make_adam(params, settings.ft_lr)
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=settings.ft_lr, weight_decay=settings.ft_weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=settings.ft_lr, weight_decay=settings.ft_weight_decay)


def train_classifier(clf: Classifier, features, codes, split, settings: ClassifierSettings, seed: int, device,
                     linear_base: LinearBase | None = None) -> tuple[Classifier, int, float]:
    """Adam with early stopping on a validation score (--ft_early_stop; the paper's: accuracy);
    returns the best model, the epochs run and its validation accuracy. Training cells are
    densified once when they fit in ``DENSE_TRAIN_BYTES``, else batch by batch (the same numbers,
    memory bounded). With ``--ft_linear_base`` the classifier gets its logistic regression
    (``linear_base``, or fitted here on the same cells): ``residual`` before training, the regression
    alone being the first early-stopping candidate; ``blend`` after, with its share chosen."""
    train_idx, val_idx, _ = split
    device = torch.device(device)
    mode = settings.ft_linear_base or "none"
    if mode != "none":
        c_grid = LINEAR_C_GRID if settings.ft_linear_c == CHOSEN else (settings.ft_linear_c,)
        linear_base = linear_base or fit_linear_base(features, codes, split, clf.out.out_features, device,
                                                     c_grid=c_grid)
    if mode == "residual" and linear_base is not None:
        attach_linear_base(clf, linear_base, mode)
    clf = clf.to(device)
    optimizer = make_optimizer([p for p in clf.parameters() if p.requires_grad], settings)
    sparse = sp.issparse(features) and sparse_products(settings.ft_batch_format, device)
    train_rows = TrainingRows(features, train_idx, device, sparse)
    y_train = torch.as_tensor(codes[train_idx]).to(device)
    val_rows = TrainingRows(features, val_idx, device, sparse)
    y_val = codes[val_idx]
    # the base's logits of the training cells, once and without dropout (it sees the cells as they are)
    base_train = train_rows.logits(clf.base_logits) if clf.base is not None else None
    rng = np.random.default_rng(seed)
    criterion = settings.ft_early_stop or "accuracy"
    best, best_state, wait, epoch = None, None, 0, 0
    if clf.base is not None:
        clf.eval()
        best, best_state = val_rows.score(clf, y_val, with_loss=criterion != "accuracy"), copy.deepcopy(clf.state_dict())
    for epoch in range(1, settings.ft_epoch + 1):
        clf.train()
        for batch in iter_batches(len(train_idx), settings.ft_batch_size, rng):
            if sparse and len(batch) == len(train_idx):
                # one batch of every training cell: their stored order (prepared once); the loss is
                # a mean, so the order changes only rounding
                x, y, rows = train_rows.batch(None, dropout=clf.dropout), y_train, slice(None)
            else:
                rows = torch.as_tensor(batch, device=device)
                x, y = train_rows.batch(batch, dropout=clf.dropout), y_train[rows]
            logits = clf.network(x) if base_train is None else clf.combine(clf.network(x), base_train[rows])
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        clf.eval()
        score = val_rows.score(clf, y_val, with_loss=criterion != "accuracy")
        if improves(score, best, criterion):
            best, best_state, wait = score, copy.deepcopy(clf.state_dict()), 0
        else:
            wait += 1
            if wait >= settings.patience:
                break
    clf.load_state_dict(best_state)
    accuracy = best[0]
    if mode == "blend" and linear_base is not None:
        attach_linear_base(clf, linear_base, mode)
        shares = BLEND_SHARES if settings.ft_blend_share == CHOSEN else (settings.ft_blend_share,)
        _, accuracy = choose_blend_share(clf, val_rows, y_val, criterion, shares)
    return clf, epoch, accuracy


class TrainingRows:
    """Some rows of a feature matrix as the classifier's inputs. Sparse: their CSR with its
    gene-block pointers on the CPU (``HostCSR``), or their CSR and its transpose's on a GPU, all
    rows prepared once, so that an epoch of one batch builds nothing. Dense: densified once when
    they fit ``DENSE_TRAIN_BYTES``, else a batch at a time."""

    def __init__(self, features, rows: np.ndarray, device, sparse: bool = False):
        self.features, self.rows, self.device = features, np.asarray(rows), torch.device(device)
        self.dense, self.sparse = None, sparse
        if sparse:
            self.csr = sp.csr_matrix(features[self.rows], dtype=np.float32)
            self.whole = training_rows(self.csr, self.device)
        elif len(self.rows) * features.shape[1] * 4 <= DENSE_TRAIN_BYTES:
            self.dense = dense_batch(features, self.rows).to(device)

    def batch(self, positions: np.ndarray | None, dropout: float = 0.0) -> torch.Tensor | SparseBatch | HostCSR:
        """The rows at ``positions`` (of these rows; None: all, in their stored order, sparse only)
        for a training step; a sparse batch gets the classifier's input dropout here, on its
        stored values (dense ones get it in the model)."""
        if self.sparse:
            part = self.whole if positions is None else training_rows(self.csr[positions], self.device)
            return part.batch(dropout)
        if self.dense is not None:
            return self.dense[torch.as_tensor(positions, device=self.device)]
        return dense_batch(self.features, self.rows[positions]).to(self.device)

    @torch.no_grad()
    def logits(self, model) -> torch.Tensor:
        """``model``'s outputs for all these rows, in their order (no dropout: inference)."""
        if self.sparse:
            return model(self.whole.inference())
        if self.dense is not None:
            return model(self.dense)
        return torch.from_numpy(apply_in_batches(model, self.features, self.rows, self.device)).to(self.device)

    @torch.no_grad()
    def score(self, clf: Classifier, codes: np.ndarray, with_loss: bool = False) -> tuple[float, float]:
        """(accuracy, mean cross-entropy or NaN when not asked for) of ``clf`` on these rows."""
        return logit_scores(self.logits(clf), torch.as_tensor(codes, device=self.device), with_loss)


def logit_scores(logits: torch.Tensor, targets: torch.Tensor, with_loss: bool = True) -> tuple[float, float]:
    """(accuracy, mean cross-entropy or NaN when not asked for) of class logits against targets."""
    accuracy = float((logits.argmax(1) == targets).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, targets)) if with_loss else float("nan")
    return accuracy, loss
