"""Memory-efficient attention kernels, installed as `ulvideo.kernels`.

  reference.py           naive O(N²) softmax attention and the causal-mask rule (the test reference)
  chunked.py             O(N)-memory online-softmax attention in PyTorch, recomputing backward
  triton_flash.py        Triton flash attention forward + backward (imports triton)
  xformers_attention.py  wrapper of xformers.ops.memory_efficient_attention (CUDA only)

Models never import these directly: `ulvideo.attention.attention` chooses among them. Nothing is
imported here so that `import ulvideo.kernels` never pulls in triton or xformers.
"""
