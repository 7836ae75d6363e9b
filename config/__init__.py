from config.settings import MODEL_ID, Settings

__all__ = ["MODEL_ID", "Settings"]
