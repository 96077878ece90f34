"""A Safe-RLHF-style PPO iteration, written from its published design, for bench_ppo.py.

What it does, as Safe-RLHF's ``PPOTrainer`` does (transformers models, eager PyTorch), for
each rollout micro-batch of ``settings["rollout_batch"]`` prompts in turn (Safe-RLHF's
``split_rl_micro_batches``: 16 rows, its ``per_device_train_batch_size``):

1. **generate**: ``model.generate`` on the micro-batch's left-padded prompts (its KV cache,
   the LM head over every row every step, finished rows padded until the longest is done),
   sampling with HF's default top-k (50), which Safe-RLHF's generation config keeps;
2. **experience**: four separate forwards of the micro-batch under ``no_grad``: actor and
   reference (full ``[B, S, V]`` logits, ``log_softmax`` then ``gather``), reward model
   (end score at the last real token) and critic (per-token values);
3. **advantages**: KL-penalised rewards and GAE as a Python loop over time;
4. **update**: per training micro-batch (``settings["micro_batch"]``), an actor step then
   each critic's step (one optimizer step each), every one a full forward with full
   logits, ``log_softmax`` + ``gather``, clipped losses.

Safe-RLHF's shipped ``scripts/ppo.sh`` adds two settings: gradient checkpointing of the
actor and the critic(s) (``settings["gradient_checkpointing"]``, HF's
``gradient_checkpointing_enable``: one more forward per backward, far fewer saved
activations) and the ptx loss (``ptx_NS`` rows given): after each RL step, an actor step on
a micro-batch of pre-training rows (HF's LM loss over every position, times
``settings["ptx_coef"]``).

With a cost model and a cost critic, as Safe-RLHF's ``PPOLagTrainer`` (PPO-Lagrangian):
the experience stage runs two more full-batch forwards (the cost model's end score, the
cost critic's values); the KL penalty goes half to the reward and half, with the opposite
sign, to the cost; cost GAE (its own Python loop) beside the reward's; ``log lambda``
takes one SGD step on ``-(J_c - threshold) * lambda`` (``J_c`` the mean of a window of
episode costs) and the actor's advantage is ``(A_r - lambda * A_c) / (1 + lambda)``; the
cost critic is updated after the reward critic, the same way.

Response lengths are forced exactly like ours: a stop token at each row's drawn length.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ScoreModel(nn.Module):
    """Safe-RLHF's ``AutoModelForScore``: a Llama decoder and a per-token linear score head."""

    def __init__(self, llama_model: nn.Module, score_weight_1H: torch.Tensor):
        super().__init__()
        self.model = llama_model
        self.score_head = nn.Linear(
            score_weight_1H.shape[1], 1, bias=False, dtype=score_weight_1H.dtype
        )
        with torch.no_grad():
            self.score_head.weight.copy_(score_weight_1H)

    def forward(self, input_ids_BS, attention_mask_BS):
        hidden_BSH = self.model(
            input_ids=input_ids_BS, attention_mask=attention_mask_BS
        ).last_hidden_state
        return self.score_head(hidden_BSH).squeeze(-1)  # [B, S]


class MasterWeightAdamW:
    """AdamW over fp32 master copies of bf16 parameters, as DeepSpeed's bf16 optimizer that
    Safe-RLHF's ``--bf16`` runs: the bf16 gradients are cast to fp32, the update is made on
    the masters, and the weights are copied back in bf16."""

    def __init__(self, params, lr: float):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, master in zip(self.params, self.masters):
            master.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, master in zip(self.params, self.masters):
            p.copy_(master)


def make_optimizer(model: nn.Module, lr: float):
    """AdamW for an fp32 model; fp32 master weights for a bf16 one (mixed precision)."""
    if next(model.parameters()).dtype == torch.float32:
        return torch.optim.AdamW(model.parameters(), lr=lr)
    return MasterWeightAdamW(model.parameters(), lr)


class ForcedStop:
    """Logits processor: row ``b`` emits ``eos`` as its ``lengths[b]``-th token, never before."""

    def __init__(self, lengths: list[int], prompt_len: int, eos_id: int):
        self.lengths = torch.tensor(lengths)
        self.prompt_len = prompt_len
        self.eos_id = eos_id

    def __call__(self, input_ids_BS, scores_BV):
        produced = input_ids_BS.shape[1] - self.prompt_len
        force = self.lengths - 1 == produced
        scores_BV[~force, self.eos_id] = float("-inf")  # no early stop: exact lengths
        if bool(force.any()):
            scores_BV[force] = float("-inf")
            scores_BV[force, self.eos_id] = 0.0
        return scores_BV


def gather_logprobs(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """The peers' way: materialise the full log-softmax, then read one entry per token."""
    return torch.gather(F.log_softmax(logits_BSV, dim=-1), 2, labels_BS.unsqueeze(-1)).squeeze(-1)


def gae_python_loop(rewards_BS, values_BS, gamma: float, lam: float):
    """Safe-RLHF's ``get_advantages_and_returns``: a Python loop over time."""
    last = 0.0
    reversed_adv = []
    S = rewards_BS.shape[1]
    for t in reversed(range(S)):
        next_values = values_BS[:, t + 1] if t < S - 1 else 0.0
        delta = rewards_BS[:, t] + gamma * next_values - values_BS[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    adv_BS = torch.stack(reversed_adv[::-1], dim=1)
    return adv_BS, adv_BS + values_BS


class BaselinePPO:
    """The models and one PPO iteration of the baseline; PPO-Lagrangian when given a
    ``cost`` model and a ``cost_critic`` (``settings["lagrangian"]``: its multiplier)."""

    def __init__(
        self,
        actor,
        reference,
        reward,
        critic,
        settings: dict,
        cost=None,
        cost_critic=None,
        ptx_NS: torch.Tensor | None = None,
    ):
        self.actor, self.reference, self.reward, self.critic = actor, reference, reward, critic
        self.cost, self.cost_critic = cost, cost_critic
        self.s = settings
        self.ptx_NS = ptx_NS  # ppo.sh: pre-training rows, a micro-batch after each RL step
        self.ptx_used = 0
        self.actor_opt = make_optimizer(actor, settings["actor_lr"])
        # (critic, its optimizer, the experience keys of its values and returns), in order
        self.critics = [(critic, self._critic_opt(critic), "values", "ret")]
        self.constrained = cost is not None
        if self.constrained:
            lag = settings["lagrangian"]
            self.critics.append(
                (cost_critic, self._critic_opt(cost_critic), "cost_values", "cost_ret")
            )
            self.log_lambda = nn.Parameter(torch.tensor(math.log(lag["lambda_init"])))
            self.lambda_opt = torch.optim.SGD([self.log_lambda], lr=lag["lambda_lr"])
            self.episode_costs: deque[float] = deque(maxlen=lag["episode_cost_window_size"])
        if settings.get("gradient_checkpointing"):  # in effect in train mode (the update)
            for model in [actor] + [critic.model for critic, *_ in self.critics]:
                # Safe-RLHF calls gradient_checkpointing_enable: the same switch, renamed
                # (and the old name deprecated) in newer transformers
                enable = getattr(model, "activation_checkpointing_enable", None)
                (enable or model.gradient_checkpointing_enable)()

    def _critic_opt(self, critic):
        return make_optimizer(critic, self.s["critic_lr"])

    def generate(self, prompts: list[list[int]], lengths: list[int]):
        """Left-pad the prompts (as Safe-RLHF's prompt collator) and sample."""
        pad, eos = self.s["pad_id"], self.s["eos_id"]
        P = max(len(p) for p in prompts)
        ids_BP = torch.full((len(prompts), P), pad, dtype=torch.long)
        mask_BP = torch.zeros(len(prompts), P, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids_BP[b, P - len(p) :] = torch.tensor(p)
            mask_BP[b, P - len(p) :] = 1
        torch.manual_seed(self.s["seed"])
        out_BS = self.actor.generate(
            input_ids=ids_BP,
            attention_mask=mask_BP,
            do_sample=True,
            temperature=self.s["temperature"],
            top_k=self.s["top_k"],
            top_p=1.0,
            max_new_tokens=max(lengths),
            pad_token_id=pad,
            eos_token_id=eos,
            logits_processor=[ForcedStop(lengths, P, eos)],
        )
        return out_BS, P

    def experience(self, seq_BS, prompt_len: int):
        """Full-batch forwards: actor/reference log-probs, the reward's (and cost's) end
        score, the critic's (and cost critic's) values."""
        pad, eos = self.s["pad_id"], self.s["eos_id"]
        resp = seq_BS[:, prompt_len:]
        after_eos = (resp == eos).long().cumsum(1) - (resp == eos).long() > 0  # tokens past eos
        attn_BS = torch.cat([seq_BS[:, :prompt_len] != pad, ~after_eos], dim=1).long()
        labels_BS = seq_BS[:, 1:]
        exp = {"seq": seq_BS, "attn": attn_BS}
        scorers = [("score", self.reward)] + [("cost", self.cost)] * self.constrained
        with torch.no_grad():
            exp["logp"] = gather_logprobs(
                self.actor(seq_BS, attention_mask=attn_BS).logits[:, :-1], labels_BS
            )
            exp["ref_logp"] = gather_logprobs(
                self.reference(seq_BS, attention_mask=attn_BS).logits[:, :-1], labels_BS
            )
            last_B = attn_BS.shape[1] - 1 - attn_BS.flip(1).argmax(1)
            for key, scorer in scorers:
                exp[key] = scorer(seq_BS, attn_BS).gather(1, last_B[:, None]).squeeze(1)
            for critic, _, values_key, _ in self.critics:
                exp[values_key] = critic(seq_BS, attn_BS)[:, :-1]
        action_mask = attn_BS[:, 1:].clone()
        action_mask[:, : prompt_len - 1] = 0
        exp["mask"] = action_mask.float()
        return exp

    def advantages(self, exp: dict) -> dict:
        """KL-penalised rewards (score on the last response token) and Python-loop GAE;
        PPO-Lagrangian: half the KL penalty on the reward, half (opposite sign) on the
        cost, cost GAE, the multiplier's update and the combined advantage."""
        mask = exp["mask"]
        kl_penalty = -self.s["kl_coef"] * (exp["logp"] - exp["ref_logp"]) * mask
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        # (end score, KL share, the keys of its values, advantages and returns)
        signals = [("score", 1.0, "values", "adv", "ret")]
        if self.constrained:
            signals = [("score", 0.5, "values", "adv", "ret")]
            signals.append(("cost", -0.5, "cost_values", "cost_adv", "cost_ret"))
        for score_key, kl_share, values_key, adv_key, ret_key in signals:
            rewards = kl_share * kl_penalty
            rewards[torch.arange(mask.shape[0]), last] += exp[score_key]
            adv, ret = gae_python_loop(
                rewards * mask, exp[values_key] * mask, self.s["gamma"], self.s["lam"]
            )
            exp[adv_key], exp[ret_key] = adv * mask, ret
        if self.constrained:
            multiplier = self.update_multiplier(exp["cost"])
            exp["adv"] = (exp["adv"] - multiplier * exp["cost_adv"]) / (1 + multiplier)
        return exp

    def update_multiplier(self, cost_B: torch.Tensor) -> float:
        """One SGD step on ``log lambda`` from the window's mean episode cost; lambda."""
        lag = self.s["lagrangian"]
        self.episode_costs.extend(cost_B.tolist())
        episode_cost = torch.tensor(list(self.episode_costs)).mean()
        loss = -(episode_cost - lag["threshold"]) * self.log_lambda.exp()
        self.lambda_opt.zero_grad()
        loss.backward()
        self.lambda_opt.step()
        if lag.get("lambda_max") is not None:
            with torch.no_grad():
                self.log_lambda.clamp_(max=math.log(lag["lambda_max"]))
        return float(self.log_lambda.detach().exp())

    def update(self, exp: dict) -> None:
        """Per training micro-batch: the actor's step, each critic's (the cost critic
        last), then (ppo.sh) a ptx step; every step its own optimizer step."""
        n, mb = exp["seq"].shape[0], self.s["micro_batch"]
        trained = [self.actor] + [critic for critic, *_ in self.critics]
        for model in trained:
            model.train()
        for start in range(0, n, mb):
            b = {k: v[start : start + mb] for k, v in exp.items()}
            self._actor_step(b)
            for critic, opt, values_key, ret_key in self.critics:
                self._critic_step(b, critic, opt, b[values_key], b[ret_key])
            if self.ptx_NS is not None:
                self._ptx_step(b["seq"].shape[0])
        for model in trained:
            model.eval()

    def _ptx_step(self, rows: int) -> None:
        """Safe-RLHF's ``ptx_step``: the actor's LM loss on the next ``rows`` pre-training
        rows, scaled by ``ptx_coef``, and an optimizer step."""
        assert self.ptx_NS is not None
        start = self.ptx_used % self.ptx_NS.shape[0]
        self.ptx_used += rows
        ids_BS = self.ptx_NS[start : start + rows]
        loss = self.actor(input_ids=ids_BS, labels=ids_BS).loss
        self.actor_opt.zero_grad()
        (self.s["ptx_coef"] * loss).backward()
        self.actor_opt.step()

    def _actor_step(self, b: dict) -> None:
        logits = self.actor(b["seq"], attention_mask=b["attn"]).logits[:, :-1]
        logp = gather_logprobs(logits, b["seq"][:, 1:])
        ratio = torch.exp(logp - b["logp"])
        clip = self.s["clip"]
        loss = -torch.min(ratio * b["adv"], ratio.clamp(1 - clip, 1 + clip) * b["adv"])
        loss = (loss * b["mask"]).sum() / b["mask"].sum()
        self.actor_opt.zero_grad()
        loss.backward()
        self.actor_opt.step()

    def _critic_step(self, b: dict, critic, opt, old_values, returns) -> None:
        values = critic(b["seq"], b["attn"])[:, :-1]
        clip = self.s["clip"]
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        loss = (loss * b["mask"]).sum() / b["mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def iteration(self, prompts, lengths) -> dict[str, Any]:
        """One PPO iteration, a rollout micro-batch at a time; returns seconds per stage
        (summed over the micro-batches), the response token count and each micro-batch's
        padded shape."""
        times: dict[str, Any] = dict.fromkeys(("generate", "score", "advantages", "train"), 0.0)
        shapes, tokens = [], 0.0
        n = self.s["rollout_batch"]
        for start in range(0, len(prompts), n):
            t = time.perf_counter()
            seq_BS, P = self.generate(prompts[start : start + n], lengths[start : start + n])
            times["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            exp = self.experience(seq_BS, P)
            times["score"] += time.perf_counter() - t
            t = time.perf_counter()
            exp = self.advantages(exp)
            times["advantages"] += time.perf_counter() - t
            t = time.perf_counter()
            self.update(exp)
            times["train"] += time.perf_counter() - t
            tokens += float(exp["mask"].sum())
            shapes.append(tuple(seq_BS.shape))
        times["response_tokens"] = tokens
        times["padded_shapes"] = shapes
        return times
