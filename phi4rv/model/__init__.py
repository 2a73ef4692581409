from phi4rv.model.decoder import Decoder, KVCache
from phi4rv.model.vision import VisionEncoder
from phi4rv.model.vlm import Phi4RV

__all__ = ["Decoder", "KVCache", "VisionEncoder", "Phi4RV"]
