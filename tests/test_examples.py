"""The training demo and the needle evaluation (examples/) run end to end on CPU at a tiny size:
one process, and two processes under torchrun with DDP and FSDP2 (gloo). The checkpoint of each
loads into the model again and is evaluated by examples/needle.py, and generates the passkey with
a decoding cache (examples/generate.py), which equals generation without one."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TINY = ["--steps", "3", "--seq", "128", "--batch", "2", "--no-eval", "--device", "cpu"]

sys.path.insert(0, EXAMPLES)
import generate  # noqa: E402
import tasks  # noqa: E402
from helpers import assert_close  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402


def run(cmd, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def check_run(out, processes, attn="nsa"):
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["processes"] == processes and metrics["steps"] == 3 and metrics["attn"] == attn
    assert all(torch.isfinite(torch.tensor(metrics["losses"])))
    assert len(metrics["step_times"]) == len(metrics["step_tokens"]) == 3
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0


@pytest.mark.parametrize("attn", ["nsa", "sdpa"])
def test_train_and_needle(attn, tmp_path):
    out = str(tmp_path / attn)
    run([sys.executable, "examples/train.py", "--attn", attn, "--out", out] + TINY, tmp_path)
    check_run(out, 1, attn)
    res = str(tmp_path / "needle")
    text = run([sys.executable, "examples/needle.py", os.path.join(out, "checkpoint.pt"),
                "--lengths", "64", "96", "--depths", "2", "--samples", "2", "--out", res,
                "--device", "cpu"], tmp_path)
    assert f"{attn}: 64:" in text
    assert os.path.exists(os.path.join(res, f"needle_{attn}.png"))
    assert "| depth | 64 | 96 |" in open(os.path.join(res, "needle.md")).read()


@pytest.mark.parametrize("attn", ["nsa", "sdpa"])
def test_packed_step_equals_per_length_steps(attn, tmp_path):
    """Every length of a step packed in one varlen batch (the default) trains exactly as one
    forward and backward per length: the same losses, overall and by length."""
    got = {}
    for how in ([], ["--no-pack"]):
        out = str(tmp_path / ("unpacked" if how else "packed"))
        run([sys.executable, "examples/train.py", "--attn", attn, "--out", out, "--min-seq", "32"]
            + TINY + how, tmp_path)
        got[bool(how)] = json.load(open(os.path.join(out, "metrics.json")))
    packed, unpacked = got[False], got[True]
    assert packed["lengths"] == [32, 64, 128]
    assert packed["losses"] == pytest.approx(unpacked["losses"], rel=1e-4, abs=1e-5)
    for T, vals in unpacked["losses_by_length"].items():
        assert packed["losses_by_length"][T] == pytest.approx(vals, rel=1e-3, abs=1e-4), f"T = {T}"


def test_finish_by_bounds_the_training_time(tmp_path):
    """--finish-by (make demo's time budget): the training minutes are what is left before it,
    less 20 s for the save and the evaluation, capped by --minutes."""
    import time
    out = str(tmp_path / "budget")
    text = run([sys.executable, "examples/train.py", "--out", out, "--finish-by", str(time.time() + 20 + 150)]
               + TINY, tmp_path)
    left = float(text.split("training for ")[1].split(" min")[0])
    assert 2.0 < left <= 2.5, text[:500]
    text = run([sys.executable, "examples/train.py", "--out", out, "--minutes", "1.5", "--finish-by",
                str(time.time() + 1000)] + TINY, tmp_path)
    assert "training for 1.5 min" in text


def test_profile_prints_the_busy_time(tmp_path):
    """--profile N: the table of N steps from a quarter in, those steps left out of tokens/s; a
    training that ends inside the profiled steps still prints the ones it ran."""
    text = run([sys.executable, "examples/train.py", "--out", str(tmp_path / "p"), "--profile", "2"] + TINY,
               tmp_path)
    assert "profile of 2 steps:" in text and "cpu busy" in text and "aten::mm" in text, text[-2000:]
    assert json.load(open(tmp_path / "p" / "metrics.json"))["profiled_steps"] == [0, 1]
    text = run([sys.executable, "examples/train.py", "--out", str(tmp_path / "q"), "--profile", "5"] + TINY,
               tmp_path)
    assert "profile of 3 steps:" in text, text[-2000:]
    run([sys.executable, "examples/train.py", "--out", str(tmp_path / "r"), "--profile", "1",
         "--profile-from", "2"] + TINY, tmp_path)
    assert json.load(open(tmp_path / "r" / "metrics.json"))["profiled_steps"] == [2]


@pytest.fixture(scope="module")
def one_process_two_shards(tmp_path_factory):
    """metrics.json of one process drawing the rows of two (--data-shards 2, twice the batch)."""
    out = str(tmp_path_factory.mktemp("shards") / "one")
    run([sys.executable, "examples/train.py", "--out", out] + TINY + ["--batch", "4", "--data-shards", "2"], None)
    return json.load(open(os.path.join(out, "metrics.json")))


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp --no-pack", "ddp --comm-dtype bf16",
                                  "fsdp --comm-dtype bf16"])
def test_torchrun_two_processes(mode, tmp_path, one_process_two_shards):
    """Under torchrun the loss curve is the one process's of the same rows (with --no-pack, FSDP2
    accumulates the lengths' gradients and reduces them once); with --comm-dtype bf16 within
    bfloat16's rounding of what crosses between processes."""
    out = str(tmp_path / "run")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "examples/train.py", "--dist", *mode.split(), "--out", out] + TINY, tmp_path)
    check_run(out, 2)
    # the same rows and the same mean over them: the loss curve of one process
    losses = json.load(open(os.path.join(out, "metrics.json")))["losses"]
    bf16 = "bf16" in mode
    assert losses == pytest.approx(one_process_two_shards["losses"], rel=2e-2 if bf16 else 1e-4, abs=1e-5)
    if bf16:  # (the rounding is there: the flag took effect)
        assert losses != pytest.approx(one_process_two_shards["losses"], rel=1e-6, abs=0)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    from model import ModelConfig, TinyLM
    TinyLM(ModelConfig(**ck["config"])).load_state_dict(ck["state_dict"])  # a full state dict


def test_multi_gpu_ab_script(tmp_path):
    """tools/multi_gpu_ab.sh (settings side by side in one device call) on CPU: a one-process and
    a two-process variant with their environment and arguments, the table against the first."""
    variants = ("# one GPU, then two processes\n"
                "one 1 -- --device cpu --preset cpu --seq 128 --batch 4 --data-shards 2\n"
                "ddp 2 OMP_NUM_THREADS=1 -- --device cpu --preset cpu --seq 128 --batch 2 --dist ddp --bucket-mb 1000\n")
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(["bash", "tools/multi_gpu_ab.sh", "3"], input=variants, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = open(tmp_path / "ab.md").read()
    assert "Over steps 1-3 of every run" in table, table
    assert "| one | 1 | 512 |" in table and "| ddp | 2 | 512 |" in table and "| 1.00x |" in table, table
    assert "=== ddp: OMP_NUM_THREADS=1" in res.stdout


def test_tasks_place_answers_where_scored():
    gen = torch.Generator().manual_seed(0)
    tok, mask = tasks.passkey(3, 64, gen, depth=0.5)
    n = tasks.PASSKEY_DIGITS
    for b in range(3):
        p = int((tok[b] == tasks.KEY).nonzero())
        assert torch.equal(tok[b, p + 1:p + 1 + n], tok[b, -n:])   # the needle is the answer
        assert mask[b].sum() == n and torch.equal(tok[b, 1:][mask[b, :-1]], tok[b, -n:])
    tok, mask = tasks.recall(2, 80, gen)
    for b in range(2):
        q = int((tok[b] == tasks.QUERY).nonzero())
        for i in range(q + 1, 80, 2):  # each queried key's value is the one after the key earlier
            first = int((tok[b, :q] == tok[b, i]).nonzero()[0])
            assert tok[b, first + 1] == tok[b, i + 1] and mask[b, i]



def test_evaluation_reports_the_trained_tasks():
    """eval.md's table has the columns of the tasks the run trained on: passkey by needle depth,
    recall (opt-in: the presets train on passkey alone), or both for the mix."""
    import train
    from model import ModelConfig, TinyLM
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                               nsa=dict(block_size=16, block_stride=8, select_size=32,
                                        num_selected=2, num_initial=1, num_local=1,
                                        window_size=16)))
    preset = dict(eval_lengths=[64, 96], eval_batch=2)
    tables = {task: train.evaluate(model, preset, torch.device("cpu"), False, 0, task).splitlines()
              for task in ("passkey", "recall", "mix")}
    depths = " | ".join(f"passkey @ depth {d:.2f}" for d in train.DEPTHS)
    assert tables["passkey"][0] == f"| T | {depths} |"
    assert tables["recall"][0] == "| T | recall |"
    assert tables["mix"][0] == f"| T | {depths} | recall |"
    for lines in tables.values():
        cells = lines[0].count("|")
        assert len(lines) == 4 and lines[1].count("|") == cells
        assert [r.split(" | ")[0] for r in lines[2:]] == ["| 64", "| 96"]
        assert all(r.count("|") == cells for r in lines[2:])
    assert train.PRESETS["gpu"]["task"] == train.PRESETS["cpu"]["task"] == "passkey"

def test_multi_gpu_summary():
    """examples/multi_gpu_summary.py: throughput over the steps common to every run, past the
    first quarter; the single-GPU bound and the cost of the processes; the loss tables."""
    import multi_gpu_summary as mg

    def metrics(processes, batch, ms, tokens, steps, loss):
        return dict(processes=processes, batch_per_process=batch, step_times=[ms / 1000] * steps,
                    step_tokens=[tokens] * steps, losses=[loss] * steps)
    runs = {"1gpu": metrics(1, 8, 400, 100000, 8, 1.0), "1gpu-part": metrics(1, 4, 250, 50000, 8, 2.0),
            "ddp": metrics(2, 4, 275, 100000, 8, 1.5), "ddp-weak": metrics(2, 8, 400, 200000, 4, 3.0)}
    runs["ddp"]["step_times"][-1] = 100.0  # past the common window (4 steps): not counted
    runs["1gpu"]["step_times"][2], runs["1gpu"]["profiled_steps"] = 100.0, [2]  # profiled: not counted
    text = mg.summary(runs)
    assert "over steps 2-4 of every run" in text
    assert "| ddp | 2 | 4 | 100000 | 275 | 363636 | 1.45x |" in text
    assert "| ddp-weak | 2 | 8 | 200000 | 400 | 500000 | 2.00x |" in text
    assert "1.60x 1gpu's tokens/s for 2 of them" in text
    assert "ddp against 1gpu-part: 1.10x the step time" in text and "; 1.82x its tokens/s" in text
    assert "| 1gpu | 0.5000 (0.500) |" in text  # |1.0 - 1.5| every step; ddp-weak is not compared
    with pytest.raises(SystemExit, match="metrics_1gpu.json"):
        mg.summary({"ddp": runs["ddp"]})
    text = mg.compare({"ddp-weak": runs["ddp-weak"], "1gpu-part": runs["1gpu-part"]})
    assert "Over steps 2-4 of every run" in text and "| ddp-weak | 2 | 200000 | 400 | 500000 | 1.00x |" in text
    assert "| 1gpu-part | 1 | 50000 | 250 | 200000 | 0.40x |" in text


# NSA blocks small enough that a few dozen tokens cross many compression windows (l = 8, d = 4)
# and selection blocks (l' = 8) and leave the window (w = 16)
TINY_NSA = dict(block_size=8, block_stride=4, select_size=8, num_selected=3, num_initial=1,
                num_local=1, window_size=16)


def random_tiny_lm(attn, dtype=torch.float64, hidden=32, head_dim=16, nsa=TINY_NSA, seed=0):
    """A tiny TinyLM (2 layers, 4 query heads, 2 KV heads), every weight random (the NSA layers'
    phi MLP and gates start at zero otherwise)."""
    torch.manual_seed(seed)
    model = TinyLM(ModelConfig(hidden=hidden, layers=2, heads=4, kv_heads=2, head_dim=head_dim,
                               attn=attn, nsa=nsa)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("attn", ["nsa", "sdpa"])
def test_cached_generation_equals_recompute(attn):
    """Greedy generation with the model's cache (a prefill, then a step per token, each token fed
    back) equals greedy generation by a full forward per token, token for token; the cached
    steps' logits are the full forward's over the prompt and the generated tokens. A prefill, a
    step of three tokens and steps of one give the full forward's logits in every row."""
    model = random_tiny_lm(attn)
    prompt = torch.randint(0, tasks.VOCAB, (3, 37), generator=torch.Generator().manual_seed(1))
    out, _, _, logits = generate.generate(model, prompt, 24)
    assert out.shape == (3, 24) and len(set(out.flatten().tolist())) > 5  # (not one token again)
    assert torch.equal(out, generate.generate_without_cache(model, prompt, 24))
    assert generate.check(model, prompt[0], out[0], logits) == (pytest.approx(0, abs=1e-12), 24)
    seq = torch.cat((prompt, out), 1)
    cache = model.new_cache(3, 45)
    with torch.no_grad():
        parts = [model(seq[:, a:b], cache=cache)
                 for a, b in ((0, 30), (30, 33), (33, 34), (34, 35))]
        assert_close(torch.cat(parts, 1), model(seq[:, :35]), 1e-10, "cached logits")


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["nsa", "sdpa"])
def test_cuda_cached_generation_matches_a_full_forward(attn):
    """On CUDA under bf16 autocast, as generate.py runs it (D = 64, a CUDA head dim; the
    paper's block sizes, a short window): a prefill of 300 tokens and 40 greedy steps, across
    compression windows and a selection block; each step's logits are a full forward's within
    bf16 noise."""
    nsa = dict(block_size=32, block_stride=16, select_size=64, num_selected=4, window_size=128)
    model = random_tiny_lm(attn, torch.float32, hidden=128, head_dim=64, nsa=nsa).cuda()
    prompt = torch.randint(0, tasks.VOCAB, (3, 300), generator=torch.Generator().manual_seed(2))
    prompt = prompt.cuda()
    out, _, _, logits = generate.generate(model, prompt, 40, autocast=True)
    # Against the bf16 full forward (not a float64 model: in a random model bf16 rounding moves
    # many block choices of both paths alike). The two bf16 paths may still differ where a
    # near-tie picks another block in one of them; a cache bug would give O(1) errors.
    rel, _ = generate.check(model, prompt[0], out[0], logits, autocast=True)
    assert rel < 0.1


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["nsa", "sdpa"])
def test_cuda_graph_generation_equals_eager(attn):
    """generate.py's CUDA-graph decoding (the model's step captured once after the prefill and
    its first step, then replayed per token) against eager steps from the same prompts, under
    bf16 autocast as generate.py runs it, for 40 tokens across compression windows and a
    selection block: the same tokens, and the same logits (the same kernels run) within bf16
    noise."""
    nsa = dict(block_size=32, block_stride=16, select_size=64, num_selected=4, window_size=128)
    model = random_tiny_lm(attn, torch.float32, hidden=128, head_dim=64, nsa=nsa).cuda()
    prompt = torch.randint(0, tasks.VOCAB, (3, 300), generator=torch.Generator().manual_seed(3))
    prompt = prompt.cuda()
    out, _, dec, logits = generate.generate(model, prompt, 40, autocast=True)
    assert dec.steps == 39 and dec.capture_s == 0
    out_g, _, dec_g, logits_g = generate.generate(model, prompt, 40, autocast=True, graphs=True)
    assert dec_g.steps == 38 and dec_g.capture_s > 0
    assert torch.equal(out_g, out)
    assert_close(logits_g.double(), logits.double(), 1e-2, "graph replays against eager steps")


def test_generate_graphs_need_cuda():
    with pytest.raises(ValueError, match="generate: CUDA graphs need a CUDA device, got cpu"):
        generate.generate(random_tiny_lm("nsa"), torch.zeros(1, 4, dtype=torch.long), 3, graphs=True)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """checkpoint.pt of an NSA and an SDPA model trained for a few steps (the tiny train path)."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = []
    for attn in ("nsa", "sdpa"):
        run([sys.executable, "examples/train.py", "--attn", attn, "--out", str(root / attn)] + TINY,
            None)
        paths.append(str(root / attn / "checkpoint.pt"))
    return paths


def test_generate_script(tiny_checkpoints, tmp_path):
    """examples/generate.py on CPU: both models at two lengths, the check against a full forward
    passes, the table and the JSON hold every row and NSA's speed-up over SDPA."""
    res = str(tmp_path / "res")
    text = run([sys.executable, "examples/generate.py", *tiny_checkpoints, "--device", "cpu",
                "--lengths", "256", "512", "--depths", "0.5", "--samples", "3", "--batch", "2",
                "--new-tokens", "8", "--check", "--out", res], tmp_path)
    for attn in ("nsa", "sdpa"):
        for T in (256, 512):
            assert f"{attn} T={T}: accuracy" in text, text
    assert text.count("check ok (logits within") == 4 and "NSA over SDPA at 512: decode" in text, text
    table = open(os.path.join(res, "generate.md")).read()
    assert "| sdpa | 512 | 3 |" in table and "| nsa | 256 | 3 |" in table, table
    assert "x (" in table.split("| nsa | 512 |")[1].splitlines()[0]  # the speed-up cell
    rows = json.load(open(os.path.join(res, "generate.json")))["rows"]
    assert [(r["attn"], r["length"]) for r in rows] == [("nsa", 256), ("nsa", 512), ("sdpa", 256),
                                                        ("sdpa", 512)]
    assert all(r["check_ok"] and r["timed_batches"] == 1 and r["decode_tokens_per_s"] > 0
               for r in rows)


def test_gpu_generate_script(tmp_path):
    """examples/gpu_generate.sh on CPU (a few training steps, one short length): both models are
    trained, generate.py checks the cached steps against a full forward, the outputs land in OUT;
    minutes 0 reuses the checkpoints, and fails without one."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = dict(os.environ, OUT=str(out), RUNS=str(runs), OMP_NUM_THREADS="1",
               TRAIN_ARGS=" ".join(TINY), GENERATE_LENGTHS="256",
               GENERATE_ARGS="--depths 0.5 --samples 2 --batch 2 --new-tokens 6 --device cpu")
    script = ["bash", "examples/gpu_generate.sh"]
    res = subprocess.run(script + ["1", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "generate.log", "generate.md",
                                                     "train_nsa.log", "train_sdpa.log"]
    rows = json.load(open(out / "generate.json"))["rows"]
    assert [(r["attn"], r["length"]) for r in rows] == [("nsa", 256), ("sdpa", 256)]
    assert all(r["check_ok"] for r in rows)
    again = subprocess.run(script + ["0", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    env["RUNS"] = str(tmp_path / "none")
    missing = subprocess.run(script + ["0", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert missing.returncode != 0 and "minutes 0 needs an earlier run" in missing.stdout
