"""Converts weights between timm / DeiT checkpoints (or AugReg / big_vision .npz) and vitjax's
own format.

  python -m vitjax.convert deit_base_patch16_224.pth deit_b.safetensors   # timm -> vitjax
  python -m vitjax.convert deit_b.safetensors deit_b_timm.safetensors     # vitjax -> timm
  python -m vitjax.convert deit_b.safetensors deit_b_timm.pth             # (needs torch)
  python -m vitjax.convert ViT-B_16.npz vit_b.safetensors               # AugReg / big_vision

The direction follows the input: a file written by vitjax (a .safetensors/.npz carrying
'vitjax_config' metadata, see vitjax/interop/native.py) becomes a timm state dict (.safetensors,
or .pth/.pt/.bin with torch); anything else (.pth/.pt/.bin, .safetensors, .npz timm state dict)
becomes a vitjax file (.safetensors or .npz) that also records the input normalisation the
weights expect (AugReg / big_vision: [-1, 1]; a timm state dict: ImageNet mean/std unless
--preprocessing says otherwise). Prints the architecture and parameter count. On bad input: one
line on stderr, exit status 2, and no output file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vitjax.interop import files
from vitjax.interop.checkpoints import PREPROCESSING, load_checkpoint
from vitjax.interop.native import (
    NATIVE_SUFFIXES,
    is_native,
    load_native,
    read_preprocessing,
    save_native,
)
from vitjax.interop.timm import CheckpointMismatchError, save_timm

_TIMM_OUT = (files.SAFETENSORS_SUFFIX, *files.TORCH_SUFFIXES)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitjax.convert",
        description="Convert ViT/DeiT weights between timm (PyTorch) and vitjax formats.",
    )
    parser.add_argument("input", help="timm checkpoint (.pth/.safetensors/.npz) or vitjax file")
    parser.add_argument("output", help="vitjax (.safetensors/.npz) or timm (.safetensors/.pth)")
    parser.add_argument("--variant", help="timm name such as deit_base_distilled_patch16_224")
    parser.add_argument("--num-heads", type=int, help="heads per block (not stored in checkpoints)")
    parser.add_argument("--image-size", type=int, help="resample position embeddings to this size")
    parser.add_argument("--num-classes", type=int, help="0 drops the head; other counts reset it")
    parser.add_argument("--non-strict", action="store_true", help="warn on missing/unknown keys")
    parser.add_argument("--preprocessing", choices=sorted(PREPROCESSING),
                        help="input normalisation a timm state dict expects (default: imagenet, "
                             "recorded as assumed); inception = pixels in [-1, 1]")
    return parser


def describe(config) -> str:
    return (
        f"{config.family}: embed_dim={config.embed_dim} depth={config.depth} "
        f"num_heads={config.num_heads} mlp_dim={config.mlp_dim} patch_size={config.patch_size} "
        f"image_size={config.image_size} "
        f"num_classes={config.num_classes} distilled={config.distilled}; "
        f"{config.num_params():,} parameters"
    )


def _check_suffix(path: str, allowed: Sequence[str], what: str) -> None:
    if Path(path).suffix.lower() not in allowed:
        raise ValueError(f"{what} must end in {' or '.join(allowed)}, got {path!r}")


def convert(args: argparse.Namespace) -> str:
    """Does the conversion; returns the lines to print."""
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise ValueError("input and output are the same file")
    if not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"the output's directory {Path(args.output).parent} does not exist; "
                         "create it first")
    if is_native(args.input):
        _check_suffix(args.output, _TIMM_OUT, "a timm output")
        config, params = load_native(args.input)
        stats = read_preprocessing(args.input)  # kept in a .safetensors header where known
        save_timm(config, params, args.output,
                  preprocessing=stats if stats and stats.get("known", True) else None)
        return f"vitjax -> timm: {describe(config)}\nwrote {args.output}"
    _check_suffix(args.output, NATIVE_SUFFIXES, "a vitjax output")
    overrides = {} if args.num_heads is None else {"num_heads": args.num_heads}
    loaded = load_checkpoint(
        args.input,
        variant=args.variant,
        strict=not args.non_strict,
        image_size=args.image_size,
        num_classes=args.num_classes,
        preprocessing=args.preprocessing,
        **overrides,
    )
    save_native(args.output, loaded.config, loaded.params, preprocessing=loaded.preprocessing)
    lines = [f"{loaded.source_format} -> vitjax: {describe(loaded.config)}",
             loaded.describe_preprocessing()]
    if args.num_heads is None and args.variant is None and loaded.source_format == "timm":
        lines.append(
            f"note: num_heads={loaded.config.num_heads} was assumed (checkpoints do not store it); "
            "pass --num-heads or --variant if that is wrong"
        )
    lines.append(f"wrote {args.output}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        print(convert(args))
    except CheckpointMismatchError as err:
        print(f"error: {err.details} (pass --non-strict to convert anyway)", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point (`vitjax-convert`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
