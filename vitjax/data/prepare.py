"""Prepares a TFDS dataset once, before any run reads it (ImageNet from its downloaded tars):

    python -m vitjax.data.prepare imagenet2012 --data_dir=/data/tfds --manual_dir=/data/imagenet

`manual_dir` holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar as downloaded from
image-net.org. This is TFDS's own `download_and_prepare` (the `tfds build` command line does the
same but imports apache_beam, which ImageNet does not need). Run it on one machine; every host
of a multi-host run then reads the prepared records from `data_dir` (e.g. a gs:// bucket).
"""

from __future__ import annotations

import argparse
import sys

from vitjax.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitjax.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", help="TFDS dataset name, e.g. imagenet2012")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir to write into")
    parser.add_argument("--manual_dir", default=None, help="folder with the downloaded archives")
    args = parser.parse_args(argv)
    from vitjax.data import sources

    try:
        builder = sources.prepare_tfds(
            args.name, data_dir=args.data_dir, manual_dir=args.manual_dir
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"prepared {args.name} in {builder.data_dir}: {splits} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
