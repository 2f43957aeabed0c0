"""The ``torch.compile(model, backend="pagedllm")`` backend (installed as ``pagedtensor.compile_backend``).

Its FX passes (one a file in ``passes/``) insert prefetch, wait and release nodes around the ops
that read paged tensors. The passes land with their own issue; this package holds their home.
"""
