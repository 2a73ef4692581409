"""The generation core: one prefill, one decode step and one token picker over a slot cache.

`generate` (chat, eval, training's evaluation) and the server's engine both drive a `Core`:
`admit` puts sequences into free slots (their images encoded together in one packed vision call,
their prompts prefilled together in one right-padded forward, a stored prompt prefix reused),
`step` runs one decode step for any set of running sequences, `release` frees a slot. Every
token, in both, is chosen by `pick`: forced tokens (a spent thinking budget), the mode's
constraints, then greedy or sampling, with log-probabilities of the model's distribution.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from phi4rv.generation.cache import SlotCache, prefill_tokens
from phi4rv.generation.compiled import compiled_decode
from phi4rv.generation.grammar import Constraint, Grammar
from phi4rv.generation.sampling import SamplingParams, sample, token_logprobs
from phi4rv.memory import ByteLRU
from phi4rv.model.vlm import Phi4RV, image_segment_ids
from phi4rv.processing.image import ImagePatches
from phi4rv.processing.reasoning import MODES, THINK_END, THINK_START
from phi4rv.processing.tokenizer import StreamDecoder, Tokenizer
from phi4rv.processing.tokens import IMAGE_TOKEN_ID, expand_image_tokens

FORCED_CLOSE = "\n</think>\n\n"  # what a spent thinking budget makes the model write
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256  # characters per stop string


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    thinking_budget: int | None = None  # max tokens inside <think> before </think> is forced
    top_logprobs: int = 0
    logprobs: bool = True  # compute each token's log-probability (False: events carry None)
    grammar: Grammar | None = None  # the answer (not the reasoning) must be in this language

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop_strings):
            raise ValueError(f"a stop string is longer than {MAX_STOP_LENGTH} characters")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")


@dataclass
class Request:
    input_ids: list[int]  # prompt ids; IMAGE_TOKEN_ID once per image (not yet expanded)
    images: list[ImagePatches] = field(default_factory=list)
    mode: str = "auto"  # the prompt's mode: "think" opened <think>, "nothink" wrote the nothink marker

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def prompt_len(self) -> int:
        """Positions after each image placeholder is widened to its patch grid."""
        return len(self.input_ids) + sum(h * w - 1 for h, w in (im.grid for im in self.images))


@dataclass
class TokenEvent:
    row: int
    token_id: int
    text: str  # new text made visible by this token (may be "")
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    thinking: bool  # this token was generated inside <think> … </think>
    finish_reason: str | None = None  # "stop" | "length" once the row is done


class Markers:
    """The think markers as token ids, where the tokenizer has them as single tokens."""

    def __init__(self, tokenizer: Tokenizer):
        def single(text: str) -> int | None:
            ids = tokenizer.encode(text)
            return ids[0] if len(ids) == 1 else None

        self.open = single(THINK_START)
        self.close = single(THINK_END)
        # Without single-token markers, a marker's first piece is what starts it.
        self.open_start = tokenizer.encode(THINK_START)[0]
        self.close_start = tokenizer.encode(THINK_END)[0]
        self.forced_close = tokenizer.encode(FORCED_CLOSE)


class SequenceState:
    """Text-level state of one sequence: visible text, stop strings, thinking, forced tokens."""

    def __init__(self, tokenizer: Tokenizer, params: GenerationParams, mode: str, markers: Markers):
        self.decoder = StreamDecoder(tokenizer)
        self.params = params
        self.mode = mode
        self.markers = markers
        self.text = ""
        self.emitted = 0
        self.thinking = mode == "think"
        self.thought = False  # some non-space text was written inside <think>
        self.closed = False  # </think> has been written
        self.thinking_tokens = 0
        self.forced: list[int] = []
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.n = 0
        # With a grammar: the fewest tokens a complete answer takes (its eos included). The
        # reasoning may then not stop the sequence, and is closed while that many remain.
        self.answer_reserve: int | None = None

    @property
    def answering(self) -> bool:
        """The next token belongs to the answer (not the reasoning, not a forced close)."""
        return not self.thinking and not self.forced

    def banned(self) -> list[int]:
        """Tokens that would leave a forced mode: no reasoning block in nothink; in think, no second
        `<think>`, no empty reasoning, and no reasoning again after `</think>`. Auto is free.
        Where the markers are not single tokens, their first pieces are banned where a marker
        would have to start (at the start of the answer / of the reasoning)."""
        m = self.markers
        out = []
        if self.mode == "nothink":
            if m.open is not None:
                out = [t for t in (m.open, m.close) if t is not None]
            elif not self.text.strip():
                out = [m.open_start]
        elif self.mode == "think":
            if m.close is None:
                out = [m.close_start] if not self.thought else []
            else:
                out = ([m.open] if m.open is not None else []) + ([m.close] if not self.thought or self.closed else [])
        if self.answer_reserve is not None and self.thinking:
            out += self.params.stop_ids  # a constrained answer must follow the reasoning
        return out

    def push(self, token: int) -> tuple[str, bool, str | None]:
        """Account for `token`; returns (visible text delta, was thinking, finish reason)."""
        was_thinking = self.thinking
        self.n += 1
        if was_thinking:
            self.thinking_tokens += 1
        finish = None
        if token in self.params.stop_ids:
            finish = "stop"
        else:
            piece = self.decoder.push(token)
            self.text += piece
            if self.thinking and piece.strip() and THINK_END not in piece:
                self.thought = True
            if not self.thinking and not self.closed and self.text.lstrip().startswith(THINK_START):
                self.thinking = True  # auto mode: the model chose to think
            elif self.thinking and THINK_END in self.text:
                self.thinking, self.closed = False, True
            # A stop string can only end in the last piece: search the tail, not the whole text.
            tail = len(piece) + self.holdback
            cut = min((i for s in self.params.stop_strings if (i := self.text.find(s, max(0, len(self.text) - tail - len(s)))) >= 0),
                      default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                finish = "stop"
        if finish is None and self.n >= self.params.max_new_tokens:
            finish = "length"
        if finish is None and self.thinking and not self.forced:
            budget = self.params.thinking_budget
            close = len(self.markers.forced_close)
            left = self.params.max_new_tokens - self.n
            if (budget is not None and self.thinking_tokens >= budget) or (
                    self.answer_reserve is not None and left <= close + self.answer_reserve):
                self.forced = list(self.markers.forced_close)
        if finish is not None:
            if finish == "length" or token not in self.params.stop_ids:
                self.text += self.decoder.flush()
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta, was_thinking, finish


@dataclass
class Sequence:
    """One request in a `Core`: its slot, its text state and the token it feeds next."""

    request: Request
    params: GenerationParams
    row: int = 0  # the caller's index, echoed in events
    slot: int = -1
    state: SequenceState | None = None
    generator: torch.Generator | None = None
    constraint: Constraint | None = None
    token: int = 0
    finished: bool = False


def pick(logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenEvent]:
    """The next token of each sequence ([B, V] logits, one row per sequence), as events."""
    raw = logits.float()
    banned = [s.state.banned() for s in seqs]
    constrained = [s.constraint is not None and s.state.answering for s in seqs]
    masked = None  # numpy [B, V] when some row has tokens it may not pick
    if any(banned) or any(constrained):
        # Masked in numpy on the host: a few vectorised passes, no thread-pool hand-offs per row.
        masked = raw.cpu().numpy().copy()
        for i, s in enumerate(seqs):
            if constrained[i]:
                outside = s.constraint.banned(masked.shape[-1], s.params.max_new_tokens - s.state.n)
                m = s.state.markers
                if s.state.mode == "auto" and s.state.n == 0 and m.open is not None and outside[m.open]:
                    outside = outside.copy()
                    outside[m.open] = False  # auto may still open a reasoning block first
                np.copyto(masked[i], -np.inf, where=outside)
            if banned[i]:
                masked[i, banned[i]] = -np.inf
    if all(s.params.sampling.temperature == 0 for s in seqs):
        if masked is None and raw.device.type != "cpu":
            tokens = raw.argmax(-1)
        else:  # numpy's argmax: same first-maximum rule, ~8x faster than torch's on CPU at [16, 100k]
            host = masked if masked is not None else raw.numpy()
            tokens = torch.from_numpy(host.argmax(-1)).to(raw.device)
    else:
        logits = raw if masked is None else torch.from_numpy(masked).to(raw.device)
        tokens = torch.stack([sample(logits[i : i + 1], s.params.sampling, s.generator)[0] for i, s in enumerate(seqs)])
    forced = [s.state.forced.pop(0) if s.state.forced else None for s in seqs]
    if any(f is not None for f in forced):
        tokens = torch.tensor([f if f is not None else int(t) for f, t in zip(forced, tokens)], device=raw.device)
    top = max(s.params.top_logprobs for s in seqs)
    chosen = top_v = top_i = None
    if top or any(s.params.logprobs for s in seqs):
        chosen, top_v, top_i = token_logprobs(raw, tokens, top)
        chosen = chosen.tolist()
    events = []
    for i, (s, token) in enumerate(zip(seqs, tokens.tolist())):
        tops = None
        if s.params.top_logprobs:
            n = s.params.top_logprobs
            tops = list(zip(top_i[i, :n].tolist(), top_v[i, :n].tolist()))
        if constrained[i] and forced[i] is None and token != s.state.markers.open and token not in s.params.stop_ids:
            s.constraint.advance(token)
        text, was_thinking, finish = s.state.push(token)
        s.token, s.finished = token, finish is not None
        logprob = chosen[i] if chosen is not None and s.params.logprobs else None
        events.append(TokenEvent(s.row, token, text, logprob, tops, was_thinking, finish))
    return events


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_spans(input_ids: list[int], grids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[begin, end) of each image's positions in the expanded prompt."""
    spans, pos, k = [], 0, 0
    for t in input_ids:
        if t == IMAGE_TOKEN_ID:
            h, w = grids[k]
            spans.append((pos, pos + h * w))
            pos, k = pos + h * w, k + 1
        else:
            pos += 1
    return spans


class PrefixStore:
    """Keys/values of prompt prefixes, reused by later prompts that start the same way, and the
    vision features of the images in them.

    A prompt is cut into blocks of `block` positions; a block's key hashes its ids, the content of
    the images whose patches it holds and the key of the block before it, so two prompts share a
    block only if everything up to it is the same (the same placeholder ids with other images
    never match). An image's features are keyed by its content alone: a prompt that shares the
    image but not all the text before its end (the same image, another question) reuses them.
    Entries are kept least-recently-used first, within `max_bytes`.
    """

    def __init__(self, max_bytes: int, block: int = 32):
        self.block = block
        self.lru = ByteLRU(max_bytes)  # a KV block: keys then values per layer; an image: [features]
        self.hits = self.lookups = 0  # prompt positions served from the store / looked up

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes

    def keys(self, ids: list[int], images: list[ImagePatches]) -> list[bytes]:
        """One key per whole block of the expanded prompt, except a block holding its last position
        (that one must be computed: its logits pick the first token)."""
        owner: list[int] = []  # image index per position (-1 for text)
        k = 0
        for t in ids:
            if t == IMAGE_TOKEN_ID:
                h, w = images[k].grid
                owner += [k] * (h * w)
                k += 1
            else:
                owner.append(-1)
        full = expand_image_tokens(ids, [im.grid for im in images])
        out, prev = [], b""
        for start in range(0, len(full) - 1 - self.block + 1, self.block):
            end = start + self.block
            seen = sorted({o for o in owner[start:end] if o >= 0})
            h = hashlib.blake2b(prev + torch.tensor(full[start:end]).numpy().tobytes()
                                + b"".join(images[o].digest for o in seen), digest_size=16).digest()
            out.append(h)
            prev = h
        return out

    def longest(self, keys: list[bytes]) -> int:
        """How many leading blocks of `keys` are stored."""
        n = 0
        for key in keys:
            if self.lru.get(key) is None:
                break
            n += 1
        return n

    def get(self, keys: list[bytes]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        blocks = [self.lru.get(key) for key in keys]
        layers = len(blocks[0]) // 2
        return ([torch.cat([b[i] for b in blocks], dim=1) for i in range(layers)],
                [torch.cat([b[layers + i] for b in blocks], dim=1) for i in range(layers)])

    def put(self, keys: list[bytes], cache: SlotCache, slot: int) -> None:
        for j, key in enumerate(keys):
            if key not in self.lru:
                a, b = j * self.block, (j + 1) * self.block
                self._add(key, [t[slot, :, a:b].clone() for t in cache.k + cache.v])

    def features(self, image: bytes) -> torch.Tensor | None:
        """The stored vision features of the image with this content hash, if any."""
        stored = self.lru.get(b"image:" + image)
        return None if stored is None else stored[0]

    def put_features(self, image: bytes, feats: torch.Tensor) -> None:
        key = b"image:" + image
        if key not in self.lru:
            self._add(key, [feats.clone()])

    def _add(self, key: bytes, value: list[torch.Tensor]) -> None:
        self.lru.put(key, value, sum(x.numel() * x.element_size() for x in value))


class Core:
    def __init__(self, model: Phi4RV, tokenizer: Tokenizer, slots: int, slot_len: int, prefix_bytes: int = 0,
                 reserve_bytes: int = 0):
        """`reserve_bytes`: memory the caller's own caches may grow to, kept free beside the KV cache
        with the prefix store's `prefix_bytes` (the server's image cache)."""
        self.model, self.tokenizer = model, tokenizer
        self.cache = SlotCache(model.cfg.decoder, slots, slot_len, model.device, model.dtype, prefix_bytes + reserve_bytes)
        self.free = list(range(slots))[::-1]
        self.markers = Markers(tokenizer)
        self.slack = len(self.markers.forced_close)  # room for a forced </think>
        self.prefixes = PrefixStore(prefix_bytes) if prefix_bytes > 0 else None
        self.timing: dict[str, float] = {}
        self.compiled = compiled_decode(model)  # None: decode steps run eagerly

    @property
    def slot_len(self) -> int:
        return self.cache.slot_len

    def check_fits(self, request: Request, params: GenerationParams) -> None:
        if request.prompt_len == 0:
            raise ValueError("empty prompt")
        if request.prompt_len + params.max_new_tokens + self.slack > self.slot_len:
            raise ValueError(
                f"prompt ({request.prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.slot_len} tokens"
            )

    @torch.inference_mode()
    def admit(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Prefill `seqs` into free slots and pick their first tokens."""
        if len(seqs) > len(self.free):
            raise ValueError(f"{len(seqs)} sequences but {len(self.free)} free slots")
        model, device = self.model, self.model.device
        for s in seqs:
            self.check_fits(s.request, s.params)
            s.slot = self.free.pop()
            s.state = SequenceState(self.tokenizer, s.params, s.request.mode, self.markers)
            if s.params.seed is not None:
                s.generator = torch.Generator(device=device).manual_seed(s.params.seed)
            if s.params.grammar is not None:
                s.constraint = s.params.grammar.start()
                s.state.answer_reserve = s.params.grammar.distance(s.constraint.guide.get_state()) + 1

        # Stored prefixes first: an image whose every position is in a reused prefix is not encoded,
        # nor one whose features are stored.
        t0 = time.perf_counter()
        rows, keys = [], []
        for s in seqs:
            grids = [im.grid for im in s.request.images]
            full = expand_image_tokens(s.request.input_ids, grids)
            start, row_keys = 0, []
            if self.prefixes is not None:
                row_keys = self.prefixes.keys(s.request.input_ids, s.request.images)
                hit = self.prefixes.longest(row_keys)
                if model.cfg.image_bidirectional_attention:  # a reused prefix may not cut an image
                    while hit and full[hit * self.prefixes.block - 1] == IMAGE_TOKEN_ID \
                            and full[hit * self.prefixes.block] == IMAGE_TOKEN_ID:
                        hit -= 1
                self.prefixes.lookups += len(full)
                if hit:
                    self.cache.copy_prefix(s.slot, *self.prefixes.get(row_keys[:hit]))
                    start = hit * self.prefixes.block
                    self.prefixes.hits += start
            rows.append((full, start, image_spans(s.request.input_ids, grids)))
            keys.append(row_keys)
        self.timing["prefill"] = self.timing.get("prefill", 0.0) + time.perf_counter() - t0

        t0 = time.perf_counter()
        feats: list[list[torch.Tensor | None]] = []  # per row, per image with positions from `start` on
        missing: list[tuple[int, int, ImagePatches]] = []  # (row, index in feats[row], image)
        for i, (s, (_, start, spans)) in enumerate(zip(seqs, rows)):
            feats.append([])
            for im, (_, end) in zip(s.request.images, spans):
                if end > start:
                    stored = self.prefixes.features(im.digest) if self.prefixes is not None else None
                    if stored is None:
                        missing.append((i, len(feats[i]), im))
                    feats[i].append(stored)
        if missing:
            images = [im for _, _, im in missing]
            new = model.encode_images(torch.cat([im.pixels for im in images]).to(device), [im.grid for im in images])
            for (i, j, im), f in zip(missing, new.split([im.pixels.shape[0] for im in images])):
                feats[i][j] = f
                if self.prefixes is not None:
                    self.prefixes.put_features(im.digest, f)
        _sync(device)
        self.timing["vision"] = self.timing.get("vision", 0.0) + time.perf_counter() - t0

        t0 = time.perf_counter()
        ids = []
        for (full, start, spans), row_feats in zip(rows, feats):
            skip = sum(start - begin for begin, end in spans if begin < start < end)  # the cached part of one cut
            ids.append((full, torch.cat(row_feats)[skip:] if row_feats else None, start))
        logits = self._prefill(seqs, ids)
        _sync(device)
        self.timing["prefill"] = self.timing.get("prefill", 0.0) + time.perf_counter() - t0
        if self.prefixes is not None:
            for s, row_keys in zip(seqs, keys):
                self.prefixes.put(row_keys, self.cache, s.slot)
        return pick(logits, seqs)

    def _prefill(self, seqs: list[Sequence], rows: list[tuple[list[int], torch.Tensor | None, int]]) -> torch.Tensor:
        """Right-padded forwards over every prompt's uncached part, `prefill_tokens` positions at a
        time in all (so a long prompt's activations stay bounded); [B, V] logits at each last position."""
        model, device = self.model, self.model.device
        lens = [len(full) - start for full, _, start in rows]
        t = max(lens)
        input_ids = torch.zeros((len(rows), t), dtype=torch.long, device=device)
        for i, (full, _, start) in enumerate(rows):
            input_ids[i, : lens[i]] = torch.tensor(full[start:], device=device)
        x = model.decoder.embed_tokens(input_ids.clamp(min=0))
        for i, (full, row_feats, start) in enumerate(rows):
            if row_feats is not None:  # the features of the row's image positions from `start` on
                is_image = torch.tensor(full[start:], device=device) == IMAGE_TOKEN_ID
                x[i, : lens[i]][is_image] = row_feats.to(x.dtype)
        slots = [s.slot for s in seqs]
        if model.cfg.image_bidirectional_attention and any(f is not None for _, f, _ in rows):
            return self._prefill_bidirectional(seqs, rows, x, lens)
        chunk = max(1, prefill_tokens(model.cfg.decoder) // len(rows))
        last: list[torch.Tensor | None] = [None] * len(rows)
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            # A row whose prompt ended in an earlier chunk is written past its end (overwritten by
            # its first decoded token before anything reads there), as right-padding is.
            self.cache.bind(slots, new=[min(max(n - c0, 0), c1 - c0) for n in lens])
            positions = self.cache.starts[:, None] + torch.arange(c1 - c0, device=device)
            mask = None  # causal
            if bool((self.cache.starts > 0).any()):  # after a stored prefix or an earlier chunk
                k_pos = torch.arange(int(self.cache.starts.max()) + c1 - c0, device=device)
                mask = (k_pos[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, S] causal from each row's start
            h = model.decoder(x[:, c0:c1], positions, mask, self.cache)
            for i, n in enumerate(lens):
                if c0 < n <= c1:
                    last[i] = h[i, n - 1 - c0]
        return model.decoder.lm_head(torch.stack(last))

    def _prefill_bidirectional(self, seqs: list[Sequence], rows: list[tuple[list[int], torch.Tensor | None, int]],
                               x: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """One forward (an image's positions see each other, so a chunk may not cut one)."""
        device = x.device
        starts = torch.tensor([start for _, _, start in rows], device=device)
        positions = starts[:, None] + torch.arange(x.shape[1], device=device)
        s_len = int(starts.max()) + x.shape[1]
        k_pos = torch.arange(s_len, device=device)
        mask = (k_pos[None, None, :] <= positions[:, :, None])  # [B, T, S] causal from each row's start
        image_ids = torch.zeros((len(rows), s_len), dtype=torch.long, device=device)
        for i, (full, f, start) in enumerate(rows):
            if f is not None:
                row = torch.tensor(full, device=device)[None]
                grids = [im.grid for im in seqs[i].request.images]
                image_ids[i, : len(full)] = image_segment_ids(row, [h * w for h, w in grids])[0]
        q_img = image_ids.gather(1, positions.clamp(max=s_len - 1))
        mask |= (q_img[:, :, None] == image_ids[:, None, :]) & (q_img[:, :, None] > 0)
        self.cache.bind([s.slot for s in seqs], new=lens)
        h = self.model.decoder(x, positions, mask[:, None], self.cache)
        return self.model.decoder.lm_head(h[torch.arange(len(rows), device=device), torch.tensor(lens, device=device) - 1])

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """One decode step: each sequence feeds its last token and gets its next (events in `seqs`' order)."""
        model, device = self.model, self.model.device
        self._close_holes(seqs)
        by_slot = sorted(seqs, key=lambda s: s.slot)  # consecutive slots in order are read as a view, not gathered
        self.cache.bind([s.slot for s in by_slot])
        if self.compiled is not None:
            logits = self.compiled(torch.tensor([s.token for s in by_slot], device=device), self.cache)
        else:
            tokens = torch.tensor([[s.token] for s in by_slot], device=device)
            h = model.decoder(model.decoder.embed_tokens(tokens), self.cache.starts[:, None], self.cache.decode_mask(), self.cache)
            logits = model.decoder.lm_head(h[:, -1])
        events = dict(zip(map(id, by_slot), pick(logits, by_slot)))
        return [events[id(s)] for s in seqs]

    def _close_holes(self, seqs: list[Sequence]) -> None:
        """Moves the highest-slot sequences down into free slots below them (a sequence that left
        mid-batch leaves a hole): the stepped slots then run consecutively and are read as views of
        the cache, where a hole would have them gathered (copied) at every step."""
        for s in sorted(seqs, key=lambda s: s.slot, reverse=True):
            if not self.free or self.free[-1] > s.slot:  # self.free[-1]: the lowest free slot
                break
            hole = self.free.pop()
            self.cache.move(s.slot, hole)
            self.free.append(s.slot)
            self.free.sort(reverse=True)
            s.slot = hole

    def release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.cache.release(seq.slot)
            self.free.append(seq.slot)
            self.free.sort(reverse=True)  # the lowest free slot is taken next: running slots stay packed
            seq.slot = -1
