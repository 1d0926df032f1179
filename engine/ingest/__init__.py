"""Stage 2: reading input files, validating them and writing to the store; data-quality checks."""
