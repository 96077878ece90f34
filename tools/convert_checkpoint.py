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
import dataclasses
import json
import os
import sys

import torch

from hpc_rlhf.config import ConfigError, ModelConfig, config_from_dict
from hpc_rlhf.models.hf_config import hf_token_fields
from hpc_rlhf.models.hf_io import CONFIG_NAME, load_hf_checkpoint, save_hf_checkpoint
from hpc_rlhf.models.hf_names import ConversionError
from hpc_rlhf.models.param_layout import Layout, check_shards, detect_shards_head
from hpc_rlhf.models.reshard import hf_to_megatron, megatron_to_hf

# The rank-file format: only this tool writes and reads it (training checkpoints are
# trainer/checkpoint.py's).
LAYOUT_NAME = "layout.json"


def mcore_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's per-rank directory name: ``mp_rank_TT`` or ``mp_rank_TT_PPP`` with PP."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_mcore_checkpoint(
    path: str,
    shards: dict,
    model_cfg: ModelConfig,
    tp: int,
    pp: int,
    vpp: int | None = None,
    hf_extra: dict | None = None,
) -> None:
    """Write one ``model.pt`` per (pp, tp) rank (``model`` or ``model0..`` with vpp) plus
    ``layout.json`` (sizes, head, ModelConfig, and ``hf_extra`` HF config fields to restore
    on export)."""
    layout = Layout(model_cfg, tp, pp, vpp)
    head = detect_shards_head(shards)
    check_shards(shards, layout, head)
    for (p, t), chunks in shards.items():
        rank_dir = os.path.join(path, mcore_rank_dir(t, p, pp))
        os.makedirs(rank_dir, exist_ok=True)
        if vpp is None:
            payload = {"model": chunks[0]}
        else:
            payload = {f"model{c}": chunk for c, chunk in enumerate(chunks)}
        payload["checkpoint_version"] = 3.0
        torch.save(payload, os.path.join(rank_dir, "model.pt"))
    meta = {"format": "hpc_rlhf.mcore", "tp": tp, "pp": pp, "vpp": vpp, "head": head}
    meta["model_config"] = dataclasses.asdict(model_cfg)
    meta["hf_extra"] = hf_extra or {}
    with open(os.path.join(path, LAYOUT_NAME), "w") as fh:
        json.dump(meta, fh, indent=2)


def load_mcore_checkpoint(path: str) -> tuple[ModelConfig, dict, dict]:
    """Read a directory written by ``save_mcore_checkpoint``: (ModelConfig, shards, layout)."""
    layout_path = os.path.join(path, LAYOUT_NAME)
    if not os.path.exists(layout_path):
        raise FileNotFoundError(f"megatron checkpoint has no {LAYOUT_NAME}: {layout_path}")
    with open(layout_path) as fh:
        meta = json.load(fh)
    model_cfg = config_from_dict(meta["model_config"], ModelConfig)
    tp, pp, vpp = meta["tp"], meta["pp"], meta["vpp"]
    shards = {}
    for p, t in Layout(model_cfg, tp, pp, vpp).ranks():
        file_path = os.path.join(path, mcore_rank_dir(t, p, pp), "model.pt")
        if not os.path.exists(file_path):
            raise FileNotFoundError(f"megatron checkpoint shard not found: {file_path}")
        payload = _load_shard(file_path)
        if vpp is None:
            shards[(p, t)] = [payload["model"]]
        else:
            shards[(p, t)] = [payload[f"model{c}"] for c in range(vpp)]
    return model_cfg, shards, meta


def _load_shard(path: str) -> dict:
    """One rank's ``model.pt``, read with ``weights_only=True`` (tensors and plain containers
    only: a shard someone hands you cannot run code); failures name the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ConversionError(
            f"cannot read megatron checkpoint shard {path}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(payload, dict):
        raise ConversionError(f"megatron checkpoint shard {path} holds no dict")
    return payload


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
    model_cfg, hf_state = load_hf_checkpoint(args.hf, transformer_impl=args.transformer_impl)
    with open(os.path.join(args.hf, CONFIG_NAME)) as fh:
        token_fields = hf_token_fields(json.load(fh))
    shards = hf_to_megatron(hf_state, model_cfg, args.tp, args.pp, args.vpp)
    save_mcore_checkpoint(
        args.out, shards, model_cfg, args.tp, args.pp, args.vpp, hf_extra=token_fields
    )
    print(
        f"wrote {len(shards)} rank file(s) (tp={args.tp} pp={args.pp} vpp={args.vpp}) to {args.out}"
    )


def mcore_to_hf(args: argparse.Namespace) -> None:
    """Read megatron rank files written by ``hf-to-mcore`` and write an HF checkpoint."""
    model_cfg, shards, meta = load_mcore_checkpoint(args.mcore)
    hf_state = megatron_to_hf(
        shards, model_cfg, meta["tp"], meta["pp"], meta["vpp"], meta.get("head")
    )
    max_bytes = int(args.max_shard_gb * 1024**3)
    save_hf_checkpoint(
        args.out, model_cfg, hf_state, max_shard_bytes=max_bytes, extra_config=meta.get("hf_extra")
    )
    print(f"wrote HF checkpoint ({len(hf_state)} tensors) to {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 with a message on bad input)."""
    args = _parser().parse_args(argv)
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
