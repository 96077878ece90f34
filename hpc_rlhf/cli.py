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


def _stage(args: argparse.Namespace) -> int:
    """Load the stage's config, run it, print its report on rank 0, shut down."""
    import torch.distributed as dist

    from hpc_rlhf.parallel.launch import shutdown_distributed

    cls, run, report = STAGES[args.stage]()
    cfg = load_config(args.config, args.overrides, cls=cls)
    result = run(cfg, args)
    if dist.get_rank() == 0 and result:
        print("\n" + report(cfg, result, args))
    shutdown_distributed()
    return 0


def _trend(name: str, first: float, last: float, steps: int, good: str, bad: str, up: bool):
    better = last > first if up else last < first
    return f"{name} {first:.4f} -> {last:.4f} over {steps} steps ({good if better else bad})"


def _pretrain_stage():
    from hpc_rlhf.config import Config
    from hpc_rlhf.trainer.pretrain import print_loss_table, run_pretrain

    def run(cfg, args):
        return run_pretrain(cfg, args.data, args.tokenizer, args.out_dir)

    def report(cfg, history, args):
        first, last = history[0][1], history[-1][1]
        trend = _trend("loss", first, last, len(history), "falling", "NOT falling", up=False)
        return print_loss_table(history) + "\n\n" + trend

    return Config, run, report


def _ppo_stage():
    from hpc_rlhf.config import PPORunConfig
    from hpc_rlhf.trainer.ppo_run import reward_table, run_ppo

    def report(cfg, history, args):
        first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
        trend = _trend("mean reward", first, last, len(history), "rising", "NOT rising", up=True)
        return reward_table(history) + "\n\n" + trend.replace(" steps", " PPO steps")

    return PPORunConfig, lambda cfg, args: run_ppo(cfg, args.out_dir), report


def _sft_stage():
    from hpc_rlhf.config import SFTRunConfig
    from hpc_rlhf.trainer.sft import run_sft

    def report(cfg, history, args):
        first, last, m = history[0]["loss"], history[-1]["loss"], history[-1]
        lines = [_trend("SFT loss", first, last, len(history), "falling", "NOT falling", False)]
        if "eval_loss" in m:
            lines.append(f"held-out loss {m['eval_loss']:.4f}, perplexity {m['eval_ppl']:.2f}")
        return "\n".join(lines)

    return SFTRunConfig, lambda cfg, args: run_sft(cfg, args.out_dir), report


def _rm_stage():
    from hpc_rlhf.config import RMRunConfig
    from hpc_rlhf.trainer.rm import run_rm

    def report(cfg, history, args):
        first, last, m = history[0]["loss"], history[-1]["loss"], history[-1]
        lines = [
            f"{cfg.rm.objective}-model loss {first:.4f} -> {last:.4f} over {len(history)} steps"
        ]
        if "eval_accuracy" in m:
            kind = "cost" if "eval_better_cost" in m else "score"
            line = (
                f"held-out accuracy {m['eval_accuracy']:.3f} (better {kind} "
                f"{m[f'eval_better_{kind}']:.3f}, worse {kind} {m[f'eval_worse_{kind}']:.3f})"
            )
            if "eval_sign_accuracy" in m:
                line += f", safety-sign accuracy {m['eval_sign_accuracy']:.3f}"
            lines.append(line)
        return "\n".join(lines)

    return RMRunConfig, lambda cfg, args: run_rm(cfg, args.out_dir), report


def _dpo_stage():
    from hpc_rlhf.config import DPORunConfig
    from hpc_rlhf.trainer.dpo import run_dpo

    def report(cfg, history, args):
        first, last, m = history[0]["loss"], history[-1]["loss"], history[-1]
        if cfg.dpo.online:  # fresh pairs each step: the judge's reward is the trend to read
            first, last = history[0]["reward_mean"], m["reward_mean"]
            return _trend("sampled reward", first, last, len(history), "rising", "NOT rising", True)
        name = f"{cfg.dpo.loss} loss"
        lines = [_trend(name, first, last, len(history), "falling", "NOT falling", False)]
        if "eval_rewards/accuracies" in m:
            lines.append(
                f"held-out implicit-reward accuracy {m['eval_rewards/accuracies']:.3f}, "
                f"margin {m['eval_rewards/margins']:.4f}"
            )
        elif "eval_rewards/chosen" in m:
            lines.append(f"held-out desirable reward {m['eval_rewards/chosen']:.4f}")
        return "\n".join(lines)

    return DPORunConfig, lambda cfg, args: run_dpo(cfg, args.out_dir), report


def _rejection_sampling_stage():
    from hpc_rlhf.config import RejectionSamplingRunConfig
    from hpc_rlhf.trainer.rejection_sampling import run_rejection_sampling

    def report(cfg, history, args):
        per_round = cfg.train.steps // cfg.rs.rounds
        rewards = [h["reward_mean"] for h in history[::per_round]]
        line = " -> ".join(f"{r:.4f}" for r in rewards)
        trend = "rising" if rewards[-1] > rewards[0] else "NOT rising"
        return f"policy's sampled reward by round: {line} ({trend})"

    def run(cfg, args):
        return run_rejection_sampling(cfg, args.out_dir)

    return RejectionSamplingRunConfig, run, report


def _eval_stage():
    from hpc_rlhf.config import EvalRunConfig
    from hpc_rlhf.trainer.policy_eval import results_table, run_eval

    def report(cfg, results, args):
        return results_table(results) + f"\n\nwritten to {args.out_dir}/eval.json"

    return EvalRunConfig, lambda cfg, args: run_eval(cfg, args.out_dir), report


def _pipeline_stage():
    from hpc_rlhf.config import PipelineConfig
    from hpc_rlhf.trainer.pipeline import run_pipeline, summary_table

    def report(cfg, summaries, args):
        return summary_table(summaries) + f"\n\npolicy: {cfg.export_dir('ppo')} (HF checkpoint)"

    return PipelineConfig, lambda cfg, args: run_pipeline(cfg), report


# command -> () -> (config class, run(cfg, args), report(cfg, result, args)); imported lazily
STAGES = {
    "pretrain": _pretrain_stage,
    "ppo": _ppo_stage,
    "sft": _sft_stage,
    "rm": _rm_stage,
    "dpo": _dpo_stage,
    "rejection-sampling": _rejection_sampling_stage,
    "eval": _eval_stage,
    "pipeline": _pipeline_stage,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpc-rlhf", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    commands = (
        ("pretrain", "language-model training of the actor", "outputs/pretrain"),
        ("ppo", "PPO (GRPO / RLOO) with the colocated generation engine", "outputs/ppo"),
        ("sft", "supervised fine-tuning on conversations", "outputs/sft"),
        ("rm", "reward- or cost-model training on preference pairs / rankings", "outputs/rm"),
        ("dpo", "DPO family (DPO, cDPO, IPO, SimPO, ORPO, KTO) on preferences", "outputs/dpo"),
        (
            "rejection-sampling",
            "sample with the policy, keep the best, fine-tune; repeated for rounds",
            "outputs/rejection_sampling",
        ),
        ("eval", "generate with a policy (and a baseline), score, compare", "outputs/eval"),
        ("pipeline", "SFT -> reward model (-> cost model) -> PPO", None),
    )
    for name, help_text, out_dir in commands:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", required=True, help="YAML config file")
        if out_dir is not None:
            command.add_argument("--out-dir", default=out_dir, help="metrics and results")
        if name == "pretrain":
            command.add_argument("--data", default=None, help="text file (default: tiny corpus)")
            command.add_argument("--tokenizer", default=None, help="sentencepiece / tokenizer.json")
        command.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        command.set_defaults(func=_stage)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        report = user_error_report(err, int(os.environ.get("RANK", "0")))
        if report:  # one write of the whole line: ranks share the pipe, and print()'s two
            # writes (text, then newline) let another rank's line land in between
            sys.stderr.write(report + "\n")
            sys.stderr.flush()
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
