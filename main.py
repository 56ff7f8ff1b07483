"""scPretrain: K-means multi-task pre-training (``--is_pretrain``) and the fine-tuning sweep.

    python main.py --is_pretrain --kmeans                                   # phase 1
    python main.py --is_pretrain --kmeans --pretrain_output \\
        --pretrained_model models/pretrained.pt --save_model models/pretrained_phase2.pt
    python main.py --kmeans --pretrained_model models/pretrained_phase2.pt  # fine-tuning sweep
    torchrun --nproc_per_node 2 main.py --is_pretrain --kmeans              # several processes
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import checkpoints
import cli
import data
import files
import finetune
import pretrain
import results
import runtime
import shards
from settings import PretrainSettings, SweepSettings

log = logging.getLogger("scpretrain")


def build_parser() -> argparse.ArgumentParser:
    """The command line (its --help states every default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--is_pretrain", action="store_true", help="pre-train (default: run the fine-tuning sweep)")
    parser.add_argument("--kmeans", action="store_true",
                        help="K-means pseudo-label pre-training, the original's flag (the only pretext task; "
                             "accepted and implied)")
    parser.add_argument("--pretrained_model", default=None,
                        help="encoder checkpoint: phase 2 starts from it, the sweep fine-tunes it "
                             f"(sweep default: {cli.DEFAULT_MODEL} if it exists)")
    parser.add_argument("--save_model", default=str(cli.DEFAULT_MODEL),
                        help="where pre-training writes its checkpoint (default: %(default)s)")
    cli.add_common_args(parser)
    cli.add_recipe_args(parser)
    cli.add_feeding_arg(parser)
    cli.add_pretrain_args(parser)
    cli.add_finetune_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = cli.resolve_recipe(parser.parse_args(argv))
    cli.check_split_fractions(parser, args)
    cli.check_derived_seeds(parser, args.seed * 1000 + args.fold1 * args.fold2 + 3)
    if args.pca_pt:
        parser.error("--pca_pt (pre-training on per-dataset PCA inputs) is not available in this version: "
                     "each dataset's own PCA basis would feed one shared encoder, and the checkpoint could "
                     "not be matched to new datasets gene by gene. Pre-train on genes; --pca_ft fine-tunes "
                     "on PCA inputs.")
    if args.pretrained_model is None and not args.is_pretrain and cli.DEFAULT_MODEL.exists():
        args.pretrained_model = str(cli.DEFAULT_MODEL)  # the sweep's default, resolved with the command line
    return args


def input_files(args) -> dict:
    """Every file the run reads, by flag: outputs are checked against them before any work."""
    read = cli.read_settings(args)
    found = {"--datasets": data.dataset_files(args.datasets, read), "--pretrained_model": args.pretrained_model}
    if not args.is_pretrain:
        found.update({"--np_input": args.np_input, "--ann_input": args.ann_input})
    return found


def run_pretraining(args) -> dict:
    save_path = files.check_output_file(args.save_model, "--save_model")
    files.refuse_clashes({"--save_model": save_path,
                          "--save_model (its epoch checkpoint)": pretrain.resume_path_for(save_path)},
                         input_files(args))
    device = runtime.resolve_device(cli.device_wanted(args))
    distributed = shards.init_distributed(device)
    rank, _ = shards.dist_info()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    settings = PretrainSettings.from_args(args)
    log.info("pre-training phase %d on %s%s", settings.phase, device, " (distributed)" if distributed else "")
    completed = False
    try:
        read = cli.read_settings(args)
        final = pretrain.run_pretraining(data.dataset_entries(args.datasets, read), settings, save_path, device,
                                         read, args.pretrained_model, args.resume, cli.args_dict(args))
        completed = True
        return final
    finally:
        shards.finish_distributed(completed)


def run_sweep(args):
    out = files.check_output_file(args.save_result, "--save_result")
    files.refuse_clashes({"--save_result": out, "--save_result (its sidecar)": results.sidecar_path(out)},
                         input_files(args))
    results.read_results(out, finetune.RESULT_COLUMNS)  # a file that is not ours is refused before any work
    device = runtime.resolve_device(cli.device_wanted(args))
    pretrained = (checkpoints.load_encoder(args.pretrained_model, cli.PRETRAIN_HINT) if args.pretrained_model
                  else None)
    log.info("fine-tuning sweep on %s, pretrained model: %s", device, args.pretrained_model)
    read = cli.read_settings(args)
    datasets = finetune.finetune_datasets(args.datasets, read, args.np_input or args.ann_input)
    return finetune.run_sweep(datasets, pretrained, cli.classifier_settings(args), cli.split_settings(args), SweepSettings.from_args(args), read,
                              out, device, cli.args_dict(args), args.jobs, args.threads, args.log_level,
                              args.allow_feature_mismatch)


def run(args):
    return run_pretraining(args) if args.is_pretrain else run_sweep(args)


def main(args) -> object:
    runtime.set_up_process(args.log_level, args.seed)  # logging, seeds, float mode, allocator
    return cli.exit_on_error(run, args, ", pre-training with --resume" if args.is_pretrain else "")


if __name__ == "__main__":
    main(parse_args())
    shards.exit_worker_now()
