"""A gpt-fast-style Stage-4 engine on transformers' Llama: static KV cache, one prefill, a graph-captured step.

Read top to bottom: `StaticKVCache` (where keys/values live), `StaticEngine.setup()` (allocate once,
capture once), `prefill()`, `decode_step()` / `decode_n()` (greedy, argmax on the device),
`generate()` (one sample, EOS checked once per chunk), and `StaticTarget` (the same cache as a
speculative-decoding target: `prefill`, `verify`, `crop`).

Why not `torch.compile(model.forward, mode="reduce-overhead")`: on transformers 5.17 its CUDA-graph
output buffer is overwritten by the next replay (GPU.md). Here every captured region reads and
writes buffers the engine owns (`_token`, `_position`, `_next`, `_out`, the cache), so nothing a
replay returns is ever freed or reused behind our back.

Positions: transformers 5.17 removed `cache_position` from Llama's forward; its `StaticLayer`
writes at a per-layer counter (`cumulative_length`) that it advances itself. `StaticKVCache`
instead writes every layer at one explicit `cache_position` buffer, as gpt-fast's KVCache does:
a rollback is then a host-side length change (no copies, no per-layer counters to rewind), and
a captured graph writes wherever the buffer, updated in place, points.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import StaticCache

from egpt_speed.decoding import DecodeResult, truncate_at_eos, with_cache
from egpt_speed.errors import EgptError
from egpt_speed.flex import FLEX, block_mask_from_dense
from egpt_speed.host_staging import PinnedStaging
from egpt_speed.timing import Clock, synchronize

SUPPORTED_ATTENTION = ("sdpa", "eager", FLEX)
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead")
# `compile` without --compile-mode: CUDA the fastest measured mode (strategies/compile.py's docstring); the CPU
# none, where compilation costs more than it saves for test-sized models
DEFAULT_COMPILE_MODE = {"cuda": "max-autotune-no-cudagraphs"}
DRAFT_COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")  # the drafter is captured by us: no cudagraph trees
CACHE_ROUNDING = 256  # cache lengths are rounded up: fewer re-captures across prompts, 16-aligned masks for SDPA
# EOS is read back every DEFAULT_EOS_EVERY tokens. A per-token read (one sync) costs ~0.02 ms/token once the
# step is a graph replay (H100, 7B: 8.32 vs 8.30 ms/token with chunks of 8), while a chunk of C decodes on
# average (C − 1)/2 dropped tokens past an EOS (~6–8 ms each): per-token checks win for answers that end.
DEFAULT_EOS_EVERY = 1
# Prompts are prefilled padded to a multiple of PREFILL_BUCKET and, on CUDA, as one captured graph per bucket:
# an eager prefill is launch-bound and rides on the host's noise. H200, `tiny` bf16, 619–628-token prompts
# (2026-12-03): the eager prefill took 19–109 ms per sample against ~1.5 ms of decode per token, i.e. as much
# as 13–70 decode steps (benchmarks/results/spec_compare_h200_20261203_fused/). Padding slots are written like
# rejected drafts: every later query's mask hides them until the decode overwrites them.
PREFILL_BUCKET = 64
# SDPA backends of the captured decode / verify / draft forwards on CUDA, per dtype (a few queries against the
# whole cache; prefill keeps PyTorch's choice). For a masked query PyTorch picks the memory-efficient kernel,
# which runs one CTA per head: on an H200, SmolLM2-135M shape (9 heads), float32, it took 87 µs a layer, 54 % of
# a captured decode step; with the math backend the step went 5.22 → 3.35 ms and a 33-wide verify 7.34 → 5.94
# ms. In bfloat16 the math backend was slower (3.57 → 4.92 ms), so bfloat16 keeps PyTorch's choice
# (benchmarks/results/step_kernel_probe_20261128_102442.md and _102705.md).
DECODE_SDPA_BACKENDS: dict[torch.dtype, list[SDPBackend]] = {torch.float32: [SDPBackend.MATH]}


class StaticKVCache(StaticCache):
    """transformers' StaticCache, written at an explicit shared `cache_position` instead of per-layer counters.

    Allocated eagerly (`early_initialization`) so its addresses exist before any graph is captured.
    `length` is the host's count of valid positions; transformers reads it (via `get_seq_length`)
    only to build the prefill mask, every other forward gets positions and mask explicitly.
    """

    def __init__(self, config, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__(config=config, max_cache_len=max_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.early_initialization(max_batch, kv_heads, head_dim, dtype, device)
        self.max_len = max_len
        self.cache_position: torch.Tensor | None = None  # [q] long: where the running forward writes
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states/value_states: [B, kv_heads, q, head_dim] → the whole layer cache [B, kv_heads, max_len, head_dim]."""
        layer = self.layers[layer_idx]
        layer.keys.index_copy_(2, self.cache_position, key_states)
        layer.values.index_copy_(2, self.cache_position, value_states)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reset(self) -> None:
        # zeroing is not needed for correctness (masks hide stale entries) but keeps a sample independent of
        # the previous one even if a stale value was non-finite (0 × NaN); ~0.1 ms for 7B
        for layer in self.layers:
            layer.keys.zero_()
            layer.values.zero_()
        self.length = 0


def resolve_compile_mode(option: str | None, device: torch.device) -> str | None:
    """--compile-mode as given ("none" and "" mean no inductor), else the device's default."""
    mode = option or DEFAULT_COMPILE_MODE.get(device.type)
    return None if mode in (None, "", "none") else str(mode)


def round_up(value: int, multiple: int = CACHE_ROUNDING) -> int:
    return int(math.ceil(value / multiple) * multiple)


def prefill_bucket(length: int, max_len: int) -> int:
    """The padded length a prompt of `length` positions is prefilled at (PREFILL_BUCKET), within a cache of max_len."""
    return min(round_up(length, PREFILL_BUCKET), max_len)


def with_decode_attention(body: Callable[[], None], device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """`body` run under the dtype's DECODE_SDPA_BACKENDS on CUDA (a compiled or captured body is traced under
    them, so the choice is baked in); unchanged elsewhere."""
    backends = DECODE_SDPA_BACKENDS.get(dtype)
    if device.type != "cuda" or not backends:
        return body

    def run() -> None:
        with sdpa_kernel(backends):
            body()
    return run


def capture_cuda_graph(body: Callable[[], None], device: torch.device, warmup: int) -> torch.cuda.CUDAGraph:
    """`body` captured once as a CUDA graph, after `warmup` runs on a side stream (cuBLAS handles,
    SDPA kernel choice, compilation happen there, outside the capture)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


@dataclass
class _PrefillBuffers:
    """The fixed-shape inputs and outputs of one prefill bucket's graph."""

    embeds: torch.Tensor  # [1, B, H] the prompt, zero-padded
    positions: torch.Tensor  # [B] 0..B-1
    last: torch.Tensor  # [1] L - 1: the last real position
    logits: torch.Tensor  # [1, 1, V]
    features: torch.Tensor  # [1, B, F]

    @classmethod
    def allocate(cls, engine: "StaticEngine", bucket: int, aux_layers: tuple[int, ...]) -> "_PrefillBuffers":
        config, device, dtype = engine.llm.config, engine.device, engine.dtype
        hidden = config.hidden_size
        return cls(embeds=torch.zeros(1, bucket, hidden, dtype=dtype, device=device),
                   positions=torch.arange(bucket, device=device),
                   last=torch.zeros(1, dtype=torch.long, device=device),
                   logits=torch.zeros(1, 1, engine.llm.lm_head.weight.shape[0], dtype=dtype, device=device),
                   features=torch.zeros(1, bucket, hidden * max(1, len(aux_layers)), dtype=dtype, device=device))


class StaticEngine:
    """Greedy batch-1 decoding of a transformers Llama on a static cache; the decode step is a CUDA graph on CUDA.

    setup(max_batch, max_seq) allocates the cache and captures once; calling it again with a size
    that fits is free, a larger size re-allocates and re-captures. On the CPU the same code runs
    without capture (`cuda_graph` is False), which is what the tests exercise.
    """

    def __init__(self, llm, cuda_graph: bool | None = None, compile_mode: str | None = None,
                 prefill_graphs: bool | None = None, inductor_config: dict | None = None):
        attention = getattr(llm.config, "_attn_implementation", "sdpa")
        if attention not in SUPPORTED_ATTENTION:
            raise EgptError(f"the static-cache decoder supports attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, "
                            f"not {attention!r}; drop the attention preparer or use baseline.")
        if compile_mode not in COMPILE_MODES:
            raise EgptError(f"compile mode {compile_mode!r} is not one of {', '.join(str(m) for m in COMPILE_MODES)}.")
        self.llm = llm
        self.device = llm.get_input_embeddings().weight.device
        self.dtype = llm.get_input_embeddings().weight.dtype
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise EgptError("CUDA-graph capture needs the model on a CUDA device.")
        self.compile_mode = compile_mode
        self.inductor_config = dict(inductor_config or {})  # torch._inductor.config entries while compiling (only)
        # reduce-overhead brings its own CUDA graphs (cudagraph trees); every other mode is captured by us
        self.manual_graph = self.cuda_graph and compile_mode != "reduce-overhead"
        self.cache: StaticKVCache | None = None
        self.max_batch = 0
        self.allocations = 0  # caches allocated so far: targets sharing this engine rebuild their state when it moves
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._steps: dict[str, Callable[[], None]] = {}
        # padded, captured prefill (PREFILL_BUCKET): on by default wherever the decode step is captured by us
        self.prefill_graphs = self.manual_graph if prefill_graphs is None else prefill_graphs
        self._prefill_buffers: dict[tuple[int, tuple[int, ...]], _PrefillBuffers] = {}
        self.prefill_capture_ms = 0.0  # capture time of the last prefill that met a new bucket (0 otherwise)
        self.setup_ms = 0.0  # allocation + warm-up + capture (+ compilation) of the last setup that did work

    # ---- setup ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def setup(self, max_batch: int, max_seq: int) -> float:
        """Allocate a cache of ≥ max_seq positions and capture the decode step; returns the ms spent (0 if it fit)."""
        if max_batch != 1:
            raise EgptError("the static-cache decoder is batch-1; use --batch-size 1.")
        if self.cache is not None and self.max_batch >= max_batch and self.cache.max_len >= max_seq:
            return 0.0
        start = time.perf_counter()
        self.release()
        max_len = round_up(max_seq)
        self.cache = StaticKVCache(self.llm.config, max_batch, max_len, self.dtype, self.device)
        self.allocations += 1
        self.max_batch = max_batch
        device = self.device
        self._kv_positions = torch.arange(max_len, device=device).view(1, 1, 1, max_len)  # [1, 1, 1, M]
        self._token = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] the token the step feeds
        self._position = torch.zeros(1, dtype=torch.long, device=device)  # [1] its position (= cache_position)
        self._next = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] the step's greedy token
        self._step = torch.zeros(1, dtype=torch.long, device=device)  # [1] index into _out
        self._out = torch.zeros(1, max_len, dtype=torch.long, device=device)  # [1, M] tokens of one decode_n
        if self.compile_mode is not None:
            for buffer in (self._token, self._position, self._next, self._step, self._out, self._kv_positions):
                torch._dynamo.mark_static_address(buffer)
        self._prepare_step("decode", self._decode_body)
        self.cache.reset()  # warm-up and capture wrote garbage at position 0
        synchronize(device)
        self.setup_ms = (time.perf_counter() - start) * 1e3
        return self.setup_ms

    def release(self) -> None:
        """Drop the cache and graphs (before a larger setup, or to free device memory)."""
        self._graphs.clear()
        self._steps.clear()
        self._prefill_buffers.clear()
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare_step(self, name: str, body: Callable[[], None], compile: bool = True,
                      decode_attention: bool = True) -> None:
        """Make `body` (reads and writes engine buffers only) runnable as self._steps[name], captured on CUDA.

        compile=False captures the eager body (index copies: nothing for inductor to fuse); decode_attention=False
        keeps PyTorch's SDPA choice instead of DECODE_SDPA_BACKENDS (the prefill's long causal query)."""
        compiled = self.compile_mode is not None and compile
        if compiled:
            body = torch.compile(body, mode=self.compile_mode, fullgraph=True, dynamic=False)
        if decode_attention:
            body = with_decode_attention(body, self.device, self.dtype)
        if not self.manual_graph:
            if compiled:  # compile (and record cudagraph trees) now, inside setup's timing
                with torch._inductor.config.patch(self.inductor_config):
                    for _ in range(3):
                        body()
            self._steps[name] = body
            return
        # The buffers hold whatever the caller loaded: warm-up writes only cache positions that are about
        # to be overwritten (or a cache that setup() resets right after). Inductor compiles in the warm-up.
        with torch._inductor.config.patch(self.inductor_config if compiled else {}):
            graph = capture_cuda_graph(body, self.device, warmup=3)
        self._graphs[name] = graph
        self._steps[name] = graph.replay

    @property
    def captured(self) -> bool:
        return bool(self._graphs) or (self.cuda_graph and self.compile_mode == "reduce-overhead" and bool(self._steps))

    # ---- the forward every stage shares -----------------------------------------------------------

    def _attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [q] → [1, 1, q, M]: query i sees cache slots ≤ positions[i].

        Built on the device from buffers, so it is graph-safe (no host sync, fixed shape). transformers'
        own mask for a StaticCache would need the cache's length, and for q > 1 its SDPA shortcut
        compares the offset to 0 on the host (a sync, and a value baked into a capture); with this
        explicit 4-D mask `create_causal_mask` returns it untouched. Slots past a query's position may
        hold stale drafts or garbage: this mask is what keeps them invisible after a rollback.
        """
        return mask_for_attention(self._kv_positions <= positions.view(1, 1, -1, 1), self)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, position_ids: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, aux_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [1, q] written at cache slots positions: [q] → (logits [1, q, V], features [1, q, F]).

        Writes the tokens' keys/values at those slots. A draft tree passes its own RoPE
        `position_ids` [1, q] (base + depth) and `mask` [1, 1, q, M]; a chain uses the slots for both. The features are what an EAGLE-style
        drafter reads: the final-norm hidden states (F = H), or with `aux_layers` (an EAGLE-3 head) the
        inputs of those decoder layers concatenated (F = len × H). LlamaForCausalLM.forward is exactly
        model → lm_head, so logits are unchanged.
        """
        self.cache.cache_position = positions
        position_ids = positions.view(1, -1) if position_ids is None else position_ids
        mask = self._attention_mask(positions) if mask is None else mask
        out = self.llm.model(**with_cache(self.cache, input_ids=tokens, position_ids=position_ids, attention_mask=mask,
                                          output_hidden_states=bool(aux_layers)))
        return self.llm.lm_head(out.last_hidden_state), features_of(out, aux_layers)

    # ---- prefill and decode ------------------------------------------------------------------------

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the previous sample (the cache is kept and zeroed; graphs stay valid)."""
        self.cache.reset()

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, aux_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds: [1, L, H] (the spliced prompt) → (logits [1, 1, V] of the last position, features [1, L, F]).

        The cache then holds positions 0..L-1. With `prefill_graphs` (CUDA default) the prompt runs padded to
        its PREFILL_BUCKET under an explicit causal mask, captured once per bucket; otherwise unpadded and
        eager: with no mask given, transformers sees an empty static cache (length 0) and lets SDPA run causal
        attention on the first L slots only (the flash kernel), as for a dynamic cache.
        """
        length = embeds.shape[1]
        if length > self.cache.max_len:
            raise EgptError(f"the prompt ({length} tokens) does not fit the static cache ({self.cache.max_len}); call setup() with a larger size.")
        self.cache.length = 0
        self.prefill_capture_ms = 0.0
        if self.prefill_graphs:
            return self._bucketed_prefill(embeds, aux_layers)
        self.cache.cache_position = torch.arange(length, device=self.device)
        out = self.llm.model(**with_cache(self.cache, inputs_embeds=embeds.to(self.dtype), output_hidden_states=bool(aux_layers),
                                          position_ids=self.cache.cache_position.view(1, -1)))
        self.cache.length = length
        return self.llm.lm_head(out.last_hidden_state[:, -1:]), features_of(out, aux_layers)

    def _bucketed_prefill(self, embeds: torch.Tensor, aux_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        length = embeds.shape[1]
        bucket = prefill_bucket(length, self.cache.max_len)
        key = (bucket, tuple(aux_layers))
        buffers = self._prefill_buffers.get(key)
        if buffers is None:
            buffers = self._prefill_buffers[key] = _PrefillBuffers.allocate(self, bucket, aux_layers)
        buffers.embeds[:, :length].copy_(embeds)
        buffers.embeds[:, length:].zero_()
        buffers.last.fill_(length - 1)
        name = f"prefill{bucket}" + "".join(f"_{layer}" for layer in aux_layers)
        if name not in self._steps:
            start = time.perf_counter()
            # no inductor, and PyTorch's SDPA choice for a long causal query; the warm-up writes the replay's slots
            self._prepare_step(name, lambda: self._prefill_body(buffers, aux_layers), compile=False, decode_attention=False)
            synchronize(self.device)
            self.prefill_capture_ms = (time.perf_counter() - start) * 1e3
        self._steps[name]()
        self.cache.length = length
        # copies: the buffers belong to the bucket's graph and the next prompt of this bucket overwrites them
        return buffers.logits.clone(), buffers.features[:, :length].clone()

    def _prefill_body(self, buffers: "_PrefillBuffers", aux_layers: tuple[int, ...]) -> None:
        self.cache.cache_position = buffers.positions
        out = self.llm.model(**with_cache(self.cache, inputs_embeds=buffers.embeds, output_hidden_states=bool(aux_layers),
                                          position_ids=buffers.positions.view(1, -1),
                                          attention_mask=self._attention_mask(buffers.positions)))
        buffers.logits.copy_(self.llm.lm_head(out.last_hidden_state.index_select(1, buffers.last)))
        buffers.features.copy_(features_of(out, aux_layers))

    def _decode_body(self) -> None:
        """The captured step: greedy token after `_token` at `_position`, then advance in place.

        Advancing inside the graph (token ← next, position += 1, out[step] ← next) leaves one
        replay per token on the host and no host sync.
        """
        logits, _ = self._forward(self._token, self._position)  # [1, 1, V]
        self._next.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        self._out.index_copy_(1, self._step, self._next)
        self._token.copy_(self._next)
        self._position.add_(1)
        self._step.add_(1)

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token: [1, 1] at position: [1] → the greedy next token [1, 1], on the device.

        The returned tensor is the engine's buffer: it changes with the next step (clone to keep it).
        The host-side cache length is not updated (it is unknown without a sync); decode_n does that.
        """
        self._token.copy_(token)
        self._position.copy_(position)
        self._step.zero_()
        self._steps["decode"]()
        return self._next

    @torch.inference_mode()
    def decode_n(self, token: torch.Tensor, position: int, count: int, stop_ids: set[int],
                 eos_every: int = DEFAULT_EOS_EVERY) -> list[int]:
        """token: [1, 1] at `position` → up to `count` greedy tokens after it.

        EOS is checked once per `eos_every` tokens (one host sync per chunk), so up to eos_every − 1
        steps past an EOS are computed and dropped (see DEFAULT_EOS_EVERY for the trade-off).
        """
        if position + count > self.cache.max_len:
            raise EgptError(f"{position + count} positions do not fit the static cache ({self.cache.max_len}).")
        self._token.copy_(token)
        self._position.fill_(position)
        self._step.zero_()
        step = self._steps["decode"]
        tokens: list[int] = []
        while len(tokens) < count:
            chunk = min(eos_every, count - len(tokens))
            for _ in range(chunk):
                step()
            new = self._out[0, len(tokens):len(tokens) + chunk].tolist()  # the one host sync per chunk
            tokens += new
            if not stop_ids.isdisjoint(new):
                break
        self.cache.length = position + len(tokens)
        return tokens

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int, stop_ids: set[int], clock: Clock,
                 eos_every: int = DEFAULT_EOS_EVERY) -> DecodeResult:
        """embeds: [1, L, H] → greedy new tokens (EOS kept, as generate keeps it), equal to HF generate's."""
        prefix_len = embeds.shape[1]
        setup_ms = self.setup(1, prefix_len + max_new_tokens)
        self.reset()
        first = self.prefill(embeds)[0][:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
        clock.mark_first_token()
        tokens = first.flatten().tolist()
        steps = 0
        if tokens[0] not in stop_ids and max_new_tokens > 1:
            rest = self.decode_n(first, prefix_len, max_new_tokens - 1, stop_ids, eos_every)
            steps = len(rest)
            tokens += rest
        kept = truncate_at_eos(tokens, stop_ids, max_new_tokens)
        metrics = {"captured": self.captured, "cuda_graph": self.cuda_graph, "decode_steps": steps,
                   "wasted_steps": len(tokens) - len(kept), "static_cache_len": self.cache.max_len}
        if setup_ms:
            metrics["compile_ms"] = setup_ms
        if self.prefill_capture_ms:  # a prompt of a new PREFILL_BUCKET: its capture is inside this prefill
            metrics["prefill_capture_ms"] = self.prefill_capture_ms
        return DecodeResult(kept, metrics)


_TARGET_NUMBERS = itertools.count()


class StaticTarget:
    """The target of a speculative loop on the engine's static cache.

    prefill(embeds) → logits of the last prompt position; verify(tokens [1, k+1]) scores them at
    the next k+1 positions; crop(length) keeps the first `length` positions valid. After each,
    `last_hidden` [1, q, F] holds the features of its q positions for EAGLE-style drafts: the final-norm
    hidden states, or after capture_layers (an EAGLE-3 head) the inputs of those layers. Nothing is
    copied on a rollback: rejected positions stay in the cache, invisible to every later query
    (the mask only shows slots ≤ the query's position) and overwritten by the next verify.
    verify pads to a fixed width (gamma + 1) so one captured graph serves every k ≤ gamma;
    a wider call captures another width (adaptive γ).
    """

    def __init__(self, engine: StaticEngine, gamma: int):
        self.engine = engine
        self.width = gamma + 1
        self.length = 0
        self.last_hidden: torch.Tensor | None = None
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.tree_width = 0  # padded node budget of verify_tree: the largest tree seen (one capture serves all)
        self._tree_base = 0  # cache length before the last verify_tree
        self._tree_buffers: dict[int, TreeVerifyBuffers] = {}
        self._keep: tuple[torch.Tensor, ...] | None = None  # keep_path's (source slots, target slots, arange) [W]
        self._number = next(_TARGET_NUMBERS)
        self._built_on = 0  # engine.allocations when the buffers and graphs above were made
        self.aux_layers: tuple[int, ...] = ()  # decoder layers whose inputs are the features (EAGLE-3); () = final norm

    def capture_layers(self, aux_layers: list[int]) -> None:
        """From now on `last_hidden` holds the inputs of these decoder layers, concatenated (as DynamicTarget's);
        each layer set gets its own captured verify graphs."""
        self.aux_layers = tuple(aux_layers)

    def discard(self) -> None:
        """Drop this target's graphs from the engine (when a new target replaces it; they would stay until the
        engine's next re-allocation)."""
        tag = f"@{self._number}"
        for name in [name for name in self.engine._steps if name.endswith(tag)]:
            self.engine._steps.pop(name)
            self.engine._graphs.pop(name, None)

    def _step_name(self, kind: str) -> str:
        """The engine's name for one of this target's graphs: targets sharing an engine keep their own."""
        return f"{kind}{self._suffix}@{self._number}"

    @property
    def _suffix(self) -> str:
        return "aux" + "_".join(map(str, self.aux_layers)) if self.aux_layers else ""

    @property
    def feature_size(self) -> int:
        hidden = self.engine.llm.get_output_embeddings().weight.shape[1]
        return hidden * max(len(self.aux_layers), 1)

    def setup(self, max_seq: int, tree_nodes: int = 0) -> float:
        """Cache room for max_seq positions plus a padded verify (chain, or a tree of tree_nodes drafted
        nodes) past the end; returns ms spent (0 if it fit)."""
        spent = self.engine.setup(1, max_seq + max(self.width, tree_nodes + 1))
        self._follow_engine()
        return spent

    def _follow_engine(self) -> None:
        """Drop buffers and graph state made on an older cache: this target's setup, or another target's on the
        same engine (spec_tree_sweep shares one), may have re-allocated it, which clears the engine's graphs."""
        if self._built_on != self.engine.allocations:
            self._buffers.clear()
            self._tree_buffers.clear()
            self._keep = None
            self._built_on = self.engine.allocations

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds: [1, L, H] → logits [V] after the last prompt token; the cache holds 0..L-1."""
        self._follow_engine()
        self.engine.reset()
        logits, self.last_hidden = self.engine.prefill(embeds, self.aux_layers)
        self.length = embeds.shape[1]
        return logits[0, -1]

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [1, k+1] (pending token, d_1..d_k) → logits [k+1, V] at positions length..length+k.

        Advances `length` by k+1; call crop() with the accepted length afterwards.
        """
        count = tokens.shape[1]
        width = max(self.width, count)
        if self.length + width > self.engine.cache.max_len:
            raise EgptError(f"verify at {self.length}+{width} does not fit the static cache ({self.engine.cache.max_len}).")
        verify_tokens, verify_positions, logits, hidden, arange = self._buffers_for(width)
        verify_tokens[:, :count].copy_(tokens)
        if count < width:  # pad with the last token: its logits are dropped, its cache slots overwritten later
            verify_tokens[:, count:].copy_(tokens[:, -1:].expand(1, width - count))
        torch.add(arange, self.length, out=verify_positions)  # on the device: no host-to-device copy
        self._run(width)
        self.length += count
        self.engine.cache.length = self.length
        # copies (~0.3 MB, microseconds): callers keep them (EAGLE's proposer stores hidden states) and
        # the graph's buffers are overwritten by the next verify
        self.last_hidden = hidden[:, :count].clone()
        return logits[:count].clone()

    def crop(self, length: int) -> None:
        """Keep positions 0..length-1; later writes start at `length`."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length
        self.engine.cache.length = length

    def _buffers_for(self, width: int) -> tuple[torch.Tensor, ...]:
        """Static buffers of the width-W verify: tokens [1, W], positions [W], logits [W, V], features [1, W, F], arange [W]."""
        key = f"{width}{self._suffix}"
        if key not in self._buffers:
            engine = self.engine
            vocab = engine.llm.get_output_embeddings().weight.shape[0]
            self._buffers[key] = (torch.zeros(1, width, dtype=torch.long, device=engine.device),
                                  torch.zeros(width, dtype=torch.long, device=engine.device),
                                  torch.zeros(width, vocab, dtype=engine.dtype, device=engine.device),
                                  torch.zeros(1, width, self.feature_size, dtype=engine.dtype, device=engine.device),
                                  torch.arange(width, device=engine.device))
        return self._buffers[key]

    def _run(self, width: int) -> None:
        name = self._step_name(f"verify{width}")
        if name not in self.engine._steps:
            tokens, positions, logits, hidden, _ = self._buffers_for(width)
            aux_layers = self.aux_layers

            def body() -> None:
                step_logits, step_hidden = self.engine._forward(tokens, positions, aux_layers=aux_layers)
                logits.copy_(step_logits[0])
                hidden.copy_(step_hidden)

            # the buffers already hold this call's inputs: capture's warm-up writes the very slots this
            # verify writes, and the replay below computes them for real
            self.engine._prepare_step(name, body)
        self.engine._steps[name]()

    # ---- draft trees ------------------------------------------------------------------------------

    @torch.inference_mode()
    def verify_tree(self, tree) -> torch.Tensor:
        """All N+1 nodes of a DraftTree in one captured forward → logits [N+1, V].

        Node i is written at slot length+i, at RoPE position length+depth(i), and sees the cache
        and its ancestors (the tree mask over the static cache). The forward is padded to a fixed
        node budget (`tree_width`): padding nodes see the cache and themselves, their outputs are
        dropped and their slots overwritten later. A `static_draft.DeviceTree` brings its mask
        inputs as device tensors (no host-to-device copy); a plain DraftTree is copied once.
        """
        count = tree_node_count(tree)  # not len(tree.tokens): a static_draft.PendingTree would read itself back now
        self.tree_width = width = max(self.tree_width, count)
        engine = self.engine
        if self.length + width > engine.cache.max_len:
            raise EgptError(f"tree verify at {self.length}+{width} does not fit the static cache ({engine.cache.max_len}).")
        buffers = self._tree_buffers_for(width)
        tokens, depths, ancestry = tree_device_inputs(tree, engine.device)
        buffers.load(tokens, depths, ancestry, self.length)
        self._run_tree(width)
        self._tree_base = self.length
        self.length += count
        engine.cache.length = self.length
        self.last_hidden = buffers.hidden[:, :count].clone()
        return buffers.logits[:count].clone()

    @torch.inference_mode()
    def keep_path(self, keep: list[int]) -> None:
        """After verify_tree: block offsets `keep` (root 0, then the accepted path) move to slots
        base, base+1, ... by index copies on the device (one captured graph over every layer)."""
        if keep == list(range(len(keep))):
            return  # already in place
        source, target, arange = self._keep_buffers()
        width = source.shape[0]
        assert len(keep) <= width, (keep, width)
        base = self._tree_base
        torch.add(arange, base, out=target)
        self._keep_staging.copy_to(keep + list(range(len(keep), width)), source)  # identity past the path
        source.add_(base)
        self.engine._steps[self._step_name("keep")]()

    def _keep_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._keep is None:
            device = self.engine.device
            width = max(self.width, 2)
            # identity while capturing: the warm-up and capture runs must not move anything
            source = torch.arange(width, device=device)
            target = torch.arange(width, device=device)
            self._keep = (source, target, torch.arange(width, device=device))
            self._keep_staging = HostStaging(width, device)
            cache = self.engine.cache

            def body() -> None:
                for layer in cache.layers:
                    layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                    layer.values.index_copy_(2, target, layer.values.index_select(2, source))

            self.engine._prepare_step(self._step_name("keep"), body, compile=False)
        return self._keep

    def _tree_buffers_for(self, width: int) -> "TreeVerifyBuffers":
        key = f"{width}{self._suffix}"
        if key not in self._tree_buffers:
            engine = self.engine
            vocab = engine.llm.get_output_embeddings().weight.shape[0]
            self._tree_buffers[key] = TreeVerifyBuffers.allocate(width, engine.cache.max_len, vocab, self.feature_size,
                                                                  engine.dtype, engine.device)
        return self._tree_buffers[key]

    def _run_tree(self, width: int) -> None:
        name = self._step_name(f"tree{width}")
        if name not in self.engine._steps:
            buffers = self._tree_buffers_for(width)
            engine = self.engine
            aux_layers = self.aux_layers

            def body() -> None:
                step_logits, step_hidden = buffers.forward(engine, aux_layers)
                buffers.logits.copy_(step_logits[0])
                buffers.hidden.copy_(step_hidden)

            engine._prepare_step(name, body)
        self.engine._steps[name]()


@dataclass
class TreeVerifyBuffers:
    """Static inputs and outputs of a width-W tree verify over a cache of M slots."""

    tokens: torch.Tensor  # [1, W] node tokens (padding repeats the root)
    slots: torch.Tensor  # [W] cache slots written: base + node index
    positions: torch.Tensor  # [W] RoPE positions: base + depth
    base: torch.Tensor  # [1] cache length before the tree
    ancestry: torch.Tensor  # [W, W] bool: [i, j] = j is i or an ancestor of i (padding: itself only)
    arange: torch.Tensor  # [W]
    eye: torch.Tensor  # [W, W] bool identity: the ancestry of padding nodes
    logits: torch.Tensor  # [W, V]
    hidden: torch.Tensor  # [1, W, H]

    @classmethod
    def allocate(cls, width: int, max_len: int, vocab: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> "TreeVerifyBuffers":
        long = dict(dtype=torch.long, device=device)
        return cls(torch.zeros(1, width, **long), torch.arange(width, **long), torch.zeros(width, **long),
                   torch.zeros(1, **long), torch.eye(width, dtype=torch.bool, device=device), torch.arange(width, **long),
                   torch.eye(width, dtype=torch.bool, device=device), torch.zeros(width, vocab, dtype=dtype, device=device),
                   torch.zeros(1, width, hidden_size, dtype=dtype, device=device))

    def load(self, tokens: torch.Tensor, depths: torch.Tensor, ancestry: torch.Tensor, base: int) -> None:
        """tokens, depths: [n] ; ancestry: [n, n] bool, for the first n ≤ W nodes; the rest is padding."""
        count = tokens.shape[0]
        self.tokens[0, :count].copy_(tokens)
        self.tokens[0, count:].copy_(tokens[:1].expand(self.tokens.shape[1] - count))
        self.positions.zero_()
        self.positions[:count].copy_(depths)
        self.positions.add_(base)
        torch.add(self.arange, base, out=self.slots)
        self.base.fill_(base)
        self.ancestry.copy_(self.eye)
        self.ancestry[:count, :count].copy_(ancestry)

    def forward(self, engine: StaticEngine, aux_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loaded tree through the engine under its tree mask → (logits [1, W, V], features [1, W, F])."""
        allowed = mask_for_attention(self.mask(engine._kv_positions), engine)
        return engine._forward(self.tokens, self.slots, self.positions.view(1, -1), allowed, aux_layers)

    def mask(self, kv_positions: torch.Tensor) -> torch.Tensor:
        """kv_positions: [1, 1, 1, M] → [1, 1, W, M] bool: the cache before base, and the node's ancestors' slots.

        Built out of place, the tree's columns scattered into fresh tensors: the in-place form (`index_copy_` into a
        view of the expanded prefix) traces to a select_scatter at a constant index, which inductor inlined into
        FlexAttention's mask function, and Triton's template could not render its index ("'int' object has no
        attribute 'free_symbols'", H200, torch 2.11: every flex tree verify at 7B and tiny shape)."""
        width, slots = self.tokens.shape[1], kv_positions.shape[-1]
        flags = dict(dtype=torch.bool, device=kv_positions.device)
        tree_columns = torch.zeros(slots, **flags).index_copy(0, self.slots, torch.ones(width, **flags))
        ancestors = torch.zeros(width, slots, **flags).index_copy(1, self.slots, self.ancestry)
        return torch.where(tree_columns, ancestors, kv_positions < self.base)


def mask_for_attention(allowed: torch.Tensor, engine: StaticEngine):
    """allowed: [1, 1, q, M] bool (True = attend) → what the LLM's attention takes: the boolean mask (sdpa), an
    additive float mask (eager) or a BlockMask (flex: the empty blocks skipped, the full ones unmasked)."""
    implementation = engine.llm.config._attn_implementation
    if implementation == "sdpa":
        return allowed
    if implementation == FLEX:
        return block_mask_from_dense(allowed)
    return torch.zeros((), dtype=engine.dtype, device=engine.device).masked_fill(~allowed, torch.finfo(engine.dtype).min)


def features_of(out, aux_layers: tuple[int, ...]) -> torch.Tensor:
    """A decoder's output → the drafter's features: final-norm states, or the inputs of `aux_layers` concatenated
    (hidden_states[i] is what enters layer i, as speculation.capture_layer_inputs records it)."""
    if not aux_layers:
        return out.last_hidden_state
    return torch.cat([out.hidden_states[index] for index in aux_layers], dim=-1)


def tree_node_count(tree) -> int:
    """Nodes of a DraftTree, root included, without reading a device-built tree back to the host."""
    on_device = getattr(tree, "device_inputs", None)
    return on_device[0].shape[0] if on_device is not None else len(tree.tokens)


class HostStaging:
    """Small host → device copies of token ids that do not wait for the device (host_staging.PinnedStaging:
    pinned on CUDA, rewritten only after its previous copy has read it; a plain copy on the CPU)."""

    def __init__(self, size: int, device: torch.device):
        self.host = PinnedStaging(device.type == "cuda", capacity=8 * size)

    def copy_to(self, values: list[int], out: torch.Tensor) -> None:
        """values → out ([len(values)] long, on the device), asynchronously on CUDA."""
        ids = self.host.reserve(8 * len(values))
        ids.view(torch.long).copy_(torch.tensor(values, dtype=torch.long))
        self.host.send(ids.view(torch.long), out)


def tree_device_inputs(tree, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DraftTree → (tokens [n], depths [n], ancestry [n, n] bool) on the device; a DeviceTree already has them."""
    on_device = getattr(tree, "device_inputs", None)
    if on_device is not None:
        return on_device
    return (torch.tensor(tree.tokens, device=device), torch.tensor(tree.depths(), device=device),
            tree.ancestry().to(device))
