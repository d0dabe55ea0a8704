"""Train the small reference Mixture-of-Experts model bundled in placement/reference/.

A byte-level BPE tokenizer and a Mixtral-architecture model (8 experts, top-2 routing) are trained
from scratch on Penn Treebank train plus the first C4 train documents of the project's shared data
folder, then saved in Hugging Face format (bf16 weights) with a loss-curve picture. The loss is
Mixtral's own (LM loss + router_aux_loss_coef x its load-balancing loss, added by
MixtralForCausalLM) plus the same balancing loss taken per layer, which Mixtral's version, pooled
over layers, does not enforce. The model is small enough to ship inside the repository, yet
quantizing its experts costs perplexity the way it does for big MoE models (see the model card).

Usage (about 3 minutes on one H100: 1500 steps of 32 x 512 tokens, 13.5 epochs):
    python -m experiments.train_reference_moe --data ../shared/data --out placement/reference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(arg: str | None) -> Path:
    """--data, else $QOS_DATA_DIR, else ../shared/data next to the repository."""
    path = arg or os.environ.get("QOS_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "data")
    path = Path(path)
    if not (path / "ptb" / "ptb.train.txt").is_file():
        raise SystemExit(f"no ptb/ptb.train.txt under data folder {path} (use --data or QOS_DATA_DIR)")
    return path


def read_jsonl_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def load_training_text(data: Path) -> tuple[str, list[str], str]:
    """PTB train (one continuous text), C4 train documents, PTB valid (held-out)."""
    ptb_train = (data / "ptb" / "ptb.train.txt").read_text(encoding="utf-8")
    ptb_valid = (data / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8")
    c4_docs = read_jsonl_texts(data / "c4" / "c4-train.00000-of-01024.first1041docs.jsonl")
    return ptb_train, c4_docs, ptb_valid


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style): no unknown tokens, so any evaluation text can be encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # One special token serves as bos/eos/unk/pad; documents are separated by it in training.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def encode_stream(tokenizer, ptb_text: str, c4_docs: list[str]) -> torch.Tensor:
    """All training text as one token stream, documents separated by EOS. -> [N] int64"""
    eos = tokenizer.eos_token_id
    ids = tokenizer(ptb_text)["input_ids"] + [eos]
    for doc_ids in tokenizer(c4_docs)["input_ids"]:
        ids += doc_ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Consecutive non-overlapping windows, remainder dropped. [N] -> [W, seqlen]"""
    n = tokens.numel() // seqlen
    return tokens[: n * seqlen].view(n, seqlen)


def sample_batch(stream: torch.Tensor, batch: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of the training stream (a fresh offset each time, so epochs don't repeat
    the same chunk boundaries). [N] -> [batch, seqlen]"""
    starts = torch.randint(0, stream.numel() - seqlen, (batch,), generator=gen, device=stream.device)
    return stream[starts[:, None] + torch.arange(seqlen, device=stream.device)]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(args, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.expert_ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=args.seqlen,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,  # the embedding is a large share of a model this small
        output_router_logits=True,  # training needs the router logits for the aux loss
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    # "eager" experts loop over experts with F.linear, which autocast runs in bf16; the fused
    # grouped_mm path would cast the activations up to the fp32 master weights instead.
    config._experts_implementation = "eager"
    return MixtralForCausalLM(config)


def add_dropout(model, p: float, p_moe: float) -> None:
    """Dropout on the embedding output and on each attention branch (p), and on each MoE branch
    (p_moe), before they join the residual stream. Forward hooks keep the saved architecture
    plain Mixtral. Some regularization is needed (~1.8M tokens for ~10M parameters), but dropout
    on the MoE branch also trains the model to shrug off noise in the expert outputs, which is
    what quantizing the experts adds, and hides the cost of quantization; so it is off by default."""

    def hook(rate):
        def drop(module, inputs, output):
            if isinstance(output, tuple):  # attention returns (attn_output, attn_weights)
                return (F.dropout(output[0], rate, module.training), *output[1:])
            return F.dropout(output, rate, module.training)

        return drop

    if p > 0:
        model.model.embed_tokens.register_forward_hook(hook(p))
    for layer in model.model.layers:
        if p > 0:
            layer.self_attn.register_forward_hook(hook(p))
        if p_moe > 0:
            layer.mlp.register_forward_hook(hook(p_moe))


def per_layer_balance_loss(router_logits, num_experts: int, top_k: int, batch: int, scope: str) -> torch.Tensor:
    """Mean over layers of the Switch load-balancing loss, each layer on its own. Mixtral's
    built-in aux loss pools the routing counts of all layers before balancing, so an expert
    index only has to be busy *somewhere*: without this term whole experts went unused in some
    layers (0.0% of PTB test tokens). scope "batch" balances each layer over the whole batch
    (transformers' formula); "sequence" balances it within every sequence, so an expert cannot
    serve only one of the two corpora. router_logits: per layer [batch*T, experts]."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if scope == "batch":
        return torch.stack([load_balancing_loss_func((g,), num_experts, top_k) for g in router_logits]).mean()
    losses = []
    for g in router_logits:
        probs = g.float().softmax(-1).view(batch, -1, num_experts)  # [B, T, E]
        top = probs.topk(top_k, dim=-1).indices  # [B, T, k]
        routed = F.one_hot(top, num_experts).sum(2).float().mean(1)  # [B, E], rows sum to k
        losses.append(num_experts * (routed * probs.mean(1)).sum(-1).mean())
    return torch.stack(losses).mean()


def count_params(model) -> tuple[int, int]:
    """(all parameters, expert parameters); tied lm_head counted once."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch: int, device, amp: bool) -> float:
    """Mean token NLL over windows [W, T] (labels shifted inside the model)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch].to(device)  # [b, T]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x, output_router_logits=False).logits  # [b, T, V]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(log["train_step"], log["train_loss"], label="train (LM loss, PTB+C4)", lw=1)
    ax.plot(log["valid_step"], log["valid_loss"], "o-", ms=3, label="held-out (PTB valid)")
    ax.set_xlabel("step")
    ax.set_ylabel("token NLL (nats)")
    ax.set_title("reference MoE training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """bf16 weights; config with output_router_logits off so that `model(..., labels=...).loss`
    is the plain LM loss (no aux term) for whoever loads the checkpoint. The in-memory fp32
    model is rounded to the stored precision, so it can be compared with the saved one."""
    import copy

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config.use_cache = True  # generation_config was made at init from use_cache=False
    # Cast a copy: model.to(bf16) would also round the fp32 rotary buffers, which are not saved.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)


@torch.no_grad()
def check_reload(model, out: Path, sample: torch.Tensor) -> torch.Tensor:
    """Reload the saved folder the plain way and compare fp32 CPU logits with the in-memory
    (bf16-rounded) model. On CPU so the logits can be compared with another machine's."""
    from transformers import AutoModelForCausalLM

    ref = model.cpu().eval()(input_ids=sample).logits  # [b, T, V]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = loaded(input_ids=sample).logits
    diff = (ref - got).abs().max().item()
    print(f"reload check: max |logit diff| = {diff:.3g}", flush=True)
    return got


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args) -> None:
    t0 = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    amp = device.type == "cuda"  # bf16 autocast on the GPU, plain fp32 on CPU (debug runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = resolve_data_dir(args.data)
    ptb_train, c4_docs, ptb_valid = load_training_text(data)
    tokenizer = train_tokenizer([ptb_train, *c4_docs], args.vocab)
    stream = encode_stream(tokenizer, ptb_train, c4_docs).to(device)  # [N]
    valid = eval_windows(torch.tensor(tokenizer(ptb_valid)["input_ids"]), args.seqlen)  # [W, T]
    if args.max_valid_windows:
        valid = valid[: args.max_valid_windows]
    print(
        f"data {data}: vocab {len(tokenizer)}, train tokens {stream.numel():,} "
        f"(PTB + {len(c4_docs)} C4 docs), PTB valid windows {valid.shape[0]} x {args.seqlen}, "
        f"tokenizer {time.time() - t0:.1f}s",
        flush=True,
    )

    model = build_model(args, tokenizer).to(device)
    add_dropout(model, args.dropout, args.moe_dropout)
    total, experts = count_params(model)
    print(f"model: {total / 1e6:.2f}M params ({experts / 1e6:.2f}M in experts), device {device}", flush=True)

    # No weight decay on norms (1-D tensors); decay everything else, embeddings included.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    tokens_per_step = args.batch * args.seqlen
    print(
        f"training {args.steps} steps x {tokens_per_step:,} tokens = "
        f"{args.steps * tokens_per_step / stream.numel():.1f} epochs",
        flush=True,
    )

    n_experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    log = {"train_step": [], "train_loss": [], "valid_step": [], "valid_loss": []}
    run_lm, run_aux, run_layer_aux, run_n = 0.0, 0.0, 0.0, 0
    t_train, t_last = time.time(), time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = sample_batch(stream, args.batch, args.seqlen, gen)  # [B, T]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(input_ids=x, labels=x)  # loss = LM NLL + aux_coef * load-balancing loss
        layer_aux = per_layer_balance_loss(output.router_logits, n_experts, top_k, args.batch, args.balance_scope)
        (output.loss + args.layer_aux_coef * layer_aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

        aux = output.aux_loss.detach()
        run_lm += (output.loss.detach() - args.aux_coef * aux).item()
        run_aux += aux.item()
        run_layer_aux += layer_aux.item()
        run_n += 1
        out_of_time = args.max_seconds and time.time() - t_train > args.max_seconds
        last = step == args.steps - 1 or out_of_time
        if (step + 1) % args.log_every == 0 or last:
            now = time.time()
            log["train_step"].append(step + 1)
            log["train_loss"].append(run_lm / run_n)
            print(
                f"step {step + 1:5d}  loss {run_lm / run_n:.4f}  aux {run_aux / run_n:.3f}  "
                f"layer aux {run_layer_aux / run_n:.3f}  "
                f"lr {lr_at(step, args):.2e}  {run_n * tokens_per_step / (now - t_last):,.0f} tok/s  "
                f"elapsed {now - t0:.0f}s",
                flush=True,
            )
            run_lm, run_aux, run_layer_aux, run_n, t_last = 0.0, 0.0, 0.0, 0, now
        if (step + 1) % args.eval_every == 0 or last:
            v = held_out_loss(model, valid, args.batch, device, amp)
            log["valid_step"].append(step + 1)
            log["valid_loss"].append(v)
            print(f"step {step + 1:5d}  PTB valid loss {v:.4f}  ppl {math.exp(v):.2f}", flush=True)
            t_last = time.time()  # keep evaluation time out of tokens/s
        if out_of_time:
            print(f"stopping early after {step + 1} steps: --max-seconds {args.max_seconds:.0f} reached", flush=True)
            break
    train_s = time.time() - t_train
    print(f"training took {train_s:.0f}s; total elapsed {time.time() - t0:.0f}s", flush=True)

    save_checkpoint(model, tokenizer, out)
    plot_losses(log, out / "loss_curve.png")
    log.update(train_seconds=train_s, train_tokens=stream.numel(), args=vars(args))
    Path(args.log_json or out / "train_log.json").write_text(json.dumps(log, indent=1))
    sample = valid[:2]  # [2, T]
    logits = check_reload(model, out, sample)
    if args.logits_out:  # fp32 logits of the reloaded checkpoint, to compare across versions
        torch.save({"input_ids": sample, "logits": logits[:, :32].clone()}, args.logits_out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved {out} ({size / 2**20:.1f} MiB); total elapsed {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data folder (default: $QOS_DATA_DIR or ../shared/data)")
    p.add_argument("--out", default=str(REPO_ROOT / "placement" / "reference"))
    p.add_argument("--vocab", type=int, default=6144)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=320, help="intermediate size of each expert")
    p.add_argument("--seqlen", type=int, default=512, help="training context = max_position_embeddings")
    p.add_argument("--aux-coef", type=float, default=0.02, help="router_aux_loss_coef")
    p.add_argument("--layer-aux-coef", type=float, default=0.02, help="per-layer balance loss weight")
    p.add_argument("--balance-scope", choices=("batch", "sequence"), default="sequence",
                   help="per-layer balance over the batch, or within each sequence")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.15, help="on embeddings and attention branches")
    p.add_argument("--moe-dropout", type=float, default=0.0, help="on MoE branches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=0, help="stop training early after this long (0 = never)")
    p.add_argument("--max-valid-windows", type=int, default=0, help="0 = all PTB valid windows")
    p.add_argument("--log-json", help="where to write the logged losses (default: OUT/train_log.json)")
    p.add_argument("--logits-out", help="save reloaded fp32 logits (2 PTB valid windows, first 32 positions)")
    p.add_argument("--cpu", action="store_true", help="force CPU (debugging)")
    main(p.parse_args())
