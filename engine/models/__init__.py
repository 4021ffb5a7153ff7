from engine.models.decoder import ARCHITECTURES, build_model

__all__ = ["ARCHITECTURES", "build_model"]
