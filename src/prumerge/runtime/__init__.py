"""Device side: preprocessing, vision sessions, (later) the LLM. Imports no torch and no transformers.

A device needs only onnxruntime (or TensorRT), numpy, pillow and, for text, tokenizers.
"""

from .preprocess import PreprocessConfig, load_image, preprocess_batch, preprocess_image
from .pipeline import GenerationResult, Pipeline
from .vision import VisionOutput, VisionSession

__all__ = ["GenerationResult", "Pipeline", "PreprocessConfig", "VisionOutput", "VisionSession", "load_image", "preprocess_batch", "preprocess_image"]
