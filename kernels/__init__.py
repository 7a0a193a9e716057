"""Memory-efficient attention kernels, installed as `ulvideo.kernels`."""
