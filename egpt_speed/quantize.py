"""Weight quantization of an already-loaded LLM, in place: bitsandbytes (LLM.int8, NF4, FP4) and torchao
weight-only (int8, int4 with tinygemm or GemLite kernels).

Only the `nn.Linear` modules inside the decoder layers are converted. The token embeddings and
`lm_head` stay in the run's dtype — transformers' bitsandbytes integration skips the output
embeddings by default and we do the same for every backend — and so do the CLIP tower, projector
and adaptor: Stage 3 is untouched. Both packages are optional and imported only when used.

The swap is done by hand rather than through `transformers.integrations.bitsandbytes.
replace_with_bnb_linear`, which in transformers 5.x builds empty meta-device modules for its
checkpoint loader to fill; here the float weights are already on the device, so each linear is
replaced by a bitsandbytes module holding its weight and quantized by moving it to the device
(bitsandbytes' documented path, the same parameter construction transformers 5.17 uses).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from egpt_speed.errors import EgptError

BNB_KINDS = ("int8", "nf4", "fp4")
TORCHAO_KINDS = ("int8wo", "int4wo", "int4wo-gemlite")
INT4_GROUP_SIZE = 128
KEPT_IN_RUN_DTYPE = "token embeddings, lm_head, CLIP tower, projector, adaptor"


@dataclass(frozen=True)
class BnbScheme:
    """One bitsandbytes configuration (the defaults are transformers' `BitsAndBytesConfig` ones)."""

    kind: Literal["int8", "nf4", "fp4"]
    compute_dtype: torch.dtype = torch.bfloat16  # 4-bit only: the dtype the matmul runs in
    double_quant: bool = True  # 4-bit only: quantize the per-block absmax constants too
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold on activations (BitsAndBytesConfig default)

    def describe(self) -> dict:
        if self.kind == "int8":
            return {"quantization": "bitsandbytes LLM.int8", "int8_threshold": self.int8_threshold,
                    "has_fp16_weights": False}
        return {"quantization": f"bitsandbytes {self.kind}", "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "double_quant": self.double_quant, "blocksize": 64}


# ---- what can run here ---------------------------------------------------------------------------

def cuda_reason(device: torch.device, what: str) -> str | None:
    if device.type != "cuda":
        return f"{what} needs CUDA (this run's device is {device.type}); run it on a GPU with --device cuda."
    return None


def package_reason(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"needs the {pip_name} package (pip install {pip_name})."
    return None


def package_version(pip_name: str) -> str | None:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- which modules ---------------------------------------------------------------------------------

def decoder_linear_names(llm) -> list[str]:
    """Fully qualified names of the plain `nn.Linear` modules in the decoder layers (not lm_head).

    `type(...) is nn.Linear` on purpose: quantized modules subclass nn.Linear, and a second
    quantizer must find nothing left rather than re-quantize them.
    """
    return [f"model.layers.{name}" for name, module in llm.model.layers.named_modules() if type(module) is nn.Linear]


def _names_or_refuse(llm, strategy: str) -> list[str]:
    names = decoder_linear_names(llm)
    if not names:
        raise EgptError(f"{strategy}: the LLM has no unquantized linear layers left; compose at most one quantization strategy.")
    return names


# ---- bitsandbytes ----------------------------------------------------------------------------------

def quantize_llm_bnb(llm, scheme: BnbScheme, device: torch.device) -> int:
    """Replace each decoder-layer nn.Linear of `llm` by a bitsandbytes module on `device`; returns the count."""
    import bitsandbytes as bnb

    names = _names_or_refuse(llm, scheme.kind)
    for name in names:  # by name, so the float module is freed as soon as it is replaced
        linear = llm.get_submodule(name)
        has_bias = linear.bias is not None
        if scheme.kind == "int8":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                      has_fp16_weights=False, threshold=scheme.int8_threshold, device="meta")
            # Int8Params quantizes when it moves from the CPU to the GPU (bitsandbytes 0.45+), so it starts on the CPU.
            weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                    compute_dtype=scheme.compute_dtype, compress_statistics=scheme.double_quant,
                                    quant_type=scheme.kind, device="meta")
            weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=scheme.double_quant,
                                       quant_type=scheme.kind, module=new)
        new.weight = weight.to(device)  # the quantization happens here
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        new.requires_grad_(False)
        llm.set_submodule(name, new)
        del linear, weight
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return len(names)


# ---- torchao ---------------------------------------------------------------------------------------

def torchao_config(kind: str):
    """The torchao config object for `int8wo` / `int4wo`, for the installed torchao version.

    int4: torchao ≥ 0.14's default packing ("plain") needs the `mslk` kernels, which PyPI ships only
    as an empty 0.0.0; the tinygemm "tile_packed_to_4d" packing uses `aten._weight_int4pack_mm`,
    which PyTorch itself ships (CUDA, bfloat16, sm80+). Older torchao used tinygemm by default.
    `set_inductor_config=False`: torchao would otherwise change torch.compile's global settings for
    every strategy in the process.
    """
    if kind not in TORCHAO_KINDS:
        raise EgptError(f"unknown torchao weight-only kind {kind!r}; use one of {', '.join(TORCHAO_KINDS)}.")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if kind == "int4wo-gemlite":
        return gemlite_config()
    if kind == "int8wo":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    fields = {f.name for f in dataclasses.fields(Int4WeightOnlyConfig)}
    if "int4_packing_format" in fields:
        return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, set_inductor_config=False)


def gemlite_config():
    """int4wo-gemlite: torchao's UIntxWeightOnlyConfig (a prototype in 0.18): 4-bit asymmetric weights in groups of
    INT4_GROUP_SIZE, quantized by HQQ and bit-packed for GemLite's Triton GEMV/GEMM kernels (a torch custom op,
    so inductor compiles around it). Why beside int4wo: tinygemm's one-row int4 matmul read 4.0 GB in 3.29 ms at
    7B shape on the H200 (1.2 TB/s, benchmarks/results/issue11_h200_20261203_night) against a 1.8 ms goal."""
    try:
        from torchao.prototype.quantization import UIntxWeightOnlyConfig
    except ImportError:
        raise EgptError("int4wo-gemlite: this torchao has no UIntxWeightOnlyConfig (torchao 0.18 or newer has it); "
                        "upgrade torchao or use int4wo.") from None
    return UIntxWeightOnlyConfig(group_size=INT4_GROUP_SIZE, bit_width=4, set_inductor_config=False)


def quantize_llm_torchao(llm, kind: str) -> int:
    """torchao `quantize_` on the decoder-layer linears of `llm` (weights already on the device); returns the count."""
    try:
        from torchao.quantization import quantize_
    except ModuleNotFoundError:
        raise EgptError(f"{kind}: torchao is not installed; pip install torchao (a build matching torch {torch.__version__}).") from None
    except (ImportError, OSError, RuntimeError) as error:  # a torchao built for another torch fails at import
        raise EgptError(f"{kind}: torchao is installed but does not import with this torch "
                        f"({type(error).__name__}: {error}); install a torchao matching torch {torch.__version__}.") from None
    names = set(_names_or_refuse(llm, kind))
    config = torchao_config(kind)
    try:
        quantize_(llm, config, filter_fn=lambda module, fqn: fqn in names)
    except (ImportError, RuntimeError, ValueError, AssertionError) as error:  # missing kernel package, unsupported shape
        raise EgptError(f"{kind}: torchao could not quantize the LLM ({type(error).__name__}: {error}).") from None
    return sum(1 for name in names if not _plain_float_weight(llm.get_submodule(name)))


# torchao's `recommended_inductor_config_setter` (0.18), minus the process-wide settings: applied by the static
# engine only while inductor compiles a torchao-quantized LLM (torchao_config passes set_inductor_config=False so
# that no other strategy of the process compiles under them). Coordinate-descent tuning is the one that matters:
# only under it does inductor decompose a one-row matmul into a multiply-and-sum reduction that reads the int8
# weight directly (torch/_inductor/decomposition.py, mm). Without it, inductor's weight-only-int8 pattern rewrites
# `mm(x, w.to(bf16)) * scale` to aten._weight_int8pack_mm, whose CUDA kernel took 216 µs per 7B linear on the H200
# (int8wo+compile 51.3–51.7 ms/token). benchmarks/results/int8wo_probe_h200_20261203: four 7B layers' linears in 470 µs
# with it against 544 µs in bf16; with 5 rows (a verify) 12.7 ms with or without the pattern (1.29 ms under
# max-autotune-no-cudagraphs without it).
TORCHAO_INDUCTOR_CONFIG = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                           "force_fuse_int_mm_with_mul": True}


def inductor_config_for(llm) -> dict:
    """The inductor settings to compile `llm`'s decode step under: torchao's when a linear holds a torchao weight."""
    for module in llm.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and type(weight).__module__.startswith("torchao"):
            return dict(TORCHAO_INDUCTOR_CONFIG)
    return {}


def _plain_float_weight(module: nn.Module) -> bool:
    """False once torchao has swapped the weight for one of its tensor subclasses (or skipped it: True)."""
    weight = module.weight
    return type(weight) in (nn.Parameter, torch.Tensor) and type(weight.data) is torch.Tensor


def torchao_settings(kind: str) -> dict:
    settings = {"quantization": f"torchao {'int8' if kind == 'int8wo' else 'int4'} weight-only",
                "torchao": package_version("torchao")}
    if kind == "int4wo-gemlite":
        settings.update(group_size=INT4_GROUP_SIZE, packing="gemlite bit-packed", quantizer="HQQ",
                        gemlite=package_version("gemlite"))
    elif kind == "int4wo":
        settings.update(group_size=INT4_GROUP_SIZE, packing="tile_packed_to_4d (tinygemm)")
    else:
        settings.update(granularity="per output channel")
    return settings


class BnbPreparer:
    """Shared body of the bitsandbytes strategies (int8, nf4, fp4): each sets `scheme` and its names.

    Mixed into a `strategies.registry.Strategy` subclass; kept here so the three modules stay one
    class declaration each.
    """

    scheme: BnbScheme
    kernel: str  # named in the "needs CUDA" refusal
    decodes = False
    sets = "the LLM's weight format"  # two of these in one composition are refused
    modifies_model = True
    lossless = False

    def unavailable_reason(self) -> str | None:
        return cuda_reason(self.ctx.device, self.kernel) or package_reason("bitsandbytes", "bitsandbytes")

    def prepare(self, model) -> None:
        self.converted = quantize_llm_bnb(model.llm, self.scheme, model.device)

    def settings(self) -> dict:
        return {**self.scheme.describe(), "bitsandbytes": package_version("bitsandbytes"),
                "quantized_linears": getattr(self, "converted", None), "kept_in_run_dtype": KEPT_IN_RUN_DTYPE}
