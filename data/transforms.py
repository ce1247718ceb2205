"""BLIP and BLIP-2 image transforms (CLIP normalisation statistics)."""

from torchvision import transforms
from torchvision.transforms import InterpolationMode

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class BlipRandAugment(transforms.RandAugment):
    """torchvision's RandAugment restricted to BLIP's operations (identity, autocontrast, brightness, sharpness,
    equalize, shear, translate, rotate); magnitude 5 of 10 bins matches BLIP's level 5 of 10."""

    OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
           "TranslateY", "Rotate")

    def __init__(self, num_ops=2, magnitude=5):
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11,
                         interpolation=InterpolationMode.BICUBIC)

    def _augmentation_space(self, num_bins, image_size):
        space = super()._augmentation_space(num_bins, image_size)
        return {op: space[op] for op in self.OPS}


def train_transform(image_size, crop_scale=(0.5, 1.0), randaugment=True, hflip=True):
    """RandomResizedCrop (bicubic) -> [horizontal flip] -> [BLIP RandAugment] -> tensor -> normalise.

    BLIP-2's train transform is this with `randaugment=False`. `hflip=False` is for captions that name left and
    right (the synthetic demo data), which a flip would make false.
    """
    steps = [transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if randaugment:
        steps.append(BlipRandAugment())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def eval_transform(image_size):
    """Bicubic resize to (S, S), no crop (the aspect ratio is not kept) -> tensor -> normalise."""
    return transforms.Compose([transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
