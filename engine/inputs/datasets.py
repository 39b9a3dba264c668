"""MVTec-AD layout and plain image folders: list the files, never read them.

MVTec layout: ROOT/<category>/train/good, ROOT/<category>/test/<defect>,
ROOT/<category>/ground_truth/<defect>/<stem>_mask.png. "good" is the normal class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".jp2"}
)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder` (recursive), sorted for a stable order."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))


@dataclass(frozen=True)
class TestItem:
    path: Path
    defect: str  # "good" for normal images
    mask: Path | None  # None for good images (all-normal mask)

    @property
    def label(self) -> int:
        return 0 if self.defect == "good" else 1


def category_root(root: Path, category: str | None) -> Path:
    """ROOT/<category> for an MVTec root, or ROOT itself when it already is a category folder."""
    root = Path(root)
    if category:
        cat = root / category
        if not cat.is_dir():
            found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
            raise DataError(f"no category {category!r} under {root}; categories found: {found or 'none'}")
        return cat
    if (root / "train").is_dir() or (root / "test").is_dir():
        return root
    cats = sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
    if len(cats) == 1:
        return root / cats[0]
    raise DataError(
        f"{root} is not an MVTec category folder (no train/ or test/); "
        f"pass --category, one of: {cats or 'none found'}"
    )


def is_mvtec_root(root: Path, category: str | None) -> bool:
    try:
        return (category_root(root, category) / "train" / "good").is_dir()
    except DataError:
        return False


def train_images(root: Path, category: str | None) -> list[Path]:
    """Normal training images: CATEGORY/train/good for an MVTec root, else every image below root."""
    root = Path(root)
    if is_mvtec_root(root, category):
        images = list_images(category_root(root, category) / "train" / "good")
    else:
        images = list_images(root)
    if not images:
        raise DataError(f"no images found under {root}")
    return images


def test_items(root: Path, category: str | None) -> list[TestItem]:
    """The MVTec test split: every test image with its defect type and mask path."""
    cat = category_root(Path(root), category)
    test_dir = cat / "test"
    if not test_dir.is_dir():
        raise DataError(f"{cat} has no test/ folder (expected an MVTec-layout category)")
    items: list[TestItem] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for img in list_images(defect_dir):
            mask = None
            if defect != "good":
                mask = cat / "ground_truth" / defect / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"missing mask for {img}: expected {mask}")
            items.append(TestItem(img, defect, mask))
    if not items:
        raise DataError(f"no test images under {test_dir}")
    return items
