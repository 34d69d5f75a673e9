"""Evaluation at decoder cost: embed each image once, then decode every prompt, model and setting.

The protocol follows HQ-SAM's evaluation and the method spec (sections 5 and 6): the image and its
GT are brought to the model frame ("stretch": squashed to S x S like HQ-SAM, or "longest_side" like
SamPredictor), prompts are drawn from the GT in that frame, and the predicted low-res logits are
brought back to the original resolution, where IoU and Boundary IoU are measured (logit > 0 vs
GT). Random prompt kinds are drawn ``draws`` times from ``np.random.default_rng([seed, draw,
image, kind])``, so every model and every routing setting sees the very same prompts.

The image encoder never runs inside the loops: :func:`embed_images` computes (or fetches from an
:class:`EmbeddingCache`) one embedding per image and model input, which every prompt kind, draw,
model (SAM = the same weights with plug-ins off) and sweep point reuses.

COCO sets are scored by mask AP with every instance prompted by a noisy GT box (:mod:`.coco`,
"N-Box"), and, given a detector's results file, with its boxes (:mod:`.coco_detections`, HQ-SAM's
COCO protocol). Also: automatic mask generation (segment-anything's ``SamAutomaticMaskGenerator`` on the
plugged ``Sam``) with a class-agnostic COCO AP/AR (:mod:`.automatic`), and the interactive click
protocol with NoC@IoU (:mod:`.interactive`).
"""

from .automatic import (
    AMG_SCORES,
    CachedSamPredictor,
    amg_coco_eval,
    amg_detections,
    amg_overlay,
    mask_generator,
    write_amg,
)
from .coco import (
    COCO_NOISE_SCALES,
    CocoImage,
    CocoResult,
    coco_gt_subset,
    coco_noisy_box_detections,
    coco_noisy_boxes,
    prepare_coco_image,
)
from .coco_detections import (
    DETECTION_SCORES,
    CocoDetections,
    DetectionsError,
    coco_box_detections,
    read_coco_detections,
)
from .interactive import (
    ClickTrace,
    click_trace,
    frame_points,
    model_decoder,
    number_of_clicks,
    summarize_traces,
)
from .protocol import (
    DETERMINISTIC_KINDS,
    Decoded,
    PreparedImage,
    decode_prompts,
    embed_images,
    eval_prompts,
    evaluate_prompts,
    logits_to_masks,
    prepare_image,
)
from .summary import per_image_rows, summarize

__all__ = [
    "AMG_SCORES",
    "COCO_NOISE_SCALES",
    "DETECTION_SCORES",
    "DETERMINISTIC_KINDS",
    "CachedSamPredictor",
    "ClickTrace",
    "CocoDetections",
    "CocoImage",
    "CocoResult",
    "Decoded",
    "DetectionsError",
    "PreparedImage",
    "amg_coco_eval",
    "amg_detections",
    "amg_overlay",
    "click_trace",
    "coco_box_detections",
    "coco_gt_subset",
    "coco_noisy_box_detections",
    "coco_noisy_boxes",
    "decode_prompts",
    "embed_images",
    "eval_prompts",
    "evaluate_prompts",
    "frame_points",
    "logits_to_masks",
    "mask_generator",
    "model_decoder",
    "number_of_clicks",
    "per_image_rows",
    "prepare_coco_image",
    "prepare_image",
    "read_coco_detections",
    "summarize",
    "summarize_traces",
    "write_amg",
]
