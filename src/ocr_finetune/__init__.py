"""ocr-finetune: adapt DeepSeek-OCR-family models to your own documents."""

__version__ = "0.1.0"
