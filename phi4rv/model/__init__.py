from phi4rv.model.decoder import Decoder, KVCache
from phi4rv.model.vision import VisionEncoder
from phi4rv.model.vlm import IGNORE_INDEX, IMAGE_TOKEN_ID, Phi4RV, expand_image_tokens

__all__ = ["Decoder", "KVCache", "VisionEncoder", "Phi4RV", "IMAGE_TOKEN_ID", "IGNORE_INDEX", "expand_image_tokens"]
