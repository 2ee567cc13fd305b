"""Backends that run DHSA: ``torch_cuda`` (CUDA kernels through ctypes + a torch custom op), and
later ``ort_cpu`` and ``trt``. Heavy runtimes are imported only inside their backend package."""
