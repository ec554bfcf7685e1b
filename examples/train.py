"""Train a small decoder-only LM built with nsa_torch.NativeSparseAttention on synthetic
long-context tasks (a passkey hidden in filler text, associative recall; examples/tasks.py).

    python examples/train.py                      # preset "gpu" when CUDA is there, else "cpu"
    python examples/train.py --attn sdpa          # the same model with full causal attention
    torchrun --nproc-per-node 2 examples/train.py --dist fsdp   # or --dist ddp

Writes to --out (default runs/<attn>-<preset>): checkpoint.pt (model config + weights, for
examples/needle.py), loss.png, eval.md (accuracy by context length and needle depth) and
metrics.json (time per step, tokens per second).
"""
import argparse
import contextlib
import json
from dataclasses import asdict
import math
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import ModelConfig, TinyLM, answer_hits, masked_loss  # noqa: E402
import tasks  # noqa: E402

# Presets: the CPU one finishes in a few minutes on two cores; the GPU one is sized for about
# 10 minutes on one H200. Small NSA blocks on CPU (T = 512) so that the needle lies outside the
# window and must be found through the compressed and selected branches. The GPU model keeps the
# paper's NSA hyper-parameters (the layer's defaults) and a large rotary base, as long-context
# models do, so that the slowest rotary pairs barely turn over 64k tokens.
# Both presets train on the passkey task alone: associative recall (--task mix or recall) is not
# learned in the demo's minutes, with NSA or with full attention (on an H200 after 8 minutes of the
# mix, rows right 0.00-0.25 and answer digits 0.22-0.47 for both, about what guessing among the
# context's digits gives), and the evaluation reports only the tasks a run trained on.
PRESETS = {
    "cpu": dict(model=dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
                           nsa=dict(block_size=16, block_stride=8, select_size=32, num_selected=4,
                                    num_initial=1, num_local=1, window_size=64)),
                task="passkey", seq=512, min_seq=64, batch=8, steps=3000, lr=3e-3,
                eval_lengths=[512, 1024], eval_batch=16),
    "gpu": dict(model=dict(hidden=512, layers=8, heads=8, kv_heads=1, head_dim=64,
                           rope_theta=500000.0),
                task="passkey", seq=16384, min_seq=64, batch=4, steps=100000, lr=1.5e-3,
                eval_lengths=[4096, 16384], eval_batch=8),
}
WARMUP_STEPS = 100
FINISH_BY_RESERVE_S = 20  # the checkpoint, loss.png and the evaluation after training (cpu preset)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default=None,
                    help="model and training size (default: gpu with CUDA, else cpu)")
    ap.add_argument("--attn", choices=["nsa", "sdpa"], default="nsa")
    ap.add_argument("--task", choices=["mix", "passkey", "recall"], default=None,
                    help="passkey (the presets'), recall (associative recall, not learned in "
                         "the demo's minutes) or mix (half of each)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=8.0,
                    help="training wall time: the learning rate decays over it (or over --steps, "
                         "whichever ends first)")
    ap.add_argument("--finish-by", type=float, default=None,
                    help=f"a Unix time: training ends {FINISH_BY_RESERVE_S} s before it (for the "
                         "save and the evaluation) or after --minutes, whichever is first, but "
                         "lasts at least a minute; make demo sets it so that set-up, training and "
                         "evaluation end within DEMO_SECONDS")
    ap.add_argument("--fixed-length", action="store_true",
                    help="train at --seq only (default: the powers of two from --min-seq to "
                         "--seq, as many tokens each, more sequences when shorter; see "
                         "--lengths-per-step)")
    ap.add_argument("--lengths-per-step", choices=["all", "one"], default="all",
                    help="all: every step holds every length of the cycle (about as many tokens "
                         "each, the gradient accumulated over them, the loss the mean over all "
                         "answers); one: each step one length, in turn")
    ap.add_argument("--no-pack", action="store_true",
                    help="with --lengths-per-step all: one forward and backward per length (the "
                         "gradient accumulated) instead of all lengths packed in one varlen batch "
                         "(cu_seqlens), which launches 1/len(cycle) as many kernels")
    ap.add_argument("--seq", type=int, default=None, help="longest training context length")
    ap.add_argument("--min-seq", type=int, default=None, help="shortest one (default: the preset's)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step and process")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dist", choices=["ddp", "fsdp"], default="ddp", help="under torchrun")
    ap.add_argument("--comm-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="under torchrun, what crosses between GPUs: bf16 halves the bytes (DDP: "
                         "gradients all-reduced in bfloat16; FSDP2: parameters gathered and "
                         "gradients reduce-scattered in bfloat16), for links slower than the "
                         "backward (e.g. GPUs without peer-to-peer access)")
    ap.add_argument("--bucket-mb", type=float, default=None,
                    help="DDP's gradient bucket size (default DDP's 25 MB); one bucket larger "
                         "than the gradients reduces them once, after the backward, instead of "
                         "overlapping the all-reduces (and NCCL's thread blocks) with it")
    ap.add_argument("--data-shards", type=int, default=None,
                    help="the data of this many processes (default: the number of processes); "
                         "one process with --data-shards 2 and --batch 2B draws exactly the rows "
                         "that two processes with --batch B draw, to compare their loss curves")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="torch.profiler over N steps from a quarter into training (or from "
                         "--profile-from): rank 0 prints the kernels by device time and their "
                         "share of the wall time (these steps are left out of tokens/s)")
    ap.add_argument("--profile-from", type=int, default=None, metavar="STEP",
                    help="the first profiled step (from 0; the kernels' time can change as "
                         "training sharpens the selected blocks)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="CUDA: warn at every point where the host waits for the device inside the "
                         "training steps from the second on (torch.cuda.set_sync_debug_mode; the "
                         "step is written to have none: the loss is read a step late, through "
                         "an event)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-eval", action="store_true")
    return ap.parse_args(argv)


def setup_distributed(args):
    """(rank, world, device): torchrun sets WORLD_SIZE > 1; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu") if args.device is None or cuda else torch.device(args.device)
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def wrap(model, args, world, device):
    if world == 1:
        return model
    if args.dist == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # (gradients as views into the all-reduce buckets: no copy into the buckets and back)
        extra = {} if args.bucket_mb is None else dict(bucket_cap_mb=args.bucket_mb)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True, **extra)
        if args.comm_dtype == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
            ddp.register_comm_hook(None, bf16_compress_hook)
        return ddp
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept it here
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = torch.bfloat16 if args.comm_dtype == "bf16" else None
    # (the sharded parameters, their gradients and the optimizer stay float32 either way)
    mp = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)
    # (FSDP2's default of gathering a block's parameters again for its backward: keeping them
    # from the forward measured no faster for the demo's model, examples/results/h200/
    # multi_gpu_5e6e51c.md)
    for blk in model.blocks:
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_state_dict(model, args, world):
    if world > 1 and args.dist == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def start_profiler(device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.start()
    return prof


def profile_table(prof, device, wall, steps):
    """The profiled steps' kernels by device time (CPU ops on a CPU run) and their time against
    the wall time: what a step spends outside the kernels."""
    from torch.autograd import DeviceType
    where = "device" if device.type == "cuda" else "cpu"
    events = prof.key_averages()
    # On CUDA the kernels' own events only: an op's row also counts the kernels it launched.
    # (Kernels of two streams, e.g. NCCL's, may overlap: the share can pass 100%.)
    busy = sum(getattr(e, f"self_{where}_time_total") for e in events
               if where == "cpu" or e.device_type == DeviceType.CUDA) / 1e6  # (us -> s)
    return (f"profile of {steps} steps: {wall / steps * 1000:.1f} ms/step wall, {where} busy "
            f"{busy / steps * 1000:.1f} ms/step ({busy / wall:.0%})\n"
            + events.table(sort_by=f"self_{where}_time_total", row_limit=20))


def length_cycle(shortest, longest):
    """The training lengths: the powers of two times `shortest` up to `longest` (short ones teach
    the copy, many answers with the needle often in the window; long ones make the compressed and
    selected branches find it)."""
    if not 32 <= shortest <= longest:
        raise SystemExit(f"train.py: need 32 <= --min-seq <= --seq, got {shortest} and {longest}")
    out = [shortest]
    while out[-1] * 2 <= longest:
        out.append(out[-1] * 2)
    return out if out[-1] == longest else out + [longest]


def step_batches(task, cycle, tokens, gen, how, step):
    """The (tokens, mask) batches of one training step, about `tokens` tokens in all: one length
    of the cycle in turn (how = "one"), or every length with about tokens / len(cycle) tokens
    each, at least one row (how = "all")."""
    if how == "one":
        T = cycle[step % len(cycle)]
        return [tasks.batch(task, max(1, tokens // T), T, gen)]
    per = tokens / len(cycle)
    return [tasks.batch(task, max(1, round(per / T)), T, gen) for T in cycle]


def pack(batches):
    """One varlen batch from equal-length batches [(tokens [B_i, T_i], mask)]: (tokens [1, N],
    mask [1, N], cu_seqlens int32 [rows + 1], which [N - 1]: the batch that each position's
    next-token loss belongs to). Rows of one length stay together (FullAttention runs them as
    one batch); no scored position is a row's last, so none predicts across rows."""
    tok = torch.cat([t.reshape(-1) for t, _ in batches])[None]
    mask = torch.cat([m.reshape(-1) for _, m in batches])[None]
    lens = torch.cat([torch.full((t.shape[0],), t.shape[1]) for t, _ in batches])
    cu = torch.cat((torch.zeros(1, dtype=torch.int64), lens.cumsum(0))).to(torch.int32)
    which = torch.cat([torch.full((t.numel(),), i) for i, (t, _) in enumerate(batches)])[:-1]
    return tok, mask, cu, which


def lr_factor(step, progress):
    """Linear warm-up over WARMUP_STEPS, then a cosine from 1 to 0.1 over `progress` in [0, 1]
    (steps or wall time: a run stopped by --minutes still ends at the low learning rate)."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def accuracy(model, task, B, T, device, gen, depth=None, autocast=False):
    """(share of rows whose every scored token is predicted, share of scored tokens predicted):
    argmax with the earlier answer tokens given."""
    model.eval()
    if task == "passkey":
        tok, mask = tasks.passkey(B, T, gen, depth=depth)
    else:
        tok, mask = tasks.recall(B, T, gen)
    tok, mask = tok.to(device), mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(tok)
    rows, right, scored = answer_hits(logits, tok, mask)
    model.train()
    return rows.float().mean().item(), right / scored


def evaluate(model, preset, device, autocast, seed, task):
    """A markdown table of accuracy by length for the tasks that `task` trains (passkey by needle
    depth, recall), each "rows right (answer tokens right)"."""
    gen = torch.Generator().manual_seed(seed + 12345)
    cols = []  # (header, task, depth)
    if task in ("passkey", "mix"):
        cols += [(f"passkey @ depth {d:.2f}", "passkey", d) for d in DEPTHS]
    if task in ("recall", "mix"):
        cols.append(("recall", "recall", None))
    lines = ["| T | " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for T in preset["eval_lengths"]:
        accs = [accuracy(model, t, preset["eval_batch"], T, device, gen, d, autocast) for _, t, d in cols]
        lines.append(f"| {T} | " + " | ".join(f"{a:.2f} ({r:.2f})" for a, r in accs) + " |")
    return "\n".join(lines)


def plot_losses(losses, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step")
    k = max(1, len(losses) // 50)
    if len(losses) >= k:
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    seq, B = args.seq or preset["seq"], args.batch or preset["batch"]
    task = args.task or preset["task"]
    steps, lr = args.steps or preset["steps"], args.lr or preset["lr"]
    out = args.out or os.path.join("runs", f"{args.attn}-{name}")
    cfg = ModelConfig(attn=args.attn, **preset["model"])
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = TinyLM(cfg, checkpointing=args.checkpointing).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    model = wrap(model, args, world, device)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    autocast = device.type == "cuda"
    cycle = [seq] if args.fixed_length else length_cycle(args.min_seq or min(preset["min_seq"], seq), seq)
    # Data shard s draws from its own generator; each process takes its share of the shards.
    shards = args.data_shards or world
    if shards % world or B % (shards // world):
        raise SystemExit(f"train.py: --data-shards {shards} must be a multiple of the {world} "
                         f"process(es), with --batch {B} a multiple of the shards per process")
    per = shards // world
    gens = [torch.Generator().manual_seed(args.seed * 1000 + s) for s in range(rank * per, (rank + 1) * per)]
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        print(f"{args.attn} preset {name}: {n_params / 1e6:.2f}M parameters, T = {cycle}, "
              f"{B * seq} tokens per step (about; lengths per step: {args.lengths_per_step}) x "
              f"{world} process(es), {steps} steps (at most "
              f"{args.minutes} min), {device}", flush=True)
    try:
        from tqdm import tqdm
        # in percent of the training (steps or minutes, whichever ends it)
        bar = tqdm(total=100, disable=rank != 0, dynamic_ncols=True,
                   bar_format="{percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    except ImportError:
        bar = None
    losses, t0, step_times, token_counts = [], time.time(), [], []
    if args.finish_by is not None:  # what is left of the time budget, less the save and evaluation
        args.minutes = min(args.minutes, max(1.0, (args.finish_by - FINISH_BY_RESERVE_S - t0) / 60))
        if rank == 0:
            print(f"training for {args.minutes:.1f} min (--finish-by)", flush=True)
    by_length = {}  # T -> each step's mean answer loss at that length (mean over the processes)
    progress = 0.0

    packing = not args.no_pack

    def draw(step):
        """This process's batches of a step (one per length), their answer counts and, when the
        step runs packed with more than one length, pack()'s tensors (in pinned memory on CUDA:
        copied to the GPU without waiting for the step before to finish)."""
        parts = [step_batches(task, cycle, B // per * seq, g, args.lengths_per_step, step) for g in gens]
        batches = [tuple(torch.cat(x) for x in zip(*same_len)) for same_len in zip(*parts)]
        counts = [int(m[:, :-1].sum()) for _, m in batches]
        packed = pack(batches) if packing and len(batches) > 1 else None
        if packed is not None and device.type == "cuda":
            packed = tuple(t.pin_memory() for t in packed)
        # (the answer counts as a tensor too: torch.tensor(..., device=cuda) would wait for the device)
        count_t = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
        return batches, counts, packed, count_t.pin_memory() if device.type == "cuda" else count_t

    upcoming = draw(0)
    first = steps // 4 if args.profile_from is None else args.profile_from
    profiled = range(first, first + args.profile)
    prof = None
    # The host reads a step's loss and progress one step late: by then it has queued the next
    # step, so the device never waits for the host between steps. Every rank adds its loss and
    # puts its progress in its own slot: one all-reduce gives the mean loss and every rank's
    # progress (each rank takes the furthest, so that all use one learning rate and stop at the
    # same step). The all-reduce and the copy to the host are queued right behind their step,
    # with an event: reading them later (.tolist() of the device tensor) would queue the copy
    # behind the next step too and wait for it.
    pending = None

    def send(stats):
        """Queues the all-reduce of this step's stats and their copy to the host: (host tensor,
        CUDA event after the copy, or None on the CPU, where the copy is done on return)."""
        if world > 1:
            dist.all_reduce(stats)
        if device.type != "cuda":
            return stats, None
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def settle(sent, lengths):
        """A step's loss and its mean answer loss at each of its lengths (means over the
        processes), and its progress (the furthest), once there."""
        host, done = sent
        if done is not None:
            done.synchronize()  # (the host waits here for that step only)
        v = host.tolist()
        n = len(lengths)
        for T, x in zip(lengths, v[1:1 + n]):
            by_length.setdefault(T, []).append(x / world)
        return v[0] / world, max(v[1 + n:])

    def say(text):  # (a line of its own under the progress bar)
        bar.write(text) if bar is not None else print(text, flush=True)

    def end_profile():
        """Stops the profiler after the profiled steps that ran; rank 0 prints their table."""
        prof.stop()
        if rank == 0:
            n = len(step_times) - profiled.start
            say(profile_table(prof, device, sum(step_times[-n:]), n))

    def report(step, loss_val, new_progress):
        nonlocal progress
        losses.append(loss_val)
        tenth = int(10 * progress)  # (before this step)
        progress = new_progress
        if bar is not None:
            bar.update(min(100, int(100 * progress)) - bar.n)
            bar.set_postfix(step=step + 1, loss=f"{loss_val:.3f}",
                            tok_s=f"{token_counts[step] * world / step_times[step]:.0f}")
        if rank == 0 and int(10 * progress) > tenth:  # a plain line each tenth, for logs
            recent = losses[-50:]
            line = (f"{min(100, int(100 * progress))}%: step {step + 1}, loss {sum(recent) / len(recent):.3f} "
                    f"(mean of {len(recent)}), {time.time() - t0:.0f} s; by length: " + ", ".join(
                        f"{T}: {sum(v[-20:]) / len(v[-20:]):.2f}" for T, v in sorted(by_length.items())))
            say(line)

    for step in range(steps):
        if step == profiled.start and args.profile:
            prof = start_profiler(device)
        if step == 1 and args.sync_debug and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        ts = time.time()
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, progress)
        batches, counts, packed, count_t = upcoming
        # The loss is the mean over every answer token of the step (of this process).
        n_ans = sum(counts)
        opt.zero_grad(set_to_none=True)
        if packed is not None:
            # every length in one packed forward and backward
            tok, mask, cu, which = packed
            # (cu_seqlens stays on the CPU: the layers read the lengths without a device sync)
            tok, mask, which = (t.to(device, non_blocking=True) for t in (tok, mask, which))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                each = masked_loss(fwd(tok, cu), tok, mask, reduction="none")
            loss = each.sum() / n_ans
            loss.backward()
            sums = torch.zeros(len(batches), device=device).index_add_(0, which, each.detach()[0])
        else:
            # a forward and backward per length, the gradient accumulated and reduced across
            # processes on the last backward only (DDP: no_sync, FSDP2: set_requires_gradient_sync)
            loss, sums = torch.zeros((), device=device), []
            for i, (tok, mask) in enumerate(batches):
                tok, mask = tok.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                sync = i == len(batches) - 1
                if hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(sync)
                with model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        part = masked_loss(fwd(tok), tok, mask, reduction="sum") / n_ans
                    part.backward()
                loss += part.detach()
                sums.append(part.detach() * n_ans)
            sums = torch.stack(sums)
        per_length = sums / count_t.to(device, non_blocking=True)
        step_tokens = sum(t.numel() for t, _ in batches)
        token_counts.append(step_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # the next step's data, drawn on the host while the device still runs this step
        upcoming = draw(step + 1) if step + 1 < steps else None
        # This step's loss and progress (by steps or by wall time, whichever is further), read
        # after the next step is queued.
        # (stats: the loss, the per-length losses, each rank's progress; the progress goes from
        # pinned memory, since writing a host number into a device tensor waits for the device)
        mine = torch.zeros(world, pin_memory=device.type == "cuda")
        mine[rank] = max((step + 1) / steps, (time.time() - t0) / (args.minutes * 60))
        stats = torch.cat([loss.detach().float().view(1), per_length.float(),
                           mine.to(device, non_blocking=True)])
        sent = (send(stats), [t.shape[1] for t, _ in batches])
        if pending is not None:
            report(step - 1, *settle(*pending))
        pending = sent
        step_times.append(time.time() - ts)
        if prof is not None and step == profiled.stop - 1:
            end_profile()
            prof = None
        if progress >= 1.0:
            break
    if args.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    if pending is not None:
        report(len(step_times) - 1, *settle(*pending))
    if prof is not None:  # training stopped inside the profiled steps
        end_profile()
    if bar is not None:
        bar.close()
    train_s = time.time() - t0
    # past compile and warm-up; the profiled steps run slower and are left out (unless that is all)
    warm = range(len(step_times) // 4, len(step_times))
    timed = [i for i in warm if i not in profiled] or list(warm)  # (profiled: empty without --profile)
    step_s = sum(step_times[i] for i in timed) / len(timed)
    tok_s = sum(token_counts[i] for i in timed) * world / sum(step_times[i] for i in timed)
    state = full_state_dict(model, args, world)
    if rank == 0:
        metrics = dict(attn=args.attn, preset=name, params=n_params, seq=seq, lengths=cycle, batch_per_process=B,
                       processes=world, dist=args.dist if world > 1 else None,
                       comm_dtype=args.comm_dtype if world > 1 else None, steps=len(losses), train_seconds=round(train_s, 1),
                       step_seconds=round(step_s, 4), tokens_per_second=round(tok_s), tokens_per_step=token_counts[-1] * world,
                       losses_by_length={T: [round(v, 4) for v in vals] for T, vals in by_length.items()},
                       first_loss=losses[0], final_loss=sum(losses[-20:]) / len(losses[-20:]),
                       losses=losses, step_times=[round(t, 4) for t in step_times],
                       step_tokens=[n * world for n in token_counts],
                       profiled_steps=list(profiled))
        torch.save(dict(config=asdict(cfg), state_dict=state, metrics=metrics),
                   os.path.join(out, "checkpoint.pt"))
        plot_losses(losses, os.path.join(out, "loss.png"), f"{args.attn}, preset {name}, T = {seq}")
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"trained {len(losses)} steps in {train_s:.0f} s ({step_s * 1000:.0f} ms/step, "
              f"{metrics['tokens_per_second']} tokens/s); loss {losses[0]:.3f} -> "
              f"{metrics['final_loss']:.3f}; checkpoint, loss.png, metrics.json in {out}")
        if not args.no_eval:
            eval_model = TinyLM(cfg).to(device)
            eval_model.load_state_dict(state)
            table = evaluate(eval_model, preset, device, autocast, args.seed, task)
            with open(os.path.join(out, "eval.md"), "w") as f:
                f.write(f"Accuracy: rows with every answer token right (answer tokens right), "
                        f"{args.attn}, preset {name}, task {task}, trained at T = {cycle}:\n\n"
                        f"{table}\n")
            print(table)
    if world > 1:
        # Every file is written; the processes leave together and skip the interpreter's teardown.
        # On CPU (gloo) a background thread of torch's process group has, rarely, aborted a process
        # there ("terminate called without an active exception", from a thread with no Python
        # frame), after all the work was done.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
