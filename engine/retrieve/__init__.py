"""Stage 6: answering requests: recommendations, search, similar items."""
