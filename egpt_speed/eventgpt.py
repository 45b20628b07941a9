"""The EventGPT network as plain transformers parts: Llama LLM + CLIP tower + projector + adaptor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from egpt_speed.errors import EgptError
from egpt_speed.prompt import EVENT_TOKEN_INDEX, MAX_CONTEXT, PromptTemplate

if TYPE_CHECKING:
    from egpt_speed.tokenizers import TokenizerMismatch


class SplicingModel(nn.Module):
    """What Stage 4 asks of every model family: the LLM's device and width, and the splice of the
    visual features into the prompt's embeddings. Subclasses set ``llm`` and ``placeholder_name``."""

    llm: nn.Module
    placeholder_name = "<event>"  # how the error message names the −200 placeholder

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().weight.shape[1]

    def splice(self, prompt_ids: torch.Tensor, event_features: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the visual features put in place of the −200 placeholder.

        prompt_ids: [L] (one −200) ; event_features: [N_ev, H] → inputs_embeds [1, L - 1 + N_ev, H].
        """
        positions = (prompt_ids == EVENT_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(positions) != 1:
            raise EgptError(f"the prompt must hold exactly one {self.placeholder_name} placeholder, "
                            f"found {len(positions)}; fix the query text.")
        at = positions[0]
        embed = self.llm.get_input_embeddings()
        before = embed(prompt_ids[:at].to(self.device))
        after = embed(prompt_ids[at + 1:].to(self.device))
        spliced = torch.cat([before, event_features.to(before.dtype), after], dim=0)
        return spliced.unsqueeze(0)


class EventGPT(SplicingModel):
    """The EventGPT network with each part a standard module; Stage 3 and Stage 4 call into it.

    ``frames_mode`` is not stored here: pooling takes the frame count from its input.
    ``tokenizer_mismatch`` is set when a checkpoint was loaded with ``allow_tokenizer_mismatch``
    and its tokenizer encodes the prompt template differently from its sentencepiece model.
    """

    family = "eventgpt"  # the stages branch on it (llava_family.LlavaFamilyModel has llava / video_llava)
    max_context = MAX_CONTEXT

    def __init__(self, llm: nn.Module, vision_tower: nn.Module, projector: nn.Sequential,
                 adaptor: nn.Linear | None, tokenizer, image_processor, template: PromptTemplate,
                 name: str, fold_to_vocab: int | None = None, random_weights: bool = False):
        super().__init__()
        self.llm = llm
        self.vision_tower = vision_tower
        self.projector = projector
        self.adaptor = adaptor
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.name = name
        self.fold_to_vocab = fold_to_vocab
        self.random_weights = random_weights
        self.tokenizer_mismatch: TokenizerMismatch | None = None

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP → projector → adaptor (exactly once) for each frame.

        pixel_values: [T, 3, S, S] → [T, P, H] (P = 577 for ViT-L/14-336: CLS kept).
        """
        tower_dtype = next(self.vision_tower.parameters()).dtype
        # last_hidden_state is the encoder output before post_layernorm, as EventGPT uses it.
        features = self.vision_tower(pixel_values.to(tower_dtype)).last_hidden_state
        features = self.projector(features.to(self.projector[0].weight.dtype))
        if self.adaptor is not None:
            features = self.adaptor(features)
        return features

    @staticmethod
    def pool(frame_features: torch.Tensor) -> torch.Tensor:
        """EventGPT's spatio-temporal pooling.

        frame_features: [T, P, H] → [T + P, H]: T temporal tokens (mean over patches of each frame)
        followed by P spatial tokens (mean over frames). 5 frames → 582 tokens, 1 frame → 578.
        """
        temporal = frame_features.mean(dim=1)
        spatial = frame_features.mean(dim=0)
        return torch.cat([temporal, spatial], dim=0)
