"""ScreenSpot-v2 (desktop / mobile / web × text / icon GUI grounding).

Layout (OS-Copilot release): `screenspot_v2/screenspot_{desktop,mobile,web}_v2.json`, rows with
`img_filename`, `bbox` (**pixels [x, y, width, height]** of the original image), `instruction`,
`data_type` (`text` | `icon`), `data_source`; images in `screenspotv2_image/` (or `images/`, or
next to the JSON files).

Coordinate convention — explicit, never guessed: by default the model answers as the release's
grounding contract says, `[x1, y1, x2, y2]` in fractions 0–1 of the image width/height, and the
prompt asks for exactly that. `coords="thousand"` (0–1000) or `coords="pixel"` (pixels of the
original image) change both the prompt and the reading. A point `[x, y]` is accepted too.

Score: the click point (the centre of the predicted box, or the point), mapped to the original
image's pixels, falls inside the target box, edges included. Reported per platform × type, the
sample-weighted mean (`sample_mean`) and the plain mean of the three platforms (`platform_mean`).
`rules="official"` (default), the ScreenSpot evaluation (SeeClick / OS-Copilot): any box gives its
centre (corners in either order), a point off the image misses, and `accuracy` is the macro
average over the 6 platform × type columns (the table published papers print; the paper's 88.2
fits it as well as the sample mean). `rules="lenient"`: numbers outside the convention's range
or an inverted box are unparsed, and `accuracy` is the sample mean.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi4rv.eval.extract import COORDS, extract_click
from phi4rv.eval.scoring import UNPARSED, Scored
from phi4rv.eval.tasks.base import EvalError, EvalSample, Task, image_size, user, with_image
from phi4rv.processing.answers import point_in_box

PLATFORMS = ("desktop", "mobile", "web")
IMAGE_FOLDERS = ("screenspotv2_image", "images", ".")

ASK = {
    "fraction": "Output its bounding box as [x1, y1, x2, y2], each coordinate a fraction of the image width or "
    "height between 0.0000 and 1.0000.",
    "thousand": "Output its bounding box as [x1, y1, x2, y2], each coordinate an integer from 0 to 1000 relative "
    "to the image width or height.",
    "pixel": "Output its bounding box as [x1, y1, x2, y2] in pixel coordinates of the {w}x{h} image.",
}


class ScreenSpotV2(Task):
    name = "screenspot_v2"
    version = "2"
    folders = ("screenspot_v2", "ScreenSpot-v2", "screenspot-v2")
    max_new_tokens = 4096
    layout = "screenspot_v2/screenspot_{desktop,mobile,web}_v2.json (+ screenspotv2_image/): img_filename, bbox (px xywh), instruction, data_type"

    def __init__(self, coords: str = "fraction", rules: str = "official"):
        super().__init__(rules)
        if coords not in COORDS:
            raise EvalError(f"coords must be one of {', '.join(COORDS)}, got {coords!r}")
        self.coords = coords

    def options(self) -> dict:
        return {"coords": self.coords, **super().options()}

    def load(self, path: Path) -> list[EvalSample]:
        files = [(p, path / f"screenspot_{p}_v2.json") for p in PLATFORMS if (path / f"screenspot_{p}_v2.json").is_file()]
        if not files:
            raise EvalError(f"no screenspot_{{desktop,mobile,web}}_v2.json under {path}")
        samples = []
        for platform, file in files:
            for i, row in enumerate(json.loads(file.read_text())):
                image = self._image(path, row["img_filename"])
                w, h = image_size(image)
                ask = ASK[self.coords].format(w=w, h=h)
                text = f"Locate the element on this screen that matches the description: {row['instruction']}\n{ask}"
                samples.append(
                    EvalSample(
                        id=f"{platform}-{i}",
                        messages=user(with_image(text)),
                        images=[image],
                        target=[float(v) for v in row["bbox"]],
                        groups={"platform": platform, "type": row["data_type"], "platform_type": f"{platform}/{row['data_type']}"},
                        info={"width": w, "height": h},
                    )
                )
        return samples

    @staticmethod
    def _image(root: Path, name: str) -> str:
        for folder in IMAGE_FOLDERS:
            p = root / folder / name
            if p.is_file():
                return str(p)
        raise EvalError(f"ScreenSpot image {name} not found in {root}/{{{','.join(IMAGE_FOLDERS)}}}")

    def score(self, sample: EvalSample, answer: str) -> Scored:
        point = extract_click(answer, sample.info["width"], sample.info["height"], self.coords,
                              strict=self.rules == "lenient")
        if point is None:
            return UNPARSED
        x, y, w, h = sample.target  # the target box in pixels, [x, y, w, h]
        return Scored(float(point_in_box(point, (x, y, x + w, y + h))), True, [round(point[0], 2), round(point[1], 2)])

    def metrics(self, rows: list[dict]) -> dict[str, float]:
        out = super().metrics(rows)
        out["sample_mean"] = out["accuracy"]
        per = [out[f"platform/{p}"] for p in PLATFORMS if f"platform/{p}" in out]
        out["platform_mean"] = sum(per) / len(per) if per else float("nan")
        cols = [out[f"platform_type/{p}/{t}"] for p in PLATFORMS for t in ("text", "icon")
                if f"platform_type/{p}/{t}" in out]
        out["column_mean"] = sum(cols) / len(cols) if cols else float("nan")
        if self.rules == "official":
            out["accuracy"] = out["column_mean"]
        return out
