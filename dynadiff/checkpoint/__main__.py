"""``python -m dynadiff.checkpoint {convert,inspect}``: see ``--help``."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from dynadiff.checkpoint.io import (CheckpointError, convert, read_metadata, read_state_dict, resolve_checkpoint,
                                   strip_wrapper_prefixes)
from dynadiff.checkpoint.zero import DEFAULT_TAG


def _inspect(path: Path, tag: str) -> None:
    path = resolve_checkpoint(path, tag)  # a folder holding model.safetensors: that file; a bad file: one line
    state = strip_wrapper_prefixes(read_state_dict(path, tag))
    groups: dict[str, list[str]] = {"brain module": [], "LoRA, image stack": [], "LoRA, text stack": [], "LoRA, other": [], "other": []}
    for key in state:
        if key.startswith("brain_modules."):
            groups["brain module"].append(key)
        elif ".lora_" in key:
            if re.search(r"\.transformers\.1\.", key):
                groups["LoRA, text stack"].append(key)
            elif re.search(r"\.transformers\.0\.", key):
                groups["LoRA, image stack"].append(key)
            else:
                groups["LoRA, other"].append(key)
        else:
            groups["other"].append(key)
    print(f"{path}: {len(state)} tensors")
    if path.suffix == ".safetensors":
        for k, v in read_metadata(path).items():
            print(f"  metadata {k} = {v[:200]}")
    for title, keys in groups.items():
        n = sum(state[k].numel() for k in keys)
        print(f"  {title}: {len(keys)} tensors, {n:,} values")
    for key in groups["brain module"]:
        print(f"    {key} {tuple(state[key].shape)} {state[key].dtype}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynadiff.checkpoint", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="DeepSpeed ZeRO checkpoint folder -> .safetensors (needs no DeepSpeed)")
    conv.add_argument("src", type=Path, help="DeepSpeed folder, e.g. checkpoints/subj01 (or its tag folder)")
    conv.add_argument("dst", type=Path, help="output .safetensors file")
    conv.add_argument("--tag", default=DEFAULT_TAG, help=f"DeepSpeed tag folder (default {DEFAULT_TAG!r})")
    conv.add_argument("--include-frozen", action="store_true", help="also write the frozen UNet/VAE weights")
    insp = sub.add_parser("inspect", help="list what a checkpoint holds")
    insp.add_argument("path", type=Path)
    insp.add_argument("--tag", default=DEFAULT_TAG)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "convert":
            if args.src.is_file():
                kind = "a .safetensors file already" if args.src.suffix == ".safetensors" else "a file"
                raise CheckpointError(
                    f"convert reads a DeepSpeed checkpoint folder (e.g. checkpoints/subj01); {args.src} is {kind}: "
                    f"`python -m dynadiff.checkpoint inspect {args.src}` lists what it holds, and eval.py "
                    "--checkpoint reads it as it is")
            counts = convert(args.src, args.dst, tag=args.tag, include_frozen=args.include_frozen)
            print(
                f"wrote {args.dst}: {counts['written']} tensors ({counts['trainable']} trained parameters, "
                f"{counts['buffers']} buffers, {counts['frozen_written']} frozen); "
                f"{counts['frozen_skipped']} frozen tensors left out"
            )
        else:
            _inspect(args.path, args.tag)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
