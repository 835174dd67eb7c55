"""SimMIM: a Swin encoder with a mask token, a one-layer decoder and an L1 loss on masked pixels (arXiv 2111.09886).

Sec. 3.1: masked patches are replaced by a learned mask token after the patch embedding. Sec. 3.2-3.3: the
prediction head is a single 1x1 convolution to ``stride**2 * 3`` channels followed by a pixel shuffle back to
image resolution (stride 32 for Swin), and the loss is L1 over the masked pixels only. The locally normalised
target (``norm_target_patch_size``, 47 for SwinV2, arXiv 2111.09883 sec. 4.1) replaces every target pixel by
its value standardised over the surrounding ``k x k`` window.

Parameter names follow the authors' SimMIM checkpoints (``encoder.*``, ``decoder.0.*``) except that the mask
token lives on this module as ``mask_token`` rather than on the encoder, so the encoder stays a plain backbone;
:func:`simmim.load_checkpoint` maps the authors' ``encoder.mask_token`` onto it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from swinv2.layers import trunc_normal_

# Both constants are the authors': the variance floor of the normalised target and the loss denominator guard.
TARGET_EPS = 1e-6
LOSS_EPS = 1e-5


def local_stats(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and standard deviation over a ``patch_size`` square window (stride 1, zero padding).

    Padded cells are not counted: the mean is over the ``n`` cells inside the image, and the variance is the
    unbiased ``(E[x^2] - mean^2) * n / (n - 1)``, clamped at 0; the returned std is ``sqrt(var + 1e-6)``.
    Computed in at least float32 (bf16 would lose the small differences ``E[x^2] - mean^2``).
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    pad = patch_size // 2
    mean = F.avg_pool2d(x, patch_size, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, patch_size, stride=1, padding=pad, count_include_pad=False)
    ones = torch.ones_like(x[:1, :1])
    count = F.avg_pool2d(ones, patch_size, stride=1, padding=pad, divisor_override=1)  # cells inside the image
    var = ((mean_sq - mean * mean) * (count / (count - 1))).clamp_min(0)
    return mean, torch.sqrt(var + TARGET_EPS)


def local_normalize(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """SimMIM's normalised target: ``(x - mean) / sqrt(var + 1e-6)`` with :func:`local_stats`."""
    mean, std = local_stats(x, patch_size)
    return (x - mean) / std


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask ``(B, h, w)`` -> pixel mask ``(B, 1, h * patch_size, w * patch_size)``."""
    return repeat(mask, "b h w -> b 1 (h p1) (w p2)", p1=patch_size, p2=patch_size)


class SimMIM(nn.Module):
    """Masked image modelling on a Swin V1/V2 backbone (SimMIM, arXiv 2111.09886 sec. 3).

    ``encoder``: a ``swinv2.create_model(..., num_classes=0)`` model. ``norm_target_patch_size``: odd window
    size of the locally normalised target (47 in the SwinV2 recipe), or ``None`` to predict the input itself.
    ``model(images, mask)`` returns the scalar loss; ``images`` are normalised ``(B, in_chans, H, W)`` with sides
    multiples of :attr:`stride`, and ``mask`` is a batch of :class:`simmim.MaskGenerator` masks, ``(B, H/p, W/p)``.
    """

    def __init__(self, encoder: nn.Module, norm_target_patch_size: int | None = None, in_chans: int = 3):
        super().__init__()
        if not (hasattr(encoder, "embed") and hasattr(encoder, "forward_tokens")):
            raise ValueError(
                f"SimMIM needs a Swin encoder from swinv2.create_model, got {type(encoder).__name__}: "
                'build one with swinv2.create_model("swinv2_...", num_classes=0)'
            )
        if getattr(encoder, "num_classes", 0) != 0:
            raise ValueError(
                f"the encoder has a {encoder.num_classes}-class head, which SimMIM would never train: "
                "create it with num_classes=0"
            )
        if encoder.patch_embed.in_chans != in_chans:
            raise ValueError(
                f"in_chans={in_chans} but the encoder takes {encoder.patch_embed.in_chans} channels: "
                "pass the same in_chans to both"
            )
        k = norm_target_patch_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 3 or k % 2 == 0):
            raise ValueError(
                f"norm_target_patch_size must be an odd integer >= 3 (the window is centred on each pixel), "
                f"got {k!r}: pass e.g. 47, or None for the plain target"
            )
        self.encoder = encoder
        self.in_chans, self.norm_target_patch_size = in_chans, k
        self.patch_size = encoder.patch_size
        # Each patch merging halves the map: the encoder's output stride is patch * 2**merges (32 for Swin).
        merges = sum(stage.downsample is not None for stage in encoder.layers)
        self.stride = encoder.patch_size * 2**merges
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def no_weight_decay(self) -> set[str]:
        """The encoder's no-decay parameters, the decoder's bias and the mask token (SimMIM, arXiv 2111.09886)."""
        own = {name for name, p in self.named_parameters() if p.ndim <= 1 and not name.startswith("encoder.")}
        return own | {"mask_token"} | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def layer_ids(self) -> dict[str, int]:
        """The encoder's layers; the mask token joins the patch embedding (layer 0), the decoder the last layer."""
        last = self.encoder.num_layers - 1
        ids = {name: last for name, _ in self.named_parameters()}
        ids.update({f"encoder.{name}": layer for name, layer in self.encoder.layer_ids().items()})
        ids["mask_token"] = 0
        return ids

    def _check(self, images: torch.Tensor, mask: torch.Tensor) -> None:
        # Shape-only checks: static under torch.compile, so no graph breaks.
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images shaped (batch, {self.in_chans}, height, width), got {tuple(images.shape)}: "
                f"pass a 4-D NCHW batch with {self.in_chans} channels"
            )
        B, _, H, W = images.shape
        if H % self.stride or W % self.stride:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the SimMIM decoder stride {self.stride}: "
                f"resize or crop the images to multiples of {self.stride}"
            )
        want = (B, H // self.patch_size, W // self.patch_size)
        if tuple(mask.shape) != want:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not fit images of {H}x{W}: expected {want}; use "
                f"MaskGenerator(input_size=({H}, {W}), model_patch_size={self.patch_size}) and stack one per image"
            )

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder output ``(B, in_chans, H, W)``, in the target's space (what the loss compares).

        The encoder gets ``images`` in its weights' dtype: DeepSpeed's bf16 casts the weights and adds no autocast,
        so callers pass float32 images and only the encoder's copy is rounded (the target keeps float32).
        """
        self._check(images, mask)
        images = images.to(self.mask_token.dtype)
        tokens = self.encoder.embed(images, mask, self.mask_token)  # mask token in before the position embedding
        features = self.encoder.forward_tokens(tokens)  # (B, H/stride, W/stride, C)
        return self.decoder(features.permute(0, 3, 1, 2))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder learns to predict: the images, or their local normalisation."""
        if self.norm_target_patch_size is None:
            return images
        return local_normalize(images, self.norm_target_patch_size)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor, target_space: bool = False) -> torch.Tensor:
        """The predicted image ``(B, in_chans, H, W)`` in the input's normalised space.

        With the normalised target the prediction is mapped back with the local mean and std of ``images``
        themselves (the inverse of :func:`local_normalize`). Those statistics include the masked pixels, so this is
        for looking at, not for measuring. ``target_space=True`` returns the raw decoder output instead.
        """
        pred = self.predict(images, mask)
        return pred if target_space else self.to_input_space(images, pred)

    def to_input_space(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """A decoder output of :meth:`predict` for ``images`` mapped back to their normalised input space."""
        if self.norm_target_patch_size is None:
            return pred
        mean, std = local_stats(images, self.norm_target_patch_size)
        return (pred * std + mean).to(images.dtype)

    def masked_error(self, images: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``|target - pred| * M`` per pixel and the pixel mask M, in float32 (what the loss sums, sec. 3.3)."""
        pred = pred.float()  # the sums over millions of pixels need float32
        weight = pixel_mask(mask, self.patch_size).to(pred.dtype)
        return torch.abs(self.target(images).float() - pred) * weight, weight

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar loss: ``sum(|target - pred| * M) / (sum(M) + 1e-5) / in_chans``, M the pixel mask (sec. 3.3).

        Pass float32 ``images`` whatever the model's dtype: the target is built from them as given (a bf16 target
        would round every pixel to 2^-9 relative before the loss sees it); the encoder gets its own cast.
        """
        error, weight = self.masked_error(images, mask, self.predict(images, mask))
        return error.sum() / (weight.sum() + LOSS_EPS) / self.in_chans

    def extra_repr(self) -> str:
        return f"stride={self.stride}, in_chans={self.in_chans}, norm_target_patch_size={self.norm_target_patch_size}"
