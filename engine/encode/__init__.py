"""Stage 3: the cached encoding pipeline (item -> per-modality vectors)."""
