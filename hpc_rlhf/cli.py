"""``hpc-rlhf`` command line: ``hpc-rlhf <stage> --config FILE [dotted.key=value ...]``.

Run it under torchrun for several processes, e.g.
``torchrun --nproc_per_node=4 -m hpc_rlhf.cli pretrain --config examples/configs/tiny_cpu.yaml``.

A user error (a bad config value, a missing or corrupt file or checkpoint, a NaN loss) is
printed as one ``hpc-rlhf: error: ...`` line, by rank 0 when every rank raises it alike,
and the command exits with status 2 (``HPC_RLHF_TRACEBACK=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from hpc_rlhf.config import ConfigError, InputError, load_config


def _pretrain(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.trainer.pretrain import print_loss_table, run_pretrain

    cfg = load_config(args.config, args.overrides)
    history = run_pretrain(
        cfg, corpus=args.data, tokenizer_path=args.tokenizer, out_dir=args.out_dir
    )
    if dist.get_rank() == 0:
        print("\n" + print_loss_table(history))
        first, last = history[0][1], history[-1][1]
        print(
            f"\nloss {first:.4f} -> {last:.4f} over {len(history)} steps "
            f"({'falling' if last < first else 'NOT falling'})"
        )
    shutdown_distributed()
    return 0


def _ppo(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hpc_rlhf.config import PPORunConfig
    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.trainer.ppo_run import reward_table, run_ppo

    cfg = load_config(args.config, args.overrides, cls=PPORunConfig)
    history = run_ppo(cfg, out_dir=args.out_dir)
    if dist.get_rank() == 0 and history:
        print("\n" + reward_table(history))
        first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
        print(
            f"\nmean reward {first:.4f} -> {last:.4f} over {len(history)} PPO steps "
            f"({'rising' if last > first else 'NOT rising'})"
        )
    shutdown_distributed()
    return 0


def _sft(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hpc_rlhf.config import SFTRunConfig
    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.trainer.sft import run_sft

    cfg = load_config(args.config, args.overrides, cls=SFTRunConfig)
    history = run_sft(cfg, out_dir=args.out_dir)
    if dist.get_rank() == 0 and history:
        first, last = history[0]["loss"], history[-1]["loss"]
        print(
            f"\nSFT loss {first:.4f} -> {last:.4f} over {len(history)} steps "
            f"({'falling' if last < first else 'NOT falling'})"
        )
        if "eval_loss" in history[-1]:
            print(
                f"held-out loss {history[-1]['eval_loss']:.4f}, "
                f"perplexity {history[-1]['eval_ppl']:.2f}"
            )
    shutdown_distributed()
    return 0


def _rm(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hpc_rlhf.config import RMRunConfig
    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.trainer.rm import run_rm

    cfg = load_config(args.config, args.overrides, cls=RMRunConfig)
    history = run_rm(cfg, out_dir=args.out_dir)
    if dist.get_rank() == 0 and history:
        first, last = history[0]["loss"], history[-1]["loss"]
        print(
            f"\n{cfg.rm.objective}-model loss {first:.4f} -> {last:.4f} over {len(history)} steps"
        )
        m = history[-1]
        if "eval_accuracy" in m:
            kind = "cost" if "eval_better_cost" in m else "score"
            line = (
                f"held-out accuracy {m['eval_accuracy']:.3f} (better {kind} "
                f"{m[f'eval_better_{kind}']:.3f}, worse {kind} {m[f'eval_worse_{kind}']:.3f})"
            )
            if "eval_sign_accuracy" in m:
                line += f", safety-sign accuracy {m['eval_sign_accuracy']:.3f}"
            print(line)
    shutdown_distributed()
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hpc_rlhf.config import EvalRunConfig
    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.trainer.policy_eval import results_table, run_eval

    cfg = load_config(args.config, args.overrides, cls=EvalRunConfig)
    results = run_eval(cfg, out_dir=args.out_dir)
    if dist.get_rank() == 0:
        print("\n" + results_table(results))
        print(f"\nwritten to {args.out_dir}/eval.json")
    shutdown_distributed()
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hpc_rlhf.config import PipelineConfig
    from hpc_rlhf.parallel.launch import shutdown_distributed
    from hpc_rlhf.trainer.pipeline import run_pipeline, summary_table

    cfg = load_config(args.config, args.overrides, cls=PipelineConfig)
    summaries = run_pipeline(cfg)
    if dist.get_rank() == 0:
        print("\n" + summary_table(summaries))
        print(f"\npolicy: {cfg.export_dir('ppo')} (HF checkpoint)")
    shutdown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpc-rlhf", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    pre = sub.add_parser("pretrain", help="language-model training of the actor")
    pre.add_argument("--config", required=True, help="YAML config file")
    pre.add_argument("--data", default=None, help="text file (default: shipped tiny corpus)")
    pre.add_argument("--tokenizer", default=None, help="sentencepiece .model or tokenizer.json")
    pre.add_argument("--out-dir", default="outputs/pretrain", help="metrics JSONL/TensorBoard")
    pre.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pre.set_defaults(func=_pretrain)
    ppo = sub.add_parser("ppo", help="PPO (GRPO / RLOO) with the colocated generation engine")
    ppo.add_argument("--config", required=True, help="YAML config file")
    ppo.add_argument("--out-dir", default="outputs/ppo", help="metrics JSONL/TensorBoard")
    ppo.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    ppo.set_defaults(func=_ppo)
    sft = sub.add_parser("sft", help="supervised fine-tuning on conversations")
    sft.add_argument("--config", required=True, help="YAML config file")
    sft.add_argument("--out-dir", default="outputs/sft", help="metrics JSONL/TensorBoard")
    sft.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    sft.set_defaults(func=_sft)
    rm = sub.add_parser("rm", help="reward-model training on preference pairs / rankings")
    rm.add_argument("--config", required=True, help="YAML config file")
    rm.add_argument("--out-dir", default="outputs/rm", help="metrics JSONL/TensorBoard")
    rm.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    rm.set_defaults(func=_rm)
    ev = sub.add_parser("eval", help="generate with a policy (and a baseline), score, compare")
    ev.add_argument("--config", required=True, help="YAML config file")
    ev.add_argument("--out-dir", default="outputs/eval", help="where eval.json is written")
    ev.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    ev.set_defaults(func=_eval)
    pipe = sub.add_parser("pipeline", help="SFT -> reward model (-> cost model) -> PPO")
    pipe.add_argument("--config", required=True, help="YAML config file")
    pipe.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pipe.set_defaults(func=_pipeline)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        report = user_error_report(err, int(os.environ.get("RANK", "0")))
        if report:
            print(report, file=sys.stderr)
        if os.environ.get("HPC_RLHF_TRACEBACK"):
            raise
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input or run (config, data and model files, rule
    rewards, checkpoints, a non-finite loss or reward): one line, no traceback. Anything
    else is a bug: a traceback."""
    from hpc_rlhf.trainer.checkpoint_files import CheckpointError
    from hpc_rlhf.trainer.trainable_model import NonFiniteLossError

    return (InputError, CheckpointError, NonFiniteLossError, FileNotFoundError, PermissionError)


def _collective_errors() -> tuple[type[BaseException], ...]:
    """User errors every rank raises alike (same config; checkpoint loads and loss checks
    agree over the world), so rank 0 alone reports them."""
    from hpc_rlhf.trainer.checkpoint_files import CheckpointError
    from hpc_rlhf.trainer.trainable_model import NonFiniteLossError

    return (ConfigError, CheckpointError, NonFiniteLossError)


def user_error_report(err: BaseException, rank: int) -> str | None:
    """The line rank ``rank`` prints for a user error, or None when rank 0 reports it."""
    if rank == 0:
        return f"hpc-rlhf: error: {err}"
    if isinstance(err, _collective_errors()):
        return None
    return f"hpc-rlhf: error on rank {rank}: {err}"


if __name__ == "__main__":
    sys.exit(main())
