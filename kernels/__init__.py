"""Memory-efficient attention kernels, installed as `ulvideo.kernels`.

  reference.py           naive O(N²) softmax attention and the causal-mask rule (the test reference)
  chunked.py             O(N)-memory online-softmax attention in PyTorch, recomputing backward
  triton_flash.py        Triton flash attention forward + backward (imports triton)
  xformers_attention.py  wrapper of xformers.ops.memory_efficient_attention (CUDA only)

Models never import these directly: `ulvideo.attention.attention` chooses among them. Nothing is
imported here so that `import ulvideo.kernels` never pulls in triton or xformers.
"""

if __name__ == "kernels":
    # Imported as top-level `kernels`: the checkout's root is on sys.path (`python -m ...` run from
    # it) and this folder hides the PyPI package of that name (Hugging Face's `kernels`, which
    # transformers imports when it is installed). Load that package in this one's place.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parents[1]
    _spec = _machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if _Path(p or ".").resolve() != _root])
    if _spec is not None and _spec.origin and _Path(_spec.origin).resolve() != _Path(__file__).resolve():
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
