"""Synthetic long-context tasks, generated in code (no downloads): a passkey hidden in filler text
(needle in a haystack) and associative recall. Token ids are small integers; `VOCAB` tokens.

Every sample is a row of `tokens` [B, T] with a boolean `mask` [B, T] on the positions whose next
token is scored: the model reads tokens[:, :-1] and is trained on tokens[:, 1:] where
mask[:, :-1] (the answer positions only: the filler is random and not worth predicting).
"""
import torch

PAD, BOS, KEY, QUERY, SEP = 0, 1, 2, 3, 4
DIGIT0 = 5          # 5 .. 14: the digits 0-9
LETTER0 = 15        # 15 .. 40: the letters a-z (filler, recall keys)
VOCAB = 48
PASSKEY_DIGITS = 5


def _filler(B, T, gen):
    return torch.randint(LETTER0, LETTER0 + 26, (B, T), generator=gen)


def _distinct(B, n, k, gen):
    """[B, k]: k distinct integers from 0..n-1 per row (k <= n)."""
    return torch.rand(B, n, generator=gen).argsort(dim=1)[:, :k]


def passkey(B, T, gen, depth=None):
    """[BOS] filler .. [KEY] d1..d5 [SEP] .. filler [QUERY] d1..d5: the 5-digit key sits at
    `depth` (a fraction of the filler, random per row when None); the answer digits are scored.
    Returns tokens [B, T], mask [B, T] (True where the NEXT token is an answer digit)."""
    n = PASSKEY_DIGITS
    assert T >= 2 * n + 5, f"passkey needs T >= {2 * n + 5}, got {T}"
    tok = _filler(B, T, gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    tok[:, 0] = BOS
    digits = torch.randint(0, 10, (B, n), generator=gen) + DIGIT0
    room = T - (2 * n + 4)  # filler tokens around the needle
    if depth is None:
        where = torch.randint(0, room + 1, (B,), generator=gen)
    else:
        where = torch.full((B,), int(round(depth * room)))
    needle = torch.cat((torch.full((B, 1), KEY), digits, torch.full((B, 1), SEP)), dim=1)
    tok.scatter_(1, 1 + where[:, None] + torch.arange(n + 2), needle)
    tok[:, T - n - 1] = QUERY
    tok[:, T - n:] = digits
    mask[:, T - n - 1:T - 1] = True
    return tok, mask


def recall(B, T, gen, pairs=8, queries=4):
    """Associative recall: `pairs` (letter key, digit value) pairs spread over filler, then
    `queries` of the keys after [QUERY], each followed by its value (scored)."""
    tail = 1 + 2 * queries
    assert T >= 1 + 2 * pairs + tail, f"recall needs T >= {1 + 2 * pairs + tail}, got {T}"
    tok = _filler(B, T, gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    tok[:, 0] = BOS
    body = T - tail - 1
    keys = _distinct(B, 26, pairs, gen) + LETTER0
    vals = torch.randint(0, 10, (B, pairs), generator=gen) + DIGIT0
    slots = _distinct(B, body // 2, pairs, gen).sort(dim=1).values * 2 + 1
    # Filler letters that equal a key would make the pair ambiguous: filler uses other letters.
    row = tok[:, 1:1 + body]
    row[(row[:, :, None] == keys[:, None, :]).any(-1)] = SEP
    tok.scatter_(1, slots, keys)
    tok.scatter_(1, slots + 1, vals)
    pick = _distinct(B, pairs, queries, gen)
    start = T - tail
    tok[:, start] = QUERY
    tok[:, start + 1::2] = keys.gather(1, pick)
    tok[:, start + 2::2] = vals.gather(1, pick)
    mask[:, start + 1::2] = True
    return tok, mask


def batch(task, B, T, gen):
    """A batch of one task ("passkey", "recall") or of both ("mix": half and half)."""
    if task == "passkey":
        return passkey(B, T, gen)
    if task == "recall":
        return recall(B, T, gen)
    if task == "mix":
        h = B // 2
        a, ma = passkey(B - h, T, gen)
        b, mb = recall(h, T, gen)
        return torch.cat((a, b)), torch.cat((ma, mb))
    raise ValueError(f"unknown task {task!r} (passkey, recall, mix)")
