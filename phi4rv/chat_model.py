"""A checkpoint ready to chat: model + tokenizer + image settings, with timing and token accounting.

This is the Python API behind `phi4rv chat` (and later the server):

    cm = ChatModel.load("ckpt/")
    r = cm.chat([{"role": "user", "content": "<image>\\nWhat is this?"}], images=["cat.jpg"], mode="think")
    print(r.thinking, r.answer, r.usage, r.timing)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from phi4rv.checkpoint import load_model
from phi4rv.config import Phi4RVConfig
from phi4rv.generation.compiled import compile_decode
from phi4rv.generation.generate import GenerationParams, Request, TokenEvent, generate, generate_stream
from phi4rv.generation.grammar import Grammar
from phi4rv.generation.sampling import SamplingParams
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.chat import Grounding, encode_chat, ground, grounding_prompt
from phi4rv.processing.image import ImageProcessorConfig, ImageSource, PatchCache, image_size, process_image
from phi4rv.processing.reasoning import MODES, CompletionSplitter, Delta, parse_completion
from phi4rv.processing.tokenizer import Tokenizer


@dataclass
class Conversation:
    messages: list[dict]
    images: list[ImageSource] = field(default_factory=list)
    mode: str = "auto"


@dataclass
class ChatResult:
    thinking: str | None
    answer: str
    mode: str  # the mode the answer was produced in: "think" | "nothink"
    finished: bool
    finish_reason: str | None
    text: str  # raw generated text
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    usage: dict[str, int]
    timing: dict[str, float]

    def to_json(self) -> dict:
        return asdict(self)


_FRACTION = r"(0\.[0-9]{4}|1\.0000)"
BOX_PATTERN = r"\[" + ", ".join([_FRACTION] * 4) + r"\]"  # the release's grounding answer
DETAILS = ("low", "high", "auto")
LOW_DETAIL_PATCHES = 256


class ChatModel:
    def __init__(self, model: Phi4RV, tokenizer: Tokenizer, image_cfg: ImageProcessorConfig, generation_config: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg  # its max_num_patches is the default ("auto") patch budget
        self.generation_config = generation_config

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        max_num_patches: int | None = None,
        quantize: str | None = None,
        compile: str | bool | None = None,
        before_read: Callable[[Phi4RVConfig, torch.dtype, int | None], None] | None = None,
    ) -> ChatModel:
        """`max_num_patches`: the default patch budget per image (default: the checkpoint's maximum).
        `quantize`: None, "int8", "int4" or "w8a8" (at load time; see `phi4rv.model.quant`).
        `compile`: True or a `torch.compile` mode ("default", "reduce-overhead", ...) compiles the
        decode step (`phi4rv.generation.compiled`); the first tokens pay the compile.
        `before_read`: see `load_model`."""
        path = Path(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(path, dtype=dtype, device=device, quantize=quantize, before_read=before_read)
        compile_decode(model, compile)
        tokenizer = Tokenizer.from_dir(path)
        pre = path / "preprocessor_config.json"
        saved = ImageProcessorConfig.from_dict(json.loads(pre.read_text())) if pre.is_file() else None
        image_cfg = ImageProcessorConfig.from_model(model.cfg, saved)
        gen = path / "generation_config.json"
        generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
        cm = cls(model, tokenizer, image_cfg, generation_config)
        if max_num_patches is not None:
            cm.image_cfg.max_num_patches = cm.patch_budget(max_num_patches=max_num_patches)
        return cm

    def patch_budget(self, detail: str | None = None, max_num_patches: int | None = None) -> int:
        """Most patches an image may use: OpenAI's `detail` (low = 256, high = the checkpoint's
        maximum, auto = the default budget) or an explicit count (at most the checkpoint's maximum)."""
        most = self.model.cfg.max_num_patches
        if max_num_patches is not None:
            if not 1 <= max_num_patches <= most:
                raise ValueError(f"max_num_patches must be between 1 and the checkpoint's maximum {most}, "
                                 f"got {max_num_patches}")
            return max_num_patches
        if detail not in (None, *DETAILS):
            raise ValueError(f"image detail must be one of {', '.join(DETAILS)}, got {detail!r}")
        return {"low": min(LOW_DETAIL_PATCHES, most), "high": most}.get(detail, self.image_cfg.max_num_patches)

    def stop_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id", self.model.cfg.eos_token_id)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids.add(self.tokenizer.eos_id)
        return tuple(sorted(i for i in ids if i is not None))

    def prepare(
        self,
        messages: list[dict],
        images: Sequence[ImageSource],
        mode: str,
        details: Sequence[str | None] | None = None,
        special_tokens: bool = False,
        patch_cache: PatchCache | None = None,
    ) -> tuple[Request, dict]:
        """Messages (string contents with `<image>` tags, or OpenAI parts) and their images ->
        a generation request; `details` gives each image's OpenAI detail (low / high / auto).
        Control tokens spelled in the messages are text unless `special_tokens` allows them."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        t0 = time.perf_counter()
        enc = encode_chat(self.tokenizer, messages, mode=mode, special_tokens=special_tokens)
        if enc.num_images != len(images):
            raise ValueError(f"the prompt has {enc.num_images} <image> tag(s) but {len(images)} image(s) were given")
        details = list(details) if details is not None else [None] * len(images)
        process = patch_cache.process if patch_cache is not None else process_image
        patches = [
            process(im, replace(self.image_cfg, max_num_patches=self.patch_budget(d)))
            for im, d in zip(images, details, strict=True)
        ]
        image_tokens = sum(p.grid[0] * p.grid[1] for p in patches)
        usage = {"prompt_tokens": len(enc.input_ids) - enc.num_images + image_tokens, "image_tokens": image_tokens}
        timing = {"preprocess": time.perf_counter() - t0}
        return Request(enc.input_ids, patches, mode=mode), {"usage": usage, "timing": timing}

    def params(self, **kw) -> GenerationParams:
        kw.setdefault("stop_ids", self.stop_ids())
        return GenerationParams(**kw)

    def stream_events(
        self, messages: list[dict], images: Sequence[ImageSource] = (), mode: str = "auto", params: GenerationParams | None = None
    ) -> Iterator[tuple[TokenEvent, dict]]:
        request, info = self.prepare(messages, images, mode)
        for events in generate_stream(self.model, self.tokenizer, [request], params or self.params(), info["timing"]):
            yield events[0], info

    def stream(
        self, messages: list[dict], images: Sequence[ImageSource] = (), mode: str = "auto", params: GenerationParams | None = None
    ) -> Iterator[Delta]:
        """Thinking and answer text as it is generated, markers removed."""
        splitter = CompletionSplitter(mode)
        for event, _ in self.stream_events(messages, images, mode, params):
            yield from splitter.push(event.text, final=event.finish_reason is not None)

    def chat(
        self, messages: list[dict], images: Sequence[ImageSource] = (), mode: str = "auto", params: GenerationParams | None = None
    ) -> ChatResult:
        return self.chat_batch([Conversation(messages, list(images), mode)], params)[0]

    def chat_batch(self, conversations: Sequence[Conversation], params: GenerationParams | None = None) -> list[ChatResult]:
        """Several conversations generated together in one batch (their images encoded together)."""
        prepared = [self.prepare(c.messages, c.images, c.mode) for c in conversations]
        shared: dict[str, float] = {}
        gens = generate(self.model, self.tokenizer, [req for req, _ in prepared], params or self.params(), shared)
        results = []
        for conv, (_, info), g in zip(conversations, prepared, gens):
            parsed = parse_completion(g.text, conv.mode, stopped_by_length=g.finish_reason == "length")
            usage = dict(info["usage"])
            usage.update(
                completion_tokens=len(g.token_ids),
                thinking_tokens=g.thinking_tokens,
                answer_tokens=len(g.token_ids) - g.thinking_tokens,
            )
            results.append(
                ChatResult(
                    thinking=parsed.thinking,
                    answer=parsed.answer,
                    mode=parsed.mode,
                    finished=parsed.finished,
                    finish_reason=g.finish_reason,
                    text=g.text,
                    token_ids=g.token_ids,
                    logprobs=g.logprobs,
                    top_logprobs=g.top_logprobs,
                    usage=usage,
                    timing={**info["timing"], **shared},
                )
            )
        return results

    def ground(self, image: ImageSource, target: str, params: GenerationParams | None = None) -> tuple[Grounding | None, ChatResult]:
        """Locate a UI element: the release's grounding prompt, answered directly; the box is in
        the pixels of `image` as given (None when the answer holds no valid box)."""
        params = params or self.params(max_new_tokens=64, sampling=SamplingParams(temperature=0))
        if params.grammar is None:  # the answer is a box in the release's format, always
            params = replace(params, grammar=Grammar.compile(BOX_PATTERN, self.tokenizer))
        result = self.chat([{"role": "user", "content": grounding_prompt(target)}], [image], "nothink", params)
        width, height = image_size(image)
        return ground(result.answer, width, height), result
