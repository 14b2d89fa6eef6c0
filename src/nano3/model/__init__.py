"""The model: presets (Bridge field names), parameter and FLOP counts, and its Hugging Face NemotronH config.
Used by train, export and eval; imports neither."""
