#!/usr/bin/env python3
"""The peer side of `aha bench gen|train`: the same workloads in PyTorch + transformers on the same GPU.

  gen:   HF generate (sdpa attention, bf16, sampling at T=1, no early stop): P prompts of L random
         tokens, N new tokens each, all in one batch. New tokens/s of the best of --repeats runs, after
         --warmup untimed runs of the same workload.
  train: one GRPO learner step on S sequences of L tokens (prompt + completion): policy forward +
         backward in bf16 autocast over fp32 master weights, frozen reference forward, full-vocabulary
         log-softmax at the sampled completion tokens (lm-head rows of the completion only, as TRL's
         logits_to_keep; --full-logits: every row), k3 KL, clipped ratio (eps 0.2 / 0.28), token-mean loss,
         grad clipping, AdamW. Eager and torch.compile. Tokens/s.

Prints one JSON line per measurement (the last lines), like aha bench.
"""
import argparse
import contextlib
import json
import statistics
import time

import torch
import transformers


def sync_time():
    torch.cuda.synchronize()
    return time.perf_counter()


def gen(args):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, V, (args.prompts, args.prompt_len), generator=g).cuda()
    mask = torch.ones_like(ids)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)
    # Warm-up: the timed workload itself. A first full-length generate ran 2.5-3.6x slower than the runs
    # after it with cuDNN attention (PyTorch's sdpa choice on the H200; presumably a plan for each of the
    # 512 key lengths), not with FlashAttention alone; it also grows the caching allocator (cudaMalloc
    # calls, counted below). docs/PERF.md, version 31.
    # aha's warm-up likewise allocates its pool and captures its decode graphs.
    backend = contextlib.nullcontext()
    if args.sdpa_backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.sdpa_backend])
    with torch.no_grad(), backend:
        runs, device_allocs = [], []
        for i in range(args.warmup + args.repeats):
            allocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
            t0 = sync_time()
            out = model.generate(ids, attention_mask=mask, **kw)
            t = sync_time() - t0
            device_allocs.append(torch.cuda.memory_stats().get("num_device_alloc", 0) - allocs)
            if i >= args.warmup:
                runs.append(t)
            else:
                warm = t
    best = min(runs)
    new = (out.shape[1] - args.prompt_len) * args.prompts
    print(json.dumps({"bench": "gen", "peer": f"transformers generate (sdpa: {args.sdpa_backend}, bf16)",
                      "seconds": best, "runs": runs,
                      "warmup_seconds": warm if args.warmup else None, "device_allocs_per_run": device_allocs,
                      "tokens_per_s": new / best, "prompts": args.prompts, "new_tokens": args.new_tokens}))


def grpo_step(policy, reference, opt, tokens, prompt_len, behaviour, advantages, beta, full_logits=False):
    # tokens [S, L]. As TRL's GRPOTrainer: logits only for the rows that predict completion tokens
    # (logits_to_keep), log-probs of tokens prompt_len..L-1. full_logits: every row's logits (log-probs
    # of tokens 1..L-1) with the prompt masked out of the loss, the form of earlier sessions' figures.
    first = 1 if full_logits else prompt_len
    keep = 0 if full_logits else tokens.shape[1] - prompt_len + 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = policy(tokens, logits_to_keep=keep).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, first:, None]).squeeze(-1)
    mask = torch.zeros_like(logp)
    mask[:, prompt_len - first:] = 1
    behaviour = behaviour[:, first - 1:]
    ratio = torch.exp(logp - behaviour)
    adv = advantages[:, None]
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - 0.2, 1 + 0.28) * adv)
    loss_tok = pg
    if beta > 0:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref_logits = reference(tokens, logits_to_keep=keep).logits[:, :-1].float()
        ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tokens[:, first:, None]).squeeze(-1)
        d = ref_logp - logp
        loss_tok = loss_tok + beta * (torch.exp(d) - d - 1)
    loss = (loss_tok * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train(args):
    policy = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.float32, attn_implementation="sdpa").cuda().train()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    V = policy.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, V, (args.sequences, args.seq_len), generator=g).cuda()
    behaviour = (-2.0 + 0.5 * torch.randn(args.sequences, args.seq_len - 1, generator=g)).clamp(max=-0.01).cuda()
    advantages = torch.tensor([(-1.0) ** i for i in range(args.sequences)], device="cuda")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    for mode in args.modes.split(","):
        step = grpo_step if mode == "eager" else torch.compile(grpo_step)
        times = []
        for i in range(args.steps + 2):  # two warm-up steps (compilation)
            t0 = sync_time()
            step(policy, reference, opt, tokens, args.prompt_len, behaviour, advantages, args.beta, args.full_logits)
            t = sync_time() - t0
            if i >= 2:
                times.append(t)
        med = statistics.median(times)
        logits = "every row's logits" if args.full_logits else "logits_to_keep"
        print(json.dumps({"bench": "train", "peer": f"PyTorch {mode} GRPO step (bf16 autocast, fp32 master, {logits})",
                          "seconds": med, "tokens_per_s": args.sequences * args.seq_len / med}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["gen", "train"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="gen: timed runs (the best is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="gen: untimed full-length runs first")
    ap.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"],
                    help="gen: PyTorch's choice of attention kernel (auto), or only this one")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--full-logits", action="store_true",
                    help="train: logits of every row, not only those predicting completion tokens")
    args = ap.parse_args()
    if args.what == "train" and args.prompt_len == 128:
        args.prompt_len = 256  # the train workload's prompt length, as aha bench train
    gen(args) if args.what == "gen" else train(args)


if __name__ == "__main__":
    main()
