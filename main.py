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

import common
import finetune
import pretrain
import results

log = logging.getLogger("scpretrain")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--is_pretrain", action="store_true", help="pre-train (default: run the fine-tuning sweep)")
    parser.add_argument("--kmeans", action="store_true",
                        help="K-means pseudo-label pre-training, the original's flag (the only pretext task; "
                             "accepted and implied)")
    parser.add_argument("--pretrained_model", default=None,
                        help="encoder checkpoint: phase 2 starts from it, the sweep fine-tunes it "
                             f"(sweep default: {common.DEFAULT_MODEL} if it exists)")
    parser.add_argument("--save_model", default=str(common.DEFAULT_MODEL),
                        help="where pre-training writes its checkpoint (default: %(default)s)")
    common.add_common_args(parser)
    common.add_recipe_args(parser)
    pretrain.add_pretrain_args(parser)
    finetune.add_finetune_args(parser)
    args = common.resolve_recipe(parser.parse_args(argv))
    common.check_split_fractions(parser, args)
    if args.pca_pt:
        parser.error("--pca_pt (pre-training on per-dataset PCA inputs) is not available in this version: "
                     "each dataset's own PCA basis would feed one shared encoder, and the checkpoint could "
                     "not be matched to new datasets gene by gene. Pre-train on genes; --pca_ft fine-tunes "
                     "on PCA inputs.")
    return args


def run(args) -> object:
    if args.is_pretrain:
        common.check_output_file(args.save_model, "--save_model")
    else:  # a result file that is not ours is refused now, before any data is read
        results.read_results(common.check_output_file(args.save_result, "--save_result"), finetune.RESULT_COLUMNS)
    device = common.resolve_device(args)
    if args.is_pretrain:
        distributed = pretrain.init_distributed(device)
        rank, _ = pretrain.dist_info()
        if rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        log.info("pre-training phase %d on %s%s", 2 if args.pretrain_output else 1, device,
                 " (distributed)" if distributed else "")
        completed = False
        try:
            final = pretrain.run_pretraining(args, common.load_datasets(args), device)
            completed = True
            return final
        finally:
            pretrain.finish_distributed(completed)
    if args.pretrained_model is None and common.DEFAULT_MODEL.exists():
        args.pretrained_model = str(common.DEFAULT_MODEL)
    log.info("fine-tuning sweep on %s, pretrained model: %s", device, args.pretrained_model)
    return finetune.run_sweep(args, device)


def main(args) -> object:
    return common.run_script(run, args)


if __name__ == "__main__":
    main(parse_args())
    pretrain.exit_worker_now()
