"""Device side: preprocessing, vision sessions, (later) the LLM. Imports no torch and no transformers.

A device needs only onnxruntime (or TensorRT), numpy, pillow and, for text, tokenizers.
"""

from .preprocess import PreprocessConfig, load_image, preprocess_batch, preprocess_image
from .pipeline import GenerationResult, Pipeline
from ..artifact.contract import VisionOutput
from .vision import VisionSession

__all__ = ["GenerationResult", "Pipeline", "PreprocessConfig", "VisionOutput", "VisionSession", "load_image", "preprocess_batch", "preprocess_image"]
