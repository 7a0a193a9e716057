"""Networks (nn.Modules only): causal 3D encoder, latent transformer (prior / base model),
pixel-space diffusion decoder, and the named size registry. Layout (B, C, T, H, W) everywhere."""
from ulvideo.nets.decoder import Decoder, LatentReadout
from ulvideo.nets.encoder import Encoder
from ulvideo.nets.layers import CausalConv3d, expand_latent_time, num_params
from ulvideo.nets.sizes import SIZES
from ulvideo.nets.transformer import LatentTransformer, TransformerBlock

__all__ = ["SIZES", "CausalConv3d", "Decoder", "Encoder", "LatentReadout", "LatentTransformer",
           "TransformerBlock", "expand_latent_time", "num_params"]
