"""FVD protocols: one preset per reference tool, each naming every choice that moves the number.

Pure data (no torch): `ulvideo fvd --help` lists these without importing the network code. The
pixel operations the fields name live in `ulvideo/eval/fvd_data.py`; the network and the
Frechet distance in `i3d.py` and `metrics.py`. References read for each preset (line numbers at
these commits):

    StyleGAN-V  universome/stylegan-v 3fecd69     (src/metrics/, src/training/dataset.py, src/scripts/)
    TATS        songweige/TATS 03bbce1            (tats/fvd/fvd.py, tats/data.py, scripts/sample_vqgan_transformer_short_videos.py)
    VideoGPT    wilson1yan/VideoGPT 733d2b1       (videogpt/fvd/fvd.py, videogpt/data.py, scripts/compute_fvd.py)
    cd-FVD      cd-fvd 0.1.1 on PyPI (= songweige/content-debiased-fvd a1e037a for cdfvd/)

Window draws: every reference draws its random windows (and shuffles) from generators that cannot
be replayed (Python's `random` inside DataLoader workers, unseeded). Ours draw from the same
distributions with numpy generators seeded by (preset seed, path of the video, pass), so a
statistics file is reproducible and independent of reading order.
"""
from __future__ import annotations

from dataclasses import dataclass

# Choices a Protocol can name (fvd_data.py implements each):
VIDEO_ROUTES = ("pil-lanczos", "bilinear-tats", "bilinear-aa-cdfvd", "bilinear-round")
FRAME_ROUTES = ("as-read", "crop-lanczos-tats", "crop-lanczos-cdfvd", "bilinear-round")
I3D_RESIZES = ("torchscript", "bilinear", "tf1-bilinear")
CLIP_RULES = ("stylegan-v", "tats", "cdfvd", "random-window")
GEN_RULES = ("first", "cdfvd")


@dataclass(frozen=True)
class Protocol:
    """Everything between a folder of videos and an FVD. Stored in every statistics file and score.

    Frames are uint8 from the file to the I3D input; `video_route` brings a decoded window of a video
    file to `resolution` x `resolution`, `frame_route` does the same for a folder of frame images,
    `i3d_resize` takes R x R to the network's 224 x 224 input. `real_clips` / `gen_clips` name the
    window rule (which videos, which start frame, how many). `num_real` 0 means every usable video.
    """

    name: str
    tool: str
    weights: str  # a key of i3d.WEIGHTS
    num_frames: int
    resolution: int
    video_route: str
    frame_route: str
    frame_order: str  # frames of a frame folder: "name" (string sort) or "number" (trailing integer)
    i3d_resize: str
    real_clips: str
    gen_clips: str
    resize_generated: bool  # False: generated clips reach the I3D resize at the size they were made
    num_real: int
    num_gen: int
    covariance: str  # "population" (/ n) or "unbiased" (/ (n - 1))
    reference_split: str  # sub-folder of `fvd ref --data` holding the reference videos ("" = the folder)
    context_frames: int = 0
    seed: int = 0

    def summary(self) -> str:
        real = f"{self.num_real} real" if self.num_real else "every real video"
        return (f"{self.tool}: {self.num_frames} frames at {self.resolution}px, {real} vs {self.num_gen} generated "
                f"clips, covariance / {'n' if self.covariance == 'population' else 'n-1'}")


def _stylegan_v(frames: int) -> Protocol:
    """StyleGAN-V `fvd2048_{16,128}f` (src/metrics/metric_main.py:115-124), 3fecd69.

    - weights: `i3d_torchscript.pt`, the TorchScript port of the tf-hub Kinetics-400 I3D
      (frechet_video_distance.py:22), called with rescale=True, resize=True, return_features=True
      (:23): the port itself maps uint8 to its input range and resizes to 224 x 224.
    - real clips: the first min(#videos, 2048) videos in sorted path order (metric_utils.py:222-230
      walks items 0..n-1 in order; metric_main.py:116 sets max_size=None, so no subset is drawn);
      videos shorter than the window are discarded first (frechet_video_distance.py:28,
      dataset.py:323-324); one window of consecutive frames per video at a uniform start in
      [0, n - frames] (dataset.py:402-406).
    - generated clips: frames 0..frames-1 (frechet_video_distance.py:39 turns the random offset off;
      the generator path renders t = 0..frames-1, metric_utils.py:309), the first 2048 in order.
      A generated video shorter than the window stops the run (StyleGAN-V asserts, dataset.py:400).
    - pixels: frame folders are read as they are (dataset.py:431-449, PIL); the dataset was made
      offline by convert_videos_to_frames.py:74-75: short side to R with PIL LANCZOS (the long side
      int(R * long / short), torchvision's rule), then a centre crop whose offset is
      round((size - R) / 2). Video files take that same resize here; not reproduced are the
      script's moviepy frame timing (:71) and its JPEG encoding (:76; PIL reads the quality from
      `quality`, so `q=95` leaves PIL's default).
    - layout: one folder of frames per video, frames sorted by name (dataset.py:289-321).
    - statistics: features cast to float32 then summed in float64 (metric_utils.py:87,99-101),
      covariance divided by n (:122-127). Ours keep float64 features.
    - mirror: StyleGAN-V's --mirror (calc_metrics_for_dataset.py:109,155) tiles the video list with
      flipped copies (dataset.py:59-62), but fvd2048_* reset xflip=False (metric_main.py:116,122):
      its FVD never mirrors. `ulvideo fvd ref --mirror` offers the tiling and records it.
    """
    return Protocol(f"stylegan-v-fvd2048-{frames}f", "StyleGAN-V 3fecd69", "i3d_torchscript", frames, 256,
                    "pil-lanczos", "as-read", "name", "torchscript", "stylegan-v", "first", True,
                    2048, 2048, "population", "")


def _cdfvd(frames: int, resolution: int) -> Protocol:
    """cd-FVD 0.1.1 with its I3D (`cdfvd.fvd.cdfvd('i3d')`), as its loaders and defaults run it.

    - weights: `i3d_pretrained_400.pt` (third_party/i3d/utils.py:28-47, the TATS file).
    - counts: n_real='full' (every video once) and n_fake=2048 are the class defaults
      (fvd.py:58); a folder with fewer than 2048 generated videos is read again in new passes,
      each a new shuffle with new random windows, until 2048 clips (fvd.py:153-160,
      data_utils.py:128-135 shuffle=True); the last pass is cut (metric_utils.py:72-75).
    - windows, video files: uniform over the n - frames + 1 windows of each video
      (data_utils.py:180-192, torchvision VideoClips with one-frame steps, :166); a video with no
      full window is replaced by the next one that has one (:188-189).
    - windows, frame folders: every leaf folder of images is a video (data_utils.py:249-265), its
      frames ordered by the integer after the last '_' (:253), kept only with MORE than `frames`
      frames (:256,262); start uniform in [0, n - frames] (:287-289).
    - pixels, video files: x / 255 in float32, short side to R with torch bilinear,
      align_corners=False, antialias=True, long side ceil (:52-59), centre crop at
      floor((size - R) / 2) (:62-65), then * 255 and truncated to uint8 (`.byte()`, fvd.py:133,155).
    - pixels, frame folders: centre square crop at floor((long - short) / 2) from the first
      frame's size (data_utils.py:290-298), PIL resize to R x R with ANTIALIAS (= LANCZOS, :309-311),
      / 255 and * 255 then truncated (exact for integers).
    - I3D input: float(uint8), torch bilinear to 224 x 224 without antialias, 2 x / 255 - 1
      (third_party/i3d/utils.py:13-25).
    - statistics: float32 features summed in float64, covariance divided by n
      (metric_utils.py:70,82-84,133-136). Precomputed statistics on its site use seed 0 (README);
      the loaders' defaults are resolution 256, 16 frames (fvd.py:215).
    """
    return Protocol(f"cdfvd-i3d-{frames}f-{resolution}px", "cd-FVD 0.1.1", "i3d_pretrained_400", frames, resolution,
                    "bilinear-aa-cdfvd", "crop-lanczos-cdfvd", "number", "bilinear", "cdfvd", "cdfvd", True,
                    0, 2048, "population", "")


TATS = Protocol(
    "tats-fvd2048-16f", "TATS 03bbce1", "i3d_pretrained_400", 16, 128, "bilinear-tats", "crop-lanczos-tats", "number",
    "bilinear", "tats", "first", False, 2048, 2048, "unbiased", "train")
TATS_DOC = """TATS' short-video FVD (scripts/sample_vqgan_transformer_short_videos.py:103-124), 03bbce1.

    - weights: `i3d_pretrained_400.pt` (tats/fvd/fvd.py:34-40).
    - real clips, video files: the train split (data.py:47) as torchvision VideoClips, i.e. every
      16-frame window of every video (one-frame steps; len = num_clips, data.py:74), shuffled
      (data.py:291), the first 2048 (sample script :112-116): 2048 windows drawn uniformly without
      replacement from all windows, so long videos give more clips.
    - real clips, frame folders (--image_folder): one window per video, videos shuffled, the
      first 2048; frames ordered by the integer after the last '_' (data.py:558), a folder kept
      only with MORE than 16 frames (:565), start uniform in [0, n - 1 - 16] (:593).
    - pixels, video files: x / 255 in float32, short side to 128 with torch bilinear,
      align_corners=False, no antialias, long side ceil (data.py:95-127), centre crop at
      floor((size - R) / 2) (:130-133), - 0.5 (:136); then (x + 0.5) * 255 truncated by `.byte()`
      (sample script :113). In float32 the -0.5/+0.5 round trip drops exact levels 1..63 by one.
    - pixels, frame folders: centre square crop at floor((long - short) / 2) (data.py:598-603),
      PIL resize to 128 x 128 with ANTIALIAS (= LANCZOS, :614-616), / 255 - 0.5 (:618, :544-548),
      then the same (x + 0.5) * 255 truncation.
    - generated clips: TATS scores its 16-frame 128 x 128 samples whole: clamp(x, -0.5, 0.5) + 0.5
      (sample script :51), * 255 truncated to uint8 and 2048 of them (:97-99). Here: frames 0..15
      of the first 2048 generated videos, at the size they were made (no resize before the I3D's).
      Our generated videos are uint8 as `ulvideo generate` writes them (rounded, videoio.to_uint8).
    - I3D input: float(uint8), torch bilinear to 224 x 224 (align_corners=False, no antialias),
      2 x / 255 - 1 (tats/fvd/fvd.py:17-27).
    - statistics: covariance divided by n - 1 (tats/fvd/fvd.py:83), Frechet distance :89-100
      (float32 torch there, float64 here).
    - VideoGPT (scripts/compute_fvd.py, 733d2b1) shares the clip rule (VideoClips windows,
      videogpt/data.py:62-63), the truncation (:95,104,110) and n - 1 (videogpt/fvd/fvd.py), but
      scores 256 test clips against 256 samples conditioned on them, at its model's resolution
      (BAIR: 64), and reaches 224 by short side + centre crop (videogpt/fvd/fvd.py:5-10): the
      same pixels as this preset for square clips; its counts are not offered as a preset.
    """

K600 = Protocol(
    "k600-5to11", "tf-hub FVD, Kinetics-600 5->11 prediction", "i3d_torchscript", 16, 64, "bilinear-round",
    "bilinear-round", "name", "tf1-bilinear", "random-window", "first", True, 50000, 50000, "unbiased", "test",
    context_frames=5)
K600_DOC = """Kinetics-600 frame prediction as reported by Video Transformer (Weissenborn et al. 2020),
    MAGVIT (Yu et al. 2023), W.A.L.T and the UL paper: 16 frames at 64 x 64, the first 5 given,
    50,000 clips. Derived from google-research's frechet_video_distance.py (its `preprocess`:
    TF1 tf.image.resize_bilinear, no half-pixel offset, to 224; 2 x / 255 - 1) and tf-gan's
    classifier metrics (covariance / (n - 1)) as read in those projects; line numbers are not
    cited because no commit of them was read for this preset. The tf-hub module is fed through its
    TorchScript port with rescale=False, resize=False. Not published in code, so ulvideo's own:
    how a video reaches 64 x 64 (short side, torch bilinear, rounded to uint8, centre crop), one
    uniform random window per test video. Our causal models make 17 frames; the first 16 count.
    """

PRESETS: dict[str, Protocol] = {p.name: p for p in (
    _stylegan_v(16), _stylegan_v(128), TATS,
    _cdfvd(16, 128), _cdfvd(16, 256), _cdfvd(128, 128), _cdfvd(128, 256), K600)}
DOCS = {"stylegan-v": _stylegan_v.__doc__, "tats": TATS_DOC, "cdfvd": _cdfvd.__doc__, "k600": K600_DOC}

# Earlier names: an alias where the protocol is the same, otherwise the reason it is gone.
ALIASES = {"stylegan-v-2048-16f": "stylegan-v-fvd2048-16f"}
RETIRED = {"ucf101-16f-128": "it matched neither TATS nor cd-FVD; use tats-fvd2048-16f (TATS) or "
                             "cdfvd-i3d-16f-128px (cd-FVD)"}


def get_preset(name: str) -> Protocol:
    """The preset called `name` (or its alias); KeyError with the known names otherwise."""
    if name in RETIRED:
        raise KeyError(f"FVD preset {name!r} is retired: {RETIRED[name]}")
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise KeyError(f"unknown FVD preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def help_lines() -> str:
    """One line per preset, for `--help`."""
    lines = [f"  {name:<24} {p.summary()}" for name, p in PRESETS.items()]
    lines += [f"  {old:<24} alias of {new}" for old, new in ALIASES.items()]
    return "\n".join(lines)
