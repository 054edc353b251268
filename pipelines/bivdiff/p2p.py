"""Prompt2Prompt attention control as diffusers attention processors (docs/algorithms.md §8, "Prompt2Prompt").

The batch holds two prompts, [source, edited] (after the unconditional rows when CFG is on). Every attention layer
of the UNet computes its probabilities explicitly; on the conditional rows the edited prompt's probabilities are
replaced by the source's:

- cross-attention, for the first `int(cross * (N + 1))` UNet calls: `replace` maps each source token's map onto the
  edited prompt's tokens (a word-for-word swap, one source word spread evenly over the tokens of its replacement);
  `refine` aligns the two token sequences (global alignment: match +1, mismatch -1, gap 0) and takes the source map
  for every aligned token, keeping the edited prompt's own map for inserted tokens;
- self-attention, for UNet calls `0 <= k < int(self * N)`, in layers with at most 16 x 16 query tokens;
- local blend (optional words, one group per prompt): after each step the latents outside the words' cross-attention
  mask (maps at 1/4 of the latent size, 3 x 3 max-pooled, normalised, threshold 0.3, union over the two prompts) are
  reset to the source's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

MAX_TOKENS = 77


def word_tokens(text: str, tokenizer) -> list[list[int]]:
    """Token positions (after the start token) of each space-separated word of `text`."""
    out, pos = [], 1
    for word in text.split(" "):
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        out.append([p for p in range(pos, pos + n) if p < MAX_TOKENS - 1])
        pos += n
    return out


def check_words(source: str, edited: str, edit_type: str, blend_words: Sequence[str] = ()) -> None:
    """The word rules of a Prompt2Prompt edit (docs/algorithms.md §8): `replace` swaps the captions' words one for one;
    each local-blend word is a word of its caption (`blend_words`: one group per caption [source, edited])."""
    if edit_type == "replace" and len(source.split(" ")) != len(edited.split(" ")):
        raise ValueError(f"edit_type: 'replace' swaps words one for one; {source!r} has {len(source.split(' '))} "
                         f"words, {edited!r} {len(edited.split(' '))} (use 'refine' to add words)")
    for prompt, group in zip((source, edited), blend_words):
        for word in group.split():
            if word not in prompt.split(" "):
                raise ValueError(f"local_blend: {word!r} is not a word of {prompt!r}")


def _ids(text: str, tokenizer) -> list[int]:
    return tokenizer(text, truncation=True, max_length=MAX_TOKENS).input_ids


def refine_mapper(source: str, edited: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas), both (77,): the source position of each edited token, and 1 where it has one (0: inserted).

    Needleman-Wunsch over the full token sequences (start and end tokens included), ties resolved gap-in-source first,
    then gap-in-edited, then diagonal. Positions past the edited prompt map to themselves."""
    x, y = _ids(source, tokenizer), _ids(edited, tokenizer)
    n, m = len(x), len(y)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 left (edited token inserted), 2 up (source token dropped), 3 diag
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1.0 if x[i - 1] == y[j - 1] else -1.0)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    pairs, i, j = [], n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move[i][j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    mapper = torch.arange(MAX_TOKENS)
    alphas = torch.ones(MAX_TOKENS)
    for j, src in pairs:
        mapper[j] = max(src, 0)
        alphas[j] = float(src >= 0)
    return mapper, alphas


def replace_mapper(source: str, edited: str, tokenizer) -> torch.Tensor:
    """(77, 77) M with edited map n = Σ_w source map w · M[w, n]: identity for equal words, a swapped word's source
    tokens spread evenly over its replacement's tokens. The prompts must have the same number of words."""
    check_words(source, edited, "replace")
    ts, te = word_tokens(source, tokenizer), word_tokens(edited, tokenizer)
    mapper = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    mapper[0, 0] = 1.0  # start token
    for a, b in zip(ts, te):
        if len(a) == len(b):
            mapper[a, b] = 1.0
        else:
            for t in b:
                mapper[a, t] = 1.0 / len(b)
    end_src, end_edit = 1 + sum(map(len, ts)), 1 + sum(map(len, te))
    for off in range(MAX_TOKENS - max(end_src, end_edit)):  # end and padding tokens, in order
        mapper[end_src + off, end_edit + off] = 1.0
    return mapper


class P2PControl:
    """The edit state of one two-prompt generation; `step` is advanced by the pipeline callback after each UNet call."""

    def __init__(self, prompts: Sequence[str], tokenizer, *, edit_type: str, steps: int, cross: float, self_: float,
                 blend_words: Sequence[str] = (), self_max_tokens: int, threshold: float, record: bool = False):
        self.edit_type, self.self_max_tokens, self.threshold = edit_type, self_max_tokens, threshold
        self.cross_calls = int(cross * (steps + 1))
        self.self_calls = int(self_ * steps)
        self.step = 0
        check_words(prompts[0], prompts[1], edit_type, blend_words)
        if edit_type == "replace":
            self.mapper = replace_mapper(prompts[0], prompts[1], tokenizer)
        elif edit_type == "refine":
            self.mapper, self.alphas = refine_mapper(prompts[0], prompts[1], tokenizer)
        else:
            raise ValueError(f"edit_type: must be refine or replace, got {edit_type!r}")
        self.blend = None
        if blend_words:  # one group of words per prompt
            blend = torch.zeros(2, MAX_TOKENS)
            for k, (prompt, group) in enumerate(zip(prompts, blend_words, strict=True)):
                spans = word_tokens(prompt, tokenizer)
                words = prompt.split(" ")
                for w in group.split():
                    hits = [t for i, word in enumerate(words) if word == w for t in spans[i]]
                    if not hits:  # a word of the caption, but past the text encoder's token limit
                        raise ValueError(f"local_blend: {w!r} lies past the {MAX_TOKENS}-token limit of {prompt!r}")
                    blend[k, hits] = 1.0
            self.blend = blend
        self.maps: list[torch.Tensor] = []  # this step's conditional cross maps (local blend), (2, heads, N, 77)
        self.blend_sum: dict[int, torch.Tensor] = {}  # token count -> summed maps over steps and layers
        self.record = [] if record else None

    # -- attention ------------------------------------------------------------------------------------------------
    def edit(self, probs: torch.Tensor, cross: bool) -> None:
        """Rewrite, in place, the edited row of probs (2, heads, N, M) = the [source, edited] conditional rows (no copy
        of the self-attention maps: at 512 px they are the largest tensors of the step)."""
        src = probs[0]
        if cross and self.step < self.cross_calls:
            if self.edit_type == "replace":
                probs[1] = torch.einsum("hpw,wn->hpn", src, self.mapper.to(src))
            else:
                a = self.alphas.to(src)
                probs[1] = src[:, :, self.mapper.to(src.device)] * a + probs[1] * (1 - a)
        elif not cross and self.step < self.self_calls and probs.shape[2] <= self.self_max_tokens:
            probs[1] = src
        if cross and self.blend is not None:
            self.maps.append(probs.detach().clone())
        if cross and self.record is not None:
            self.record.append((self.step, probs.detach().cpu().clone()))

    # -- steps ----------------------------------------------------------------------------------------------------
    def after_step(self, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Advance the step; with local blend, reset the latents outside the words' mask to the source's."""
        self.step += 1
        if self.blend is None:
            return latents
        for probs in self.maps:
            n, m = probs.shape[2], probs.float().mean(1)  # (2, N, 77): the heads' mean, summed over layers and steps
            self.blend_sum[n] = m if n not in self.blend_sum else self.blend_sum[n] + m
        self.maps = []
        h, w = latent_hw
        want = (h // 4) * (w // 4)
        n = want if want in self.blend_sum else min(self.blend_sum)  # tiny UNets: their coarsest maps
        side_h = max(1, round((n * h / w) ** 0.5))
        maps = self.blend_sum[n].reshape(2, side_h, n // side_h, MAX_TOKENS)
        words = (maps * self.blend.to(maps)[:, None, None, :]).sum(-1)[:, None]  # (2, 1, h', w')
        mask = F.interpolate(F.max_pool2d(words, 3, 1, padding=1), size=(h, w))
        mask = mask / mask.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        keep = (mask > self.threshold).any(0, keepdim=True).to(latents.dtype)  # union over the two prompts
        src = latents[:1]
        return src + keep * (latents - src)


class P2PAttnProcessor:
    """Attention with explicit probabilities, the conditional [source, edited] rows edited by a `P2PControl`."""

    def __init__(self, control: P2PControl):
        self.control = control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        mask = attn.prepare_attention_mask(attention_mask, n, b)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, mask)
        heads = probs.shape[0] // b
        self.control.edit(probs.view(b, heads, *probs.shape[1:])[-2:], cross)  # the conditional rows, in place
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def install(unet, control: P2PControl) -> dict:
    """Set a P2P processor on every attention layer of `unet`; returns the previous processors (to restore)."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: P2PAttnProcessor(control) for name in previous})
    return previous
