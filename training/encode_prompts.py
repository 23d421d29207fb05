"""The text-embedding cache of a training data folder, made with FLUX's text encoders.

    python -m training.encode_prompts --data DATA --text-encoders FLUX.1-dev

Each manifest.jsonl row's embedding file is its `text_embedding`, or text/<sha256 of the prompt>.safetensors
when the row has none (the field is then filled in). Files that exist are kept, so the same prompt is
encoded once and a second run only encodes new prompts. The manifest is replaced in one step; rows
that needed no change keep their text and order. Rows without a prompt are left as they are and
listed (the trainer's data check names them again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from umo_core.backbones.flux1.text_embedding import embedding_file_tensors
from umo_core.backbones.flux1.text_encoders import encode_prompts, load_text_encoders
from umo_core.errors import UMOError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.encode_prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl (see README)")
    parser.add_argument("--text-encoders", type=Path, required=True,
                        help="diffusers FLUX folder with text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts encoded together")
    return parser.parse_args(argv)


def cache_path(prompt: str) -> str:
    """The embedding file of a prompt, relative to the data folder."""
    return f"text/{hashlib.sha256(prompt.encode()).hexdigest()}.safetensors"


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # An interrupted run must not leave a partial file that the next run would take as done.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary)
    os.replace(temporary, path)


def encode_data_folder(data: Path, text_encoders: Path, device: str, dtype: torch.dtype,
                       batch_size: int) -> None:
    """Write the missing embedding files of `data` and fill in the rows' `text_embedding` (see above)."""
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        raise UMOError(f"data folder '{data}' has no manifest.jsonl (one JSON object per line, see README)")
    if batch_size < 1:
        raise UMOError("--batch-size must be at least 1")
    lines = manifest.read_text().splitlines()
    to_encode: dict[str, str] = {}  # embedding file -> prompt
    filled = 0
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            print(f"note: manifest.jsonl row {index + 1}: not valid JSON ({error.msg}); left as it is",
                  file=sys.stderr)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            print(f"note: manifest.jsonl row {index + 1}: no 'prompt' text; left as it is", file=sys.stderr)
            continue
        if "text_embedding" not in row:
            row["text_embedding"] = cache_path(row["prompt"])
            lines[index] = json.dumps(row, ensure_ascii=False)
            filled += 1
        if not (data / row["text_embedding"]).is_file():
            to_encode[row["text_embedding"]] = row["prompt"]

    if to_encode:
        encoders = load_text_encoders(text_encoders, dtype, device)
        pending = list(to_encode.items())
        for start in tqdm(range(0, len(pending), batch_size), desc="encoding prompts", unit="batch"):
            chunk = pending[start:start + batch_size]
            text = encode_prompts(encoders, [prompt for _, prompt in chunk])
            for i, (path, _) in enumerate(chunk):
                _write_atomically(data / path, embedding_file_tensors(text, i))
    if filled:
        temporary = manifest.with_name(manifest.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in lines))
        os.replace(temporary, manifest)
    print(f"{len(to_encode)} prompt(s) encoded, {filled} row(s) given a text_embedding, in '{data}'")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        encode_data_folder(args.data, args.text_encoders, args.device, dtype, args.batch_size)
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
