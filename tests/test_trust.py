"""Run identities, resume checks, option ranges, output paths, exit codes and clean logs."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import clus
import fig
import main
import pretrain
import rf_svm_lr
import runtime
from helpers import toy_counts, toy_dataset_file, write_cellblast_h5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    paths = [str(toy_dataset_file(root / "alpha.h5", n_cells=120, n_genes=30, n_types=3, seed=1)),
             str(toy_dataset_file(root / "beta.h5", n_cells=100, n_genes=30, n_types=2, seed=2))]
    models = {}
    for name, lr in (("a", "1e-3"), ("b", "1e-2")):
        models[name] = root / f"{name}.pt"
        main.main(pretrain_args(paths, models[name], "--pt_lr", lr))
    return {"root": root, "datasets": paths, "models": models}


def pretrain_args(datasets, save, *extra):
    return main.parse_args(["--is_pretrain", "--kmeans", "--datasets", *datasets, "--save_model", str(save),
                            "--pt_epoch", "2", "--batch_num", "2", "--avg_cluster_num", "20", "--hid", "8",
                            "--log_level", "WARNING", *extra])


def sweep(setup, model, out, *extra):
    return main.main(main.parse_args(["--kmeans", "--datasets", *setup["datasets"], "--pretrained_model", str(model),
                                      "--save_result", str(out), "--ft_epoch", "5", "--patience", "2", "--hid", "8",
                                      "--log_level", "WARNING", *extra]))


# --------------------------------------------------------------------------- run identities


def test_rows_of_another_model_are_not_skipped_nor_mixed(setup, tmp_path, caplog):
    out = tmp_path / "ft.csv"
    first = sweep(setup, setup["models"]["a"], out)
    again = sweep(setup, setup["models"]["a"], out)  # same model and settings: nothing redone
    assert len(first) == len(again) == 4 and first["run_id"].nunique() == 1
    both = sweep(setup, setup["models"]["b"], out)  # another model: its own rows, same seeds
    assert len(both) == 8 and both["run_id"].nunique() == 2
    changed = sweep(setup, setup["models"]["b"], out, "--ft_lr", "0.01")  # another setting: another identity
    assert len(changed) == 12 and changed["run_id"].nunique() == 3
    sidecar = json.loads((tmp_path / "ft.csv.args.json").read_text())["identities"]
    assert set(sidecar) == set(changed["run_id"])
    assert {sidecar[i]["settings"]["ft_lr"] for i in sidecar} == {0.002, 0.01}
    assert len({sidecar[i]["model_digest"] for i in sidecar}) == 2


def test_figures_use_one_identity(setup, tmp_path, capsys):
    out = tmp_path / "finetune.csv"
    a = sweep(setup, setup["models"]["a"], out)
    b = sweep(setup, setup["models"]["b"], out)
    newest = b["run_id"].iloc[-1]
    runtime.setup_logging("INFO")
    frames = fig.load_sources(fig.parse_args(["--results_dir", str(tmp_path)]))
    assert set(frames["finetune"]["run_id"]) == {newest}
    assert "1 other identity" in capsys.readouterr().err
    oldest = a["run_id"].iloc[0]
    frames = fig.load_sources(fig.parse_args(["--results_dir", str(tmp_path), "--run_id", oldest]))
    assert set(frames["finetune"]["run_id"]) == {oldest} and len(frames["finetune"]) == 4


def test_a_csv_that_is_not_ours_is_refused_before_any_data_and_left_untouched(setup, tmp_path, capsys):
    out = tmp_path / "mine.csv"
    out.write_text("name,value\nx,1\n")
    missing = str(tmp_path / "nowhere.h5")
    runs = [lambda: sweep(setup, setup["models"]["a"], out),
            lambda: main.main(main.parse_args(["--kmeans", "--datasets", missing, "--save_result", str(out)])),
            lambda: rf_svm_lr.main(rf_svm_lr.parse_args(["--datasets", missing, "--save_result", str(out),
                                                         "--pretrained_model", str(setup["models"]["a"])])),
            lambda: clus.main(clus.parse_args(["--datasets", missing, "--save_result", str(out),
                                               "--pretrained_model", str(setup["models"]["a"])]))]
    for run in runs:
        with pytest.raises(SystemExit) as exc:
            run()
        err = capsys.readouterr().err
        assert exc.value.code == 1 and out.read_text() == "name,value\nx,1\n"
        assert "left untouched" in err and "nowhere.h5" not in err


def test_resume_lists_every_changed_setting_and_allows_more_epochs(setup, tmp_path, monkeypatch, capsys):
    import pretrain

    real_epoch = pretrain.train_epoch
    monkeypatch.setattr(pretrain, "train_epoch",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[-1] == 2 else real_epoch(*a, **k))
    with pytest.raises(SystemExit) as exc:
        main.main(pretrain_args(setup["datasets"], tmp_path / "cut.pt"))
    assert exc.value.code == 130 and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(pretrain, "train_epoch", real_epoch)
    with pytest.raises(SystemExit) as exc:
        main.main(pretrain_args(setup["datasets"], tmp_path / "cut.pt", "--resume", "--pt_lr", "0.5", "--hid", "12"))
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert "pt_lr: 0.0001 in the checkpoint, 0.5 now" in err and "hid: 8 in the checkpoint, 12 now" in err
    final = main.main(pretrain_args(setup["datasets"], tmp_path / "cut.pt", "--resume", "--pt_epoch", "3"))
    assert final["epoch"] == 3


# --------------------------------------------------------------------------- options and paths


@pytest.mark.parametrize("flags", [
    ["--batch_num", "0"], ["--avg_cluster_num", "0"], ["--pt_epoch", "0"], ["--pt_patience", "-1"],
    ["--kmeans_iter", "0"], ["--ft_batch_size", "0"], ["--ft_epoch", "0"], ["--patience", "0"],
    ["--fold1", "0"], ["--fold2", "0"], ["--hid", "0"], ["--pca_dim", "0"], ["--max_tr_num", "0"],
    ["--per_train", "0"], ["--per_train", "1"], ["--per_val", "1.5"], ["--per_train", "0.7", "--per_val", "0.3"],
    ["--pt_lr", "0"], ["--pt_lr", "nan"], ["--ft_lr", "-1"], ["--kmeans_max_cells", "-5"], ["--seed", "-1"],
    ["--kmeans_tol", "1"], ["--kmeans_tol", "-0.5"], ["--kmeans_tol", "nan"],
    ["--jobs", "0"], ["--hid", "ten"], ["--log_level", "LOUD"],
])
def test_main_refuses_out_of_range_options(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main.parse_args(["--kmeans", *flags])
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


@pytest.mark.parametrize("parse, flags", [
    (rf_svm_lr.parse_args, ["--pca_dim", "0"]), (rf_svm_lr.parse_args, ["--fold1", "0"]),
    (clus.parse_args, ["--n_seeds", "0"]), (clus.parse_args, ["--pca_fit_cells", "0"]),
    (fig.parse_args, ["--log_level", "chatty"]),
])
def test_other_scripts_refuse_out_of_range_options(parse, flags):
    with pytest.raises(SystemExit) as exc:
        parse(flags)
    assert exc.value.code == 2


def test_log_level_is_case_insensitive():
    assert main.parse_args(["--log_level", "warning"]).log_level == "WARNING"


def test_debug_logs_this_projects_records_and_only_warnings_of_other_libraries(capsys):
    import logging
    try:
        runtime.setup_logging("debug")
        logging.getLogger("scpretrain.kmeans").debug("our detail")
        logging.getLogger("numba.core.byteflow").debug("a compiler's internals")
        logging.getLogger("numba.core.byteflow").info("a compiler's news")
        logging.getLogger("h5py").warning("a library's warning")
        err = capsys.readouterr().err
    finally:
        runtime.setup_logging("INFO")
    assert "our detail" in err and "a library's warning" in err
    assert "internals" not in err and "news" not in err


def test_output_paths_are_checked_before_any_data_is_read(tmp_path, capsys):
    missing_data = str(tmp_path / "nowhere.h5")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(["--is_pretrain", "--kmeans", "--save_model", str(tmp_path)], "--save_model"),
             (["--is_pretrain", "--kmeans", "--save_model", str(blocker / "m.pt")], "--save_model"),
             (["--kmeans", "--save_result", str(tmp_path)], "--save_result")]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as exc:
            main.main(main.parse_args([*argv, "--datasets", missing_data]))
        err = capsys.readouterr().err
        assert exc.value.code == 1 and flag in err and "nowhere.h5" not in err


# --------------------------------------------------------------------------- datasets with one class


def test_one_class_dataset_is_left_out_of_the_sweep(setup, tmp_path, capsys):
    counts, _ = toy_counts(60, 30, 1, 5)
    one = write_cellblast_h5(tmp_path / "one.h5", counts, [f"GENE{i}" for i in range(30)], ["only"] * 60)
    frame = main.main(main.parse_args(["--kmeans", "--datasets", setup["datasets"][0], str(one), "--pretrained_model",
                                       str(setup["models"]["a"]), "--save_result", str(tmp_path / "r.csv"),
                                       "--ft_epoch", "3", "--hid", "8"]))
    assert set(frame["dataset"]) == {"alpha"} and np.isfinite(frame["accuracy"]).all()
    assert "one: one cell type only" in capsys.readouterr().err


# --------------------------------------------------------------------------- logs


def test_a_log_file_gets_log_lines_and_no_progress_bar_frames(setup, tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--is_pretrain", "--kmeans", "--datasets", *setup["datasets"],
                           "--save_model", str(tmp_path / "m.pt"), "--pt_epoch", "2", "--batch_num", "2",
                           "--avg_cluster_num", "20", "--hid", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "phase 1 epoch 2: loss" in proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr


def test_bad_data_exits_1_and_bad_command_line_exits_2(tmp_path):
    bad = subprocess.run([sys.executable, "main.py", "--kmeans", "--datasets", str(tmp_path / "missing.h5")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "missing.h5" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([sys.executable, "main.py", "--batch_num", "0"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert usage.returncode == 2 and "--batch_num" in usage.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_scripts_have_freed_arrays_returned_to_the_system(monkeypatch):
    assert runtime.return_freed_memory() is True  # mallopt accepted the threshold
    calls = []
    monkeypatch.setattr(runtime, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(main, "run", lambda args: "ran")
    assert main.main(main.parse_args(["--log_level", "WARNING"])) == "ran"
    assert calls == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_pretraining_reuses_freed_memory_once_k_means_is_done(collection, tmp_path, monkeypatch):
    assert runtime.reuse_freed_memory() is True  # mallopt accepted both thresholds
    runtime.return_freed_memory()  # back to the reading threshold for the rest of this process
    done, seen = [], []
    real_labels = pretrain.compute_pseudo_labels
    monkeypatch.setattr(pretrain, "compute_pseudo_labels",
                        lambda *a, **k: (lambda out: done.append("k-means") or out)(real_labels(*a, **k)))
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: seen.append(list(done)) or True)
    main.main(main.parse_args(["--is_pretrain", "--kmeans", "--datasets", *collection, "--save_model",
                               str(tmp_path / "p1.pt"), "--pt_epoch", "1", "--batch_num", "2", "--avg_cluster_num",
                               "20", "--hid", "8", "--log_level", "WARNING"]))
    assert seen == [["k-means"]]  # once, after K-means (which reads under the reading threshold), before the epochs


def test_a_steps_batch_lives_through_its_backward_and_is_freed_before_the_next_step(collection, tmp_path,
                                                                                     monkeypatch):
    """A step's CSR batch is read by its weight gradient, and by nothing after it: held into the
    next step it adds to the peak (a 30,000-cell step's batch is ~200 MB)."""
    import weakref

    import csr_kernels

    batches, checked = [], []
    real_prepare, real_times = pretrain.prepare_step, csr_kernels.transposed_times

    def alive():
        return [r for r in batches if r() is not None]

    def prepare(*a, **k):
        assert not alive(), "an earlier step's batch is still held"
        host = real_prepare(*a, **k)
        if host is not None:
            batches.append(weakref.ref(host.X))
        return host

    def times(*a, **k):  # the encoder's weight gradient, in the backward
        checked.append(len(alive()))
        return real_times(*a, **k)

    monkeypatch.setattr(pretrain, "prepare_step", prepare)
    monkeypatch.setattr(csr_kernels, "transposed_times", times)
    main.main(main.parse_args(["--is_pretrain", "--kmeans", "--datasets", *collection, "--save_model",
                               str(tmp_path / "p1.pt"), "--pt_epoch", "2", "--batch_num", "3", "--avg_cluster_num",
                               "20", "--hid", "8", "--log_level", "WARNING"]))
    assert len(batches) == 6 and checked == [1] * 6  # every backward ran with its own batch alone alive
