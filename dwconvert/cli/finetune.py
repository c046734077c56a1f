"""``dwconvert finetune``: win back accuracy by distillation from the original model.

Also the fine-tuning options of ``dwconvert compress --finetune SPEC``. Under
``torchrun --nproc_per_node N`` every process runs the same command; only rank 0
writes files and prints.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import fields

import torch
from tabulate import tabulate
from torch import nn

from ..checkpoint import CheckpointError, load, read_recipe
from ..costs import measure
from ..data import DATA_SPECS_HELP, DataSpecError, load_dataset, select_images
from ..finetune import finetune
from ..resume import resume_path
from ..progress import progress_enabled
from ..training import OPTIMIZERS, FinetuneConfig, FinetuneResult
from ..report import format_count
from .common import (
    EXIT_USAGE,
    CLIError,
    add_arch_options,
    check_output_path,
    load_original,
    non_negative_int,
    number_parser,
    parse_batch_size,
    parse_floats,
    parse_seed,
    positive_int,
)

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  dwconvert finetune small.safetensors --teacher model.pth --data mnist5k --limit 4000 \\
      --val-offset 4000 --epochs 1 --lr 0.01 -o small-ft.safetensors
  torchrun --nproc_per_node 2 -m dwconvert finetune small.safetensors --teacher model.pth \\
      --data fashion-mnist:/usr/share/datasets/fashion-mnist --mean 0.286 --std 0.353 \\
      --epochs 2 -o small-ft.safetensors
"""

# Specs whose split option is ignored: training and held-out images come from one set.
SINGLE_SPLIT_SPECS = ("mnist5k", "imagefolder")

# CLI option -> FinetuneConfig field, for the options that map one to one.
_CONFIG_OPTIONS = {f.name for f in fields(FinetuneConfig)} - {"amp"}


finite_float = number_parser(float, math.isfinite, "{text} should be a finite number")
_norm = number_parser(float, lambda v: v >= 0, "{text} should be a norm >= 0 (0: no clipping)")


def _clip_norm(text: str) -> float | None:
    return _norm(text) or None


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Held-out data, the recipe, and where it runs: shared by finetune and compress."""
    held_out = parser.add_argument_group("held-out data (evaluated after each epoch)")
    held_out.add_argument("--val-data", metavar="SPEC", default=None,
                          help="held-out images (default: the training spec's test split)")
    held_out.add_argument("--val-split", default="test", choices=("train", "test"),
                          help="split of --val-data, where it has splits (default: test)")
    held_out.add_argument("--val-limit", type=positive_int, default=None, metavar="N",
                          help="evaluate N held-out images only")
    held_out.add_argument("--val-offset", type=non_negative_int, default=0, metavar="N",
                          help="skip the first N held-out images (e.g. the training ones of a "
                               "one-split spec like mnist5k)")

    d = FinetuneConfig()
    recipe = parser.add_argument_group("fine-tuning recipe")
    recipe.add_argument("--epochs", type=positive_int, default=d.epochs,
                        help=f"passes over the training data (default {d.epochs})")
    recipe.add_argument("--batch-size", type=parse_batch_size, default=d.batch_size,
                        help=f"images per step and process (default {d.batch_size})")
    recipe.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                        help=f"default {d.optimizer}")
    recipe.add_argument("--lr", type=finite_float, default=None,
                        help="peak learning rate (default 1e-3 for adamw, 0.01 for sgd)")
    recipe.add_argument("--momentum", type=finite_float, default=d.momentum,
                        help=f"sgd momentum, Nesterov (default {d.momentum})")
    recipe.add_argument("--weight-decay", type=finite_float, default=d.weight_decay,
                        help=f"default {d.weight_decay}")
    recipe.add_argument("--warmup", type=finite_float, default=d.warmup,
                        help="fraction of the steps with a linear warm-up, then cosine decay "
                             f"(default {d.warmup})")
    recipe.add_argument("--temperature", type=finite_float, default=d.temperature,
                        help=f"distillation temperature (default {d.temperature})")
    recipe.add_argument("--kd-weight", type=finite_float, default=d.kd_weight,
                        help=f"weight of matching the teacher's logits (default {d.kd_weight})")
    recipe.add_argument("--ce-weight", type=finite_float, default=d.ce_weight,
                        help=f"weight of cross-entropy on labels (default {d.ce_weight})")
    recipe.add_argument("--feature-weight", type=finite_float, default=d.feature_weight,
                        help="weight of matching each converted layer's output to the "
                             f"original conv's (default {d.feature_weight}: off)")
    recipe.add_argument("--freeze-bn", action="store_true",
                        help="keep BatchNorm running statistics fixed")
    recipe.add_argument("--clip-grad-norm", type=_clip_norm, default=d.clip_grad_norm,
                        help=f"largest gradient norm; 0 for no clipping "
                             f"(default {d.clip_grad_norm})")
    recipe.add_argument("--seed", type=parse_seed, default=d.seed, help=f"default {d.seed}")
    recipe.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                        metavar="STEPS", help="steps between writes of the resume file "
                                              f"(default {d.checkpoint_every})")
    recipe.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    recipe.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on with CUDA, off on CPU)")
    recipe.add_argument("--resume", action="store_true",
                        help="continue the interrupted run of OUTPUT from its resume file")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a converted checkpoint by distillation from the original",
        description="Train a converted model to match the original (the teacher): "
                    "temperature-scaled KL on the teacher's logits, plus cross-entropy where "
                    "the data has labels. Evaluates on held-out images after each epoch, keeps "
                    "the best epoch in OUTPUT and can resume an interrupted run. Runs under "
                    "torchrun for several processes. " + DATA_SPECS_HELP,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("converted", metavar="CONVERTED", help="a dwconvert checkpoint")
    parser.add_argument("--teacher", required=True, metavar="ORIGINAL",
                        help="the original checkpoint (state_dict; its arch comes from the "
                             "converted recipe unless --arch is given)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="fine-tuned checkpoint to write (.safetensors)")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="training images, e.g. mnist5k or fashion-mnist:DIR")
    parser.add_argument("--split", default="train", choices=("train", "test"),
                        help="split of --data, where it has splits (default: train)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="train on N images only")
    parser.add_argument("--offset", type=non_negative_int, default=0, metavar="N",
                        help="skip the first N training images")
    parser.add_argument("--mean", type=parse_floats, default=None,
                        help="input normalisation mean per channel, e.g. 0.1307")
    parser.add_argument("--std", type=parse_floats, default=None,
                        help="input normalisation std per channel, e.g. 0.3081")
    add_arch_options(parser, required=False)
    add_training_options(parser)
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> FinetuneConfig:
    values = {name: getattr(args, name) for name in _CONFIG_OPTIONS if hasattr(args, name)}
    try:
        return FinetuneConfig(amp=args.amp, **values)
    except ValueError as err:
        raise CLIError(str(err), EXIT_USAGE) from None


def datasets_from(args: argparse.Namespace, spec: str, split: str, limit, offset):
    """(training set, held-out set) from the data options."""
    val_spec = args.val_data or spec
    try:
        train = select_images(load_dataset(spec, split=split, mean=args.mean, std=args.std),
                       limit, offset, spec)
        held_out = select_images(load_dataset(val_spec, split=args.val_split, mean=args.mean,
                                       std=args.std), args.val_limit, args.val_offset, val_spec)
    except DataSpecError as err:
        raise CLIError(str(err)) from None
    same_split = args.val_split == split or spec.partition(":")[0] in SINGLE_SPLIT_SPECS
    if val_spec == spec and same_split and _overlap(offset, limit, args.val_offset,
                                                    args.val_limit):
        raise CLIError(f"the held-out images overlap the training images of {spec!r}: "
                       "give --val-data, or --limit and --val-offset so that they do not "
                       "(e.g. --limit 4000 --val-offset 4000 for mnist5k)", EXIT_USAGE)
    return train, held_out


def _overlap(offset: int, limit: int | None, val_offset: int, val_limit: int | None) -> bool:
    stop = math.inf if limit is None else offset + limit
    val_stop = math.inf if val_limit is None else val_offset + val_limit
    return max(offset, val_offset) < min(stop, val_stop)


def run_finetune(student: nn.Module, teacher: nn.Module, args: argparse.Namespace, train,
                 held_out, output, arch: str | None, arch_kwargs,
                 extra: dict | None = None) -> FinetuneResult:
    """Fine-tunes, mapping the library's errors to CLI errors."""
    config = config_from(args)
    try:
        return finetune(student, teacher, train, val_data=held_out, config=config,
                        output=output, arch=arch, arch_kwargs=arch_kwargs, extra=extra,
                        resume=args.resume, overwrite=args.force, device=args.device,
                        progress=is_main_process() and progress_enabled())
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err), EXIT_USAGE) from None


def check_resume_file(output, args: argparse.Namespace) -> None:
    """Refuse to start afresh over the resume file of an interrupted run, unless --force,
    and to resume a run that left no resume file; before any work is done."""
    state = resume_path(output)
    if state.exists() and not args.resume and not args.force:
        raise CLIError(f"{str(state)!r} holds an interrupted run of {str(output)!r}: pass "
                       "--resume to continue it, or --force to start again", EXIT_USAGE)
    if args.resume and not state.is_file():
        raise CLIError(f"--resume: no resume file {str(state)!r}; the run never started, or "
                       "it completed; start again without --resume", EXIT_USAGE)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print_outcome(result: FinetuneResult, original: nn.Module, converted_cost,
                  example: torch.Tensor, held_out_count: int) -> None:
    """Per-epoch records and the three-way table: original, converted, fine-tuned."""
    epochs = [[r.epoch, f"{r.train_loss:.4f}", _percent(r.val_top1),
               _percent(r.val_agreement), f"{r.seconds:.1f}", f"{r.images_per_second:.0f}"]
              for r in result.history]
    print(tabulate(epochs, headers=["epoch", "train loss", "held-out top-1", "agreement",
                                    "seconds", "images/s"], disable_numparse=True))
    print()
    original_cost = cost_of(original, example)
    tuned_cost = cost_of(result.model, example)
    best = result.best
    rows = [
        ["original", _percent(result.teacher_top1), "-",
         format_count(original_cost.params), format_count(original_cost.macs)],
        ["converted", _percent(result.start_top1), _percent(result.start_agreement),
         format_count(converted_cost.params), format_count(converted_cost.macs)],
        [f"fine-tuned (epoch {result.best_epoch})", _percent(best.val_top1 if best else None),
         _percent(best.val_agreement if best else None), format_count(tuned_cost.params),
         format_count(tuned_cost.macs)],
    ]
    print(tabulate(rows, headers=["model", "top-1", "agreement", "params", "MACs"],
                   disable_numparse=True))
    print()
    processes = f" on {result.world_size} processes" if result.world_size > 1 else ""
    span = f"{len(result.history)} epoch" + ("s" if len(result.history) != 1 else "")
    print(f"{held_out_count} held-out images; {span}{processes}")


def cost_of(model: nn.Module, example: torch.Tensor):
    """MACs and parameters at ``example``, on whatever device the model is."""
    device = next((p.device for p in model.parameters()), example.device)
    return measure(model, (example.to(device),))


def first_image(dataset) -> torch.Tensor:
    """The first image of a data set as a batch of one, for counting MACs."""
    item = dataset[0]
    image = item[0] if isinstance(item, (tuple, list)) else item
    return image.unsqueeze(0)


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def run(args: argparse.Namespace) -> int:
    if not is_main_process():
        logging.getLogger().setLevel(logging.ERROR)
    check_resume_file(args.output, args)  # first: its message names --resume
    output = check_output_path(args.output, [args.converted, args.teacher],
                               args.force or args.resume)
    try:
        meta = read_recipe(args.converted)
        student = load(args.converted, arch=args.arch, arch_kwargs=args.arch_kwargs)
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    arch = args.arch or meta["arch"]
    arch_kwargs = args.arch_kwargs if args.arch_kwargs is not None else meta["arch_kwargs"]
    teacher = load_original(args.teacher, arch, arch_kwargs, args.allow_pickle)
    train, held_out = datasets_from(args, args.data, args.split, args.limit, args.offset)
    example = first_image(held_out)
    converted_cost = cost_of(student, example)
    result = run_finetune(student, teacher, args, train, held_out, output, arch, arch_kwargs)
    if is_main_process():
        print_outcome(result, teacher, converted_cost, example, len(held_out))
        print(f"wrote {output}")
    return 0
