"""The text-embedding cache of a training data folder, made with the backbone's text encoders.

    python -m training.encode_prompts --data DATA --text-encoders FLUX.1-dev
    python -m training.encode_prompts --backbone flux2 --data DATA --text-encoders FLUX.2-klein-base-4B
    python -m training.encode_prompts --backbone flux2 --data DATA --text-encoders FLUX.2-dev

Each manifest.jsonl row's embedding file is its `text_embedding`, or text/<sha256 of the prompt>.safetensors
when the row has none (the field is then filled in). Files that exist are kept, so the same prompt is
encoded once and a second run only encodes new prompts; FLUX.2 [klein] files made before they held the empty
prompt's embedding (negative_prompt_embeds, for klein base's classifier-free guidance) are encoded again. The
manifest is replaced in one step; rows that needed no change keep their text and order. Every row is checked
before the encoders load: a row that is not a JSON object, has no prompt text or names an embedding file outside
the folder stops the run with nothing written (the trainer would refuse such a row).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from umo_core.backbones import DEFAULT, TRAINABLE, get
from umo_core.backbones.text_embedding import embedding_file_metadata, embedding_file_tensors, lacks_negative
from umo_core.console import HelpFormatter, command_status, progress
from umo_core.errors import UMOError
from umo_core.files import save_tensors

from .manifest import parse_row, prompt_of, read_lines, relative_path, row_label, row_line, text_embedding_path
from .manifest import write_lines as write_manifest

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EncodeSettings:
    data: Path
    text_encoders: Path
    device: str
    dtype: torch.dtype
    batch_size: int
    backbone: str = DEFAULT


def parse_args(argv: list[str] | None = None) -> EncodeSettings:
    parser = argparse.ArgumentParser(prog="python -m training.encode_prompts", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl (see README)")
    parser.add_argument("--backbone", choices=TRAINABLE, default=DEFAULT,
                        help="whose text encoders: flux1 (CLIP-L and T5) or flux2 ([klein]'s Qwen3 or [dev]'s "
                             "Mistral-3, read from the folder); the files record it")
    parser.add_argument("--text-encoders", type=Path, required=True,
                        help="the backbone's diffusers folder: FLUX.1 with text_encoder/, tokenizer/, text_encoder_2/, "
                             "tokenizer_2/; FLUX.2 [klein] or [dev] with text_encoder/, tokenizer/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the encoders run")
    parser.add_argument("--dtype", choices=DTYPES, help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts encoded together")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: give at least 1")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return EncodeSettings(args.data, args.text_encoders, args.device, dtype, args.batch_size, args.backbone)


@dataclass
class Plan:
    lines: list[str]  # the manifest's lines, with the rows given a text_embedding changed
    filled: int  # rows given a text_embedding
    to_encode: dict[str, str]  # embedding file (relative to the folder) -> its prompt


def plan_encoding(data: Path) -> Plan:
    """What a run does to `data`; every row is checked first, and a bad one is a UMOError listing every bad row."""
    lines = read_lines(data)
    plan, problems = Plan(lines, 0, {}), []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = parse_row(line)
            prompt = prompt_of(row)
            if "text_embedding" in row:
                path = relative_path(row["text_embedding"], "text embedding")
            else:
                path = row["text_embedding"] = text_embedding_path(prompt)
                lines[index] = row_line(row)
                plan.filled += 1
        except UMOError as problem:
            problems.append(f"{row_label(data, index + 1)}: {problem}")
            continue
        if not (data / path).is_file() or lacks_negative(data / path):
            plan.to_encode[path] = prompt
    if problems:
        listing = "\n  ".join(problems)
        raise UMOError(f"{len(problems)} row(s) of '{data}' cannot be encoded; fix or remove them (nothing was "
                       f"written):\n  {listing}")
    return plan


def encode_data_folder(settings: EncodeSettings) -> Plan:
    """Write the missing embedding files of the data folder and fill in the rows' `text_embedding` (see above)."""
    data = settings.data
    plan = plan_encoding(data)
    if plan.to_encode:
        backbone = get(settings.backbone)
        encoders = backbone.load_text_encoders(settings.text_encoders, settings.dtype, settings.device)
        pending = list(plan.to_encode.items())
        bar = progress(len(pending), "encoding prompts", "prompt")
        for start in range(0, len(pending), settings.batch_size):
            chunk = pending[start:start + settings.batch_size]
            text = backbone.encode_prompts(encoders, [prompt for _, prompt in chunk])
            for i, (path, _) in enumerate(chunk):
                # An interrupted run leaves no partial file that the next run would take as done.
                save_tensors(data / path, embedding_file_tensors(text, i),
                             embedding_file_metadata(backbone.name, text.made_with))
            bar.update(len(chunk))
        bar.close()
    if plan.filled:
        write_manifest(data, plan.lines)
    return plan


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)

    def work() -> int:
        plan = encode_data_folder(settings)
        print(f"{len(plan.to_encode)} prompt(s) encoded, {plan.filled} row(s) given a text_embedding, "
              f"in '{settings.data}'")
        return 0

    return command_status(work, f"the prompts encoded so far are kept in '{settings.data}'; run the same command "
                                "again to carry on")

if __name__ == "__main__":
    raise SystemExit(main())
