"""Convert checkpoints between HF Llama (safetensors) and megatron-core TP x PP shards.

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR --tp 2 --pp 2 [--vpp 2]
    python tools/convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR

``hf-to-mcore`` writes ``mp_rank_TT[_PPP]/model.pt`` per rank (Megatron's naming; ``model``
or ``model0``, ``model1``... with virtual stages) and ``layout.json`` (sizes, head kind and
the ModelConfig). ``mcore-to-hf`` reads that back and writes ``config.json`` +
safetensors. Pure tensor resharding on CPU: no torch.distributed, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> megatron rank shards")
    to_mcore.add_argument("--hf", required=True, help="HF checkpoint directory")
    to_mcore.add_argument("--out", required=True, help="output directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    to_mcore.add_argument("--vpp", type=int, default=None, help="virtual stages per rank")
    to_mcore.add_argument(
        "--transformer-impl",
        default="local",
        choices=("local", "transformer_engine"),
        help="megatron layer spec whose parameter names to write",
    )
    to_hf = sub.add_parser("mcore-to-hf", help="megatron rank shards -> HF directory")
    to_hf.add_argument("--mcore", required=True, help="directory written by hf-to-mcore")
    to_hf.add_argument("--out", required=True, help="output HF directory")
    to_hf.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split safetensors above this size"
    )
    return parser


def hf_to_mcore(args: argparse.Namespace) -> None:
    """Read an HF checkpoint, reshard it for TP x PP (x VPP), write the rank files."""
    from hpc_rlhf.models import convert

    model_cfg, hf_state = convert.load_hf_checkpoint(
        args.hf, transformer_impl=args.transformer_impl
    )
    with open(os.path.join(args.hf, convert.CONFIG_NAME)) as fh:
        token_fields = convert.hf_token_fields(json.load(fh))
    shards = convert.hf_to_megatron(hf_state, model_cfg, args.tp, args.pp, args.vpp)
    convert.save_mcore_checkpoint(
        args.out, shards, model_cfg, args.tp, args.pp, args.vpp, hf_extra=token_fields
    )
    print(
        f"wrote {len(shards)} rank file(s) (tp={args.tp} pp={args.pp} vpp={args.vpp}) to {args.out}"
    )


def mcore_to_hf(args: argparse.Namespace) -> None:
    """Read megatron rank files written by ``hf-to-mcore`` and write an HF checkpoint."""
    from hpc_rlhf.models import convert

    model_cfg, shards, meta = convert.load_mcore_checkpoint(args.mcore)
    hf_state = convert.megatron_to_hf(
        shards, model_cfg, meta["tp"], meta["pp"], meta["vpp"], meta.get("head")
    )
    max_bytes = int(args.max_shard_gb * 1024**3)
    convert.save_hf_checkpoint(
        args.out, model_cfg, hf_state, max_shard_bytes=max_bytes, extra_config=meta.get("hf_extra")
    )
    print(f"wrote HF checkpoint ({len(hf_state)} tensors) to {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 with a message on bad input)."""
    args = _parser().parse_args(argv)
    from hpc_rlhf.config import ConfigError
    from hpc_rlhf.models.convert import ConversionError

    try:
        if args.command == "hf-to-mcore":
            hf_to_mcore(args)
        else:
            mcore_to_hf(args)
    except (ConversionError, ConfigError, FileNotFoundError) as err:
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
