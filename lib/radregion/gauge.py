"""The gauge augmentation: paste the things radiographers put on films (rulers, lead side markers "L"/"R",
calibration spheres, text stamps) at random places on images of every class, so that a model cannot use them
as shortcuts to the region."""

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from PIL import Image, ImageDraw, ImageFont

_FONT = ImageFont.load_default()
_STAMP_WORDS = ("AP", "PA", "LAT", "OBL", "SUPINE", "ERECT", "PORTABLE", "WB", "FLEX", "EXT", "INSP", "EXP")


def _text_mask(text: str, height: int) -> np.ndarray:
    """Text rendered with PIL's built-in font, scaled to `height` pixels: float32 alpha in [0, 1]."""
    left, top, right, bottom = _FONT.getbbox(text)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, fill=255, font=_FONT)
    width = max(1, round(canvas.width * height / canvas.height))
    return np.asarray(canvas.resize((width, max(1, height)), Image.BILINEAR), dtype=np.float32) / 255


class GaugeAugment(Randomizable, Transform):
    """With probability `prob`, paste 1..`max_items` gauges on a (H, W) or (1, H, W) image in [0, 1].

    Each gauge has a random kind, place, size, orientation and brightness (mostly bright, as lead and metal are
    on a radiograph; text sometimes dark, as burnt-in annotations are on bright areas). Output stays in [0, 1].
    """

    KINDS = ("ruler", "marker", "sphere", "stamp")

    def __init__(self, prob: float = 0.5, max_items: int = 3):
        self.prob = prob
        self.max_items = max_items

    def randomize(self, data=None) -> None:
        pass  # each call draws as it goes, from self.R only

    def __call__(self, image):
        is_tensor = isinstance(image, torch.Tensor)
        array = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
        out = array.astype(np.float32, copy=True)
        if self.R.rand() < self.prob:
            plane = out.reshape(out.shape[-2:])
            for _ in range(self.R.randint(1, self.max_items + 1)):
                kind = self.KINDS[self.R.randint(len(self.KINDS))]
                self._paste(plane, getattr(self, f"_{kind}")(min(plane.shape)), metal=kind in ("ruler", "sphere"))
            np.clip(out, 0.0, 1.0, out=out)
        return torch.as_tensor(out) if is_tensor else out

    def _paste(self, plane: np.ndarray, alpha: np.ndarray, metal: bool) -> None:
        if self.R.rand() < 0.3:
            alpha = np.rot90(alpha, self.R.choice([1, 3]))
        h, w = plane.shape
        ah, aw = min(alpha.shape[0], h), min(alpha.shape[1], w)
        alpha = alpha[:ah, :aw]
        top, left = self.R.randint(0, h - ah + 1), self.R.randint(0, w - aw + 1)
        value = self.R.uniform(0.85, 1.0) if metal or self.R.rand() < 0.8 else self.R.uniform(0.0, 0.15)
        strength = self.R.uniform(0.7, 1.0)
        region = plane[top : top + ah, left : left + aw]
        if not metal and abs(value - float(region.mean())) < 0.3:  # burnt-in text is drawn to be seen
            value = 1.0 - value
        region += strength * alpha * (value - region)

    def _ruler(self, side: int) -> np.ndarray:
        length = max(8, int(side * self.R.uniform(0.25, 0.8)))
        height = max(4, int(side * self.R.uniform(0.03, 0.07)))
        spacing = max(2, int(side * self.R.uniform(0.012, 0.04)))
        mask = np.zeros((height, length), np.float32)
        mask[:, :1] = mask[:, -1:] = 1
        mask[-max(1, height // 8) :, :] = 1  # the ruler's edge
        for i, x in enumerate(range(0, length, spacing)):
            tick = height if i % 10 == 0 else (height * 2) // 3 if i % 5 == 0 else height // 3
            mask[height - tick :, x : x + max(1, spacing // 4)] = 1
        return mask

    def _marker(self, side: int) -> np.ndarray:
        height = max(6, int(side * self.R.uniform(0.04, 0.1)))
        letter = _text_mask("LR"[self.R.randint(2)], height)
        pad = max(1, height // 5)
        mask = np.zeros((letter.shape[0] + 2 * pad, letter.shape[1] + 2 * pad), np.float32)
        mask[pad : pad + letter.shape[0], pad : pad + letter.shape[1]] = letter
        if self.R.rand() < 0.5:  # a lead marker in its plastic frame: the letter cut out of a bright square
            mask = 1 - mask
        return mask

    def _sphere(self, side: int) -> np.ndarray:
        radius = max(2.0, side * self.R.uniform(0.015, 0.06))
        size = int(2 * radius + 3)
        y, x = np.mgrid[:size, :size] - (size - 1) / 2
        r = np.sqrt(x**2 + y**2) / radius
        # a metal ball: brightest at the centre, soft edge
        return np.clip(np.sqrt(np.clip(1 - r**2, 0, 1)) * 1.5, 0, 1).astype(np.float32)

    def _stamp(self, side: int) -> np.ndarray:
        choice = self.R.randint(3)
        if choice == 0:
            text = f"{self.R.randint(1, 29):02d}/{self.R.randint(1, 13):02d}/{self.R.randint(1990, 2030)}"
        elif choice == 1:
            text = "".join(chr(65 + c) for c in self.R.randint(0, 26, size=self.R.randint(2, 4)))
        else:
            text = _STAMP_WORDS[self.R.randint(len(_STAMP_WORDS))]
        return _text_mask(text, max(5, int(side * self.R.uniform(0.025, 0.06))))
