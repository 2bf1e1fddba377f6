"""What the vision graph expects of an image: the preprocessing half of the artifact contract (stdlib only).

The build derives it from the checkpoint's ``preprocessor_config.json`` (and the size the encoder takes) and writes
it into the manifest; the runtime applies it with PIL/numpy (:mod:`prumerge.runtime.preprocess`).
"""

from __future__ import annotations

import dataclasses

from ..errors import InputError

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, without importing PIL here
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What the vision graph expects of an image, in the order applied: pad, resize, crop, rescale, normalise."""

    image_size: int  # side of the square pixel_values the graph takes
    resize_shortest_edge: int | None = None  # None: no resize (the image must already be image_size)
    resample: int = BICUBIC
    crop_height: int | None = None
    crop_width: int | None = None
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_to_square: bool = False

    @classmethod
    def from_processor_dict(cls, processor: dict | None, image_size: int) -> "PreprocessConfig":
        """From a ``preprocessor_config.json`` (CLIP / LLaVA processors); CLIP defaults for the tower's size if absent."""
        if not processor:
            return cls(image_size=image_size, resize_shortest_edge=image_size, crop_height=image_size, crop_width=image_size)
        size = processor.get("size", {"shortest_edge": image_size}) if processor.get("do_resize", True) else None
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if size is not None and "shortest_edge" not in size:
            if size.get("height") != size.get("width"):
                raise InputError(f"unsupported processor size {size}: only shortest_edge or square sizes")
            size = {"shortest_edge": size["height"]}
        crop = processor.get("crop_size", {"height": image_size, "width": image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_crop = processor.get("do_center_crop", True)
        if do_crop and int(crop["height"]) != int(crop["width"]):
            raise InputError(f"unsupported processor crop {crop}: only square crops")
        produced = int(crop["height"]) if do_crop else (None if size is None else int(size["shortest_edge"]))
        if produced is not None and produced != image_size:
            # an explicit --image-size other than the processor's: scale resize and crop alike, so the crop keeps
            # the same share of the image (recorded in the manifest; the default size is the processor's own)
            if size is not None:
                size = {"shortest_edge": int(round(int(size["shortest_edge"]) * image_size / produced))}
            crop = {"height": image_size, "width": image_size}
        return cls(
            image_size=image_size,
            resize_shortest_edge=None if size is None else int(size["shortest_edge"]),
            resample=int(processor.get("resample", BICUBIC)),
            crop_height=int(crop["height"]) if do_crop else None,
            crop_width=int(crop["width"]) if do_crop else None,
            rescale_factor=float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0,
            image_mean=tuple(processor.get("image_mean", OPENAI_CLIP_MEAN)) if processor.get("do_normalize", True) else (0.0, 0.0, 0.0),
            image_std=tuple(processor.get("image_std", OPENAI_CLIP_STD)) if processor.get("do_normalize", True) else (1.0, 1.0, 1.0),
            pad_to_square=bool(processor.get("do_pad", False)),
        )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["image_mean"], data["image_std"] = list(self.image_mean), list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        data = dict(data)
        data["image_mean"], data["image_std"] = tuple(data["image_mean"]), tuple(data["image_std"])
        return cls(**data)


def processor_image_size(processor: dict | None) -> int | None:
    """The square side a ``preprocessor_config.json`` produces (its crop, else its fixed resize), or None.

    This is the size a checkpoint is *used* at: DINOv2 configs say 518 while every DINOv2 processor crops to 224,
    and transformers interpolates the position embeddings to whatever arrives. None when the processor leaves the
    size open (shortest-edge resize without a crop).
    """
    if not processor:
        return None
    if processor.get("do_center_crop", True) and processor.get("crop_size") is not None:
        side = processor["crop_size"]
    elif processor.get("do_resize", True) and processor.get("size") is not None:
        side = processor["size"]
        if isinstance(side, dict) and "shortest_edge" in side:
            return None
    else:
        return None
    if isinstance(side, int):
        return side
    if not isinstance(side, dict) or side.get("height") != side.get("width") or not isinstance(side.get("height"), int):
        raise InputError(f"unsupported processor size {side}: only square crops or sizes")
    return side["height"]
