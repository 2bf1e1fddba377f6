"""``TensorRTSession``: an artifact's ``vision.engine`` on TensorRT, with :class:`VisionSession`'s interface.

Torch-free: device memory through cuda-python's runtime bindings. The padded contract uses static output buffers;
the dynamic contract's data-dependent token axis goes through an ``IOutputAllocator``. An engine built for another
GPU or TensorRT version is refused at load with both named (engines are not portable).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, InputError
from ..artifact.manifest import inside
from ..artifact.engine import device_facts, engine_mismatch
from .session import VisionSessionBase


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailableError("the TensorRT session needs cuda-python (pip install cuda-python)") from exc
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ArtifactError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTSession(VisionSessionBase):
    """The artifact's own engine on TensorRT (the shared checks and output contract from the base class)."""

    def __init__(self, directory: Path, manifest, graph: dict) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailableError("TensorRT is not installed; use provider cpu/cuda (onnxruntime) instead") from exc
        engine_facts = graph.get("engine")
        if not engine_facts:
            raise ArtifactError(f"{directory} has no TensorRT engine; build one on this device: prumerge-export engine {directory}")
        problem = engine_mismatch(engine_facts, device_facts())
        if problem:
            raise ArtifactError(f"{inside(directory, engine_facts['file'])} cannot run here: {problem}")
        self.trt, self.cudart = trt, _cudart()
        super().__init__(directory, manifest, graph, batch_max=int(engine_facts["options"]["max_batch"]))
        self.provider = "TensorRT"
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(inside(directory, engine_facts["file"]).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {inside(directory, engine_facts['file'])}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.outputs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                        if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
        self.dynamic = graph["contract"] == "dynamic"
        self._allocator = _OutputAllocator(trt, self.cudart) if self.dynamic else None

    def run_batch(self, feed: np.ndarray) -> dict:
        cudart, ctx = self.cudart, self.context
        buffers = []
        try:
            device_in = _check(cudart.cudaMalloc(feed.nbytes))
            buffers.append(device_in)
            _check(cudart.cudaMemcpyAsync(device_in, feed.ctypes.data, feed.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
            ctx.set_input_shape(self.input_name, feed.shape)
            ctx.set_tensor_address(self.input_name, device_in)
            hosts = {}
            for name in self.outputs:
                dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
                shape = tuple(ctx.get_tensor_shape(name))
                if self._allocator is not None and any(d < 0 for d in shape):
                    ctx.set_output_allocator(name, self._allocator)
                    continue
                hosts[name] = np.empty(shape, dtype=dtype)
                pointer = _check(cudart.cudaMalloc(max(hosts[name].nbytes, 1)))
                buffers.append(pointer)
                ctx.set_tensor_address(name, pointer)
            if not ctx.execute_async_v3(self.stream):
                raise ArtifactError("TensorRT execution failed")
            for name in self.outputs:
                if name not in hosts:  # data-dependent: shape and memory come from the allocator
                    shape = self._allocator.shapes[name]
                    dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
                    hosts[name] = np.empty(shape, dtype=dtype)
                    pointer = self._allocator.pointers[name]
                else:
                    pointer = ctx.get_tensor_address(name)
                _check(cudart.cudaMemcpyAsync(hosts[name].ctypes.data, pointer, hosts[name].nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
        finally:
            for pointer in buffers:
                cudart.cudaFree(pointer)
        return hosts  # by name


class _OutputAllocator:
    """Grows device buffers for outputs whose shape TensorRT learns only while running (dynamic contract)."""

    def __new__(cls, trt, cudart):
        class Allocator(trt.IOutputAllocator):
            def __init__(self):
                trt.IOutputAllocator.__init__(self)
                self.pointers, self.sizes, self.shapes = {}, {}, {}

            def reallocate_output(self, tensor_name, memory, size, alignment):
                if self.sizes.get(tensor_name, 0) < size:
                    if tensor_name in self.pointers:
                        cudart.cudaFree(self.pointers[tensor_name])
                    self.pointers[tensor_name] = _check(cudart.cudaMalloc(max(size, 1)))
                    self.sizes[tensor_name] = size
                return self.pointers[tensor_name]

            def notify_shape(self, tensor_name, shape):
                self.shapes[tensor_name] = tuple(shape)

        return Allocator()
