"""StableSam: one frozen segment-anything ``Sam`` with the Stable-SAM plug-ins attached."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from ..config import ENCODER_PRECISIONS, PluginConfig, TuningConfig, check_config
from .deformable_sampling import DeformableSamplingPlugin, SpatialAttentionPlugin
from .dynamic_routing import DynamicRoutingPlugin, FixedRouting
from .encoder_tuning import attach_adapters, attach_lora
from .fast_attention import attach_fast_attention, detach_fast_attention
from .plugged_attention import OutputTokenReader, PluggedTokenToImageAttention

__all__ = ["DecoderOutput", "PromptTensors", "StableSam", "group_by_structure", "plugin_sites"]

# The autocast dtype of each fast-path encoder precision ("fp32": no autocast, segment-anything's code).
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def plugin_sites(sam: Sam) -> dict[str, tuple[nn.Module, str]]:
    """The token-to-image attentions a plug-in can sit in: name -> (parent module, attribute)."""
    transformer = sam.mask_decoder.transformer
    sites = {
        f"block{i + 1}": (layer, "cross_attn_token_to_image") for i, layer in enumerate(transformer.layers)
    }
    sites["final"] = (transformer, "final_attn_token_to_image")
    return sites


@dataclass
class PromptTensors:
    """The prompts for ONE image, already in the model's input frame (SAM's 1024 frame).

    P prompts share the image; each field is None or has P as its leading dimension.

    Attributes:
      point_coords: P x N x 2 float (x, y) pixel coordinates.
      point_labels: P x N int (1 positive, 0 negative, -1 padding).
      boxes: P x 4 float xyxy.
      mask_inputs: P x 1 x h x w low-res mask prompts (h, w = 4 x the embedding size).
    """

    point_coords: Tensor | None = None
    point_labels: Tensor | None = None
    boxes: Tensor | None = None
    mask_inputs: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.point_coords is None) != (self.point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if self.point_coords is not None and self.point_coords.shape[:2] != self.point_labels.shape[:2]:
            raise ValueError(
                f"point_coords {tuple(self.point_coords.shape)} and point_labels "
                f"{tuple(self.point_labels.shape)} disagree on the number of prompts/points"
            )
        sizes = {f.shape[0] for f in (self.point_coords, self.boxes, self.mask_inputs) if f is not None}
        if not sizes:
            raise ValueError("a prompt needs points, a box or a mask input")
        if len(sizes) > 1:
            raise ValueError(f"prompt fields disagree on the number of prompts: {sorted(sizes)}")

    @classmethod
    def stack(cls, prompts: Sequence, device: torch.device | str = "cpu") -> PromptTensors:
        """P prompts of one structure (see :func:`group_by_structure`) as one P-prompt batch.

        ``prompts``: objects with numpy ``point_coords`` (N x 2), ``point_labels`` (N), ``box``
        (4) and ``mask_input`` (h x w) attributes or None (:class:`stable_sam.prompts.Prompt`).
        """

        def stacked(attr: str, dtype: torch.dtype) -> Tensor | None:
            values = [getattr(p, attr) for p in prompts]
            if values[0] is None:
                return None
            return torch.as_tensor(np.stack(values), dtype=dtype, device=device)

        masks = stacked("mask_input", torch.float32)
        return cls(
            point_coords=stacked("point_coords", torch.float32),
            point_labels=stacked("point_labels", torch.int64),
            boxes=stacked("box", torch.float32),
            mask_inputs=None if masks is None else masks[:, None],
        )

    @property
    def num_prompts(self) -> int:
        for field_value in (self.point_coords, self.boxes, self.mask_inputs):
            if field_value is not None:
                return field_value.shape[0]
        raise AssertionError("unreachable: validated in __post_init__")

    def to(self, device: torch.device) -> PromptTensors:
        return PromptTensors(*(None if t is None else t.to(device) for t in self._fields()))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.point_coords, self.point_labels, self.boxes, self.mask_inputs)


def group_by_structure(prompts: Sequence) -> list[list[int]]:
    """Indices of prompts that can share one decoder call (same point count, box and mask presence)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        key = (
            None if p.point_coords is None else len(p.point_coords),
            p.box is None,
            p.mask_input is None,
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@dataclass
class DecoderOutput:
    """Mask decoder outputs for a batch of prompts.

    Attributes:
      low_res_logits: P x M x h x w mask logits (M = 1, or 3 with multimask output).
      iou_predictions: P x M predicted mask IoU.
      routing: P x 2 routing weights (α1, α2) of the main plug-in site, None without plug-ins.
      offsets: P x G x H x W x 2 DSP offsets (feature pixels) of the main site, or None.
    """

    low_res_logits: Tensor
    iou_predictions: Tensor
    routing: Tensor | None
    offsets: Tensor | None


class StableSam(nn.Module):
    """A segment-anything ``Sam`` whose weights are frozen, with Stable-SAM plug-ins attached.

    The plug-ins replace single submodules of *this* ``sam`` instance (the token-to-image
    attentions listed in ``plugin_config.placements``) by :class:`PluggedTokenToImageAttention`;
    everything else in SAM runs unchanged. The SAM parameters are frozen before the plug-ins are
    created, so exactly the plug-ins (plus whatever ``tuning`` unfreezes or adds) are trainable.

    Arguments:
      sam: the SAM instance, already holding its (strictly loaded) weights. Modified in place.
      sam_type: its registry name ("vit_b", "vit_l", "vit_h", "small", "tiny").
      plugin_config: the plug-in configuration.
      tuning: what else is trainable (baselines); default: nothing.
      sam_checkpoint_sha256: sha256 of the SAM checkpoint file the weights came from (None for
        random weights); it identifies the model in plug-in checkpoints and embedding caches.
      encoder_precision: how the frozen image encoder runs (see :meth:`set_encoder_precision`):
        "fp32" (default) is segment-anything's own code; "bf16" / "fp16" the fast path.
    """

    def __init__(
        self,
        *,
        sam: Sam,
        sam_type: str,
        plugin_config: PluginConfig,
        tuning: TuningConfig | None = None,
        sam_checkpoint_sha256: str | None = None,
        encoder_precision: str = "fp32",
    ) -> None:
        super().__init__()
        tuning = tuning or TuningConfig()
        _validate(plugin_config, tuning)
        self.sam = sam
        self.sam_type = sam_type
        self.plugin_config = plugin_config
        self.tuning = tuning
        self.sam_checkpoint_sha256 = sam_checkpoint_sha256
        self._encoder_fingerprint: str | None = None
        self._encoder_precision = "fp32"

        # Freeze first: whatever is created afterwards is trainable by construction.
        self.sam.requires_grad_(False)
        self.sites: dict[str, PluggedTokenToImageAttention] = {}
        if plugin_config.variant != "none":
            for name in plugin_config.placements:
                self.sites[name] = self._attach(name)
        self._apply_tuning()
        self.set_encoder_precision(encoder_precision)

    def extra_repr(self) -> str:
        return f"sam_type={self.sam_type!r}, encoder_precision={self.encoder_precision!r}"

    # ----------------------------------------------------------------------------------- set-up
    def _attach(self, site: str) -> PluggedTokenToImageAttention:
        sites = plugin_sites(self.sam)
        if site not in sites:
            raise ValueError(f"unknown plug-in placement {site!r}; choose from {sorted(sites)}")
        parent, attribute = sites[site]
        attention = getattr(parent, attribute)
        if not isinstance(attention, Attention):
            raise ValueError(f"placement {site!r} is already plugged")
        cfg = self.plugin_config
        dim = self.sam.mask_decoder.transformer_dim
        if cfg.variant == "dsp":
            sampler = DeformableSamplingPlugin(
                embedding_dim=dim,
                offset_bound=cfg.offset_bound,
                offset_groups=cfg.offset_groups,
                kernel_size=cfg.offset_kernel,
                offset_bias=cfg.offset_bias,
                amplitude=cfg.amplitude,
                padding_mode=cfg.padding_mode,
                init=cfg.init,
            )
        else:
            sampler = SpatialAttentionPlugin(
                embedding_dim=dim, kernel_size=cfg.offset_kernel, offset_bias=cfg.offset_bias, init=cfg.init
            )
        if cfg.routing == "drp":
            router = DynamicRoutingPlugin(
                embedding_dim=dim, hidden_dim=cfg.drp_hidden, normalization=cfg.routing_norm, init=cfg.init
            )
        else:
            router = FixedRouting(alpha1=cfg.fixed_alpha1)
        plugged = PluggedTokenToImageAttention(
            attention=attention,
            sampler=sampler,
            router=router,
            token_reader=OutputTokenReader(self.sam.mask_decoder, cfg.drp_token),
            feature_size=tuple(self.sam.prompt_encoder.image_embedding_size),
            replace=cfg.replace,
            resample_pe=cfg.resample_pe,
        )
        setattr(parent, attribute, plugged)
        return plugged

    def _apply_tuning(self) -> None:
        decoder = self.sam.mask_decoder
        # Training supervises the single-mask output (mask token 0) only, so the hypernetworks of
        # the multimask tokens and the IoU head would get no gradient: they stay frozen (unused
        # trainable parameters would also break DDP's gradient reduction).
        if self.tuning.decoder == "full":
            decoder.requires_grad_(True)
            decoder.output_hypernetworks_mlps[1:].requires_grad_(False)
            decoder.iou_prediction_head.requires_grad_(False)
        elif self.tuning.decoder == "prediction_head":
            decoder.output_hypernetworks_mlps[0].requires_grad_(True)
        if self.tuning.encoder == "lora":
            attach_lora(self.sam.image_encoder, rank=self.tuning.lora_rank)
        elif self.tuning.encoder == "adapter":
            attach_adapters(self.sam.image_encoder, bottleneck=self.tuning.adapter_dim)

    def set_encoder_precision(self, precision: str) -> None:
        """Switch how the frozen image encoder runs; reversible, on this instance only.

        "fp32": segment-anything's own ``Attention`` in every ViT block, no autocast (the
        reference, and the default). "bf16" / "fp16": the fast path, :class:`FastAttention`
        (the same computation through ``scaled_dot_product_attention``, sharing the weights)
        swapped into every block of THIS encoder, and :meth:`embed_images` under autocast to that
        dtype, its output cast back to float32 so the decoder, the plug-ins and the embedding
        cache see what they always see. bf16 suits CPUs with AMX/avx512_bf16 and Ampere+ GPUs;
        fp16 older GPUs. The embeddings differ from fp32 ones (about 1 % relative error), so
        :meth:`encoder_id`, which keys the embedding cache, includes the precision.

        The fast path is for a frozen encoder only: LoRA/adapters train through the encoder.
        """
        if precision not in ENCODER_PRECISIONS:
            raise ValueError(
                f"encoder_precision must be one of {list(ENCODER_PRECISIONS)}, got {precision!r}"
            )
        if precision != "fp32" and not self.encoder_is_frozen:
            raise ValueError(
                f"encoder_precision={precision!r} is the fast path of a frozen encoder, but tuning.encoder="
                f"{self.tuning.encoder!r} trains through it: use encoder_precision='fp32'"
            )
        if precision == "fp32":
            detach_fast_attention(self.sam.image_encoder)
        else:
            attach_fast_attention(self.sam.image_encoder)
        self._encoder_precision = precision

    def detach_plugins(self) -> Sam:
        """Put SAM's original attentions back and return the plain ``Sam`` (reversibility)."""
        for name, plugged in self.sites.items():
            parent, attribute = plugin_sites(self.sam)[name]
            setattr(parent, attribute, plugged.attention)
        self.sites = {}
        return self.sam

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def encoder_precision(self) -> str:
        """The encoder precision: "fp32" (segment-anything's code) or the fast path's "bf16" / "fp16"."""
        return self._encoder_precision

    @property
    def encoder_is_frozen(self) -> bool:
        """False when LoRA/adapters change the encoder: its embeddings must not be cached."""
        return self.tuning.encoder == "frozen"

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def mask_input_size(self) -> tuple[int, int]:
        return tuple(self.sam.prompt_encoder.mask_input_size)

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable tensors only, keyed by parameter name (what a plug-in checkpoint holds)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor], *, source: str = "state dict") -> None:
        """Load exactly the trainable tensors; any missing, extra or mis-shaped key is an error."""
        params = dict(self.named_parameters())
        expected = set(self.trainable_parameter_names())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match this model's trainable parameters: missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise ValueError(
                        f"{source}: {name} has shape {tuple(value.shape)}, the model expects "
                        f"{tuple(params[name].shape)}"
                    )
                params[name].copy_(value)

    def encoder_fingerprint(self) -> str:
        """Identifies the encoder weights: the SAM checkpoint sha256, or a hash of the weights."""
        if not self.encoder_is_frozen:
            raise RuntimeError("the encoder is being tuned (LoRA/adapter): its embeddings are not cacheable")
        if self.sam_checkpoint_sha256 is not None:
            return self.sam_checkpoint_sha256
        if self._encoder_fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in self.sam.image_encoder.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._encoder_fingerprint = "weights-" + digest.hexdigest()
        return self._encoder_fingerprint

    def encoder_id(self) -> str:
        """What embedding caches key this encoder's output by: SAM type, weights, precision.

        fp32 keeps the form it always had (``<sam type>:<fingerprint>``), so existing caches stay
        valid; the fast path appends its precision, so an fp32 embedding is never served to a
        fast-path run or the other way round.
        """
        identity = f"{self.sam_type}:{self.encoder_fingerprint()}"
        return identity if self.encoder_precision == "fp32" else f"{identity}:{self.encoder_precision}-sdpa"

    # ------------------------------------------------------------------------- runtime switches
    @contextlib.contextmanager
    def plugins_disabled(self) -> Iterator[None]:
        """Run plain SAM (same weights, same process) inside the block."""
        previous = {name: site.enabled for name, site in self.sites.items()}
        try:
            for site in self.sites.values():
                site.enabled = False
            yield
        finally:
            for name, site in self.sites.items():
                site.enabled = previous[name]

    @contextlib.contextmanager
    def forced_alpha1(self, alpha1: float) -> Iterator[None]:
        """Force α = (α1, 1 - α1) at every site (Table S8); α1 = 0 reproduces SAM exactly."""
        if not 0.0 <= alpha1 <= 1.0:
            raise ValueError(f"alpha1 must lie in [0, 1], got {alpha1}")
        previous = {name: site.alpha1_override for name, site in self.sites.items()}
        try:
            for site in self.sites.values():
                site.alpha1_override = alpha1
            yield
        finally:
            for name, site in self.sites.items():
                site.alpha1_override = previous[name]

    @property
    def main_site(self) -> PluggedTokenToImageAttention | None:
        """The site whose routing is reported: block2 (the paper's) if plugged, else the first."""
        if not self.sites:
            return None
        return self.sites.get("block2", next(iter(self.sites.values())))

    # ------------------------------------------------------------------------------- forward
    def embed_images(self, images: Tensor) -> Tensor:
        """images: B x 3 x h x w float RGB in [0, 255], resized so the long side is img_size.

        Returns B x C x H x W float32 image embeddings (without grad unless the encoder is
        tuned), computed in :attr:`encoder_precision`.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        if max(images.shape[-2:]) != self.img_size:
            raise ValueError(f"images must have long side {self.img_size}, got {tuple(images.shape[-2:])}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_is_frozen):
            if self.encoder_precision == "fp32":
                return self.sam.image_encoder(self.sam.preprocess(images))
            with torch.autocast(images.device.type, dtype=_AUTOCAST_DTYPES[self.encoder_precision]):
                embeddings = self.sam.image_encoder(self.sam.preprocess(images))
            return embeddings.float()

    def decode(
        self, image_embedding: Tensor, prompts: PromptTensors, *, multimask_output: bool
    ) -> DecoderOutput:
        """Run the prompt encoder and the (plugged) mask decoder for P prompts on ONE image.

        Args:
          image_embedding: 1 x C x H x W (SAM repeats it per prompt).
          prompts: P prompts in the input frame.
          multimask_output: SAM's flag (False: mask token 0 only).
        """
        if image_embedding.ndim != 4 or image_embedding.shape[0] != 1:
            raise ValueError(
                f"decode takes one image embedding 1 x C x H x W, got {tuple(image_embedding.shape)}"
            )
        points = None if prompts.point_coords is None else (prompts.point_coords, prompts.point_labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.mask_inputs)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        site = self.main_site
        routing = None if site is None else site.last_routing
        offsets = None if site is None else site.last_offsets
        return DecoderOutput(low_res_logits=low_res, iou_predictions=iou, routing=routing, offsets=offsets)

    def forward(
        self,
        prompts: Sequence[PromptTensors],
        *,
        image_embeddings: Tensor | None = None,
        images: Tensor | None = None,
        multimask_output: bool = False,
    ) -> DecoderOutput:
        """The training forward: B images, each with its own prompts, decoded one image at a time.

        SAM's decoder repeats one image embedding per prompt, so images are looped over (their
        sparse-token counts differ anyway). ``Sam.forward`` is not used: it runs under no_grad.

        Args:
          prompts: one :class:`PromptTensors` per image.
          image_embeddings: B x C x H x W precomputed embeddings, or
          images: B x 3 x S x S images for :meth:`embed_images` (needed when the encoder is tuned).
          multimask_output: SAM's flag.

        Returns:
          The outputs of all prompts concatenated in image order.
        """
        if (image_embeddings is None) == (images is None):
            raise ValueError("give exactly one of image_embeddings and images")
        if image_embeddings is None:
            image_embeddings = self.embed_images(images)
        if image_embeddings.shape[0] != len(prompts):
            raise ValueError(f"{image_embeddings.shape[0]} images but {len(prompts)} prompt sets")
        outputs = [
            self.decode(image_embeddings[i : i + 1], p, multimask_output=multimask_output)
            for i, p in enumerate(prompts)
        ]
        return DecoderOutput(
            low_res_logits=torch.cat([o.low_res_logits for o in outputs]),
            iou_predictions=torch.cat([o.iou_predictions for o in outputs]),
            routing=None if outputs[0].routing is None else torch.cat([o.routing for o in outputs]),
            offsets=None if outputs[0].offsets is None else torch.cat([o.offsets for o in outputs]),
        )


def _validate(cfg: PluginConfig, tuning: TuningConfig) -> None:
    """Every choice and range declared in stable_sam.config (a ConfigError, i.e. a ValueError)."""
    check_config(cfg, "plugin")
    check_config(tuning, "tuning")
