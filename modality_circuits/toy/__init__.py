"""The toy MLLM: a tiny LLaVA trained here on synthetic modality-conflict data (model, training, evaluation)."""
