"""Data shipped for the built-in demo: instructions, pretraining corpus, tokenizer, base model."""
